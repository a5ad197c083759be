"""Image files to batches for the model: decoded and padded in DataLoader worker processes, regrouped by shape.

`worker_jobs` runs a function on consecutive ranges of files, each range in one worker process (or in the
calling process with 0 workers), and returns the results in file order. `decoded_chunks` uses it to read
files in chunks (a CPU encode goes further and encodes them in the workers too, see vqtok.jobs.pipeline);
`shape_batches` turns the chunks into batches of images that share a padded shape. A file that cannot be
read travels back as its one-line reason and is handed to the caller's `on_error`, so one bad file never
stops a run.

Batches depend only on the file order, the images' shapes, `batch_size` and `batch_pixels`, never on the
number of workers or on chunk boundaries; and the model encodes each image of a batch on its own, so the codes
are the same for any number of workers and any batch size (tests/test_encode.py compares the outputs byte for
byte).

Memory is bounded by the chunk and batch sizes, not by the number of files: the DataLoader keeps at most
2 chunks per worker in flight, and `shape_batches` holds at most `4 * batch_size` images waiting for a
batch of their shape (beyond that, the group holding the oldest image goes out as a smaller batch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqtok.data import io
from vqtok.errors import VqtokError

# Images held waiting for a batch of their shape, as a multiple of the batch size: enough to fill batches from
# a folder of a few mixed shapes, while a folder where every image has its own shape still cannot pile up.
PENDING_BATCHES = 4

# Workers are forked on Linux: they start in milliseconds with every module already imported (spawn and
# forkserver re-import torch, ~1 s per worker). They only run Pillow and CPU tensor code, never CUDA.
_START_METHOD = "fork" if sys.platform.startswith("linux") else None

# Whether `worker_jobs` may run any callable, closures included: forked workers inherit it instead of unpickling it.
FORKED_WORKERS = _START_METHOD == "fork"

# (file index, original (h, w)) of each image in a batch.
BatchItems = list[tuple[int, tuple[int, int]]]

# One file, as `ImageFiles` reads it: (file index, uint8 (3, H, W) padded, original (h, w)), or
# (file index, None, the one-line reason it could not be read).
FileItem = tuple[int, "np.ndarray | None", "tuple[int, int] | str"]

T = TypeVar("T")


class ShapeGroup(NamedTuple):
    """Images of one chunk that share a padded shape: file indices, original (h, w) sizes, uint8 (n, 3, H, W).

    A numpy array rather than a tensor: it travels back from the worker pickled through the pipe, while a
    tensor would go through shared memory, whose file descriptor the main process must fetch from the worker
    over a socket (about 2 ms per chunk on a busy 2-core machine, more than a 32x32 chunk's bytes cost).
    """

    indices: list[int]
    sizes: list[tuple[int, int]]
    images: np.ndarray


class Chunk(NamedTuple):
    """One worker's output for consecutive files: the images grouped by shape, and (file index, reason) for
    each file that could not be read."""

    groups: list[ShapeGroup]
    errors: list[tuple[int, str]]


def available_cores() -> int:
    """CPU cores for this process: its affinity mask, shared with the other processes torchrun started on this
    machine (LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // int(local)) if local.isdigit() and int(local) > 0 else cores


def default_workers() -> int:
    """Decoding processes for `vqtok train`, and for `vqtok encode` when the model runs on an accelerator (on a
    CPU the encode workers run the model too, see vqtok.jobs.pipeline.encode_workers): half the cores, at
    least 1, at most 8.

    Half, because with the default image model reading a file costs about as much as encoding it (CIFAR-10:
    0.17-0.28 ms and 0.29-0.35 ms per image, one thread each), and for photos much less (481x321: 4 ms and
    45-60 ms); the other cores feed the accelerator and write. Training needs even less: a batch's decode is
    ~3% of a training step.
    """
    return max(1, min(8, available_cores() // 2))


class ImageFiles:
    """Item i of `paths`, decoded and edge-padded to multiples of `multiple`:
    (i, uint8 (3, H, W), original (h, w)), or (i, None, one-line reason) when the file cannot be read."""

    def __init__(self, paths: Sequence[Path], multiple: int) -> None:
        self.paths = list(paths)
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> FileItem:
        try:
            image = io.load_image(self.paths[i])
        except VqtokError as err:
            return i, None, str(err)
        padded, size = io.pad_to_multiple(image, self.multiple)
        return i, padded.numpy(), size


def group_by_shape(items: list[FileItem]) -> Chunk:
    """DataLoader collate: stack each padded shape into one array, and list the unreadable files."""
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, int], np.ndarray]]] = {}
    errors = []
    for index, image, extra in items:
        if image is None:
            errors.append((index, extra))
        else:
            groups.setdefault(image.shape, []).append((index, extra, image))
    return Chunk([ShapeGroup([i for i, _, _ in g], [s for _, s, _ in g], np.stack([x for _, _, x in g]))
                  for g in groups.values()], errors)


class DecodeChunk:
    """A `worker_jobs` job: files -> their Chunk (decoded, padded, grouped by shape)."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __call__(self, indices: range) -> Chunk:
        return group_by_shape([self.files[i] for i in indices])


def decoded_chunks(paths: Sequence[Path], multiple: int, chunk_size: int, workers: int) -> Iterator[Chunk]:
    """Chunks of `chunk_size` consecutive files, decoded by `workers` processes (0: in this process), in order.

    The workers start (fork) here, not on the first `next`. Each runs torch with one thread (DataLoader sets
    it), so workers and the model's threads can be counted against the cores.
    """
    return worker_jobs(len(paths), chunk_size, workers, DecodeChunk(ImageFiles(paths, multiple)))


class _Jobs(Dataset):
    """Job j of `jobs` near-equal consecutive ranges of `count` file indices: run(range(count j // jobs,
    count (j + 1) // jobs))."""

    def __init__(self, count: int, jobs: int, run: Callable[[range], object]) -> None:
        self.count, self.jobs, self.run = count, jobs, run

    def __len__(self) -> int:
        return self.jobs

    def __getitem__(self, job: int) -> object:
        return self.run(range(self.count * job // self.jobs, self.count * (job + 1) // self.jobs))


def _as_is(result: T) -> T:
    """The loader's collate: the job's result as it is. The default for unbatched items would turn numpy arrays
    into tensors, which travel through shared memory instead of the pipe."""
    return result


def worker_jobs(count: int, job_files: int, workers: int, run: Callable[[range], T]) -> Iterator[T]:
    """run(files) for consecutive ranges of at most `job_files` file indices out of `count`, in `workers`
    processes (0: in this process), yielded in order. The ranges are near-equal and, with workers, as many for
    each (the loader hands them out in turn), so the workers finish together rather than one running a job
    longer while the others wait.

    For work whose result is much smaller than its input, such as encoding images to codes on a CPU: each worker
    runs torch on one thread (DataLoader sets it) and sends back only what `run` returns, pickled through the
    pipe (return numpy arrays, not tensors, which would go through shared memory). At most 2 jobs per worker
    are in flight. `run` must be picklable unless FORKED_WORKERS.
    """
    jobs = -(-count // job_files)
    workers = min(workers, jobs)
    if workers:
        jobs = min(count, -(-jobs // workers) * workers)
    loader = DataLoader(_Jobs(count, jobs, run), batch_size=None, num_workers=workers, collate_fn=_as_is,
                        multiprocessing_context=_START_METHOD if workers else None,
                        # Without its own generator the loader draws its workers' base seed from the global RNG,
                        # and running an encode would change what the caller's next random numbers are.
                        generator=torch.Generator())
    return iter(loader)


def batch_rows(shape: Sequence[int], batch_size: int, batch_pixels: int | None) -> int:
    """Images per batch for images of padded shape (..., H, W): `batch_size`, fewer when that many would hold
    more than `batch_pixels` pixels, and at least 1."""
    if batch_pixels is None:
        return batch_size
    return max(1, min(batch_size, batch_pixels // (shape[-2] * shape[-1])))


def shape_batches(chunks: Iterator[Chunk], batch_size: int, on_error: Callable[[int, str], None],
                  batch_pixels: int | None = None) -> Iterator[tuple[BatchItems, torch.Tensor]]:
    """Regroup decoded chunks into batches of one padded shape: `file_batches` of their files in file order."""
    return file_batches(chunk_files(chunks), batch_size, on_error, batch_pixels)


def chunk_files(chunks: Iterator[Chunk]) -> Iterator[FileItem]:
    """The files of each chunk, one by one in file order, unreadable ones included."""
    for chunk in chunks:
        files: list[FileItem] = [(index, None, reason) for index, reason in chunk.errors]
        files += [item for g in chunk.groups for item in zip(g.indices, g.images, g.sizes)]
        yield from sorted(files, key=lambda item: item[0])


def file_batches(files: Iterator[FileItem], batch_size: int, on_error: Callable[[int, str], None],
                 batch_pixels: int | None = None) -> Iterator[tuple[BatchItems, torch.Tensor]]:
    """Group decoded files into batches of one padded shape: ([(file index, original (h, w))], uint8 (B, 3, H, W)).

    A batch holds at most `batch_size` images and at most `batch_pixels` pixels (B * H * W), except that an
    image larger than `batch_pixels` makes a batch of its own. Images are taken in file order; a shape's batch
    goes out when full, and when more than PENDING_BATCHES * batch_size images wait, the group holding the
    oldest goes out as it is. Unreadable files go to `on_error(file index, reason)`.
    """
    pending: dict[tuple[int, ...], list[tuple[int, tuple[int, int], np.ndarray]]] = {}
    waiting = 0

    def take(shape: tuple[int, ...]) -> tuple[BatchItems, torch.Tensor]:
        nonlocal waiting
        group = pending.pop(shape)
        waiting -= len(group)
        return [(i, s) for i, s, _ in group], torch.from_numpy(np.stack([x for _, _, x in group]))

    for index, image, size in files:
        if image is None:
            on_error(index, size)
            continue
        shape = image.shape
        group = pending.setdefault(shape, [])
        group.append((index, size, image))
        waiting += 1
        if len(group) >= batch_rows(shape, batch_size, batch_pixels):
            yield take(shape)
        elif waiting > PENDING_BATCHES * batch_size:
            # dicts keep insertion order and a group is created by its oldest image: the first group
            # holds the image that has waited longest.
            yield take(next(iter(pending)))
    while pending:
        yield take(next(iter(pending)))
