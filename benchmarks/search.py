"""Benchmark nearest-code search: naive full-matrix argmin against each `vqtok.search.nearest` backend.

For every (K, D) it times N random queries against a random K-code codebook and reports milliseconds per
call (best of --repeats) and effective GFLOP/s, counting 2*N*K*D floating-point operations per search.
With --crossover it instead sweeps N at fixed K to find where faiss starts to beat the torch backend,
which is where `vqtok.search.FAISS_MIN_ROWS` comes from.

    python benchmarks/search.py                      # N=65536, K in 512..16384 at D=64, one row at D=256
    python benchmarks/search.py --crossover          # N sweep, torch vs faiss
Results go to benchmarks/results/search.json (written atomically).
"""

from __future__ import annotations


import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqtok.atomic import write_bytes_atomic  # noqa: E402
from vqtok.quantize.search import FAISS_MIN_ROWS, nearest  # noqa: E402
from timing import best_seconds  # noqa: E402  (benchmarks/timing.py; the script folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "search.json"


def naive(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The baseline: the whole N x K matrix of ||c||^2 - 2 x.c at once, then argmin (N,) int64."""
    return torch.addmm(codebook.pow(2).sum(1), x, codebook.t(), alpha=-2.0).argmin(1)


def timing(backend: str, n: int, k: int, d: int, sec: float) -> dict:
    """One result row: shape, milliseconds per call and GFLOP/s at 2*N*K*D operations per search."""
    return {"backend": backend, "N": n, "K": k, "D": d, "ms": sec * 1e3, "gflops": 2 * n * k * d / sec / 1e9}


def backends(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
    """Name -> search function for every backend that runs on `device`."""
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {"naive": naive}
    names = ["cuda", "auto"] if device.type == "cuda" else ["torch", "faiss", "auto"]
    for name in names:
        fns[name] = lambda x, c, name=name: nearest(x, c, backend=name)
    return fns


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_table(n: int, ks: list[int], d: int, extra_d: int | None, repeats: int, device: torch.device) -> list[dict]:
    """Time every backend for each K at D=d, plus one row at D=extra_d (largest K); one dict per timing."""
    shapes = [(k, d) for k in ks] + ([(max(ks), extra_d)] if extra_d else [])
    rows = []
    gen = torch.Generator().manual_seed(0)
    for k, dim in shapes:
        x = torch.randn(n, dim, generator=gen).to(device)
        codebook = torch.randn(k, dim, generator=gen).to(device)
        for name, fn in backends(device).items():
            def call(fn=fn, x=x, codebook=codebook) -> None:
                fn(x, codebook)
                sync(device)

            sec = best_seconds(call, repeats)
            rows.append(timing(name, n, k, dim, sec))
            print(f"  N={n} K={k} D={dim} {name:6s} {sec * 1e3:9.2f} ms", file=sys.stderr, flush=True)
    return rows


def run_crossover(ns: list[int], ks: list[int], d: int, repeats: int) -> list[dict]:
    """Time torch and faiss backends (CPU) for every (N, K) at D=d; one dict per timing."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(max(ns), d, generator=gen)
    for k in ks:
        codebook = torch.randn(k, d, generator=gen)
        for n in ns:
            x = x_all[:n]
            for name in ("torch", "faiss"):
                sec = best_seconds(lambda x=x, name=name: nearest(x, codebook, backend=name), repeats)
                rows.append(timing(name, n, k, d, sec))
    return rows


def print_table(rows: list[dict], by: str) -> None:
    """A plain-text (markdown) table: one line per shape, ms and GFLOP/s per backend."""
    names = list(dict.fromkeys(r["backend"] for r in rows))
    shapes = list(dict.fromkeys((r["N"], r["K"], r["D"]) for r in rows))
    cell = {(r["N"], r["K"], r["D"], r["backend"]): r for r in rows}
    print("| N | K | D | " + " | ".join(f"{b} ms (GFLOP/s)" for b in names) + " |")
    print("|" + "---:|" * (3 + len(names)))
    for n, k, d in shapes:
        cells = [f"{cell[n, k, d, b]['ms']:.2f} ({cell[n, k, d, b]['gflops']:.0f})" for b in names]
        print(f"| {n} | {k} | {d} | " + " | ".join(cells) + " |")
    print(f"\n({by})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=65536, help="queries per search (rows of x)")
    parser.add_argument("--k", type=int, nargs="+", default=[512, 1024, 4096, 8192, 16384], help="codebook sizes")
    parser.add_argument("--d", type=int, default=64, help="code dimension")
    parser.add_argument("--extra-d", type=int, default=256, help="one more row at this D and the largest K (0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell; the best is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch (and so faiss) CPU threads; default: torch's choice")
    parser.add_argument("--crossover", action="store_true", help="sweep N for torch vs faiss instead (CPU)")
    parser.add_argument("--crossover-n", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 16384])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crossover:
        rows = run_crossover(args.crossover_n, args.k, args.d, args.repeats)
    else:
        rows = run_table(args.n, args.k, args.d, args.extra_d or None, args.repeats, device)
    cpu = platform.processor() or platform.machine()
    by = f"best of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"
    print_table(rows, by)

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["crossover" if args.crossover else "table"] = {
        "command": " ".join(["python", "benchmarks/search.py", *sys.argv[1:]]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "faiss_min_rows": FAISS_MIN_ROWS,
        "rows": rows,
    }
    write_bytes_atomic(args.out, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
