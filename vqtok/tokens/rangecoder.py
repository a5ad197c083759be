"""A range coder over static integer frequency tables, with the shortest termination that decodes.

Each table's frequencies sum to M = 2^precision (precision <= 24). The coder keeps a 64-bit interval
[low, low + rng) with rng in [2^56, 2^64] between codes and emits a byte whenever rng drops below 2^56, so
the division rng // M never truncates more than 2^-32 of the interval. At the end it emits the fewest bytes
(0 or 1) that single out a point of the final interval; the decoder reads zero bytes past the end.

Why not rANS or constriction: an image token file often holds only 49-64 codes (~400 bits of information),
so the flush dominates. rANS must write its whole final state (4-8 bytes); constriction's coders write 32-bit
words (~1.04x the information on 49 codes). This coder's stream is less than one byte longer than its
information, which puts a 7x7 file within 1% of the cross-entropy (benchmarks/tokens.py). Everything is
Python integer arithmetic, identical on every platform.

A stream is canonical: the decoder tracks the encoder's state, and refuses a stream whose length or final
bytes differ from what the encoder would have written for the codes it decoded.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from itertools import repeat
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

_MASK = (1 << 64) - 1
_FULL = 1 << 64
_BOTTOM = 1 << 56  # emit a byte whenever the interval is narrower than this
_LIST_TABLE_MAX = 4096

# A table gives no code more than 31/32 of M, so every code narrows the interval by at least log2(32/31) bits.
_MIN_BITS_PER_CODE = 0.0458  # < log2(32/31) = 0.04580


def max_codes(stream_bytes: int) -> int:
    """The most codes a stream of `stream_bytes` bytes can hold, so a reader can refuse a larger claim first.

    n codes narrow the interval from 2^64 by a factor of at least 2^(0.0458 n); E renormalisation bytes widen
    it back by 2^(8 E) and it ends at >= 2^56, so 0.0458 n <= 8 E + 8 with E <= stream_bytes: about
    174.7 (stream_bytes + 1) codes.
    """
    return int(8 * (stream_bytes + 1) / _MIN_BITS_PER_CODE)


Table = tuple[Sequence[int], Sequence[int]]  # (frequencies (m,), cumulative frequencies (m+1,))


def encode_symbols(symbols: Iterable[tuple[Table, int]], precision: int) -> bytes:
    """Code each (table, index) in turn into one stream: the index into that table's frequencies, which sum to
    2^precision. Every coded index must have a nonzero frequency. Tables may differ from code to code (a
    context model picks one per code); a generator keeps only the current one alive."""
    out = bytearray()
    low, rng = 0, _FULL
    for (freq, cum), j in symbols:
        r = rng >> precision
        low += r * cum[j]
        rng = r * freq[j]
        if low >> 64:
            _carry(out)
            low &= _MASK
        while rng < _BOTTOM:
            out.append(low >> 56)
            low = (low << 8) & _MASK
            rng <<= 8
    tail, carry = _termination(low, rng)
    if carry:
        _carry(out)
    out += tail
    return bytes(out)


def decode_symbols(stream: bytes | memoryview, tables: Iterable[Table], precision: int,
                   fail: Callable[[str], Exception], out: array) -> None:
    """Inverse of `encode_symbols`: decode one index per table that `tables` yields, appending each to `out`
    (an array("q")) before the next table is asked for, so a generator can pick the next table from the codes
    decoded so far. Raises fail(problem) for a stream that is not what `encode_symbols` writes for them."""
    data = bytes(stream)
    size = len(data)
    padded = data + bytes(8)
    window = int.from_bytes(padded[:8], "big")
    x, low, rng, pos = window, 0, _FULL, 8  # x = window - low: where the stream points inside the interval
    append = out.append
    for freq, cum in tables:
        r = rng >> precision
        slot = x // r
        if slot >= cum[-1]:
            raise fail("corrupt entropy stream (points outside the coding interval)")
        # Codes of frequency 0 have an empty slot range; bisect_right lands past them.
        j = bisect_right(cum, slot) - 1
        append(j)
        step = r * cum[j]
        x -= step
        low += step
        rng = r * freq[j]
        while rng < _BOTTOM:
            if pos >= size + 8:
                raise fail("corrupt entropy stream (ran out of data)")
            x = (x << 8) | padded[pos]
            low = (low << 8) & _MASK
            rng <<= 8
            pos += 1
    tail, _ = _termination(low & _MASK, rng)
    emitted = pos - 8
    if size != emitted + len(tail) or padded[emitted : emitted + 8] != (tail + bytes(8))[:8]:
        raise fail("corrupt entropy stream (does not end where it should)")


def encode(rows: Iterable[Sequence[int]], tables: Iterable[Table], precision: int) -> bytes:
    """Code rows[s] (indices into table s) with tables[s], row after row, into one stream (`encode_symbols`
    with one table per row). `tables` may be a generator: only one table need exist at a time."""
    return encode_symbols(((table, j) for row, table in zip(rows, tables) for j in row), precision)


def decode(stream: bytes | memoryview, tables: Iterable[Table], precision: int, n: int,
           fail: Callable[[str], Exception]) -> list[np.ndarray]:
    """Inverse of `encode` for n codes per table: [int64 indices (n,) per table]. Raises fail(problem) for a
    stream that is not what `encode` writes for the codes it decodes to. `tables` may be a generator."""
    out = array("q")  # 8 bytes a code, not the ~36 of a Python list
    rows = 0

    def per_code() -> Iterator[Table]:
        nonlocal rows
        for table in tables:
            rows += 1
            yield from repeat(table, n)

    decode_symbols(stream, per_code(), precision, fail, out)
    codes = np.frombuffer(out, dtype=np.int64) if len(out) else np.zeros(0, dtype=np.int64)
    return [codes[i * n:(i + 1) * n] for i in range(rows)]


def freq_cum(freqs: np.ndarray) -> tuple[Sequence[int], Sequence[int]]:
    """(frequencies (m,), cumulative frequencies (m+1,)) for the coding loops: Python lists, the quickest
    to index, up to 4096 entries; above that flat int64 arrays, ~30% slower to index but built by a copy
    instead of one object per entry, and 8 bytes an entry instead of ~36 (a K = 2^20 table takes 16 MB)."""
    cum = np.zeros(len(freqs) + 1, dtype=np.int64)
    np.cumsum(freqs, out=cum[1:])
    if len(freqs) <= _LIST_TABLE_MAX:
        return freqs.tolist(), cum.tolist()
    freq_arr, cum_arr = array("q"), array("q")
    freq_arr.frombytes(np.ascontiguousarray(freqs, dtype=np.int64).view(np.uint8))
    cum_arr.frombytes(cum.view(np.uint8))
    return freq_arr, cum_arr


def _termination(low: int, rng: int) -> tuple[bytes, bool]:
    """The shortest byte string t (0 or 1 bytes, since rng >= 2^56) such that t followed by zeros lies in
    [low, low + rng); returns (t, whether it carries into the bytes already emitted)."""
    for nbytes in range(9):
        unit = 1 << (64 - 8 * nbytes)
        point = -(-low // unit) * unit
        if point < low + rng:
            return (point & _MASK).to_bytes(8, "big")[:nbytes], point >= _FULL
    raise AssertionError("unreachable: point = low always works")


def _carry(out: bytearray) -> None:
    """Add one to the number the emitted bytes spell. It never runs off the front: the interval always lies
    inside [0, 1)."""
    i = len(out) - 1
    while out[i] == 0xFF:
        out[i] = 0
        i -= 1
    out[i] += 1
