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
# The entropy codec's context tables (vqtok.tokens.context), beside the weights when the model has them. The
# (S, G + 1, K) counts are stored as their nonzero entries: flat indices and values, with the shape. Fitting
# data fills few of the cells when K is large (16,384 codes: 8.5 M cells, 34 MB dense, against at most one
# entry per fitted code). Files written before keep one dense tensor, which `load` still reads.
CONTEXT_GROUPS = "context.groups"
CONTEXT_COUNTS = "context.counts"
CONTEXT_SHAPE = "context.counts_shape"
CONTEXT_INDEX = "context.counts_index"
CONTEXT_VALUE = "context.counts_value"
CONTEXT_KEYS = (CONTEXT_GROUPS, CONTEXT_SHAPE, CONTEXT_INDEX, CONTEXT_VALUE)
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
        tensors.update(_context_tensors(model.context_table))
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
        context = {k: state.pop(k) for k in (*CONTEXT_KEYS, CONTEXT_COUNTS) if k in state}
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as err:
        raise VqtokError(f"{path}: weights do not match the stored config ({_first_line(err)})") from None
    # Files without one (written by hand, with safetensors alone) have nothing to check against.
    if FINGERPRINT_KEY in metadata and model.fingerprint() != metadata[FINGERPRINT_KEY]:
        raise VqtokError(f"{path} is corrupt: its weights do not match its fingerprint")
    if CONTEXT_GROUPS in context:
        try:
            groups = context[CONTEXT_GROUPS].numpy().astype(np.int64)
            model.context_table = ContextTable(model.code_frequencies(), groups, _context_counts(context, groups.shape))
        except ValueError as err:
            raise VqtokError(f"{path}: bad context tables ({err})") from None
    return model.to(device).eval()


def _context_tensors(table: ContextTable) -> dict[str, torch.Tensor]:
    """The tensors that store `table` in a model file: its groups and its counts' nonzero entries (int32 values:
    a count reaching 2^31 would take 2^31 code positions of fitting data)."""
    flat = table.counts.reshape(-1)
    index = np.flatnonzero(flat)
    return {CONTEXT_GROUPS: torch.from_numpy(table.groups.astype(np.int32)),
            CONTEXT_SHAPE: torch.tensor(table.counts.shape, dtype=torch.int64),
            CONTEXT_INDEX: torch.from_numpy(index.astype(np.int64 if flat.size > 2**31 - 1 else np.int32)),
            CONTEXT_VALUE: torch.from_numpy(flat[index].astype(np.int32))}


def _context_counts(tensors: dict[str, torch.Tensor], groups_shape: tuple[int, ...]) -> np.ndarray:
    """The (S, G + 1, K) int64 counts stored in `tensors`, dense (files before the sparse form) or sparse;
    ValueError when the parts do not fit together. The stored shape is checked against the groups' (S, K)
    before anything is allocated, so a damaged shape cannot ask for terabytes."""
    if CONTEXT_COUNTS in tensors:
        return tensors[CONTEXT_COUNTS].numpy().astype(np.int64)
    if not all(k in tensors for k in (CONTEXT_SHAPE, CONTEXT_INDEX, CONTEXT_VALUE)):
        raise ValueError("context counts missing")
    shape = tuple(int(n) for n in tensors[CONTEXT_SHAPE].tolist())
    index, value = tensors[CONTEXT_INDEX].numpy().astype(np.int64), tensors[CONTEXT_VALUE].numpy()
    if (len(shape) != 3 or (shape[0], shape[2]) != tuple(groups_shape) or not 2 <= shape[1] <= shape[2] + 1
            or index.shape != value.shape or index.ndim != 1):
        raise ValueError(f"context counts of shape {shape} with {index.shape} indices and {value.shape} values")
    size = int(np.prod(shape))
    if index.size and (index.min() < 0 or index.max() >= size):
        raise ValueError(f"context count indices outside the {shape} table")
    counts = np.zeros(size, dtype=np.int64)
    counts[index] = value
    return counts.reshape(shape)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
