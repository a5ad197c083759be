"""The process keeps freed memory for reuse after `keep_freed_memory` (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A child process: allocate and free 20 MB, then count the page faults of allocating the same again.
CHILD = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from vqtok.allocator import keep_freed_memory
    assert keep_freed_memory()
a = np.ones(5 << 20, dtype=np.float32); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(5 << 20, dtype=np.float32); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_allocation_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    # 20 MB is 5,120 pages: with glibc's defaults the second block is fresh memory, faulted in again (~500 faults
    # where the kernel maps several pages a fault); kept, it is the first block, already mapped.
    assert second_allocation_faults("default") > 200
    assert second_allocation_faults("keep") < 50
