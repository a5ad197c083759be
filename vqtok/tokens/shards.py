"""Token shards: many items' codes in memory-mappable files, for training models on tokens.

A shard named `NAME` in a folder is four files:

- `NAME.codes.npy`: every item's codes, flattened in C order and concatenated, in the smallest unsigned
  dtype that holds codes < K (uint8 for K <= 256, uint16 for K <= 65536, else uint32);
- `NAME.index.npy`: int64 (N+1,) offsets; item i is codes[index[i]:index[i+1]];
- `NAME.items.jsonl`: one JSON object per item: "name", "shape" (S, *grid) and the caller's metadata;
- `NAME.shard.json`: format, version, codebook_size, stages, dtype, fingerprint, items, codes.

The arrays are plain `.npy` files, so `np.load(path, mmap_mode="r")` opens them without vqtok. Every file
is written atomically and the `.shard.json` last: a shard whose descriptor exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from vqtok.atomic import atomic_path, write_bytes_atomic
from vqtok.errors import TokenFileError

SHARD_FORMAT = "vqtok-shard"
SHARD_VERSION = 1
DESCRIPTOR_SUFFIX = ".shard.json"


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned dtype holding codes in [0, codebook_size)."""
    if codebook_size <= 1 << 8:
        return np.dtype(np.uint8)
    if codebook_size <= 1 << 16:
        return np.dtype(np.uint16)
    if codebook_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"codebook size {codebook_size} does not fit 32-bit codes")


class ShardWriter:
    """Write one shard, item by item; codes stream to disk, so memory stays flat however many items come.

    codebook_size and fingerprint default to the first item's meta ("codebook_size", "fingerprint", as in a
    token file header). Every item must have the same number of stages and codes < K. Use as a context
    manager or call `close()`; a writer left without `close()` (or closed by an exception in a `with`
    block) leaves no shard behind.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str = "shard", *, codebook_size: int | None = None,
                 fingerprint: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.codebook_size = codebook_size
        self.fingerprint = fingerprint
        self.stages: int | None = None
        self._offsets = [0]
        self._lines: list[str] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, raw = tempfile.mkstemp(prefix=f".{name}.", suffix=".codes.raw", dir=self.out_dir)
        self._raw_path = Path(raw)
        self._raw = os.fdopen(fd, "wb")

    def add(self, name: str, codes: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Append one item: codes (S, *grid) integers in [0, K); meta is stored beside its name and shape."""
        meta = dict(meta or {})
        codes = np.asarray(codes)
        if self.codebook_size is None:
            self.codebook_size = meta.get("codebook_size")
            if not isinstance(self.codebook_size, int):
                raise ValueError("shard writer needs codebook_size (argument or the first item's meta)")
        if self.fingerprint is None and isinstance(meta.get("fingerprint"), str):
            self.fingerprint = meta["fingerprint"]
        if codes.ndim < 2 or codes.dtype.kind not in "iu":
            raise ValueError(f"item {name!r}: codes must be an integer array (S, *grid), got {codes.dtype} {codes.shape}")
        if self.stages is None:
            self.stages = codes.shape[0]
        if codes.shape[0] != self.stages:
            raise ValueError(f"item {name!r} has {codes.shape[0]} stages; the shard has {self.stages}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"item {name!r}: codes must be in [0, {self.codebook_size})")
        if meta.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError(f"item {name!r} comes from another tokenizer (fingerprint {meta['fingerprint']})")
        self._raw.write(np.ascontiguousarray(codes, dtype=code_dtype(self.codebook_size)).tobytes())
        self._offsets.append(self._offsets[-1] + codes.size)
        self._lines.append(json.dumps({**meta, "name": name, "shape": list(codes.shape)}, separators=(",", ":")))

    def close(self) -> Path:
        """Finish the shard; returns the path of its `.shard.json` descriptor."""
        if not self._lines:
            self.abort()
            raise ValueError(f"shard {self.name!r} got no items")
        self._raw.close()
        dtype = code_dtype(self.codebook_size)
        total = self._offsets[-1]
        base = self.out_dir / self.name
        try:
            with atomic_path(f"{base}.codes.npy") as tmp, open(tmp, "wb") as out, open(self._raw_path, "rb") as raw:
                np.lib.format.write_array_header_2_0(out, {"descr": dtype.str, "fortran_order": False, "shape": (total,)})
                shutil.copyfileobj(raw, out, 1 << 20)
        finally:
            self._raw_path.unlink(missing_ok=True)
        with atomic_path(f"{base}.index.npy") as tmp:
            np.save(tmp, np.asarray(self._offsets, dtype=np.int64))
        write_bytes_atomic(f"{base}.items.jsonl", "".join(line + "\n" for line in self._lines).encode())
        descriptor = {
            "format": SHARD_FORMAT, "version": SHARD_VERSION, "codebook_size": self.codebook_size,
            "stages": self.stages, "dtype": dtype.name, "fingerprint": self.fingerprint,
            "items": len(self._lines), "codes": total,
        }
        path = Path(f"{base}{DESCRIPTOR_SUFFIX}")
        write_bytes_atomic(path, json.dumps(descriptor, indent=1).encode())
        return path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._raw.close()
        self._raw_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(out_dir: str | os.PathLike, items: Iterable[tuple[str, np.ndarray, dict[str, Any]]],
                name: str = "shard", *, codebook_size: int | None = None, fingerprint: str | None = None) -> Path:
    """Write (name, codes (S, *grid), meta) items as one shard in out_dir; returns the descriptor path.

    See `ShardWriter` for codebook_size and fingerprint.
    """
    writer = ShardWriter(out_dir, name, codebook_size=codebook_size, fingerprint=fingerprint)
    try:
        for item_name, codes, meta in items:
            writer.add(item_name, codes, meta)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class Shard:
    """One opened shard: descriptor, memory-mapped codes and index, per-item metadata."""

    def __init__(self, descriptor: Path) -> None:
        self.descriptor = descriptor
        base = str(descriptor)[: -len(DESCRIPTOR_SUFFIX)]
        try:
            info = json.loads(descriptor.read_bytes())
        except OSError as e:
            raise TokenFileError(f"{descriptor}: cannot read shard descriptor: {e.strerror or e}") from None
        except ValueError:
            raise TokenFileError(f"{descriptor}: shard descriptor is not valid JSON") from None
        if not isinstance(info, dict) or info.get("format") != SHARD_FORMAT:
            raise TokenFileError(f"{descriptor}: not a vqtok shard descriptor")
        if not isinstance(info.get("version"), int) or info["version"] > SHARD_VERSION:
            raise TokenFileError(f"{descriptor}: shard version {info.get('version')!r} is newer than this vqtok reads")
        k, stages = info.get("codebook_size"), info.get("stages")
        if not isinstance(k, int) or k < 2 or not isinstance(stages, int) or stages < 1:
            raise TokenFileError(f"{descriptor}: bad codebook_size or stages")
        self.codebook_size, self.stages, self.fingerprint = k, stages, info.get("fingerprint")
        self.codes = _load_npy(Path(f"{base}.codes.npy"))
        if self.codes.ndim != 1 or self.codes.dtype != code_dtype(k) or info.get("dtype") != self.codes.dtype.name:
            raise TokenFileError(f"{base}.codes.npy: expected a flat {code_dtype(k)} array, got {self.codes.dtype} {self.codes.shape}")
        index_path = Path(f"{base}.index.npy")
        index = _load_npy(index_path)
        if index.ndim != 1 or index.dtype != np.int64 or len(index) < 1:
            raise TokenFileError(f"{index_path}: expected an int64 (N+1,) offsets array, got {index.dtype} {index.shape}")
        self.index = np.array(index)
        if self.index[0] != 0 or self.index[-1] != len(self.codes) or (np.diff(self.index) < 0).any():
            raise TokenFileError(f"{index_path}: offsets do not describe {len(self.codes)} codes")
        self.items = _load_items(Path(f"{base}.items.jsonl"), self.index, stages)

    def __len__(self) -> int:
        return len(self.items)


def _load_npy(path: Path) -> np.ndarray:
    """np.load(path, mmap_mode="r"), with every failure turned into a TokenFileError naming the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise TokenFileError(f"{path}: shard file is missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise TokenFileError(f"{path}: not a readable .npy array ({e})") from None


def _load_items(path: Path, index: np.ndarray, stages: int) -> list[dict[str, Any]]:
    """Per-item metadata, checked against the index: item i has shape (stages, *grid) of index[i+1]-index[i] codes."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise TokenFileError(f"{path}: shard file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"{path}: cannot read shard items ({e})") from None
    if len(lines) != len(index) - 1:
        raise TokenFileError(f"{path}: {len(lines)} items, the index has {len(index) - 1}")
    items = []
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
        except ValueError:
            raise TokenFileError(f"{path}: line {i + 1} is not valid JSON") from None
        shape = item.get("shape") if isinstance(item, dict) else None
        if (not isinstance(shape, list) or len(shape) < 2 or shape[0] != stages
                or not all(isinstance(d, int) and d >= 0 for d in shape)
                or int(np.prod(shape)) != index[i + 1] - index[i]):
            raise TokenFileError(f"{path}: item {i} has a shape that does not match the index")
        items.append(item)
    return items


def find_shards(path: str | os.PathLike) -> list[Path]:
    """Shard descriptors at `path`: the file itself if it is one, else every `*.shard.json` in the folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TokenFileError(f"{path}: no such shard file or folder")
    found = sorted(path.glob(f"*{DESCRIPTOR_SUFFIX}"))
    if not found:
        raise TokenFileError(f"{path}: no shards (*{DESCRIPTOR_SUFFIX}) in this folder")
    return found


class TokenDataset(torch.utils.data.Dataset):
    """Items of one or more shards (folders or `.shard.json` files), in order.

    dataset[i] is a LongTensor shaped like item i's codes, (S, *grid); `meta(i)` is its metadata (name,
    shape and what the writer was given). All shards must share codebook size, stages and fingerprint.
    Codes are read from memory maps on access; pickling (DataLoader workers) reopens the files instead of
    copying them.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.descriptors = [d for p in paths for d in find_shards(p)]
        if not self.descriptors:
            raise TokenFileError("no shards given")
        self._open()

    def _open(self) -> None:
        self._shards = [Shard(d) for d in self.descriptors]
        first = self._shards[0]
        for shard in self._shards[1:]:
            if (shard.codebook_size, shard.stages, shard.fingerprint) != (first.codebook_size, first.stages, first.fingerprint):
                raise TokenFileError(f"{shard.descriptor}: codebook size, stages or fingerprint differ from {first.descriptor}")
        self.codebook_size, self.stages, self.fingerprint = first.codebook_size, first.stages, first.fingerprint
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[Shard, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shards[s], i - int(self._starts[s])

    def __getitem__(self, i: int) -> torch.Tensor:
        shard, j = self._locate(i)
        codes = np.asarray(shard.codes[shard.index[j] : shard.index[j + 1]]).astype(np.int64)
        if codes.size and codes.max() >= self.codebook_size:
            raise TokenFileError(f"{shard.descriptor}: item {j} holds codes >= the codebook size {self.codebook_size}")
        return torch.from_numpy(codes.reshape(shard.items[j]["shape"]))

    def meta(self, i: int) -> dict[str, Any]:
        """Item i's metadata: "name", "shape" and the writer's meta."""
        shard, j = self._locate(i)
        return dict(shard.items[j])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_shards"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()
