"""Nearest-code search: for each row of x, the index of the closest codebook row (squared L2).

One entry point, `nearest`, with three backends:

- "torch": blocked `addmm` + a row minimum on the CPU (or any device). x is taken `chunk` rows at a time and
  the codebook 2048 codes at a time, so the N x K score matrix never exists whole; each block stays small
  enough to live in the L2 cache, which is what keeps the minimum pass from being memory bound. The row
  minimum goes through groups of codes on the CPU (`_first_min`), 2-3x faster than torch's `min(1)`.
- "faiss": `faiss.IndexFlatL2` over the codebook, searched with k=1 (CPU). The index is built on every call:
  codebooks change every training step, and building one only copies the codebook (0.01 ms at K=512,
  0.5 ms at K=16384, D=64), which is far below the cost of any search worth sending to faiss.
- "cuda": the blocked torch search on GPU tensors, with blocks sized for GPU memory instead of a CPU cache.
  It runs the matmul in fp32; if the caller has turned on TF32 matmuls globally, the matmul follows that
  setting, and only the returned distances stay exact (they are recomputed, see below).

Whatever the backend, the returned distance is recomputed directly as ||x - codebook[i]||^2 in fp32 for the
chosen code, not read off the expanded ||x||^2 - 2 x.c + ||c||^2 form, which loses every digit to
cancellation when x sits far from the origin compared with its distance to the nearest code.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "faiss", "cuda")

# On CPU, "auto" sends a search with at least this many rows of x to faiss and a smaller one to the blocked
# torch search. The crossover is set by N rather than by N*K*D: below 2048 rows faiss is level with torch at
# K=64 but 2-3x slower at K=512 and K=4096; from 2048 rows up it is within ~10% at K=64 and 5-40% faster
# at K >= 512 (one thread or two). Measured on a
# 2-core AVX-512 Xeon, D=64, best of 15 (`benchmarks/search.py --crossover --repeats 15`), torch vs faiss:
# N=1024, K=4096: 3.9 vs 10.9 ms; N=2048, K=4096: 7.8 vs 7.2 ms; N=2048, K=512: 1.15 vs 1.19 ms;
# N=65536, K=4096: 233 vs 210 ms.
FAISS_MIN_ROWS = 2048

# Block shapes. CPU: 512 rows x 2048 codes of float32 is 4 MiB, the combined L2 cache of the 2-core Xeon it
# was tuned on; at N=32768, D=64, K=512..16384 such blocks ran at 150-160 GFLOP/s against ~60 for 32 MiB
# blocks, and the whole N x K matrix at once ran at ~55. GPU: blocks of up to 8192 codes and as many rows as
# keep a block's scores within 8192 x 8192 floats (256 MiB, small enough to sit beside a training step). Each
# block costs a few kernel launches, so small codebooks want many rows: on an H200 (N=65536, D=64, best of 5)
# 8192-row blocks took 0.98 ms at K=512 against 0.37 ms for one 65536-row block (a plain addmm + argmin over
# the whole matrix: 0.29), and 1.79 against 1.55 ms at K=4096; at K=16384 the rows matter less (6.7 vs 6.1).
_CPU_ROWS = 512
_CPU_K_BLOCK = 2048
_CUDA_SCORES = 8192 * 8192
_CUDA_K_BLOCK = 8192

# Codes per group in `_first_min`: torch's `amin` over a last dimension of 32 floats is vectorized (16 is not),
# and the 32 scores of the winning group are few enough to gather.
_MIN_GROUP = 32

# Rows per step when recomputing exact distances for faiss results: (8192, D) differences stay in cache.
_EXACT_ROWS = 8192


@torch.no_grad()
def nearest(
    x: torch.Tensor, codebook: torch.Tensor, *, backend: str = "auto", chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the nearest codebook row of every row of x under squared Euclidean distance.

    x: (N, D), codebook: (K, D), on the same device, any floating dtypes; the search runs in float32.
    backend: "auto", "torch", "faiss" or "cuda" (see the module docstring); "auto" takes "cuda" for GPU
    tensors, and on CPU "faiss" when N >= FAISS_MIN_ROWS, else "torch". "faiss" on GPU tensors copies them
    to the CPU and the results back. chunk: rows of x per block for "torch"/"cuda" (default 512
    on CPU; on GPU as many as keep a block within 8192 x 8192 scores); the codebook is scanned in blocks of
    2048 (CPU) or 8192 (GPU) codes.

    Returns (indices (N,) int64, squared distances (N,) float32), on x's device, without gradient.
    With "torch" and "cuda", codes whose computed scores tie exactly resolve to the lowest index; faiss also
    keeps the first of exactly tied codes for k=1 (tests/test_search.py checks both on duplicated rows), but
    it computes scores in a different order, so it may pick another of two codes that are within rounding.
    """
    if x.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"nearest: x and codebook must be 2-D, got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest: x has D={x.shape[1]} but the codebook has D={codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("nearest: the codebook is empty")
    if x.device != codebook.device:
        raise ValueError(f"nearest: x is on {x.device} but the codebook is on {codebook.device}")
    if not (x.is_floating_point() and codebook.is_floating_point()):
        raise ValueError(f"nearest: expected floating tensors, got {x.dtype} and {codebook.dtype}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"nearest: chunk must be >= 1, got {chunk}")
    if backend not in BACKENDS:
        raise ValueError(f"nearest: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")

    if backend == "auto":
        backend = _auto_backend(x, codebook)
    if x.shape[0] == 0:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0, dtype=torch.float32)

    x = x.detach().float()
    codebook = codebook.detach().float()
    if backend == "faiss":
        return _faiss_nearest(x, codebook)
    if backend == "cuda":
        if x.device.type != "cuda":
            raise ValueError(f"nearest: backend 'cuda' needs CUDA tensors, got tensors on {x.device}")
        rows = chunk or _CUDA_SCORES // min(codebook.shape[0], _CUDA_K_BLOCK)
        return _blocked_nearest(x, codebook, rows, _CUDA_K_BLOCK)
    return _blocked_nearest(x, codebook, chunk or _CPU_ROWS, _CPU_K_BLOCK)


def _auto_backend(x: torch.Tensor, codebook: torch.Tensor) -> str:
    """The backend "auto" picks for these shapes and this device."""
    if x.device.type == "cuda":
        return "cuda"
    if x.device.type == "cpu" and x.shape[0] >= FAISS_MIN_ROWS:
        return "faiss"
    return "torch"


def _blocked_nearest(
    x: torch.Tensor, codebook: torch.Tensor, rows: int, k_block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked search on float32 x (N, D), codebook (K, D): (indices (N,) int64, squared distances (N,))."""
    n, k = x.shape[0], codebook.shape[0]
    # ||x||^2 is the same for every code of a row, so it is left out of the scores: s = ||c||^2 - 2 x.c
    c_sq = (codebook * codebook).sum(1)
    indices = torch.empty(n, dtype=torch.long, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        xs = x[start:start + rows]
        best, best_idx = _first_min(torch.addmm(c_sq[:k_block], xs, codebook[:k_block].t(), alpha=-2.0))
        for k0 in range(k_block, k, k_block):
            score, idx = _first_min(torch.addmm(c_sq[k0:k0 + k_block], xs, codebook[k0:k0 + k_block].t(), alpha=-2.0))
            # Strictly better only: on an exact tie the earlier block, hence the lower index, is kept.
            better = score < best
            best = torch.where(better, score, best)
            best_idx = torch.where(better, idx + k0, best_idx)
        indices[start:start + rows] = best_idx
        dists[start:start + rows] = _exact_sq_dist(xs, codebook, best_idx)
    return indices, dists


def _first_min(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (N, K) -> (row minima (N,), index of each row's first minimum (N,) int64): `scores.min(1)`.

    On the CPU, torch's `min(1)` computes values and indices element by element (~1.1 ns an element on one
    core, as much as the `addmm` that made the scores at D=64); `amin` over groups of _MIN_GROUP codes is
    vectorized. So: each group's minimum, the first group holding the row's minimum, and the first minimum
    within that group, the same index `min(1)` gives, ties and NaN included (512 x 1024 scores: 0.19 against
    0.50 ms; 512 x 2048: 0.32 against 1.03 ms). Other devices, and widths that are not at least four
    whole groups, use `min(1)`.
    """
    n, k = scores.shape
    if scores.device.type != "cpu" or k % _MIN_GROUP or k < 4 * _MIN_GROUP:
        return scores.min(1)
    groups = scores.view(n, k // _MIN_GROUP, _MIN_GROUP)
    group = groups.amin(2).argmin(1)
    members = groups.gather(1, group.view(n, 1, 1).expand(n, 1, _MIN_GROUP)).squeeze(1)
    value, offset = members.min(1)
    return value, group * _MIN_GROUP + offset


def _exact_sq_dist(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """||x - codebook[idx]||^2 per row, float32 (N,), for x (N, D) and idx (N,)."""
    diff = x - codebook[idx]
    return (diff * diff).sum(1)


@functools.cache
def _faiss() -> ModuleType:
    """faiss, imported on first use: the import costs ~0.2 s and most callers never need it."""
    import faiss

    return faiss


def _faiss_nearest(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss IndexFlatL2 search, k=1, on float32 x (N, D), codebook (K, D) on any device."""
    faiss = _faiss()
    device = x.device
    # Contiguous float32 CPU tensors are handed to faiss as numpy views, without a copy.
    x_cpu = x.cpu().contiguous()
    cb_cpu = codebook.cpu().contiguous()
    # faiss and torch each ship an OpenMP runtime. Imported after torch (as here), faiss binds to torch's and
    # shares its thread pool; imported first, it keeps its own pool, sized to all cores whatever torch was
    # told. Either way faiss gets torch's thread count, so a caller's torch.set_num_threads holds for both.
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(cb_cpu.shape[1])
    index.add(cb_cpu.numpy())
    n = x_cpu.shape[0]
    indices = torch.empty((n, 1), dtype=torch.long)
    scores = torch.empty((n, 1), dtype=torch.float32)
    index.search(x_cpu.numpy(), 1, D=scores.numpy(), I=indices.numpy())
    # faiss answers -1 for rows it cannot place (NaN input); torch's min gives a valid index there, and so
    # do we, leaving the NaN to show in the distance.
    indices = indices.view(n).clamp_(min=0)
    dists = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, _EXACT_ROWS):
        stop = start + _EXACT_ROWS
        dists[start:stop] = _exact_sq_dist(x_cpu[start:stop], cb_cpu, indices[start:stop])
    return indices.to(device), dists.to(device)
