"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A crash or Ctrl-C mid-write leaves either the old file or no file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _temp_beside(target: Path) -> tuple[int, Path]:
    """An open temporary file in the target's folder (created if missing), keeping the target's suffix so
    writers that pick a format from it (Pillow, soundfile) still work: (descriptor, path)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    return fd, Path(tmp)


def _normal_mode(path: Path) -> None:
    # mkstemp creates 0600 files, and some writers (safetensors) replace the file they are given: set the
    # permissions a plain open() would have given once the writing is done.
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it."""
    target = Path(path)
    fd, tmp_path = _temp_beside(target)
    os.close(fd)
    try:
        yield tmp_path
        _normal_mode(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, through the temporary file's own descriptor (one open, not two: this
    is the per-file cost of an encode run that writes many small token files)."""
    target = Path(path)
    fd, tmp_path = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _normal_mode(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    # The only way to read the umask is to set it; done once, at import, rather than around every file, so
    # no other thread can create a file while it is briefly 0.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
