"""Nearest-code search: for each row of x, the index of the closest codebook row (squared L2)."""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, D), codebook: (K, D) -> (indices (N,) int64, squared distances (N,) float32).

    Chunked over N so the N x K distance matrix never exists whole.
    """
    x = x.float()
    codebook = codebook.float()
    c_sq = (codebook * codebook).sum(1)
    indices, dists = [], []
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        d = torch.addmm(c_sq, xs, codebook.t(), alpha=-2.0)
        best, idx = d.min(1)
        indices.append(idx)
        dists.append((best + (xs * xs).sum(1)).clamp_min_(0))
    if not indices:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(indices), torch.cat(dists)
