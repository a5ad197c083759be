"""Context tables for the entropy codec: each code is coded with a frequency table picked by a code coded before it.

Codes (S, *grid) are coded stage by stage, each stage in C order, so the grid reads as rows along its last axis
(image rows; audio channels, or one row). The table for a code is picked by its context:

- in the first stage, the group of the code before it in its row (the left neighbour in an image, the previous
  frame in audio); the first code of a row has a table of its own;
- in a later stage s, the group of the stage s - 1 code at the same position.

A code's group is its cluster among G k-means clusters of its stage's code vectors, so similar codes share
statistics and a model's tables stay at (S, G + 1, K). Measured on BSDS500 val with the shipped photo model
(K = 1024, G = 64, fitted on the 200 train photos): the first stage costs 8.64 bits a code instead of 9.79 with
one table per stage (10 packed), later stages about 9.5 instead of 9.9.

Counts are smoothed towards each stage's overall code frequencies when the tables are built, so every code keeps
a nonzero frequency in every context and a context seen few times still codes well. This module imports
numpy only; `fit` imports faiss for the k-means.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from vqtok.tokens.rangecoder import freq_cum

GROUPS = 64
# Smoothing: a context's counts are mixed with its stage's overall frequencies as if those had been seen this
# many times in it (the best of 4, 16, 64 and 256 on BSDS500 val).
PRIOR_WEIGHT = 64


@dataclass(frozen=True)
class ContextTable:
    """A model's code statistics for the entropy codec.

    order0: (S, K) int64 code counts per stage (what files coded with one table per stage were coded with).
    groups: (S, K) int64, each code's group in [0, G). counts: (S, G + 1, K) int64 counts of a stage's code given
    its context in the fitting data; row G is the first code of a row in stage 1 (unused in later stages). The
    coder uses them smoothed (`smoothed`).
    Slicing (`table[:n]`) keeps the first n stages, for files encoded with fewer stages.
    """

    order0: np.ndarray
    groups: np.ndarray
    counts: np.ndarray
    _coding: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        stages, k = self.order0.shape
        g = self.counts.shape[1] - 1
        if self.groups.shape != (stages, k) or self.counts.shape != (stages, g + 1, k) or g < 1:
            raise ValueError(f"context table shapes do not agree: order0 {self.order0.shape}, "
                             f"groups {self.groups.shape}, counts {self.counts.shape}")
        if self.groups.min() < 0 or self.groups.max() >= g:
            raise ValueError(f"context groups must be in [0, {g})")
        if self.counts.min() < 0:
            raise ValueError("context counts must be >= 0")

    def __len__(self) -> int:
        return len(self.order0)

    def __getitem__(self, stages: slice) -> ContextTable:
        return ContextTable(self.order0[stages], self.groups[stages], self.counts[stages])

    def smoothed(self) -> np.ndarray:
        """(S, G + 1, K) int64 integers proportional to the smoothed probabilities of a code given its context:
        (n_cy + w p_y) / (n_c + w), with p_y the stage's overall frequency of code y (every code counted once
        more, so none has probability 0) and w = PRIOR_WEIGHT, times n_c + w and the stage's total count."""
        overall = self.counts.sum(1) + 1  # (S, K)
        return self.counts * overall.sum(1)[:, None, None] + PRIOR_WEIGHT * overall[:, None, :]

    @property
    def group_count(self) -> int:
        return self.counts.shape[1] - 1

    def coding_tables(self, precision: int, normalize) -> tuple[int, list[list[tuple]]]:
        """(CRC32 of the normalised frequencies and the groups, the coder's (freq, cum) pair per stage and
        context), built once per precision. `normalize` is tokfile.normalize_table (tokfile imports this module)."""
        if precision not in self._coding:
            s, c, k = self.counts.shape
            freqs = normalize(self.smoothed().reshape(s * c, k), precision).reshape(s, c, k)
            crc = zlib.crc32(np.ascontiguousarray(self.groups, dtype="<i4"),
                             zlib.crc32(np.ascontiguousarray(freqs, dtype="<i4")))
            self._coding[precision] = (crc, [[freq_cum(row) for row in stage] for stage in freqs])
        return self._coding[precision]


def contexts(codes: np.ndarray, groups: np.ndarray, group_count: int) -> np.ndarray:
    """The context of every code: codes (S, rows, n) int64 -> (S, rows, n) int64 in [0, G]."""
    out = np.empty_like(codes)
    out[0, :, 0] = group_count
    out[0, :, 1:] = groups[0][codes[0, :, :-1]]
    for s in range(1, len(codes)):
        out[s] = groups[s - 1][codes[s - 1]]
    return out


def fit(codebooks: Sequence[np.ndarray], codes: Iterable[np.ndarray], order0: np.ndarray,
        group_count: int = GROUPS, seed: int = 0) -> ContextTable:
    """Fit a context table to `codes`, an iterable of code arrays (S, *grid) as a model writes them.

    codebooks: each stage's code vectors (K, D) float32, grouped by k-means (faiss, seeded). order0: the
    model's (S, K) code counts.
    """
    import faiss

    stages, k = order0.shape
    groups = np.empty((stages, k), dtype=np.int64)
    for s, book in enumerate(codebooks):
        vectors = np.ascontiguousarray(book, dtype=np.float32)
        kmeans = faiss.Kmeans(vectors.shape[1], group_count, niter=25, seed=seed, min_points_per_centroid=1)
        kmeans.train(vectors)
        groups[s] = kmeans.index.search(vectors, 1)[1][:, 0]
    seen = np.zeros((stages, group_count + 1, k), dtype=np.int64)
    for item in codes:
        rows = np.asarray(item, dtype=np.int64).reshape(stages, -1, item.shape[-1])
        ctx = contexts(rows, groups, group_count)
        for s in range(stages):
            np.add.at(seen[s], (ctx[s].ravel(), rows[s].ravel()), 1)
    return ContextTable(np.asarray(order0, dtype=np.int64), groups, seen)
