"""Files to token files and back: `encode_files` and `decode_files`, the work behind `vqtok encode / decode`.

Both mirror the input tree under the output folder, batch files of equal shape, skip and report a bad file and
go on, and write every output atomically. Images are padded (edge-replicated) to a multiple of the model's
downsampling factor; the original size goes into the token file and decode crops back to it. Audio is read,
resampled to the model's rate, encoded, decoded and written in chunks (vqtok.audiostream), so a file of any
length fits in memory; its token header keeps the original rate, length and channel count, and decode
writes a WAV at that rate and exact length.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from vqtok.data import io as data
from vqtok.jobs.audiostream import CHUNK_SECONDS, decoded_signal, encode_signal, model_signal, resampled_length, write_signal
from vqtok.device import pick_device
from vqtok.errors import TokenFileError, VqtokError
from vqtok.modelfile import load
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens.shards import DESCRIPTOR_SUFFIX, ShardWriter
from vqtok.tokens.tokfile import MAGIC, Tokens, read_tokens, write_tokens

TOKEN_SUFFIX = ".vqt"
SHARD_NAME = "shard"

# Called once per input file with (path, outcome) where outcome is "written", "exists" or "failed".
FileCallback = Callable[[Path, str], None]


@dataclass
class RunReport:
    """What an encode or decode run did, file by file."""

    written: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "written": len(self.written),
            "skipped_existing": len(self.existing),
            "failed": [{"file": f, "error": e} for f, e in self.failed],
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bits_per_token": 8.0 * self.bytes / self.tokens if self.tokens else 0.0,
            "seconds": self.seconds,
        }


def code_table(model: Tokenizer) -> np.ndarray:
    """(S, K) int64 code frequencies seen in training, each at least 1 so every code stays encodable."""
    return np.maximum(model.quantizer.code_counts().cpu().numpy().astype(np.int64), 1)


def load_for_inputs(model_path: Path, inputs: Sequence[Path], device: torch.device,
                    stages: int | None = None) -> tuple[Tokenizer, str, list[Path]]:
    """Load the model and find the input files, checking they suit each other: same modality, and
    `stages` (when given) within the model's residual stages."""
    model = load(model_path, device)
    modality, paths = data.find_inputs(list(inputs))
    if modality != model.config.modality:
        raise VqtokError(f"{model_path} is an {model.config.modality} model but the inputs are {modality} files")
    if stages is not None and not 1 <= stages <= model.config.quantizer.stages:
        raise VqtokError(f"--stages must be between 1 and {model.config.quantizer.stages} for {model_path}")
    return model, modality, paths


def encode_files(
    model_path: Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    force: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    codec: str = "packed",
    stages: int | None = None,
    shard: bool = False,
    channels: str = "mono",
    chunk_seconds: float | None = None,
    on_file: FileCallback | None = None,
) -> RunReport:
    """Encode every image or audio file under `inputs` into `out/<relative path>.vqt` (e.g. a/b.jpg ->
    out/a/b.jpg.vqt).

    `stages`: keep only the first N residual stages (a lower bitrate). Audio: `channels` "mono" mixes the
    channels (codes (S, frames)), "keep" tokenizes each (codes (S, C, frames)); files are encoded in chunks of
    `chunk_seconds` (default 30) with enough overlap that the codes match a whole-file encode. With `shard`,
    all items go into one memory-mappable token shard `out/shard.*` instead (see vqtok.tokens.shards), in input
    order; items keep their relative name and header fields as metadata.
    """
    begin = time.perf_counter()
    dev = pick_device(device)
    model, modality, paths = load_for_inputs(model_path, inputs, dev, stages)
    if channels not in ("mono", "keep"):
        raise VqtokError(f"--channels must be mono or keep, got {channels!r}")
    if chunk_seconds is not None and chunk_seconds <= 0:
        raise VqtokError(f"--chunk-seconds must be > 0, got {chunk_seconds}")
    report = RunReport()
    notify = on_file or (lambda _p, _o: None)
    fingerprint = model.fingerprint()
    table = code_table(model)[: stages or None] if codec == "entropy" else None

    codebook_size = model.config.quantizer.codebook_size
    shard_writer = None
    if shard:
        if (out / f"{SHARD_NAME}{DESCRIPTOR_SUFFIX}").exists() and not force:
            raise VqtokError(f"{out} already holds a token shard; pass --force to rewrite it")
        shard_writer = ShardWriter(out, SHARD_NAME, codebook_size=codebook_size, fingerprint=fingerprint)

    def write(path: Path, target: Path, codes: torch.Tensor, header: dict) -> None:
        header = {"fingerprint": fingerprint, "modality": modality, **header}
        array = codes.cpu().numpy()
        if shard_writer is not None:
            shard_writer.add(header["source"], array, header)
        else:
            report.bytes += write_tokens(target, array, header, codebook_size=codebook_size, codec=codec, table=table)
            report.written.append(str(target))
        report.tokens += codes.numel()
        notify(path, "written")

    todo: list[tuple[Path, Path, str]] = []
    for path in paths:
        rel = data.relative_name(path, inputs)
        target = out / rel.with_name(rel.name + TOKEN_SUFFIX)
        if target.exists() and not force and not shard:
            report.existing.append(str(target))
            notify(path, "exists")
        else:
            todo.append((path, target, rel.as_posix()))

    def failed(path: Path, reason: str) -> None:
        report.failed.append((str(path), reason))
        notify(path, "failed")

    if modality == "audio":
        for path, target, source in todo:
            try:
                codes, header = encode_audio(model, path, stages, channels == "mono",
                                             chunk_seconds or CHUNK_SECONDS)
            except VqtokError as err:
                failed(path, str(err))
                continue
            write(path, target, codes, {**header, "source": source})
    where = {path: (target, source) for path, target, source in todo if modality == "image"}
    for items, batch in image_batches(list(where), model.hop, batch_size, failed):
        codes = model.encode(batch.to(dev).float().div_(255.0), stages)
        for (path, size), c in zip(items, codes):
            target, source = where[path]
            write(path, target, c, {"original_size": list(size), "source": source})
    if shard_writer is not None:
        if not report.tokens:
            shard_writer.abort()
            raise VqtokError(f"nothing to write to the shard in {out}: no input could be encoded")
        descriptor = shard_writer.close()
        report.written.append(str(descriptor))
        report.bytes = sum(p.stat().st_size for p in out.glob(f"{SHARD_NAME}.*"))
    report.seconds = time.perf_counter() - begin
    return report


def encode_audio(model: Tokenizer, path: Path, stages: int | None, mono: bool,
                 chunk_seconds: float = CHUNK_SECONDS) -> tuple[torch.Tensor, dict]:
    """Codes of one audio file, (S, frames) mono or (S, C, frames), and the header fields decode needs:
    sample_rate (the model's), original_sample_rate, original_length (samples at the original rate),
    channels (in the file), channel_mode ("mono": mixed down, "keep": one code row per channel)."""
    rate = model.config.sample_rate
    source, signal = model_signal(path, rate, mono)
    with source:
        codes = encode_signal(model, signal, stages, chunk_seconds)
    header = {"sample_rate": rate, "original_sample_rate": source.rate, "original_length": source.length,
              "channels": source.file_channels, "channel_mode": "mono" if mono else "keep"}
    return codes, header


def image_batches(
    paths: Sequence[Path], multiple: int, batch_size: int, on_error: Callable[[Path, str], None]
) -> Iterator[tuple[list[tuple[Path, tuple[int, int]]], torch.Tensor]]:
    """Decode images and yield batches of equal padded shape: ([(path, original (h, w))], uint8 (B, 3, H, W)).

    Images are padded to multiples of `multiple`; a file that cannot be read goes to `on_error(path, message)`.
    Batches of one shape are yielded as soon as they are full, the rest at the end, so memory holds at most
    one partial batch per distinct shape.
    """
    pending: dict[tuple[int, ...], list[tuple[Path, tuple[int, int], torch.Tensor]]] = {}

    def take(shape: tuple[int, ...]):
        items = pending.pop(shape)
        return [(p, s) for p, s, _ in items], torch.stack([x for _, _, x in items])

    for path in paths:
        try:
            image = data.load_image(path)
        except VqtokError as err:
            on_error(path, str(err))
            continue
        padded, size = data.pad_to_multiple(image, multiple)
        shape = tuple(padded.shape)
        pending.setdefault(shape, []).append((path, size, padded))
        if len(pending[shape]) >= batch_size:
            yield take(shape)
    for shape in list(pending):
        yield take(shape)


def find_token_files(inputs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(token file, root it was found under) for every .vqt file named or found recursively, sorted."""
    found: list[tuple[Path, Path]] = []
    for root in inputs:
        root = Path(root)
        if root.is_file():
            found.append((root, root.parent))
        elif root.is_dir():
            found.extend((p, root) for p in sorted(root.rglob(f"*{TOKEN_SUFFIX}")) if not p.name.startswith("."))
        else:
            raise VqtokError(f"{root}: no such file or folder")
    if not found:
        raise VqtokError(f"no {TOKEN_SUFFIX} token files in {', '.join(str(p) for p in inputs)}")
    return found


def decoded_name(token_path: Path, root: Path, modality: str) -> Path:
    """tokens/a/b.jpg.vqt -> a/b.png (images) or a/b.wav (audio)."""
    rel = token_path.relative_to(root) if token_path.is_relative_to(root) else Path(token_path.name)
    stem = rel.name[: -len(TOKEN_SUFFIX)] if rel.name.endswith(TOKEN_SUFFIX) else rel.name
    return rel.with_name(Path(stem).with_suffix(".png" if modality == "image" else ".wav").name)


def decode_files(
    model_path: Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    force: bool = False,
    device: str = "auto",
    on_file: FileCallback | None = None,
) -> RunReport:
    """Decode every token file under `inputs` to a PNG at its original size, or a 16-bit WAV at its original
    sample rate and length, mirroring the tree under `out`. Token files written by another model (different
    fingerprint) are refused and reported."""
    begin = time.perf_counter()
    dev = pick_device(device)
    model = load(model_path, dev)
    fingerprint = model.fingerprint()
    table = code_table(model)
    report = RunReport()
    notify = on_file or (lambda _p, _o: None)
    for token_path, root in find_token_files(inputs):
        target = out / decoded_name(token_path, root, model.config.modality)
        if target.exists() and not force:
            report.existing.append(str(target))
            notify(token_path, "exists")
            continue
        try:
            tokens = read_tokens_for_model(token_path, table)
            if tokens.header.get("fingerprint") != fingerprint:
                raise VqtokError(f"{token_path}: written by model {tokens.header.get('fingerprint')}, "
                                 f"not by {model_path} ({fingerprint})")
            codes = torch.from_numpy(tokens.codes.astype(np.int64))
            if model.config.modality == "audio":
                decode_audio(model, codes, tokens.header, target, token_path)
            else:
                image = model.decode(codes.unsqueeze(0).to(dev))[0]
                h, w = tokens.header["original_size"]
                data.save_image(target, image[:, :h, :w].cpu())
        except (TokenFileError, VqtokError) as err:
            report.failed.append((str(token_path), str(err)))
            notify(token_path, "failed")
            continue
        report.tokens += tokens.codes.size
        report.bytes += token_path.stat().st_size
        report.written.append(str(target))
        notify(token_path, "written")
    report.seconds = time.perf_counter() - begin
    return report


def decode_audio(model: Tokenizer, codes: torch.Tensor, header: dict, target: Path, token_path: Path) -> None:
    """Write the WAV of audio codes (S, frames) or (S, C, frames) at the header's original rate and length."""
    try:
        rate, length = int(header["original_sample_rate"]), int(header["original_length"])
    except (KeyError, TypeError, ValueError):
        raise VqtokError(f"{token_path}: not an audio token file (no original_sample_rate / original_length)") from None
    if rate <= 0 or length < 0:
        raise VqtokError(f"{token_path}: bad original rate {rate} or length {length}")
    frames, needed = codes.shape[-1], -(-resampled_length(length, rate, model.config.sample_rate) // model.hop)
    if frames != needed:
        raise VqtokError(f"{token_path}: {frames} code frames, but {length} samples at {rate} Hz need {needed}")
    write_signal(target, decoded_signal(model, codes, length, rate))


def read_tokens_for_model(path: Path, table: np.ndarray | None) -> Tokens:
    """read_tokens with the model's code table cut to the file's stage count (a file encoded with --stages N
    and the entropy codec was coded with the first N rows)."""
    if table is not None:
        stages = _header_stages(path)
        if stages is not None and stages <= len(table):
            table = table[:stages]
    return read_tokens(path, table=table)


def _header_stages(path: Path) -> int | None:
    """The "stages" field of a token file's JSON header, or None when it cannot be peeked at (read_tokens
    then reports the problem). Layout: magic (4), version (2), header length u32 (4), header."""
    try:
        with path.open("rb") as f:
            head = f.read(10)
            if len(head) < 10 or head[:4] != MAGIC:
                return None
            size = int.from_bytes(head[6:10], "little")
            stages = json.loads(f.read(min(size, 1 << 16))).get("stages")
    except (OSError, ValueError, AttributeError):
        return None
    return stages if isinstance(stages, int) and stages >= 1 else None
