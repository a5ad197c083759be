"""Running an encode on several processes or machines, and writing its results off the critical path.

Parts: `--part I/N` takes the I-th of N contiguous slices of the file list (in `find_inputs` order: the inputs
as given, each folder walked in sorted order), so the N parts together are exactly the whole list, each file
in one part. Contiguous rather than strided so the part shards, read in name order (as `TokenDataset` reads a
folder), hold the items in the same order as one whole-run shard. Under torchrun (WORLD_SIZE and RANK set),
the part is shared the same way among the WORLD_SIZE processes: process RANK takes part
(I - 1) * WORLD_SIZE + RANK + 1 of N * WORLD_SIZE. No process group is needed: every process finds the same
files and computes its own slice.

Writing: `OrderedWriter` writes results on a background thread, in file order, while the next batch is being
decoded and encoded. Model: `parallel_map` runs batches on `forward_threads` threads at once, each operation
on one thread (`one_intra_op_thread`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from vqtok.errors import VqtokError
from vqtok.tokens.shards import DESCRIPTOR_SUFFIX

SHARD_NAME = "shard"
_SHARD_FILE = re.compile(rf"{SHARD_NAME}(?:-\d+-of-(\d+))?{re.escape(DESCRIPTOR_SUFFIX)}")

Part = tuple[int, int]
T = TypeVar("T")
R = TypeVar("R")


def parse_part(text: str) -> Part:
    """Read --part: "2/3" -> (2, 3), part I of N, 1-based."""
    first, slash, second = text.partition("/")
    try:
        part = (int(first), int(second)) if slash else None
    except ValueError:
        part = None
    if part is None or not 1 <= part[0] <= part[1]:
        raise VqtokError(f"--part must be I/N with 1 <= I <= N (e.g. 2/3), got {text!r}")
    return part


def process_part(part: Part | None = None) -> Part:
    """This process's part of the files: `part` (default 1/1, the whole list), shared among torchrun's
    processes when WORLD_SIZE and RANK are set (see the module docstring)."""
    index, count = part or (1, 1)
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world is None:
        return index, count
    if not (world.isdigit() and (rank or "").isdigit() and int(rank) < int(world)):
        raise VqtokError(f"torchrun environment: need 0 <= RANK < WORLD_SIZE, got RANK={rank!r} WORLD_SIZE={world!r}")
    return (index - 1) * int(world) + int(rank) + 1, count * int(world)


def take_part(items: Sequence[T], part: Part) -> list[T]:
    """Items [floor(n (I-1) / N), floor(n I / N)) of n: part I of N contiguous, near-equal slices."""
    index, count = part
    return list(items[len(items) * (index - 1) // count: len(items) * index // count])


def shard_name(part: Part) -> str:
    """The shard's name: "shard" for a whole run, "shard-00002-of-00003" for part 2/3 (parts never collide and
    sort in order)."""
    index, count = part
    return SHARD_NAME if count == 1 else f"{SHARD_NAME}-{index:05d}-of-{count:05d}"


def check_shard_split(out: Path, part: Part) -> None:
    """Refuse to add a shard to a folder holding shards of a run split into another number of parts: a
    folder is read as one data set, and the two splits would hold the same files twice."""
    for descriptor in sorted(out.glob(f"{SHARD_NAME}*{DESCRIPTOR_SUFFIX}")):
        match = _SHARD_FILE.fullmatch(descriptor.name)
        if match and int(match.group(1) or 1) != part[1]:
            raise VqtokError(f"{out} already holds {descriptor.name}, from a run split into "
                             f"{int(match.group(1) or 1)} part(s), not {part[1]}; write to another folder")


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each process on a machine takes its own GPU: plain "cuda" becomes cuda:LOCAL_RANK."""
    local = os.environ.get("LOCAL_RANK", "")
    if device.type == "cuda" and device.index is None and local.isdigit():
        return torch.device("cuda", int(local) % torch.cuda.device_count())
    return device


class OrderedWriter:
    """Write results on a background thread, in file order, so writing overlaps decoding and the model.

    The encode loop calls `put(items, codes)` with a batch of codes (B, S, *grid) (a tensor on any device: the
    copy to the CPU happens on the writer thread; or a numpy array, or one result per item) and
    `fail(index, reason)` for a file that could not be encoded. The thread calls
    `write(index, codes (S, *grid) numpy or the item's result, extra)` or `failed(index, reason)` for files
    0, 1, 2... strictly in order, holding results that arrive early; so a shard lists its items in file order
    and a report lists files in the same order whatever the batching.

    At most `depth` batches wait in the queue (`put` blocks beyond that), which bounds memory. An exception
    raised by `write` or `failed` stops the writing and is raised in the encode loop's thread by the next
    `put`, `fail` or `close`. Use as a context manager: leaving on an exception drops what is still queued.
    """

    def __init__(self, write: Callable[[int, np.ndarray, dict], None], failed: Callable[[int, str], None],
                 depth: int = 4) -> None:
        self._write, self._failed = write, failed
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._early: dict[int, tuple[Callable, tuple]] = {}
        self._next = 0
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="vqtok-writer", daemon=True)

    def __enter__(self) -> OrderedWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._cancelled = True
            self._queue.put(None)
            self._thread.join()

    def put(self, items: Sequence[tuple[int, dict]], codes: torch.Tensor | Sequence) -> None:
        """Queue a batch: (file index, extra header fields) per item, codes (B, S, *grid) or one result per
        item in the same order."""
        self._send(("codes", list(items), codes))

    def fail(self, index: int, reason: str) -> None:
        """Queue a file that could not be encoded, with its one-line reason."""
        self._send(("failed", index, reason))

    def close(self) -> None:
        """Wait until everything queued is written; raise the writer's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        if self._early:
            raise RuntimeError(f"files {sorted(self._early)[:5]}... never written: file {self._next} is missing")

    def _send(self, event: object) -> None:
        self._raise()
        self._queue.put(event)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            # After an error or a cancel keep taking events, so a `put` waiting for room never blocks forever.
            if self._error is None and not self._cancelled:
                try:
                    self._handle(event)
                except BaseException as err:  # raised again in the encode loop's thread
                    self._error = err

    def _handle(self, event: tuple) -> None:
        kind, first, second = event
        if kind == "failed":
            self._early[first] = (self._failed, (second,))
        else:
            for (index, extra), codes in zip(first, second.cpu().numpy() if torch.is_tensor(second) else second):
                self._early[index] = (self._write, (codes, extra))
        while self._next in self._early:
            call, args = self._early.pop(self._next)
            call(self._next, *args)
            self._next += 1


class SharedOrAlone:
    """A lock that many holders share, or one holds alone: batches encoded with oneDNN convolutions share it,
    a tiled encode (which switches oneDNN off process-wide, see vqtok.jobs.tiles) runs alone, so no batch
    ever runs half on one kind of kernel. A waiting `alone` keeps new `shared` holders out, so it cannot
    starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._alone and not self._sharing)
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


def forward_threads(cores: int) -> int:
    """Threads running the model at once on a CPU: one per core, at most 8 (each holds the GIL briefly between
    operations, so more threads would queue for it)."""
    return max(1, min(8, cores))


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch operations on one thread each (restoring the caller's count on exit); the model's parallelism
    comes from `forward_threads` threads working on different batches instead.

    Not intra-op threads, for two reasons. An OpenMP team stalls at every barrier when the cores are busy
    with anything else, here the decoding workers and the writer (on 2 busy cores, 2 intra-op threads
    encoded CIFAR-10 10x slower than 1, and 481x321 photos 4x slower). And oneDNN picks its convolution
    kernels by the thread count as well as the batch size (a batch of 2 to 8 small images gave outputs
    differing in the last bit with 1 and with 2 threads), so a thread count that followed the machine would
    let near-tie codes follow it too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parallel_map(fn: Callable[..., R], jobs: Iterable[tuple], threads: int) -> Iterator[R]:
    """fn(*job) for every job, on `threads` threads at once, yielded in job order. At most 2 * threads jobs are
    taken ahead of the results, which bounds memory; an exception from `fn` is raised here."""
    with ThreadPoolExecutor(threads, thread_name_prefix="vqtok-model") as pool:
        running: collections.deque[Future[R]] = collections.deque()
        for job in jobs:
            running.append(pool.submit(fn, *job))
            if len(running) >= 2 * threads:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
