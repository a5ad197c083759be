"""Codebook upkeep helpers: k-means++ seeding with Lloyd refinement, seeded random draws, and the
collective operations that keep every rank's codebook statistics identical under torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vqtok.quantize.search import nearest

# k-means++ seeding draws its seeds from a subsample of at most min(64 K, 16384) rows: seeding is K
# sequential passes over that pool. Above KMEANS_PP_MAX_CODES codes the passes cost more than they gain
# and seeds are drawn uniformly instead; Lloyd steps then use every row in both cases.
KMEANS_SAMPLES_PER_CODE = 64
KMEANS_MAX_POOL = 16384
KMEANS_PP_MAX_CODES = 4096


def distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(*tensors: Tensor) -> None:
    """Sum each tensor over all ranks, in place (no-op in a single process)."""
    if distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(*tensors: Tensor, src: int = 0) -> None:
    """Overwrite each tensor with rank `src`'s copy, in place (no-op in a single process)."""
    if distributed():
        for t in tensors:
            dist.broadcast(t, src)


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of x (N, D), concatenated in rank order: (world * N, D). Ranks train on contiguous
    blocks of one global batch, so this is the batch a single process would have seen. x itself in a single
    process; every rank must pass the same N."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def generator(seed: int) -> torch.Generator:
    """A CPU generator for one upkeep draw. Seeds come from a state buffer, so draws survive a resume and
    are the same on every rank."""
    return torch.Generator().manual_seed(seed % (2**63 - 1))


def kmeans(x: Tensor, k: int, gen: torch.Generator, iters: int = 5) -> tuple[Tensor, Tensor]:
    """k-means++ seeding (D^2 sampling) then `iters` Lloyd steps: x (N, D) -> (centroids (k, D), sizes (k,)).

    Seeding uses a random subsample of x (see KMEANS_MAX_POOL); Lloyd uses all of x. The uniforms come from
    `gen` (CPU) and the sampling is inverse-CDF on x's device, so it is reproducible on any device. Clusters
    that end up empty keep their seed. With fewer than k distinct rows, some centroids repeat (dead-code
    restarts separate them later). K = 1024, N = 10k, D = 64 takes about 0.5 s on one CPU thread.
    """
    x = x.detach().float()
    n = x.shape[0]
    cap = min(KMEANS_SAMPLES_PER_CODE * k, KMEANS_MAX_POOL)
    pool = x[torch.randperm(n, generator=gen)[:cap].to(x.device)] if n > cap else x
    uniforms = torch.rand(k, generator=gen).to(x.device)
    if k <= KMEANS_PP_MAX_CODES:
        centroids = kmeans_pp_seed(pool, k, uniforms)
    else:
        centroids = pool[(uniforms * pool.shape[0]).long().clamp(max=pool.shape[0] - 1)]
    sizes = torch.zeros(k, device=x.device)
    for _ in range(iters):
        idx, _ = nearest(x, centroids)
        sizes = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        centroids = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1.0)[:, None], centroids)
    return centroids, sizes


def kmeans_pp_seed(x: Tensor, k: int, uniforms: Tensor) -> Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii 2007): x (M, D), uniforms (k,) in [0, 1) -> (k, D).

    The first seed is x[floor(u_0 M)]; seed i is drawn with probability proportional to the squared distance
    to the nearest seed so far, by inverse CDF with u_i. One pass over x per seed, no M x k matrix.
    """
    m = x.shape[0]
    x_sq = (x * x).sum(1)
    seeds = x.new_empty(k, x.shape[1])
    pick = (uniforms[0] * m).long().clamp(max=m - 1).reshape(1)
    d2 = torch.full_like(x_sq, float("inf"))
    for i in range(k):
        if i > 0:
            cdf = torch.cumsum(d2, 0)
            pick = torch.searchsorted(cdf, (uniforms[i] * cdf[-1]).reshape(1), right=True).clamp(max=m - 1)
        seed = x[pick[0]]
        seeds[i] = seed
        # |x - s|^2 as one matrix-vector product: far cheaper than materialising x - s.
        d2 = torch.minimum(d2, torch.addmv(x_sq + seed.dot(seed), x, seed, alpha=-2.0).clamp_min(0.0))
    return seeds
