"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A crash or Ctrl-C mid-write leaves either the old file or no file, never a truncated one. A crash can leave a
temporary file behind (named `.<target name>.<pid>-<n>.tmp<suffix>`), never a partial target.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Iterator

# Temporary names: the process id tells processes apart (several encode processes may write into one folder),
# the counter tells this process's threads and files apart; `next` on an itertools.count is atomic under the GIL.
_COUNTER = itertools.count()
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create_beside(target: str) -> tuple[int, str]:
    """Create and open a new temporary file in the target's folder (made if missing), keeping the target's
    suffix so writers that pick a format from it (Pillow, soundfile) still work: (descriptor, path).

    Created with mode 0o666 less the umask, the permissions a plain open() gives, so the renamed file needs no
    chmod. Cheaper than `tempfile.mkstemp` (no random names, no chmod), which matters when an encode writes
    thousands of small token files a second.
    """
    folder, name = os.path.split(target)
    suffix = os.path.splitext(name)[1]
    made_folder = False
    while True:
        tmp = os.path.join(folder, f".{name}.{os.getpid()}-{next(_COUNTER)}.tmp{suffix}")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # left by a crashed process that had this process id: take the next name
            continue
        except FileNotFoundError:
            # Make the folder and try once more; it may have appeared meanwhile (encode workers write into
            # the same new folders at once), so only a second failure is an error.
            if not folder or made_folder:
                raise
            os.makedirs(folder, exist_ok=True)
            made_folder = True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it."""
    target = os.fspath(path)
    fd, tmp = _create_beside(target)
    os.close(fd)
    try:
        yield Path(tmp)
        # Some writers (safetensors) replace the file they are given with one of mode 0600: give it back the
        # permissions a plain open() gives.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, through the temporary file's own descriptor (one open, no chmod: this
    is the per-file cost of an encode run that writes many small token files)."""
    target = os.fspath(path)
    fd, tmp = _create_beside(target)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    # The only way to read the umask is to set it; done once, at import, rather than around every file, so
    # no other thread can create a file while it is briefly 0.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
