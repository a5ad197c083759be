"""nearest(): every backend against a float64 brute-force reference, plus ties, dtypes, edge shapes, errors."""

from __future__ import annotations

import faiss
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vqtok.quantize import search
from vqtok.quantize.search import FAISS_MIN_ROWS, nearest

CPU_BACKENDS = ["torch", "faiss", "auto"]


def reference(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """All squared distances (N, K) in float64, each from its own difference (no expanded-form cancellation)."""
    return torch.cdist(
        x.double().cpu(), codebook.double().cpu(), compute_mode="donot_use_mm_for_euclid_dist"
    ).square()


def check(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, dist: torch.Tensor) -> None:
    """idx picks a code at the minimum distance (within fp32 rounding of the scores) and dist is its distance."""
    n = x.shape[0]
    assert idx.shape == (n,) and idx.dtype == torch.long and idx.device == x.device
    assert dist.shape == (n,) and dist.dtype == torch.float32 and dist.device == x.device
    assert not idx.requires_grad and not dist.requires_grad
    if n == 0:
        return
    idx, dist = idx.cpu(), dist.cpu()
    assert int(idx.min()) >= 0 and int(idx.max()) < codebook.shape[0]
    d = reference(x, codebook)
    best = d.min(1).values
    chosen = d.gather(1, idx[:, None]).squeeze(1)
    # A search scores codes as ||c||^2 - 2 x.c in fp32, so it can only tell apart codes whose distances differ
    # by more than the rounding of those terms.
    x_sq = x.double().cpu().square().sum(1)
    c_sq_max = codebook.double().cpu().square().sum(1).max()
    slack = 1e-5 * (x_sq + c_sq_max)
    assert torch.all(chosen <= best + slack), (chosen - best).max()
    # The reported distance is the real one for the chosen code: relative to that distance, not to the norms.
    torch.testing.assert_close(dist.double(), chosen, rtol=1e-5, atol=1e-6)
    # Where the best code is clearly ahead of the runner-up, every backend must find exactly that code.
    if codebook.shape[0] > 1:
        two = d.topk(2, dim=1, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > 2 * slack
        assert torch.equal(idx[clear], d.argmin(1)[clear])


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("n", "k", "d", "chunk"),
    [
        (700, 4500, 16, None),  # N not a multiple of the row block, K spans three codebook blocks
        (1000, 300, 32, 7),  # tiny odd chunk
        (FAISS_MIN_ROWS + 3, 64, 8, None),  # large enough that "auto" goes to faiss
        (0, 10, 4, None),
        (5, 1, 3, None),  # K=1: everything maps to code 0
        (300, 50, 1, None),  # D=1
        (1, 2049, 5, None),
    ],
)
def test_matches_reference(backend: str, n: int, k: int, d: int, chunk: int | None) -> None:
    x, codebook = randn(n, d, seed=1), randn(k, d, seed=2)
    idx, dist = nearest(x, codebook, backend=backend, chunk=chunk)
    check(x, codebook, idx, dist)
    if k == 1:
        assert torch.all(idx == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 2047, 2048, 2049, 4097])
def test_every_code_finds_itself(backend: str, k: int) -> None:
    # Codebook sizes around the torch backend's 2048-code blocks: the first and last code of each block count.
    codebook = randn(k, 8, seed=21)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(22))
    idx, dist = nearest(codebook[perm], codebook, backend=backend)
    assert torch.equal(idx, perm)
    assert torch.all(dist == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_are_searched_in_fp32(backend: str, dtype: torch.dtype) -> None:
    x, codebook = randn(400, 24, seed=3, dtype=dtype), randn(200, 24, seed=4, dtype=dtype)
    idx, dist = nearest(x, codebook, backend=backend)
    assert dist.dtype == torch.float32
    check(x, codebook, idx, dist)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exact_ties_resolve_to_the_lowest_index(backend: str) -> None:
    # Small integers make every score exact in fp32 whatever the summation order, so ties are true ties.
    gen = torch.Generator().manual_seed(5)
    codebook = torch.randint(-4, 5, (4100, 6), generator=gen).float()
    codebook[2050] = codebook[5]  # a duplicate in another codebook block of the torch search
    codebook[9] = codebook[5]
    codebook[4099] = codebook[5]
    x = torch.cat([codebook[5:6].repeat(3, 1), codebook[9:10] + 0.25, codebook[2050:2051]])
    idx, dist = nearest(x, codebook, backend=backend)
    check(x, codebook, idx, dist)
    d = reference(x, codebook)
    lowest = torch.stack([torch.nonzero(row == row.min())[0, 0] for row in d])
    assert torch.equal(idx, lowest)
    assert torch.all(idx[:3] == 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_duplicate_rows_pick_a_nearest_copy(backend: str) -> None:
    base = randn(40, 12, seed=6)
    codebook = torch.cat([base, base, base[:7]])
    x = randn(500, 12, seed=7)
    idx, dist = nearest(x, codebook, backend=backend)
    check(x, codebook, idx, dist)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_magnitudes_keep_exact_distances(backend: str) -> None:
    # Far from the origin the expanded form ||x||^2 - 2 x.c + ||c||^2 loses all its digits to cancellation
    # (||x||^2 ~ 1.6e7 against distances ~ 30); the reported distances must still be the real ones.
    x = 1000.0 + randn(300, 16, seed=8)
    codebook = 1000.0 + randn(64, 16, seed=9)
    idx, dist = nearest(x, codebook, backend=backend)
    check(x, codebook, idx, dist)
    # Pure scale: 1e15 squared is 1e30, still inside float32.
    x, codebook = 1e15 * randn(300, 16, seed=10), 1e15 * randn(64, 16, seed=11)
    idx, dist = nearest(x, codebook, backend=backend)
    check(x, codebook, idx, dist)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_and_no_gradient(backend: str) -> None:
    x = randn(300, 20, seed=12)[:, ::2].requires_grad_()
    codebook = randn(20, 90, seed=13).t()[:, 1::2]  # (90, 10), strided
    idx, dist = nearest(x, codebook, backend=backend)
    check(x.detach(), codebook, idx, dist)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    k=st.integers(1, 30),
    d=st.integers(1, 6),
    chunk=st.one_of(st.none(), st.integers(1, 17)),
    backend=st.sampled_from(CPU_BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n: int, k: int, d: int, chunk: int | None, backend: str, seed: int) -> None:
    x, codebook = randn(n, d, seed=seed), randn(k, d, seed=seed + 1)
    idx, dist = nearest(x, codebook, backend=backend, chunk=chunk)
    check(x, codebook, idx, dist)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    groups=st.integers(1, 40),
    levels=st.integers(1, 5),
    nans=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_grouped_row_minimum_is_min(n: int, groups: int, levels: int, nans: int, seed: int) -> None:
    # Few distinct values make ties within and across groups; a NaN is the minimum for torch's min(1).
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n, groups * 32), generator=gen).float()
    for _ in range(nans):
        scores[torch.randint(0, n, (1,), generator=gen), torch.randint(0, groups * 32, (1,), generator=gen)] = torch.nan
    value, index = search._first_min(scores)
    want_value, want_index = scores.min(1)
    assert torch.equal(index, want_index)
    assert torch.equal(value.isnan(), want_value.isnan())
    assert torch.equal(value.nan_to_num(-1.0), want_value.nan_to_num(-1.0))

def test_auto_picks_faiss_only_for_many_rows() -> None:
    codebook = randn(16, 4, seed=14)
    assert search._auto_backend(torch.empty(FAISS_MIN_ROWS, 4), codebook) == "faiss"
    assert search._auto_backend(torch.empty(FAISS_MIN_ROWS - 1, 4), codebook) == "torch"


def test_faiss_uses_torch_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        nearest(randn(50, 4, seed=15), randn(8, 4, seed=16), backend="faiss")
        assert faiss.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)


def test_faiss_nan_rows_still_get_a_valid_index() -> None:
    x = randn(30, 4, seed=17)
    x[3, 1] = float("nan")
    idx, dist = nearest(x, randn(8, 4, seed=18), backend="faiss")
    assert 0 <= int(idx[3]) < 8 and torch.isnan(dist[3])


@pytest.mark.parametrize(
    ("x", "codebook", "kwargs", "message"),
    [
        (torch.zeros(3, 4), torch.zeros(5, 3), {}, "D=4"),
        (torch.zeros(3, 4), torch.zeros(0, 4), {}, "empty"),
        (torch.zeros(3), torch.zeros(5, 3), {}, "2-D"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(5, 4), {}, "floating"),
        (torch.zeros(3, 4), torch.zeros(5, 4), {"backend": "gpu"}, "unknown backend"),
        (torch.zeros(3, 4), torch.zeros(5, 4), {"chunk": 0}, "chunk"),
        (torch.zeros(3, 4), torch.zeros(5, 4), {"backend": "cuda"}, "CUDA tensors"),
    ],
)
def test_bad_arguments(x: torch.Tensor, codebook: torch.Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nearest(x, codebook, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "auto", "torch", "faiss"])
@pytest.mark.parametrize(("n", "k", "d", "chunk"), [(9000, 9000, 16, None), (70000, 300, 8, None), (700, 300, 8, 13),
                                                     (0, 5, 3, None)])
def test_cuda(backend: str, n: int, k: int, d: int, chunk: int | None) -> None:
    x, codebook = randn(n, d, seed=19).cuda(), randn(k, d, seed=20).cuda()
    idx, dist = nearest(x, codebook, backend=backend, chunk=chunk)
    check(x, codebook, idx, dist)
    half_idx, half_dist = nearest(x.half(), codebook.half(), backend=backend)
    check(x.half(), codebook.half(), half_idx, half_dist)
