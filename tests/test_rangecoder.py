"""The range coder behind the entropy codec: exact round trips, a flush of at most one byte over the
information content, carries, and refusal of every stream the encoder would not have written."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqtok.tokens import rangecoder
from vqtok.tokens.tokfile import normalize_table


class Refused(Exception):
    pass


def _decode(stream: bytes, tables: list, precision: int, n: int) -> list[list[int]]:
    return [row.tolist() for row in rangecoder.decode(stream, tables, precision, n, Refused)]


def _tables(counts: np.ndarray, precision: int) -> list:
    return [rangecoder.freq_cum(row) for row in normalize_table(counts, precision)]


def _information_bits(rows: list[list[int]], counts: np.ndarray, precision: int) -> float:
    freqs = normalize_table(counts, precision)
    return -sum(math.log2(freqs[s][j] / 2**precision) for s, row in enumerate(rows) for j in row)


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(2, 300),
    stages=st.integers(1, 3),
    n=st.integers(0, 200),
    precision=st.integers(12, 24),
    skew=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_and_flush_under_one_byte(k, stages, n, precision, skew, seed):
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, k + 1) ** skew
    probs = rng.permutation(probs / probs.sum())
    counts = rng.integers(0, 1000, size=(stages, k)) + (probs * 10**6).astype(np.int64)
    rows = [rng.choice(k, size=n, p=probs).tolist() for _ in range(stages)]
    tables = _tables(counts, precision)
    stream = rangecoder.encode(rows, tables, precision)
    assert _decode(stream, tables, precision, n) == rows
    # The flush leaves the stream less than one byte longer than the information it carries.
    assert len(stream) < _information_bits(rows, counts, precision) / 8 + 1 + 1e-6
    assert stages * n <= rangecoder.max_codes(len(stream))


def test_carries_propagate_through_runs_of_ff(monkeypatch):
    """A frequent code at the top of a non-dyadic table pushes `low` towards 2^64: some carries must ripple
    through emitted 0xFF bytes."""
    carries = []
    real_carry = rangecoder._carry
    monkeypatch.setattr(rangecoder, "_carry", lambda out: (carries.append(bytes(out)), real_carry(out)))
    counts = np.array([[2, 1]])
    tables = _tables(counts, 16)
    rng = np.random.default_rng(3)
    for _ in range(50):
        rows = [rng.choice(2, size=400, p=[0.02, 0.98]).tolist()]
        stream = rangecoder.encode(rows, tables, 16)
        assert _decode(stream, tables, 16, 400) == rows
    assert any(c.endswith(b"\xff") for c in carries)


def test_empty_and_certain_streams_are_tiny():
    tables = _tables(np.array([[1, 1]]), 12)
    assert rangecoder.encode([[]], tables, 12) == b""
    assert _decode(b"", tables, 12, 0) == [[]]
    # Code 0 sits at the bottom of the interval: its stream is all zero bytes, which the flush leaves out.
    stream = rangecoder.encode([[0] * 10], tables, 12)
    assert stream == b"\x00"
    assert _decode(stream, tables, 12, 10) == [[0] * 10]


@pytest.mark.parametrize("change", ["append", "drop", "last+1", "last-1", "first^1"])
def test_non_canonical_or_damaged_streams_are_refused(change):
    counts = np.array([[5, 3, 2, 1, 1, 1, 1, 1]])
    tables = _tables(counts, 12)
    rows = [np.random.default_rng(0).integers(0, 8, size=300).tolist()]
    stream = bytearray(rangecoder.encode(rows, tables, 12))
    if change == "append":
        stream += b"\x00"
    elif change == "drop":
        del stream[-1]
    elif change == "last+1":
        stream[-1] = (stream[-1] + 1) % 256
    elif change == "last-1":
        stream[-1] = (stream[-1] - 1) % 256
    else:
        stream[0] ^= 1
    try:
        decoded = _decode(bytes(stream), tables, 12, 300)
    except Refused:
        return
    assert decoded != rows  # a damaged stream may decode, but never silently to the same codes


def test_max_codes_bound_admits_the_densest_stream():
    counts = np.array([[10**9, 1]])
    tables = _tables(counts, 12)
    for n in (1, 100, 10_000):
        stream = rangecoder.encode([[0] * n], tables, 12)
        assert n <= rangecoder.max_codes(len(stream))
