"""Peak memory of a command and every process it starts, sampled from /proc (Linux).

The whole tree is measured as the sum of proportional set sizes (PSS: a page shared by n processes counts 1/n
in each), so forked DataLoader workers, which share most of their pages with their parent, are not counted
twice; the first process alone is measured by its resident set size (RSS).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096


@dataclass
class Measured:
    """A finished command: exit code, wall seconds, peak memory in MB of its whole process tree (PSS summed at
    each sample) and peak RSS of the first process alone."""

    returncode: int
    seconds: float
    peak_tree_mb: float
    peak_main_mb: float
    output: str


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def _pss_mb(pid: int) -> float:
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def _rss_mb(pid: int) -> float:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(command: list[str], interval: float = 0.05, env: dict[str, str] | None = None) -> Measured:
    """Run `command`, sampling the RSS of it and its descendants every `interval` seconds."""
    begin = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_tree = peak_main = 0.0
    while proc.poll() is None:
        tree, todo, total = _children(), [proc.pid], 0.0
        while todo:
            pid = todo.pop()
            total += _pss_mb(pid)
            todo.extend(tree.get(pid, []))
        peak_tree, peak_main = max(peak_tree, total), max(peak_main, _rss_mb(proc.pid))
        time.sleep(interval)
    output = proc.stdout.read() if proc.stdout else ""
    return Measured(proc.returncode, time.perf_counter() - begin, peak_tree, peak_main, output)
