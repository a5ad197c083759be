"""Model files: one self-describing `model.safetensors` (weights + JSON config + vqtok version in the metadata).

Nothing here unpickles: safetensors holds raw tensors and a string-to-string metadata map, so opening a model
file someone hands you cannot run code.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vqtok import __version__, zoo
from vqtok.atomic import atomic_path
from vqtok.config import ModelConfig
from vqtok.errors import VqtokError
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens.context import ContextTable

CONFIG_KEY = "vqtok.config"
VERSION_KEY = "vqtok.version"
FINGERPRINT_KEY = "vqtok.fingerprint"
# The entropy codec's context tables (vqtok.tokens.context), beside the weights when the model has them.
CONTEXT_GROUPS = "context.groups"
CONTEXT_COUNTS = "context.counts"
# The state-dict prefixes of the nets, which `save_model(half_nets=True)` stores in float16.
NETS = ("encoder.", "decoder.")


def save_model(model: Tokenizer, path: str | os.PathLike, extra: dict[str, str] | None = None, *,
               half_nets: bool = False) -> str:
    """Write `model` atomically; returns its fingerprint (also stored in the metadata).

    half_nets: store the encoder's and decoder's floating-point weights as float16, half their bytes (the
    quantizer's codebooks and statistics stay float32). The model's own weights are rounded to float16 first,
    so the model in memory, its fingerprint and the one `load` rebuilds are the same; `load` returns float32.
    """
    if half_nets:
        round_nets_to_half(model)
    fingerprint = model.fingerprint()
    metadata = {
        CONFIG_KEY: model.config.to_json(),
        VERSION_KEY: __version__,
        FINGERPRINT_KEY: fingerprint,
        **(extra or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half_nets:
        tensors.update({k: v.half() for k, v in tensors.items() if k.startswith(NETS) and v.is_floating_point()})
    if model.context_table is not None:
        # int32 on disk: a count reaching 2^31 would take 2^31 code positions of fitting data.
        tensors[CONTEXT_GROUPS] = torch.from_numpy(model.context_table.groups.astype(np.int32))
        tensors[CONTEXT_COUNTS] = torch.from_numpy(model.context_table.counts.astype(np.int32))
    blob = save(tensors, metadata=metadata)
    # safetensors writes its metadata map in no fixed order (a hash map, shuffled per call): the header is
    # written again with sorted keys, so the same model and metadata always make the same bytes. The
    # header's tensor offsets count from the end of the header, so the data that follows stays as it is.
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, padded with spaces as safetensors does
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(memoryview(blob)[8 + size:])
    return fingerprint


def round_nets_to_half(model: Tokenizer) -> None:
    """Round the encoder's and decoder's floating-point parameters and buffers to float16 values, in place
    (their dtype stays float32)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith(NETS) and tensor.is_floating_point():
                tensor.copy_(tensor.half())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata map of a model or checkpoint file, without loading tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise VqtokError(f"{path}: no such model file") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise VqtokError(f"{path}: not a safetensors model file ({_first_line(err)})") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild the `Tokenizer` stored in `path` (config from the metadata, then the weights), in eval mode.
    `path` may also name a shipped model ("mnist"; see vqtok.zoo). Weights that do not give the fingerprint
    stored beside them (flipped bytes) are refused: token files carry the fingerprint, and would otherwise
    name a model that never made them."""
    path = zoo.resolve(path)
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise VqtokError(f"{path}: not a vqtok model (no {CONFIG_KEY} in its metadata)")
    try:
        config = ModelConfig.from_json(metadata[CONFIG_KEY])
    except (json.JSONDecodeError, TypeError, VqtokError) as err:
        raise VqtokError(f"{path}: unreadable model config ({_first_line(err)})") from None
    model = Tokenizer(config)
    try:
        state = load_file(str(path))
        groups, counts = state.pop(CONTEXT_GROUPS, None), state.pop(CONTEXT_COUNTS, None)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as err:
        raise VqtokError(f"{path}: weights do not match the stored config ({_first_line(err)})") from None
    # Files without one (written by hand, with safetensors alone) have nothing to check against.
    if FINGERPRINT_KEY in metadata and model.fingerprint() != metadata[FINGERPRINT_KEY]:
        raise VqtokError(f"{path} is corrupt: its weights do not match its fingerprint")
    if groups is not None and counts is not None:
        try:
            model.context_table = ContextTable(model.code_frequencies(), groups.numpy().astype(np.int64),
                                               counts.numpy().astype(np.int64))
        except ValueError as err:
            raise VqtokError(f"{path}: bad context tables ({err})") from None
    return model.to(device).eval()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
