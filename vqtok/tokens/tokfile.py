"""The `.vqt` token file: one tokenized image or audio clip, codes of shape (S, *grid).

Layout (docs/FORMAT.md has the full description and the rules a reader enforces):

    magic b"VQTK" | major u8 | minor u8 | header_len u32 | header | payload_len u32 | payload | CRC32 u32

All integers are little-endian; the CRC32 covers every byte before it. The header is a JSON object: in format 2
(what this version writes) DEFLATE-compressed against a preset dictionary of the fields vqtok writes
(`HEADER_DICTIONARY`), which takes a typical header from 170-310 bytes to 45-75; format 1 files (plain JSON) still
open. Two payload codecs:

- "packed": the codes of all stages, stage by stage in C order, at ceil(log2 K) bits each, LSB first.
- "entropy": a range coder (`rangecoder.py`) on static integer frequency tables: the model's code frequencies, one
  table per stage ("table": "model"), or the model's context tables, a table per code picked by a code coded
  before it ("table": "context", see `context.py`; the caller passes them to reader and writer), or per-file
  counts stored in the payload ("table": "file").
  Tables are normalised with integer arithmetic only, so a file decodes identically on every platform.
  `vqtok encode --codec entropy` writes a file packed instead when that is no larger (`encode_with_fallback`).

Reading never trusts a length: sizes are checked against the bytes actually present before anything is
allocated, and every problem raises `TokenFileError` naming the file.

This module imports numpy only (no torch), so tools that only read token files stay light.
"""

from __future__ import annotations

import json
import os
from array import array
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtok.tokens import context, rangecoder
from vqtok.tokens.context import ContextTable
from vqtok.atomic import write_bytes_atomic
from vqtok.errors import TokenFileError

# A model's code statistics as the entropy codec takes them: (S, K) code counts, or a context table.
CodeTable = np.ndarray | ContextTable

MAGIC = b"VQTK"
VERSION = (2, 0)
CODECS = ("packed", "entropy")
# magic (4) + major, minor (2) + header length (4) + payload length (4) + CRC32 (4).
FIXED_OVERHEAD_BYTES = 18
MAX_HEADER_BYTES = 65536
MAX_CODEBOOK_SIZE = 1 << 24
MAX_STAGES = 256
MAX_GRID_DIMS = 3
FORMAT_KEYS = ("codec", "codebook_size", "stages", "grid")
# Format 2's header is raw DEFLATE (RFC 1951, no zlib or gzip wrapper) of the JSON, compressed against this
# preset dictionary: the names and usual values of the fields vqtok writes. Part of the format: a reader
# needs exactly these bytes. DEFLATE codes near matches in fewer bits, so the fields every file has come last.
HEADER_DICTIONARY = (
    b'"precision":18,"table":"model","table":"context","table_crc":"refine":'
    b'"channels":2,"channel_mode":"keep"'
    b'{"fingerprint":"","modality":"image","original_size":[32,32],"source":".png","jpg",'
    b'{"fingerprint":"","modality":"audio","sample_rate":16000,"original_sample_rate":16000,"original_length":,'
    b'"channels":1,"channel_mode":"mono","source":".wav",".flac",'
    b'"codec":"entropy","codec":"packed","codebook_size":1024,"stages":1,"grid":['
)
# Fields only some codecs write: dropped from a caller's header (say, one read from another file) so a
# packed file never carries a stale table checksum.
CODEC_KEYS = ("precision", "table", "table_crc")

# Frequency tables sum to 2^precision.
_MIN_PRECISION = 12
_MAX_PRECISION = 24
# A symbol may take at most 31/32 of a table: every symbol then costs >= log2(32/31) = 0.046 bits, which
# bounds how many codes a payload of a given size can hold (see rangecoder.max_codes).
_CAP_DIVISOR = 32
# payload_len is a u32.
_MAX_PAYLOAD_BYTES = (1 << 32) - 1
# Codes per chunk in bit (un)packing: bounds the (chunk, 32) bit matrix to 8 MiB.
_PACK_CHUNK = 1 << 18


@dataclass
class Tokens:
    """The content of one token file.

    codes: int64, shape (S, *grid) (S residual stages; grid (H, W) for images, (C, T) or (T,) for audio).
    header: the JSON header as read: the writer's format fields (codec, codebook_size, stages, grid and the
    codec's own fields) plus the caller's metadata (fingerprint, modality, sizes, source name...).
    path: the file read, or None when decoded from bytes.
    """

    codes: np.ndarray
    header: dict[str, Any]
    path: Path | None = None


def bits_per_code(codebook_size: int) -> int:
    """Bits per code in the packed codec: ceil(log2 K), at least 1."""
    if codebook_size < 2:
        raise ValueError(f"codebook size must be >= 2, got {codebook_size}")
    return (codebook_size - 1).bit_length()


def entropy_precision(codebook_size: int) -> int:
    """Bits of the frequency-table total 2^precision the writer uses for K codes (12..24)."""
    return min(_MAX_PRECISION, max(_MIN_PRECISION, bits_per_code(codebook_size) + 8))


def normalize_table(counts: np.ndarray, precision: int, *, floor_all: bool = True) -> np.ndarray:
    """Integer frequency tables summing to 2^precision, from code counts.

    counts: (S, K) non-negative integers (code counts per stage). floor_all: every code gets frequency >= 1
    (model tables, so any code can be coded); otherwise only codes with a nonzero count do (per-file tables).
    Frequencies are proportional to counts (largest remainders, ties to the lower code) and no code takes
    more than 31/32 of the total. Integer arithmetic only: identical on every platform.
    Returns int32 (S, K) (frequencies are <= 2^24).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] < 2 or counts.dtype.kind not in "iu":
        raise ValueError(f"frequency table must be an integer array (S, K) with K >= 2, got {counts.dtype} {counts.shape}")
    if counts.dtype.kind == "i" and counts.size and counts.min() < 0:
        raise ValueError("frequency table counts must be >= 0")
    if counts.dtype == np.uint64 and counts.size and counts.max() >= 1 << 63:
        raise ValueError("frequency table counts must be < 2^63")
    total = 1 << precision
    if counts.shape[1] > total:
        raise ValueError(f"{counts.shape[1]} codes do not fit a table of total 2^{precision}")
    out = np.empty(counts.shape, dtype=np.int32)
    for stage, row in enumerate(counts):
        out[stage] = _normalize_row(row.astype(np.int64, copy=False), total, floor_all)
    return out


def _normalize_row(c: np.ndarray, total: int, floor_all: bool) -> np.ndarray:
    """One stage of `normalize_table`: int64 counts (K,) -> int64 frequencies (K,) summing to `total`."""
    if not c.any():
        c = np.ones_like(c)
    # Keep c * total inside int64: drop low bits of huge counts, but never turn a nonzero count into zero.
    shift = max(0, int(c.max()).bit_length() - 36)
    if shift:
        c = np.where(c > 0, np.maximum(c >> shift, 1), 0)
    nonzero = c > 0
    spare = total - (len(c) if floor_all else int(np.count_nonzero(nonzero)))
    csum = int(c.sum())
    scaled = c * spare
    freq = scaled // csum
    freq += 1 if floor_all else nonzero
    remainder = total - int(freq.sum())
    if remainder:
        # Largest remainders first, ties to the lower code: everything above the remainder-th largest
        # fraction, then the lowest codes holding exactly that fraction.
        frac = np.remainder(scaled, csum, out=scaled)
        threshold = np.partition(frac, len(frac) - remainder)[len(frac) - remainder]
        above = frac > threshold
        freq += above
        ties = np.flatnonzero(frac == threshold)[: remainder - int(np.count_nonzero(above))]
        freq[ties] += 1
    cap = total - total // _CAP_DIVISOR
    top = int(np.argmax(freq))
    excess = int(freq[top]) - cap
    if excess > 0:
        # The excess goes to the next most frequent code (lowest index among ties); it stays far below cap.
        freq[top] = -1
        second = int(np.argmax(freq))
        freq[top] = cap
        freq[second] += excess
    return freq


def encode_tokens(
    codes: np.ndarray,
    header: dict[str, Any],
    *,
    codebook_size: int,
    codec: str = "packed",
    table: CodeTable | None = None,
) -> bytes:
    """The bytes of a token file for `codes` (S, *grid), integers in [0, codebook_size).

    header: the caller's metadata (must hold "fingerprint" and "modality"); the format fields (codec,
    codebook_size, stages, grid and codec fields) are added from the arguments. codec: "packed" or
    "entropy". table, for "entropy": the model's (S, K) code counts (the file records "table": "model") or
    its `ContextTable` ("table": "context"); such a file must be read with the same table. None with
    "entropy" stores per-file counts in the payload.
    """
    codes = np.asarray(codes)
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if not 2 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook size must be in [2, 2^24], got {codebook_size}")
    if codes.ndim < 2 or codes.ndim > MAX_GRID_DIMS + 1 or codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be an integer array (S, *grid) with 1-3 grid dims, got {codes.dtype} {codes.shape}")
    if not 1 <= codes.shape[0] <= MAX_STAGES:
        raise ValueError(f"stages must be in [1, {MAX_STAGES}], got {codes.shape[0]}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must be in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]")
    for key in ("fingerprint", "modality"):
        if not isinstance(header.get(key), str):
            raise ValueError(f"header needs a string {key!r}")
    grid = list(codes.shape[1:])
    if "grid" in header and list(header["grid"]) != grid:
        raise ValueError(f"header grid {header['grid']} does not match codes of shape {codes.shape}")
    if table is not None and codec != "entropy":
        raise ValueError("a frequency table applies only to the entropy codec")

    stages = codes.shape[0]
    flat = codes.reshape(stages, -1).astype(np.int64)
    fields: dict[str, Any] = {"codec": codec, "codebook_size": codebook_size, "stages": stages, "grid": grid}
    if codec == "packed":
        payload = _pack(flat.reshape(-1), bits_per_code(codebook_size))
    else:
        precision = entropy_precision(codebook_size)
        fields["precision"] = precision
        if isinstance(table, ContextTable):
            if table.order0.shape != (stages, codebook_size):
                raise ValueError(f"context table has {len(table)} stages of {table.order0.shape[1]} codes, "
                                 f"codes need ({stages}, {codebook_size})")
            fields["table"] = "context"
            fields["table_crc"], coding = table.coding_tables(precision, normalize_table)
            payload = _context_encode(codes.reshape(stages, -1, grid[-1]).astype(np.int64), table, coding,
                                      precision) if flat.size else b""
        elif table is not None:
            table = np.asarray(table)
            if table.shape != (stages, codebook_size):
                raise ValueError(f"frequency table has shape {table.shape}, codes need ({stages}, {codebook_size})")
            freqs = normalize_table(table, precision)
            fields["table"] = "model"
            fields["table_crc"] = _table_crc(freqs)
            payload = _entropy_encode(flat, [(None, row) for row in freqs], precision)
        else:
            fields["table"] = "file"
            sparse = [np.unique(row, return_counts=True) for row in flat]
            tables = [_file_table(syms, counts, precision) for syms, counts in sparse]
            payload = _encode_counts(sparse) + _entropy_encode(flat, tables, precision)
    full = {**{key: value for key, value in header.items() if key not in CODEC_KEYS}, **fields}
    head = header_bytes(full)
    if len(payload) > _MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes is too large for one token file")
    body = b"".join([MAGIC, bytes(VERSION), struct.pack("<I", len(head)), head, struct.pack("<I", len(payload)), payload])
    return body + struct.pack("<I", zlib.crc32(body))


def encode_with_fallback(
    codes: np.ndarray,
    header: dict[str, Any],
    *,
    codebook_size: int,
    codec: str = "packed",
    table: CodeTable | None = None,
) -> bytes:
    """The token file `vqtok encode --codec CODEC` writes for `codes`: `encode_tokens`, except that an
    "entropy" file that would come out larger than the packed one is written packed instead.

    Range coding spends more than ceil(log2 K) bits on a code its table makes rare, so a table that misfits a
    file (a model's table on other data, per-file counts of a few codes, near-uniform codes plus the entropy
    header fields) can cost more than packing. The choice is per file and the header records it, so readers
    need nothing new. Arguments as for `encode_tokens`.
    """
    data = encode_tokens(codes, header, codebook_size=codebook_size, codec=codec, table=table)
    if codec != "entropy":
        return data
    packed = encode_tokens(codes, header, codebook_size=codebook_size)
    return packed if len(packed) <= len(data) else data


def write_tokens(
    path: str | os.PathLike,
    codes: np.ndarray,
    header: dict[str, Any],
    *,
    codebook_size: int,
    codec: str = "packed",
    table: CodeTable | None = None,
) -> int:
    """Write `codes` (S, *grid) to a token file atomically; returns the bytes written.

    See `encode_tokens` for the arguments.
    """
    data = encode_tokens(codes, header, codebook_size=codebook_size, codec=codec, table=table)
    write_bytes_atomic(path, data)
    return len(data)


def peek_header(path: str | os.PathLike) -> dict | None:
    """The header of a token file, read without its payload (layout: magic (4), version (2), header length
    u32 (4), header), or None when it cannot be read; `read_tokens` then reports the problem."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
            if len(head) < 10 or head[:4] != MAGIC or not 1 <= head[4] <= VERSION[0]:
                return None
            size = int.from_bytes(head[6:10], "little")
            return parse_header(f.read(size), head[4]) if size <= MAX_HEADER_BYTES else None
    except (OSError, ValueError):
        return None


def header_bytes(header: dict[str, Any]) -> bytes:
    """The header field of a format-2 file for `header`: its JSON without whitespace, raw DEFLATE against
    `HEADER_DICTIONARY`. Raises ValueError for a header over MAX_HEADER_BYTES of JSON."""
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(text)} bytes; the limit is {MAX_HEADER_BYTES}")
    # Memory level 8 (zlib's default): the same bytes as level 9 on vqtok's headers in 5 us instead of 7, which a
    # folder of small token files pays per file. Lower levels are faster still but cut DEFLATE blocks every few
    # hundred symbols, each with its own code tables, so a long header could come out longer than its JSON.
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=HEADER_DICTIONARY)
    # JSON is printable ASCII (json.dumps escapes the rest), under 7 bits a byte for DEFLATE's Huffman codes, so
    # the compressed header is always shorter than the JSON and within the limit too.
    return packer.compress(text) + packer.flush()


def parse_header(raw: bytes, major: int = VERSION[0]) -> dict[str, Any]:
    """The header object from the header field of a file of format `major` (1: JSON, 2: `header_bytes`);
    ValueError says what is wrong.

    Inflating stops at MAX_HEADER_BYTES, so a small header that would expand without bound is refused
    before it takes memory."""
    if major >= 2:
        inflater = zlib.decompressobj(-15, zdict=HEADER_DICTIONARY)
        try:
            text = inflater.decompress(raw, MAX_HEADER_BYTES + 1)
        except zlib.error:
            raise ValueError("header is not valid DEFLATE data") from None
        if len(text) > MAX_HEADER_BYTES:
            raise ValueError(f"header inflates to more than {MAX_HEADER_BYTES} bytes")
        if not inflater.eof or inflater.unused_data:
            raise ValueError("header's DEFLATE stream does not end where its length says")
        raw = text
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def read_tokens(path: str | os.PathLike, *, table: CodeTable | None = None) -> Tokens:
    """Read a token file. table: the model's code statistics, needed for files that record "table": "model"
    ((S, K) code counts, or a ContextTable, whose counts it holds) or "table": "context" (a ContextTable).
    Raises TokenFileError (naming the file) for anything unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Look before reading it all: a large file of another kind is refused after 4 bytes.
            if f.read(4) != MAGIC:
                raise TokenFileError(f"{path}: not a vqtok token file (bad magic)")
            size = os.fstat(f.fileno()).st_size
            if size > FIXED_OVERHEAD_BYTES + MAX_HEADER_BYTES + _MAX_PAYLOAD_BYTES:
                raise TokenFileError(f"{path}: {size} bytes is larger than any token file can be")
            data = MAGIC + f.read()
    except OSError as e:
        raise TokenFileError(f"{path}: cannot read token file: {e.strerror or e}") from None
    tokens = decode_tokens(data, table=table, source=str(path))
    tokens.path = path
    return tokens


def decode_tokens(data: bytes, *, table: CodeTable | None = None, source: str = "<bytes>") -> Tokens:
    """Decode the bytes of a token file; `source` names it in error messages. See `read_tokens`."""

    def fail(problem: str) -> TokenFileError:
        return TokenFileError(f"{source}: {problem}")

    size = len(data)
    if size < 4 or data[:4] != MAGIC:
        raise fail("not a vqtok token file (bad magic)")
    if size < 10:
        raise fail(f"truncated: {size} bytes, shorter than the fixed header")
    major, minor = data[4], data[5]
    if major > VERSION[0]:
        raise fail(f"format version {major}.{minor} is newer than this vqtok reads ({VERSION[0]}.x); upgrade vqtok")
    if major < 1:
        raise fail(f"unknown format version {major}.{minor}")
    (head_len,) = struct.unpack_from("<I", data, 6)
    if head_len > MAX_HEADER_BYTES:
        raise fail(f"header length {head_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if size < 10 + head_len + 4:
        raise fail(f"truncated: {size} bytes, the header alone needs {10 + head_len + 4}")
    (payload_len,) = struct.unpack_from("<I", data, 10 + head_len)
    expected = FIXED_OVERHEAD_BYTES + head_len + payload_len
    if size < expected:
        raise fail(f"truncated: {size} bytes, expected {expected}")
    if size > expected:
        raise fail(f"{size - expected} unexpected bytes after the checksum")
    (crc,) = struct.unpack_from("<I", data, expected - 4)
    if zlib.crc32(memoryview(data)[: expected - 4]) != crc:
        raise fail("checksum mismatch (the file is corrupt)")

    try:
        header = parse_header(bytes(data[10 : 10 + head_len]), major)
    except ValueError as e:
        raise fail(str(e)) from None
    codec, k, stages, grid = _check_header(header, fail)
    payload = memoryview(data)[14 + head_len : 14 + head_len + payload_len]
    n_per_stage = 1
    for dim in grid:
        n_per_stage *= dim
    if codec == "packed":
        flat = _unpack_checked(payload, stages * n_per_stage, bits_per_code(k), fail)
    else:
        flat = _entropy_decode(payload, header, stages, grid, k, table, fail)
    codes = flat.reshape(stages, *grid)
    if codes.size and int(codes.max()) >= k:
        stage, pos = np.argwhere(codes.reshape(stages, -1) >= k)[0]
        raise fail(f"code {codes.reshape(stages, -1)[stage, pos]} at stage {stage} is >= the codebook size {k}")
    return Tokens(codes=codes, header=header)


def _check_header(header: dict[str, Any], fail) -> tuple[str, int, int, list[int]]:
    """Validate the format fields; returns (codec, codebook size, stages, grid)."""
    for key in (*FORMAT_KEYS, "fingerprint", "modality"):
        if key not in header:
            raise fail(f"header has no {key!r} field")
    codec = header["codec"]
    if codec not in CODECS:
        raise fail(f"unknown codec {codec!r}")
    k = header["codebook_size"]
    if not _is_int(k) or not 2 <= k <= MAX_CODEBOOK_SIZE:
        raise fail(f"codebook size {k!r} is not an integer in [2, 2^24]")
    stages = header["stages"]
    if not _is_int(stages) or not 1 <= stages <= MAX_STAGES:
        raise fail(f"stages {stages!r} is not an integer in [1, {MAX_STAGES}]")
    grid = header["grid"]
    if (not isinstance(grid, list) or not 1 <= len(grid) <= MAX_GRID_DIMS
            or not all(_is_int(d) and d >= 0 for d in grid)):
        raise fail(f"grid {grid!r} is not a list of 1-{MAX_GRID_DIMS} non-negative integers")
    if not isinstance(header["fingerprint"], str) or not isinstance(header["modality"], str):
        raise fail("fingerprint and modality must be strings")
    return codec, k, stages, grid


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------- packed


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """Bit-pack int64 codes (n,) at `bits` bits each, LSB first: code i holds stream bits [i*bits, (i+1)*bits)."""
    out = bytearray()
    for start in range(0, len(codes), _PACK_CHUNK):  # a multiple of 8 codes: each chunk ends on a byte
        chunk = codes[start : start + _PACK_CHUNK].astype("<u4")
        bitmat = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        out += np.packbits(bitmat[:, :bits].reshape(-1), bitorder="little").tobytes()
    return bytes(out)


def _unpack_checked(payload: memoryview, n: int, bits: int, fail) -> np.ndarray:
    """Inverse of `_pack` for n codes; the payload must be exactly ceil(n*bits/8) bytes with zero padding."""
    need = (n * bits + 7) // 8
    if len(payload) != need:
        raise fail(f"header claims {n} codes ({need} bytes packed) but the payload has {len(payload)} bytes")
    raw = np.frombuffer(payload, dtype=np.uint8)
    tail = (n * bits) % 8
    if tail and raw[-1] >> tail:
        raise fail("nonzero padding bits after the last code")
    out = np.empty(n, dtype=np.int64)
    chunk_bytes = _PACK_CHUNK * bits // 8
    for i, start in enumerate(range(0, n, _PACK_CHUNK)):
        count = min(_PACK_CHUNK, n - start)
        bitstream = np.unpackbits(raw[i * chunk_bytes : i * chunk_bytes + (count * bits + 7) // 8], bitorder="little")
        bitmat = np.zeros((count, 32), dtype=np.uint8)
        bitmat[:, :bits] = bitstream[: count * bits].reshape(count, bits)
        out[start : start + count] = np.packbits(bitmat, axis=1, bitorder="little").view("<u4").reshape(-1)
    return out


# ---------------------------------------------------------------------------------------------- entropy


def _table_crc(freqs: np.ndarray) -> int:
    """CRC32 of a normalised (S, K) table, recorded so a file is never decoded with another model's table."""
    return zlib.crc32(np.ascontiguousarray(freqs, dtype="<i4"))


def _file_table(syms: np.ndarray, counts: np.ndarray, precision: int) -> tuple[np.ndarray, np.ndarray]:
    """The coding table of one stage from its sparse counts: (codes (m,), frequencies (m,)), m >= 2.

    A stage with one distinct code gets the lowest other code beside it (frequency 0 before the cap), the
    code that `normalize_table` would hand the cap's excess in a dense table.
    """
    if len(syms) == 1:
        other = 1 if syms[0] == 0 else 0
        syms = np.array(sorted([int(syms[0]), other]), dtype=np.int64)
        counts = np.where(syms == other, 0, counts[0])
    if len(syms) == 0:
        return np.zeros(1, dtype=np.int64), np.full(1, 1 << precision, dtype=np.int64)
    return syms.astype(np.int64), _normalize_row(counts.astype(np.int64), 1 << precision, floor_all=False)


def _entropy_encode(flat: np.ndarray, tables: list[tuple[np.ndarray | None, np.ndarray]], precision: int) -> bytes:
    """Range-code int64 codes (S, n); stage s uses tables[s] = (codes or None for 0..K-1, frequencies), whose
    frequencies sum to 2^precision."""
    rows = [(row if syms is None else np.searchsorted(syms, row)).tolist() for row, (syms, _) in zip(flat, tables)]
    return rangecoder.encode(rows, (rangecoder.freq_cum(f) for _, f in tables), precision)


def _context_encode(rows: np.ndarray, table: ContextTable, coding: list[list[tuple]], precision: int) -> bytes:
    """Range-code int64 codes (S, rows, n), each with the table of its context (see context.py)."""
    ctx = context.contexts(rows, table.groups, table.group_count)
    return rangecoder.encode_symbols(((coding[s][c], j) for s in range(len(rows))
                                      for c, j in zip(ctx[s].ravel().tolist(), rows[s].ravel().tolist())), precision)


def _context_decode(coded: memoryview, table: ContextTable, coding: list[list[tuple]], stages: int, rows: int,
                    n: int, precision: int, fail) -> np.ndarray:
    """Inverse of `_context_encode`: int64 codes (stages * rows * n,). Each code's table comes from the codes
    decoded before it, as the encoder picked it."""
    out = array("q")
    groups, none = table.groups.tolist(), table.group_count

    def tables():
        first, left = coding[0], groups[0]
        for _ in range(rows):
            if n:
                yield first[none]
            for _ in range(n - 1):
                yield first[left[out[-1]]]
        per_stage = rows * n
        for s in range(1, stages):
            here, above, base = coding[s], groups[s - 1], (s - 1) * per_stage
            for i in range(base, base + per_stage):
                yield here[above[out[i]]]

    rangecoder.decode_symbols(coded, tables(), precision, fail, out)
    return np.frombuffer(out, dtype=np.int64) if len(out) else np.zeros(0, dtype=np.int64)


def _entropy_decode(payload: memoryview, header: dict[str, Any], stages: int, grid: list[int], k: int,
                    table: CodeTable | None, fail) -> np.ndarray:
    """Decode an entropy payload into int64 codes (stages * n,), checking tables, sizes and the end of the stream."""
    n = int(np.prod(grid, dtype=np.int64))
    precision = header.get("precision")
    if not _is_int(precision) or not _MIN_PRECISION <= precision <= _MAX_PRECISION or k > 1 << precision:
        raise fail(f"entropy precision {precision!r} is not an integer in [{_MIN_PRECISION}, {_MAX_PRECISION}] fitting K={k}")
    kind = header.get("table")
    if kind in ("model", "context"):
        sparse, offset = None, 0
    elif kind == "file":
        sparse, offset = _decode_counts(payload, stages, k, n, fail)
    else:
        raise fail(f"unknown entropy table {kind!r}")
    coded = payload[offset:]
    if stages * n > rangecoder.max_codes(len(coded)):
        raise fail(f"header claims {stages * n} codes, more than {len(coded)} coded bytes can hold")
    if kind == "context":
        if not isinstance(table, ContextTable):
            raise fail("entropy-coded with the model's context tables; read it with its model "
                       "(vqtok inspect --model MODEL, or read_tokens(path, table=...))")
        if table.order0.shape != (stages, k):
            raise fail(f"the context table given has {len(table)} stages of {table.order0.shape[1]} codes; "
                       f"the file needs ({stages}, {k})")
        crc, coding = table.coding_tables(precision, normalize_table)
        if crc != header.get("table_crc"):
            raise fail("written with different context tables (another model?)")
        return _context_decode(coded, table, coding, stages, n // grid[-1] if n else 0, grid[-1] if n else 0,
                               precision, fail)
    if kind == "model":
        if table is None:
            raise fail("entropy-coded with the model's frequency table; read it with its model "
                       "(vqtok inspect --model MODEL, or read_tokens(path, table=...))")
        table = np.asarray(table.order0 if isinstance(table, ContextTable) else table)
        if table.shape != (stages, k) or table.dtype.kind not in "iu":
            raise fail(f"the frequency table given has shape {table.shape} ({table.dtype}); the file needs integers ({stages}, {k})")
        try:
            freqs = normalize_table(table, precision)
        except ValueError as e:
            raise fail(f"bad frequency table: {e}") from None
        if _table_crc(freqs) != header.get("table_crc"):
            raise fail("written with a different frequency table (another model?)")
    if sparse is None:
        tables = [(None, row) for row in freqs]
    else:
        tables = [_file_table(syms, counts, precision) for syms, counts in sparse]
    rows = rangecoder.decode(coded, (rangecoder.freq_cum(f) for _, f in tables), precision, n, fail)
    out = np.concatenate([row if syms is None else syms[row] for (syms, _), row in zip(tables, rows)])
    if sparse is not None:
        for stage, (syms, counts) in enumerate(sparse):
            found, found_counts = np.unique(out[stage * n : (stage + 1) * n], return_counts=True)
            if not (np.array_equal(found, syms) and np.array_equal(found_counts, counts)):
                raise fail(f"decoded codes of stage {stage} do not match the stored counts")
    return out


def _encode_counts(sparse: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Per-file counts: per stage varint(#codes present), then varint(gap to the previous code), varint(count)
    for each code present, in increasing code order."""
    out = bytearray()
    for syms, counts in sparse:
        _put_varint(out, len(syms))
        prev = -1
        for sym, count in zip(syms.tolist(), counts.tolist()):
            _put_varint(out, sym - prev - 1)
            _put_varint(out, count)
            prev = sym
    return bytes(out)


def _decode_counts(payload: memoryview, stages: int, k: int, n: int,
                   fail) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Parse `_encode_counts` output: ([(codes (m,), counts (m,)) per stage], bytes used).

    Each stage must count exactly n codes. Arrays are sized by what the payload holds, never by K.
    """
    sparse = []
    pos = 0
    for stage in range(stages):
        nnz, pos = _get_varint(payload, pos, fail)
        # Each listed code takes >= 2 bytes, so a count beyond the payload is a lie, whatever K says.
        if nnz > k or 2 * nnz > len(payload) - pos:
            raise fail(f"stored table of stage {stage} lists {nnz} codes")
        syms, counts = [], []
        sym = -1
        for _ in range(nnz):
            gap, pos = _get_varint(payload, pos, fail)
            count, pos = _get_varint(payload, pos, fail)
            sym += gap + 1
            if sym >= k or count == 0:
                raise fail(f"stored table of stage {stage} is corrupt")
            syms.append(sym)
            counts.append(count)
        if sum(counts) != n:
            raise fail(f"stored table of stage {stage} counts {sum(counts)} codes, the grid holds {n}")
        sparse.append((np.array(syms, dtype=np.int64), np.array(counts, dtype=np.int64)))
    return sparse, pos

def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(buf: memoryview, pos: int, fail) -> tuple[int, int]:
    """Read an unsigned LEB128 integer of at most 8 bytes (< 2^56) at `pos`; returns (value, next pos)."""
    value = 0
    for i in range(8):
        if pos >= len(buf):
            raise fail("entropy table runs past the end of the payload")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    raise fail("entropy table holds an oversized number")
