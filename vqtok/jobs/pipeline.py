"""Files to token files and back: `encode_files` and `decode_files`, the work behind `vqtok encode / decode`.

Both mirror the input tree under the output folder, batch files of equal shape, skip and report a bad file and
go on, and write every output atomically. Encoding decodes images in worker processes (vqtok.data.readers)
while the model runs, writes on a background thread, and can take one part of the files (vqtok.jobs.encoding).
Images are padded (edge-replicated) to a multiple of the model's downsampling factor; the original size goes
into the token file and decode crops back to it. Audio is read, resampled to the model's rate, encoded, decoded
and written in chunks (vqtok.audiostream), so a file of any length fits in memory; its token header keeps the
original rate, length and channel count, and decode writes a WAV at that rate and exact length.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from vqtok.atomic import write_bytes_atomic
from vqtok.data import io as data
from vqtok.data.readers import (FORKED_WORKERS, BatchItems, ImageFiles, available_cores, batch_rows, decoded_chunks,
                                default_workers, file_batches, shape_batches, worker_jobs)
from vqtok.device import pick_device
from vqtok.jobs.audiostream import CHUNK_SECONDS, decoded_signal, encode_signal, model_signal, resampled_length, write_signal
from vqtok.jobs.refine import Refinement
from vqtok.jobs.encoding import (OrderedWriter, Part, SharedOrAlone, check_shard_split, forward_threads,
                                 one_intra_op_thread, parallel_map, process_part, rank_device, shard_name, take_part)
from vqtok.jobs.tiles import checked_image_size, decode_tiled, encode_tiled, needs_tiles
from vqtok.errors import TokenFileError, VqtokError
from vqtok.modelfile import load
from vqtok.nets.tokenizer import Tokenizer
from vqtok.postfilter import check_strength
from vqtok.tokens.shards import DESCRIPTOR_SUFFIX, ShardWriter
from vqtok.tokens.tokfile import CodeTable, Tokens, encode_with_fallback, peek_header, read_tokens

TOKEN_SUFFIX = ".vqt"

# Forward passes: images of one padded shape always go through the model in batches of the same size, at most
# *_BATCH_IMAGES images and *_BATCH_PIXELS pixels (B * H * W; an image larger than that alone), whatever
# --batch-size, so an image's codes never depend on its batch (see encode_batch). On a CPU the cost per image
# is lowest around 2^16-2^17 pixels per batch; beyond, activations fall out of the caches (default image model,
# one thread: 32x32 images cost 0.26 ms each in batches of 32, 0.235 ms in 64, 0.25 ms in 128; a 481x321 photo
# 62 ms alone, 68 ms in pairs, 79 ms in fours). Accelerators want large batches; their caps only bound memory.
CPU_BATCH_IMAGES = 64
CPU_BATCH_PIXELS = 1 << 17
DEVICE_BATCH_IMAGES = 256
DEVICE_BATCH_PIXELS = 1 << 22

# Files per job of a CPU encode in worker processes (see `encode_image_files`). Each job costs this process a
# fixed ~1 ms (the DataLoader's bookkeeping, unpickling), 4% of a job of 64 32x32 images (CIFAR-10 into a
# shard: 4,300 images/s with jobs of 64, 4,800 with 256); a job's memory does not grow with its files (it
# decodes them one by one into batches, see `EncodeJob`).
ENCODE_JOB_FILES = 256

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


def code_table(model: Tokenizer) -> CodeTable:
    """The model's code statistics for the entropy codec: its context table when it has one (`vqtok train`
    fits one, see vqtok.jobs.contexts), else its code counts (`Tokenizer.code_frequencies`)."""
    return model.context_table if model.context_table is not None else model.code_frequencies()


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
    num_workers: int | None = None,
    part: Part | None = None,
    refine: Refinement = Refinement(),
    on_file: FileCallback | None = None,
) -> RunReport:
    """Encode every image or audio file under `inputs` into `out/<relative path>.vqt` (e.g. a/b.jpg ->
    out/a/b.jpg.vqt); files whose token file exists are skipped unless `force`, but one made by another model
    or with other options (`output_settings`) is reported as failed and kept. Inputs of different roots that
    share a relative name (x.png in two folders) would share an output: the first writes it, the others are
    reported as failed.

    Images are decoded by `num_workers` processes (default: `encode_workers`; 0 decodes in this process),
    `batch_size` files at a time (on a CPU see `encode_job_files`, and encoded there too), and the model
    encodes batches of one padded shape, sized by that shape (CPU_BATCH_* / DEVICE_BATCH_*); token files are
    written on a background thread (see `encode_image_files`). The codes do not depend on
    `num_workers`, `batch_size` or `part` (see `encode_batch`). Audio files are encoded one per worker process on
    a CPU (see `encode_audio_files`). Memory follows the batch sizes and queue depths
    (vqtok.data.readers, vqtok.jobs.encoding), not the number of files.

    `stages`: keep only the first N residual stages (a lower bitrate). Audio: `channels` "mono" mixes the
    channels (codes (S, frames)), "keep" tokenizes each (codes (S, C, frames)); files are encoded in chunks of
    `chunk_seconds` (default 30) with enough overlap that the codes match a whole-file encode. `part` (I, N):
    encode only part I of N of the file list; under torchrun each process takes its share of it (see
    vqtok.jobs.encoding). With `shard`, the items go into one memory-mappable token shard instead (see
    vqtok.tokens.shards), `out/shard.*` or, for part I of N, `out/shard-0000I-of-0000N.*`, in file order;
    items keep their relative name and header fields as metadata. A complete part shard is kept (a rerun
    redoes only the parts that did not finish); a whole run's complete shard is an error unless `force`.
    A true `refine` (audio only): choose each file's codes by analysis by synthesis (vqtok.jobs.refine);
    slower, same bitrate, better sound.
    """
    begin = time.perf_counter()
    dev = rank_device(pick_device(device))
    model, modality, paths = load_for_inputs(model_path, inputs, dev, stages)
    _check_encode_options(channels, chunk_seconds, batch_size, num_workers)
    refine.check(modality, model_path)
    part = process_part(part)
    report = RunReport()
    notify = on_file or (lambda _p, _o: None)
    fields = {"fingerprint": model.fingerprint(), "modality": modality}
    sink = (_TokenShard(out, part, model.config.quantizer.codebook_size, fields["fingerprint"], report) if shard
            else _TokenFiles(out, model, codec, stages, report, model_path,
                             output_settings(model, fields["fingerprint"], codec, stages, channels, refine)))

    # A shard run names its files when it writes them, on the writer thread, so it spends nothing on names before
    # its first batch; a .vqt run names them up front too, to skip those already written.
    source = data.relative_namer(inputs)

    todo = sink.select(take_part(paths, part), source, force, notify)

    # A .vqt run claims every output name in `select`, before any worker writes; a shard run as it writes.
    results = _Results(sink, source, todo, fields, report, notify, _Claims() if shard else None)
    workers = encode_workers(dev) if num_workers is None else num_workers
    store = results.store if isinstance(sink, _TokenFiles) else None
    try:
        with OrderedWriter(results.write, results.failed) as writer:
            if modality == "audio":
                encode_audio_files(model, todo, writer, stages, channels == "mono", chunk_seconds or CHUNK_SECONDS,
                                   workers, store, refine)
            else:
                encode_image_files(model, todo, writer, stages, batch_size, workers, store)
    except BaseException:
        sink.abort()
        raise
    sink.finish()
    report.seconds = time.perf_counter() - begin
    return report


class _Results:
    """What an encode does with each file's result, by its index into `todo`: name it, write it through the sink
    (or count what a worker wrote with `store`), report it and tell `notify`."""

    def __init__(self, sink: _TokenFiles | _TokenShard, source: Callable[[Path], str], todo: list[Path],
                 fields: dict, report: RunReport, notify: FileCallback, claims: _Claims | None = None) -> None:
        self.sink, self.source, self.todo, self.fields = sink, source, todo, fields
        self.report, self.notify, self.claims = report, notify, claims

    def store(self, index: int, codes: np.ndarray, extra: dict) -> Stored | VqtokError:
        """Write one .vqt file, in a worker process (see `encode_image_files`, `encode_audio_files`); its error
        goes back as data, to be raised by `write` with its one line (a DataLoader would add the worker's
        traceback)."""
        name = self.source(self.todo[index])
        try:
            return Stored(codes.size, self.sink.store(name, codes, {**self.fields, **extra, "source": name}))
        except VqtokError as err:
            return err

    def write(self, index: int, result: np.ndarray | Stored | VqtokError, extra: dict) -> None:
        """Codes (S, *grid) to write, or what `store` wrote in a worker; with `claims`, a file whose name an
        earlier one took is reported instead."""
        name = self.source(self.todo[index])
        if isinstance(result, VqtokError):
            raise result
        if self.claims is not None and (clash := self.claims.clash(name, self.todo[index])):
            self.failed(index, clash)
            return
        if isinstance(result, Stored):
            self.sink.record(name, result.bytes)
            self.report.tokens += result.tokens
        else:
            self.sink.write(name, result, {**self.fields, **extra, "source": name})
            self.report.tokens += result.size
        self.notify(self.todo[index], "written")

    def failed(self, index: int, reason: str) -> None:
        self.report.failed.append((str(self.todo[index]), reason))
        self.notify(self.todo[index], "failed")


def output_settings(model: Tokenizer, fingerprint: str, codec: str, stages: int | None, channels: str,
                    refine: Refinement) -> dict:
    """The header fields an encode with these options gives every token file, and so those an existing one
    must hold to count as done: the model's fingerprint, the stages, the codec of a packed run (an entropy run
    writes a file packed when that is smaller, see `encode_with_fallback`) and, for audio, the channel mode
    and how the codes were chosen ("refine", "search"; None when not)."""
    fields: dict = {"fingerprint": fingerprint, "stages": stages or model.config.quantizer.stages}
    if codec == "packed":
        fields["codec"] = codec
    if model.config.modality == "audio":
        chosen = refine.header_fields()
        fields.update(channel_mode=channels, refine=chosen.get("refine"), search=chosen.get("search"))
    return fields


class _Claims:
    """The outputs of one run and the input each belongs to: two inputs with one output (x.png in two input
    folders; a.png and a.jpg decoded) would overwrite each other, or share a name in a shard. The first one
    (in file order) keeps it."""

    def __init__(self) -> None:
        self.owners: dict[str, Path] = {}

    def clash(self, output: str, path: Path) -> str | None:
        """None when `output` is `path`'s, else why `path` is not written, in one line."""
        owner = self.owners.setdefault(output, path)
        return None if owner == path else f"{path}: not written: its output {output} is {owner}'s"


def _check_encode_options(channels: str, chunk_seconds: float | None, batch_size: int,
                          num_workers: int | None) -> None:
    if channels not in ("mono", "keep"):
        raise VqtokError(f"--channels must be mono or keep, got {channels!r}")
    if chunk_seconds is not None and chunk_seconds <= 0:
        raise VqtokError(f"--chunk-seconds must be > 0, got {chunk_seconds}")
    if batch_size < 1:
        raise VqtokError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise VqtokError(f"--num-workers must be >= 0, got {num_workers}")


class _TokenFiles:
    """Where a .vqt run writes: one token file per input, out/<relative name>.vqt."""

    def __init__(self, out: Path, model: Tokenizer, codec: str, stages: int | None, report: RunReport,
                 model_path: Path, settings: dict) -> None:
        self.out, self.codec, self.report = out, codec, report
        self.model_path, self.settings = model_path, settings
        self.codebook_size = model.config.quantizer.codebook_size
        self.table = code_table(model)[: stages or None] if codec == "entropy" else None

    def target(self, source: str) -> str:
        """out/<relative name>.vqt, for an input's relative name in posix form (a string: pathlib would cost
        more than the rest of a small file's writing)."""
        return os.path.join(self.out, f"{source}{TOKEN_SUFFIX}")

    def select(self, paths: list[Path], source: Callable[[Path], str], force: bool,
               notify: FileCallback) -> list[Path]:
        """The inputs still to encode: all with `force`, else those without a token file from this model and
        these `settings`. An input whose token file another input in the list has is reported as failed, as is
        one whose token file is from another model or other settings (unless `force`). `source`: an input's
        relative name."""
        left = []
        claims = _Claims()
        for path in paths:
            target = self.target(source(path))
            problem = claims.clash(target, path)
            if problem is None and not force and os.path.exists(target):
                problem = self._other_run(target)
                if problem is None:
                    self.report.existing.append(target)
                    notify(path, "exists")
                    continue
            if problem is None:
                left.append(path)
            else:
                self.report.failed.append((str(path), problem))
                notify(path, "failed")
        return left

    def _other_run(self, target: str) -> str | None:
        """Why the token file at `target` is not this run's output (its header only is read), or None."""
        header = peek_header(target)
        if header is None:
            return f"{target}: exists but is not a readable token file; --force to overwrite"
        if header.get("fingerprint") != self.settings["fingerprint"]:
            return (f"{target}: written by model {header.get('fingerprint')}, not {self.model_path} "
                    f"({self.settings['fingerprint']}); --force to overwrite")
        for key, value in self.settings.items():
            if header.get(key) != value:
                return f"{target}: written with {key} {header.get(key)}, this run gives {value}; --force to overwrite"
        return None

    def write(self, source: str, codes: np.ndarray, header: dict) -> None:
        self.record(source, self.store(source, codes, header))

    def store(self, source: str, codes: np.ndarray, header: dict) -> int:
        """Write the token file of `source` (relative name) -> its bytes. Changes nothing but the file, so
        worker processes can call it."""
        target = self.target(source)
        # --codec entropy falls back to packed for a file it would make larger (see encode_with_fallback).
        blob = encode_with_fallback(codes, header, codebook_size=self.codebook_size, codec=self.codec,
                                    table=self.table)
        try:
            write_bytes_atomic(target, blob)
        except OSError as err:
            raise VqtokError(f"{target}: cannot write the token file ({err.strerror or err})") from None
        return len(blob)

    def record(self, source: str, size: int) -> None:
        """Count the token file of `source`, `size` bytes, written by `store`."""
        self.report.bytes += size
        self.report.written.append(self.target(source))

    def finish(self) -> None:
        """Every token file is complete once written."""

    def abort(self) -> None:
        """Token files already written are complete; a rerun skips them."""


class _TokenShard:
    """Where a --shard run writes: one shard for the whole run, or one for this process's part."""

    def __init__(self, out: Path, part: Part, codebook_size: int, fingerprint: str, report: RunReport) -> None:
        self.out, self.part, self.report, self.name = out, part, report, shard_name(part)
        self.codebook_size, self.fingerprint = codebook_size, fingerprint
        self.writer: ShardWriter | None = None

    def select(self, paths: list[Path], source: Callable[[Path], str], force: bool,
               notify: FileCallback) -> list[Path]:
        """Every input, unless the shard is complete and not `force`: then nothing for a part, an error for a
        whole run."""
        check_shard_split(self.out, self.part)
        descriptor = self.out / f"{self.name}{DESCRIPTOR_SUFFIX}"
        if descriptor.exists() and not force:
            if self.part[1] == 1:
                raise VqtokError(f"{self.out} already holds a token shard; pass --force to rewrite it")
            for path in paths:
                self.report.existing.append(str(path))
                notify(path, "exists")
            return []
        if paths:
            self.writer = ShardWriter(self.out, self.name, codebook_size=self.codebook_size,
                                      fingerprint=self.fingerprint)
        return paths

    def write(self, source: str, codes: np.ndarray, header: dict) -> None:
        self.writer.add(source, codes, header)
        self.report.written.append(source)

    def finish(self) -> None:
        """Close the shard (its descriptor is written last, so it appears only complete)."""
        if self.writer is None:
            return
        if not self.report.tokens:
            self.writer.abort()
            raise VqtokError(f"nothing to write to the shard in {self.out}: no input could be encoded")
        self.writer.close()
        self.report.bytes = sum(p.stat().st_size for p in self.out.glob(f"{self.name}.*"))

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


@torch.no_grad()
def encode_batch(model: Tokenizer, batch: torch.Tensor, stages: int | None, rows: int) -> torch.Tensor:
    """uint8 images (B, 3, H, W), B <= rows, on the model's device -> codes (B, S, H/f, W/f) int64.

    The codes of an image depend on nothing but the image and `rows`, not on the other images of the batch or
    on B: the encoder runs on exactly `rows` images (the batch padded with copies of its last image), and the
    nearest-code search on blocks of one size (`ResidualVQ.encode_blocks`). `Tokenizer.encode` on a
    batch gives the same codes except at near-ties: convolution kernels (oneDNN) and the search backends pick
    their algorithm by the tensor sizes, so a vector almost equidistant from two codes can land on either with
    another batch size (measured on CIFAR-10 with a codebook of encoder outputs plus noise: 7 to 11 codes in
    256,000 differ from those of batches of one, with batches of 5 to 128 images and 1 or 2 threads).
    """
    images = len(batch)
    padded = torch.cat([batch, batch[-1:].expand(rows - images, *batch.shape[1:])]) if images < rows else batch
    z = model.encoder(padded.float().div_(255.0))[:images]
    codes = model.quantizer.encode_blocks(z.movedim(1, -1).reshape(-1, z.shape[1]), stages)
    return codes.reshape(images, *z.shape[2:], -1).movedim(-1, 1)


def encode_images(model: Tokenizer, batch: torch.Tensor, stages: int | None, images: int,
                  pixels: int) -> torch.Tensor:
    """uint8 images of one padded shape (B, 3, H, W) -> codes (B, S, H/f, W/f): a large image in tiles (memory
    bounded by one window), smaller ones as one batch of `batch_rows(shape, images, pixels)` rows."""
    if needs_tiles(*batch.shape[-2:]):
        return torch.stack([encode_tiled(model, image, stages) for image in batch])
    dev = next(model.parameters()).device
    return encode_batch(model, batch.to(dev), stages, batch_rows(batch.shape, images, pixels))


class Stored(NamedTuple):
    """A token file written in a worker process: its tokens and bytes."""

    tokens: int
    bytes: int


# Writes one file's token file in a worker: (file index, codes (S, h, w), extra header fields) -> what it wrote.
StoreFile = Callable[[int, np.ndarray, dict], "Stored | VqtokError"]


def image_fields(size: tuple[int, int]) -> dict:
    """The header fields an image's token file adds: its original (h, w)."""
    return {"original_size": list(size)}


class EncodeJob:
    """A `worker_jobs` job for a CPU encode: decode a range of files one by one, encode them as batches of one
    padded shape fill (`file_batches`, CPU_BATCH_*), and send back, per batch, the file items with their
    codes (B, S, h, w) numpy, or with `store`, what it wrote for each file; and [(file index, reason)] for the
    files that could not be read."""

    def __init__(self, model: Tokenizer, paths: Sequence[Path], stages: int | None,
                 store: StoreFile | None = None) -> None:
        self.model, self.files, self.stages, self.store = model, ImageFiles(paths, model.hop), stages, store

    def __call__(self, indices: range) -> tuple[list[tuple[BatchItems, object]], list[tuple[int, str]]]:
        errors: list[tuple[int, str]] = []
        encoded = []
        for items, batch in file_batches((self.files[i] for i in indices), CPU_BATCH_IMAGES,
                                         lambda i, why: errors.append((i, why)), CPU_BATCH_PIXELS):
            codes = encode_images(self.model, batch, self.stages, CPU_BATCH_IMAGES, CPU_BATCH_PIXELS).numpy()
            if self.store is not None:
                codes = [self.store(i, c, image_fields(size)) for (i, size), c in zip(items, codes)]
            encoded.append((items, codes))
        return encoded, errors


def encode_image_files(model: Tokenizer, paths: Sequence[Path], writer: OrderedWriter, stages: int | None,
                       batch_size: int, workers: int, store: StoreFile | None = None) -> None:
    """Encode images, handing each batch's codes to `writer` with the file indices into `paths`.

    On a CPU with `workers` > 0 (on Linux, see FORKED_WORKERS), each worker process decodes and encodes its
    own files on one thread (`EncodeJob`, `encode_job_files` files at a time) and sends back only codes: the
    cores run the decoder and the model with no image crossing between processes and no thread of this one
    waiting for the interpreter lock. With `store` the workers write the token files too, and `writer` gets
    what they wrote. Otherwise `workers` processes (or this one) decode `batch_size` files at a time while
    this one runs the model: on a CPU on one thread per core, each encoding its own batch with
    single-threaded operations (see vqtok.jobs.encoding.one_intra_op_thread); on an accelerator one batch at
    a time.
    """
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu and workers and FORKED_WORKERS:  # EncodeJob holds the model and `store` holds closures
        job_files = encode_job_files(len(paths), batch_size, workers)
        for encoded, errors in worker_jobs(len(paths), job_files, workers, EncodeJob(model, paths, stages, store)):
            for index, reason in errors:
                writer.fail(index, reason)
            for items, results in encoded:
                writer.put([(i, image_fields(size)) for i, size in items], results)
        return

    chunks = decoded_chunks(paths, model.hop, batch_size, workers)
    images, pixels = (CPU_BATCH_IMAGES, CPU_BATCH_PIXELS) if cpu else (DEVICE_BATCH_IMAGES, DEVICE_BATCH_PIXELS)
    kernels = SharedOrAlone()

    def encode(items: BatchItems, batch: torch.Tensor) -> tuple[list[tuple[int, dict]], torch.Tensor]:
        # A tiled encode switches oneDNN off process-wide, so it runs alone.
        with kernels.alone() if needs_tiles(*batch.shape[-2:]) else kernels.shared():
            codes = encode_images(model, batch, stages, images, pixels)
        return [(i, image_fields(size)) for i, size in items], codes

    batches = shape_batches(chunks, images, writer.fail, pixels)
    with one_intra_op_thread() if cpu else contextlib.nullcontext():
        for items, codes in parallel_map(encode, batches, forward_threads(available_cores()) if cpu else 1):
            writer.put(items, codes)


def encode_workers(device: torch.device) -> int:
    """Default worker processes for an encode: on a CPU one per core, at most 16 (each encodes, see
    `encode_image_files` and `encode_audio_files`); on an accelerator `default_workers()` (images: they only
    decode)."""
    return max(1, min(16, available_cores())) if device.type == "cpu" else default_workers()


def encode_job_files(files: int, batch_size: int, workers: int) -> int:
    """Files per `EncodeJob`: `batch_size`, at least ENCODE_JOB_FILES, but no more than a quarter of each
    worker's share of the files, so the workers finish together on a short list of large photos."""
    return max(1, min(max(batch_size, ENCODE_JOB_FILES), -(-files // (4 * workers))))


def encode_audio_files(model: Tokenizer, paths: Sequence[Path], writer: OrderedWriter, stages: int | None,
                       mono: bool, chunk_seconds: float, workers: int = 0, store: StoreFile | None = None,
                       refine: Refinement = Refinement()) -> None:
    """Encode audio files (each in chunks, see `encode_audio`; codes chosen as `refine` says), handing each file's codes
    to `writer` with its index into `paths`.

    On a CPU with `workers` > 0 and more than one file (on Linux, see FORKED_WORKERS), each worker process reads,
    resamples and encodes whole files on one thread (`AudioEncodeJob`), and with `store` writes their token
    files too: a file's small 1-D convolutions keep one core busy far better than they spread over several, so
    the cores go to separate files. A single file (or `workers` 0) is encoded here, on torch's threads.
    """
    cpu = next(model.parameters()).device.type == "cpu"
    # The job holds the model and `store` closures, so it needs forked workers. In this process the writer
    # thread writes the token files, while the next file encodes.
    in_workers = cpu and workers > 0 and FORKED_WORKERS and len(paths) > 1
    job = AudioEncodeJob(model, paths, stages, mono, chunk_seconds, store if in_workers else None, refine)
    for index, header, result in worker_jobs(len(paths), 1, workers if in_workers else 0, job):
        if isinstance(result, str):
            writer.fail(index, result)
        else:
            writer.put([(index, header)], [result])


class AudioEncodeJob:
    """A `worker_jobs` job for an audio encode: one file -> (file index, header fields, codes (S, *frames)
    numpy, or with `store` what it wrote, or the reason it could not be read)."""

    def __init__(self, model: Tokenizer, paths: Sequence[Path], stages: int | None, mono: bool,
                 chunk_seconds: float, store: StoreFile | None = None, refine: Refinement = Refinement()) -> None:
        self.model, self.paths, self.stages, self.mono = model, paths, stages, mono
        self.chunk_seconds, self.store, self.refine = chunk_seconds, store, refine

    def __call__(self, indices: range) -> tuple[int, dict | None, np.ndarray | Stored | VqtokError | str]:
        (index,) = indices
        try:
            codes, header = encode_audio(self.model, self.paths[index], self.stages, self.mono, self.chunk_seconds,
                                         self.refine)
        except VqtokError as err:
            return index, None, str(err)
        codes = codes.numpy()
        return index, header, codes if self.store is None else self.store(index, codes, header)


def encode_audio(model: Tokenizer, path: Path, stages: int | None, mono: bool,
                 chunk_seconds: float = CHUNK_SECONDS, refine: Refinement = Refinement()) -> tuple[torch.Tensor, dict]:
    """Codes of one audio file, (S, frames) mono or (S, C, frames), and the header fields decode needs:
    sample_rate (the model's), original_sample_rate, original_length (samples at the original rate),
    channels (in the file), channel_mode ("mono": mixed down, "keep": one code row per channel), and `refine`'s
    fields (`Refinement.header_fields`)."""
    rate = model.config.sample_rate
    source, signal = model_signal(path, rate, mono)
    with source:
        codes = encode_signal(model, signal, stages, chunk_seconds, refine)
    return codes, audio_header(rate, (source.rate, source.length, source.file_channels), mono, refine)


def audio_header(sample_rate: int, info: tuple[int, int, int], mono: bool,
                 refine: Refinement = Refinement()) -> dict:
    """The header fields decode needs for a file encoded at `sample_rate` (the model's), from its `info`
    (rate in Hz, frames, channels; `data.audio_info`): sample_rate, original_sample_rate, original_length,
    channels, channel_mode; and how the codes were chosen (`Refinement.header_fields`: "refine", "search")."""
    rate, frames, channels = info
    header = {"sample_rate": sample_rate, "original_sample_rate": rate, "original_length": frames,
              "channels": channels, "channel_mode": "mono" if mono else "keep"}
    return {**header, **refine.header_fields()}


def image_batches(
    paths: Sequence[Path], multiple: int, batch_size: int, on_error: Callable[[Path, str], None]
) -> Iterator[tuple[list[tuple[Path, tuple[int, int]]], torch.Tensor]]:
    """Decode images in this process and yield batches of equal padded shape:
    ([(path, original (h, w))], uint8 (B, 3, H, W)).

    Images are padded to multiples of `multiple`; a file that cannot be read goes to `on_error(path, message)`.
    Memory holds a bounded number of images waiting for a batch of their shape (see vqtok.data.readers).
    """
    paths = list(paths)
    chunks = decoded_chunks(paths, multiple, batch_size, 0)
    for items, batch in shape_batches(chunks, batch_size, lambda i, why: on_error(paths[i], why)):
        yield [(paths[i], size) for i, size in items], batch


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
    postfilter: float = 0.0,
    on_file: FileCallback | None = None,
) -> RunReport:
    """Decode every token file under `inputs` to a PNG at its original size, or a 16-bit WAV at its original
    sample rate and length, mirroring the tree under `out`; audio through the postfilter (vqtok.postfilter)
    at strength `postfilter` when it is non-zero. Token files written by another model (different
    fingerprint), or whose codes the model cannot decode (`check_codes_fit`), are refused and reported, as is
    each token file whose output an earlier one in the list has (a.png.vqt and a.jpg.vqt both decode to
    a.png) and an output that cannot be written. Images above `tiles.WHOLE_IMAGE_PIXELS` are decoded tile by
    tile; a token file claiming a size that encode would refuse (`data.MAX_IMAGE_PIXELS`) is refused before
    its codes are read."""
    begin = time.perf_counter()
    dev = pick_device(device)
    model = load(model_path, dev)
    check_strength(postfilter, model.config.modality, model_path)
    fingerprint = model.fingerprint()
    table = code_table(model)
    report = RunReport()
    notify = on_file or (lambda _p, _o: None)
    claims = _Claims()
    for token_path, root in find_token_files(inputs):
        target = out / decoded_name(token_path, root, model.config.modality)
        clash = claims.clash(str(target), token_path)
        # A folder in the output's place is no finished output: writing then reports it.
        if clash is None and target.is_file() and not force:
            report.existing.append(str(target))
            notify(token_path, "exists")
            continue
        try:
            if clash is not None:
                raise VqtokError(clash)
            size = checked_image_size(token_path, model.hop) if model.config.modality == "image" else None
            tokens = read_tokens_for_model(token_path, table)
            if tokens.header.get("fingerprint") != fingerprint:
                raise VqtokError(f"{token_path}: written by model {tokens.header.get('fingerprint')}, "
                                 f"not by {model_path} ({fingerprint})")
            check_codes_fit(tokens, model, token_path)
            codes = torch.from_numpy(tokens.codes.astype(np.int64))
            try:
                if model.config.modality == "audio":
                    decode_audio(model, codes, tokens.header, target, token_path, postfilter)
                elif needs_tiles(*size):
                    data.save_image(target, decode_tiled(model, codes, size=size))
                else:
                    image = model.decode(codes.unsqueeze(0).to(dev))[0]
                    data.save_image(target, image[:, :size[0], :size[1]].cpu())
            except OSError as err:
                raise VqtokError(f"{target}: cannot write the decoded file ({err.strerror or err})") from None
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


def check_codes_fit(tokens: Tokens, model: Tokenizer, token_path: Path) -> None:
    """`VqtokError` naming the file unless `model` can decode its codes: codes of the model's modality and
    codebook size (`read_tokens` has checked every code against the latter), at most its stages, and a grid of
    its kind, (h, w) for images, (frames) or (channels, frames) for audio."""
    header, config = tokens.header, model.config
    stages, codebook_size = config.quantizer.stages, config.quantizer.codebook_size
    if header.get("modality") != config.modality:
        raise VqtokError(f"{token_path}: holds {header.get('modality')} codes, the model is an {config.modality} model")
    if header.get("codebook_size") != codebook_size:
        raise VqtokError(f"{token_path}: codes from a codebook of {header.get('codebook_size')}, the model's has "
                         f"{codebook_size}")
    if tokens.codes.shape[0] > stages:
        raise VqtokError(f"{token_path}: {tokens.codes.shape[0]} stages of codes, the model has {stages}")
    if tokens.codes.ndim not in ((3,) if config.modality == "image" else (2, 3)):
        raise VqtokError(f"{token_path}: a code grid of {tokens.codes.ndim - 1} dimensions does not fit an "
                         f"{config.modality} model")


def decode_audio(model: Tokenizer, codes: torch.Tensor, header: dict, target: Path, token_path: Path,
                 postfilter: float = 0.0) -> None:
    """Write the WAV of audio codes (S, frames) or (S, C, frames) at the header's original rate and length,
    postfiltered at strength `postfilter` (0: not)."""
    try:
        rate, length = int(header["original_sample_rate"]), int(header["original_length"])
    except (KeyError, TypeError, ValueError):
        raise VqtokError(f"{token_path}: not an audio token file (no original_sample_rate / original_length)") from None
    data.check_sample_rate(token_path, rate)
    if length < 0:
        raise VqtokError(f"{token_path}: bad original length {length}")
    frames, needed = codes.shape[-1], -(-resampled_length(length, rate, model.config.sample_rate) // model.hop)
    if frames != needed:
        raise VqtokError(f"{token_path}: {frames} code frames, but {length} samples at {rate} Hz need {needed}")
    write_signal(target, decoded_signal(model, codes, length, rate, postfilter))


def read_tokens_for_model(path: Path, table: CodeTable | None) -> Tokens:
    """read_tokens with the model's code table cut to the file's stage count (a file encoded with --stages N
    and the entropy codec was coded with the first N rows)."""
    if table is not None:
        stages = _header_stages(path)
        if stages is not None and stages <= len(table):
            table = table[:stages]
    return read_tokens(path, table=table)


def _header_stages(path: Path) -> int | None:
    """The "stages" field of a token file's header, or None when the header cannot be read."""
    stages = (peek_header(path) or {}).get("stages")
    return stages if isinstance(stages, int) and stages >= 1 else None
