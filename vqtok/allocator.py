"""Keep the memory torch frees inside the process, so the next batch reuses it instead of faulting in fresh pages.

glibc's malloc returns freed memory to the kernel eagerly: blocks above its (adaptive) mmap threshold are
unmapped on free, and a heap whose free top passes the trim threshold is shrunk. An encode or a training step
frees and allocates the same activation buffers batch after batch, so every batch faults its buffers in again:
on CIFAR-10 (the default image model, a 2-core machine) ~30 page faults an image, ~0.07 ms of kernel time, or
~10% of the CPU an image costs. With the thresholds below, ~3 faults an image. Blocks over 32 MB (glibc's
own ceiling for the adaptive threshold) still come from mmap and go back on free, and an arena keeps at most
64 MB free at its top, so a large photo's memory is still returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (see the module docstring). Returns False,
    changing nothing, where the C library is not glibc (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has it: musl's mallopt accepts and ignores these settings
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
