"""Training data streamed from disk: random image crops and audio segments read by DataLoader workers.

Nothing is decoded ahead of time, so a run's memory does not depend on how many files it reads. Every item a
step needs is named by `(file index, item seed)`; `BatchPlan` computes them from the run's seed and the step
number alone, so:
  - the data a step sees does not depend on the number of DataLoader workers or processes;
  - a resumed run starting at step s sees exactly the batches an uninterrupted run saw from step s on;
  - under torch.distributed each rank takes one contiguous block of every global batch, so N processes
    together see the same items, in the same order, as one process with the same global batch.

A file that cannot be read is replaced by the next readable file in the list (deterministically) and reported
with the item, so a bad file costs a warning, not the run.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vqtok.data import io
from vqtok.errors import VqtokError

# A (file index, item seed) pair: what one training item is made from.
Item = tuple[int, int]
# Files reported unreadable while making items: (path, one-line reason).
Skipped = list[tuple[str, str]]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over each): well spread, the same on every machine."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


@dataclass
class Batch:
    """One step's share of a batch: inputs (B, C, *spatial) and the files found unreadable making it."""

    inputs: torch.Tensor
    skipped: Skipped


def collate(results: list[tuple[torch.Tensor, Skipped]]) -> Batch:
    """Stack the items of a batch; gather their reports of unreadable files."""
    return Batch(torch.stack([x for x, _ in results]), [s for _, bad in results for s in bad])


class BatchPlan(Sampler[list[Item]]):
    """The items of every training step from `start` to `stop`, for one rank: a batch sampler.

    Files are drawn in epochs of a seeded permutation (each file once per epoch) or, with `weights`, with
    replacement in proportion to the weights (audio: so every second of sound is equally likely). The global
    batch of `batch_size` items is cut into `world` equal contiguous blocks; this rank yields block `rank`.
    """

    def __init__(self, files: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1, weights: torch.Tensor | None = None):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not a multiple of the {world} processes")
        self.files, self.batch_size, self.seed = files, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.weights = weights
        self._epoch: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[Item]]:
        share = self.batch_size // self.world
        for step in range(self.start, self.stop):
            items = self.step_items(step)
            yield items[self.rank * share:(self.rank + 1) * share]

    def step_items(self, step: int) -> list[Item]:
        """The global batch of `step`: `batch_size` (file index, item seed) pairs."""
        first = step * self.batch_size
        positions = range(first, first + self.batch_size)
        if self.weights is not None:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, step))
            files = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen).tolist()
        else:
            files = [self._permutation(p // self.files)[p % self.files] for p in positions]
        return [(f, mix_seed(self.seed, p)) for f, p in zip(files, positions)]

    def _permutation(self, epoch: int) -> list[int]:
        if self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            self._epoch = (epoch, torch.randperm(self.files, generator=gen).tolist())
        return self._epoch[1]


def unwrap_worker_errors(batches: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of a DataLoader as they come. A VqtokError raised in a worker process comes out of the
    DataLoader with the worker's traceback as its message; it is raised again with its own one-line message."""
    try:
        yield from batches
    except VqtokError as err:
        text = str(err)
        if "\nOriginal Traceback" not in text:  # raised in this process: already the user's message
            raise
        # The traceback ends with the line "<module>.<type name>: <message>".
        raise type(err)(text.rstrip().splitlines()[-1].partition(": ")[2]) from None


def fixed_items(files: Sequence[int], seed: int) -> list[Item]:
    """Validation items: one seeded crop or segment of each file, the same in every run with this seed."""
    return [(f, mix_seed(seed, f, 2)) for f in files]


def split_files(n: int, seed: int, val_fraction: float, max_val: int) -> tuple[list[int], list[int]]:
    """A seeded split of n files into (train, val) indices: val gets val_fraction of them, at least 1, at most
    max_val, and none when there are fewer than 4 files (validation then reuses a few training files)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if n < 4 or val_fraction == 0 else min(max_val, max(1, round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def batches_of(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive batches of at most `batch_size` items (for validation loaders)."""
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


class _FileItems(Dataset, abc.ABC):
    """Items made from files by `make`, with the substitution rule for unreadable ones."""

    def __init__(self, paths: Sequence[Path | str]):
        # Plain strings: cheap to copy into worker processes and no per-access refcount churn on Path objects.
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, Skipped]:
        index, seed = item
        skipped: Skipped = []
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                return self.make(path, np.random.default_rng(seed)), skipped
            except VqtokError as err:
                skipped.append((path, str(err)))
        raise VqtokError(f"none of the {len(self.paths)} files could be read (first: {skipped[0][1]})")

    @abc.abstractmethod
    def make(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        """One item from the file at `path`, its random choices drawn from `rng`; VqtokError if unreadable."""


class ImageCrops(_FileItems):
    """uint8 (3, size, size) random crops at the file's own scale, mirrored left-right with probability 1/2.
    A file whose shorter side is below `size` is first resized (bicubic) so that side equals `size`; nothing
    else is resized."""

    def __init__(self, paths: Sequence[Path | str], size: int):
        super().__init__(paths)
        self.size = size

    def make(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        arr = io.load_image(path).permute(1, 2, 0).numpy()
        h, w = arr.shape[:2]
        s = self.size
        if min(h, w) < s:
            scale = s / min(h, w)
            h, w = max(s, round(h * scale)), max(s, round(w * scale))
            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
        top, left = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
        crop = arr[top:top + s, left:left + s]
        if rng.integers(2):
            crop = crop[:, ::-1]
        crop = np.require(crop, requirements=["C", "W"])
        return torch.from_numpy(crop).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class AudioFile:
    """What a file's header says: sample rate (Hz) and length (frames)."""

    path: str
    rate: int
    frames: int


def read_audio_headers(paths: Sequence[Path]) -> tuple[list[AudioFile], Skipped]:
    """Headers of every file (no samples decoded); files whose header cannot be read or that hold no samples
    are returned as skipped."""
    found: list[AudioFile] = []
    skipped: Skipped = []
    for path in paths:
        try:
            rate, frames, _ = io.audio_info(path)
        except VqtokError as err:
            skipped.append((str(path), str(err)))
            continue
        if frames <= 0:
            skipped.append((str(path), f"{path}: no audio samples (empty or header-only file)"))
            continue
        found.append(AudioFile(str(path), rate, frames))
    return found, skipped


class AudioSegments(_FileItems):
    """float32 (1, length) mono segments at `rate` Hz read from the files by frame range.

    The offset is uniform over the file; a file shorter than the segment is placed at a random offset in
    silence (`pad_short`) or returned whole and unpadded (validation). Only the frames needed are read and
    resampled (with a margin for the resampler's kernel).

    Augmentation (training only), both drawn per segment from the item's seed:
      - speed_perturb p: the segment plays at a speed 1 + k/100 for a uniform integer k in [-100p, 100p] (read
        at a rate scaled by that factor, so pitch and formants move with it: new voices from the same speech,
        as ASR's speed perturbation, Ko et al. 2015);
      - gain_db g: scaled by a uniform gain in [-g, g] dB, then down to a peak of 1 if it would clip.
    """

    # Extra input frames read on each side when resampling, so the sinc kernel sees real samples.
    RESAMPLE_MARGIN = 64

    def __init__(self, files: Sequence[AudioFile], rate: int, length: int, pad_short: bool = True,
                 speed_perturb: float = 0.0, gain_db: float = 0.0):
        super().__init__([f.path for f in files])
        self.files = {f.path: f for f in files}
        self.rate, self.length, self.pad_short = rate, length, pad_short
        self.speed_steps, self.gain_db = round(100 * speed_perturb), gain_db

    def make(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        # Draws happen only when augmenting, so runs without it see the segments they always did.
        speed = 100 + int(rng.integers(-self.speed_steps, self.speed_steps + 1)) if self.speed_steps else 100
        wave = self._segment(path, rng, speed)
        if self.gain_db:
            wave = wave * 10 ** (float(rng.uniform(-self.gain_db, self.gain_db)) / 20)
            wave = wave / wave.abs().max().clamp_min(1.0)
        return wave

    def _segment(self, path: str, rng: np.random.Generator, speed: int) -> torch.Tensor:
        """The segment at `speed` / 100 times the file's speed."""
        info = self.files[path]
        needed = math.ceil(self.length * info.rate * speed / (100 * self.rate))  # frames at the file's rate
        out = torch.zeros(1, self.length)
        if info.frames >= needed:
            start = int(rng.integers(info.frames - needed + 1))
            wave = self._read(path, info, start, needed, speed)
            n = min(wave.shape[1], self.length)  # resampling can round one sample short
            out[0, :n] = wave[0, :n]
            return out
        wave = self._read(path, info, 0, info.frames, speed)
        if not self.pad_short:
            return wave
        n = min(wave.shape[1], self.length)
        offset = int(rng.integers(self.length - n + 1))
        out[0, offset:offset + n] = wave[0, :n]
        return out

    def _read(self, path: str, info: AudioFile, start: int, frames: int, speed: int) -> torch.Tensor:
        """Frames [start, start + frames) at the file's rate -> mono float32 (1, T) at self.rate, played at
        `speed` / 100 of the file's speed; T >= length when the file holds enough audio."""
        # Reading at rate * speed / 100 and resampling to self.rate plays the audio speed / 100 times as fast.
        source, target = info.rate * speed, self.rate * 100
        margin = self.RESAMPLE_MARGIN if source != target else 0
        lo, hi = max(0, start - margin), min(info.frames, start + frames + margin)
        try:
            block, _ = sf.read(path, start=lo, stop=hi, dtype="float32", always_2d=True)
        except Exception as err:  # libsndfile raises several types on damaged data
            raise VqtokError(f"{path}: cannot read audio ({' '.join(str(err).split())})") from None
        if not np.isfinite(block).all():
            raise VqtokError(f"{path}: audio holds NaN or infinite samples")
        wave = torch.from_numpy(np.ascontiguousarray(block.T)).mean(0, keepdim=True)
        if margin:
            wave = io.Resampler(source, target)(wave)  # bounded memory even where the rates share few factors
            skip = round((start - lo) * target / source)
            wave = wave[:, skip:]
        return wave.clamp_(-1.0, 1.0)
