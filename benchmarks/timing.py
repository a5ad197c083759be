"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable


def best_seconds(fn: Callable[[], object], repeats: int, setup: Callable[[], object] = lambda: None) -> float:
    """Fastest of `repeats` timed calls, after one untimed warm-up call, in seconds; `setup` runs untimed
    before every call."""
    setup()
    fn()
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
