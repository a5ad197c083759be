"""The .vqt token file: round trips for every codec, exact sizes, versioning, and refusal of bad files."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqtok.errors import TokenFileError
from vqtok.tokens.rangecoder import max_codes
from vqtok.tokens.tokfile import (
    FIXED_OVERHEAD_BYTES,
    HEADER_DICTIONARY,
    MAGIC,
    Tokens,
    bits_per_code,
    decode_tokens,
    encode_tokens,
    entropy_precision,
    header_bytes,
    normalize_table,
    parse_header,
    peek_header,
    read_tokens,
    write_tokens,
)

HEADER = {"fingerprint": "0123abcd", "modality": "image", "source": "cat.png"}
KS = [2, 3, 255, 256, 257, 512, 1024, 65536, 2**20]
GRIDS = st.one_of(
    st.tuples(st.integers(0, 9), st.integers(0, 9)),  # image (H, W)
    st.tuples(st.integers(0, 40)),  # mono audio (T,)
    st.tuples(st.integers(1, 2), st.integers(0, 20)),  # audio (C, T)
)


def _inflate(raw: bytes) -> bytes:
    """A format-2 header field back to its JSON text, with zlib alone (raw DEFLATE, the preset dictionary)."""
    inflater = zlib.decompressobj(-15, zdict=HEADER_DICTIONARY)
    return inflater.decompress(raw) + inflater.flush()


def _split(data: bytes) -> tuple[dict, int]:
    """(header dict, offset of the payload length field) of an encoded file."""
    (head_len,) = struct.unpack_from("<I", data, 6)
    return json.loads(_inflate(data[10 : 10 + head_len])), 10 + head_len


def _rebuild(data: bytes, header: dict | None = None, version: tuple[int, int] | None = None,
             head: bytes | None = None) -> bytes:
    """The file with its header (a dict, or the raw header field `head`) or version replaced and a valid CRC,
    to test checks behind the CRC."""
    old, at = _split(data)
    if head is None:
        head = header_bytes(old if header is None else header)
    (payload_len,) = struct.unpack_from("<I", data, at)
    payload = data[at + 4 : at + 4 + payload_len]
    body = MAGIC + bytes(version or data[4:6]) + struct.pack("<I", len(head)) + head + struct.pack("<I", len(payload)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.sampled_from(KS),
    stages=st.integers(1, 4),
    grid=GRIDS,
    codec=st.sampled_from(["packed", "entropy", "entropy-model"]),
    skewed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(k, stages, grid, codec, skewed, seed):
    rng = np.random.default_rng(seed)
    # Skewed codes (a few favourites) exercise uneven tables, uniform ones every bit of a packed code; the
    # top code K-1 is always present when there is room, so off-by-one errors at the top of the range show.
    if skewed:
        codes = np.minimum(rng.geometric(0.3, size=(stages, *grid)) - 1, k - 1)
    else:
        codes = rng.integers(0, k, size=(stages, *grid))
    if codes.size:
        codes.reshape(-1)[-1] = k - 1
    table = rng.integers(0, 50, size=(stages, k)) if codec == "entropy-model" else None
    data = encode_tokens(codes, HEADER, codebook_size=k, codec=codec.split("-")[0], table=table)
    tokens = decode_tokens(data, table=table)
    assert tokens.codes.dtype == np.int64
    assert tokens.codes.shape == (stages, *grid)
    np.testing.assert_array_equal(tokens.codes, codes)
    assert tokens.header["codebook_size"] == k and tokens.header["stages"] == stages
    assert tokens.header["grid"] == list(grid) and tokens.header["fingerprint"] == HEADER["fingerprint"]


@pytest.mark.parametrize("codec", ["packed", "entropy"])
def test_uniform_random_codes_round_trip_through_disk(tmp_path, codec):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1000, size=(2, 12, 12))
    path = tmp_path / "a.vqt"
    written = write_tokens(path, codes, HEADER, codebook_size=1000, codec=codec)
    assert written == path.stat().st_size
    tokens = read_tokens(path)
    assert isinstance(tokens, Tokens) and tokens.path == path
    np.testing.assert_array_equal(tokens.codes, codes)
    assert [p.name for p in tmp_path.iterdir()] == ["a.vqt"]  # no temporary left behind


def test_packed_size_is_exact():
    codes = np.arange(49).reshape(1, 7, 7) * 10
    data = encode_tokens(codes, HEADER, codebook_size=512)
    head_len = len(header_bytes(_split(data)[0]))
    assert bits_per_code(512) == 9
    assert len(data) == FIXED_OVERHEAD_BYTES + head_len + (49 * 9 + 7) // 8
    assert FIXED_OVERHEAD_BYTES == 18


@pytest.mark.parametrize("k,bits", [(2, 1), (3, 2), (255, 8), (256, 8), (257, 9), (2**20, 20), (2**20 + 1, 21)])
def test_bits_per_code(k, bits):
    assert bits_per_code(k) == bits


def test_header_has_no_whitespace_and_keeps_caller_fields():
    data = encode_tokens(np.zeros((1, 3, 3), dtype=np.int64), {**HEADER, "original_size": [28, 28]}, codebook_size=16)
    header, at = _split(data)
    assert b" " not in _inflate(data[10:at])
    assert header["original_size"] == [28, 28] and header["codec"] == "packed"


def test_unknown_header_field_and_newer_minor_version_still_open():
    codes = np.arange(6).reshape(1, 2, 3)
    data = encode_tokens(codes, HEADER, codebook_size=8)
    header = {**_split(data)[0], "added_in_2_7": {"anything": [1, 2]}}
    tokens = decode_tokens(_rebuild(data, header=header, version=(2, 7)))
    np.testing.assert_array_equal(tokens.codes, codes)
    assert tokens.header["added_in_2_7"] == {"anything": [1, 2]}


def test_newer_major_version_is_refused_clearly():
    data = _rebuild(encode_tokens(np.zeros((1, 2, 2), dtype=np.int64), HEADER, codebook_size=4), version=(3, 0))
    with pytest.raises(TokenFileError, match=r"x\.vqt: format version 3\.0 is newer .* upgrade vqtok"):
        decode_tokens(data, source="x.vqt")


def test_header_is_deflated_against_the_dictionary_and_much_smaller_than_its_json(tmp_path):
    audio = {"fingerprint": "b9034cba7d97724d", "modality": "audio", "sample_rate": 16000,
             "original_sample_rate": 16000, "original_length": 240000, "channels": 1, "channel_mode": "mono",
             "source": "1688-142285-0000.flac"}
    codes = np.arange(750).reshape(1, 750) % 1024
    data = encode_tokens(codes, audio, codebook_size=1024)
    assert data[4:6] == bytes([2, 0])
    header, at = _split(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert header == {**audio, "codec": "packed", "codebook_size": 1024, "stages": 1, "grid": [750]}
    assert at - 10 <= len(text) // 3  # 257 bytes of JSON in about 60
    path = tmp_path / "a.vqt"
    path.write_bytes(data)
    assert peek_header(path) == header == parse_header(data[10:at])


def test_format_1_files_with_plain_json_headers_still_open(tmp_path):
    codes = np.arange(12).reshape(2, 6) % 5
    new = encode_tokens(codes, HEADER, codebook_size=5, codec="entropy")
    header, _ = _split(new)
    old = _rebuild(new, version=(1, 0), head=json.dumps(header, separators=(",", ":")).encode())
    tokens = decode_tokens(old)
    np.testing.assert_array_equal(tokens.codes, codes)
    assert tokens.header == header
    path = tmp_path / "old.vqt"
    path.write_bytes(old)
    assert peek_header(path) == header


@pytest.mark.parametrize("head,problem", [
    (b"not deflate at all \xff\xff", "not valid DEFLATE data"),
    (header_bytes(HEADER)[:-3], "does not end where its length says"),
    (header_bytes(HEADER) + b"\x00", "does not end where its length says"),
    (zlib.compress(b"[1, 2]")[2:-4], "not a JSON object"),
    (zlib.compress(b"{" * 1000)[2:-4], "not valid JSON"),
])
def test_bad_compressed_headers_are_refused(head, problem):
    data = _rebuild(encode_tokens(np.zeros((1, 2, 2), dtype=np.int64), HEADER, codebook_size=4), head=head)
    with pytest.raises(TokenFileError, match=f"x\\.vqt: .*{problem}"):
        decode_tokens(data, source="x.vqt")


def test_header_that_inflates_without_bound_is_refused_before_it_takes_memory():
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = bomb.compress(b'{"a":"' + b"x" * 50_000_000) + bomb.flush()  # 48 KB inflating to 50 MB
    data = _rebuild(encode_tokens(np.zeros((1, 2, 2), dtype=np.int64), HEADER, codebook_size=4), head=head)
    tracemalloc.start()
    try:
        with pytest.raises(TokenFileError, match="header inflates to more than 65536 bytes"):
            decode_tokens(data, source="x.vqt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


@pytest.mark.parametrize("codec", ["packed", "entropy"])
def test_truncation_at_every_offset_is_refused(codec):
    data = encode_tokens(np.arange(20).reshape(1, 4, 5) % 7, HEADER, codebook_size=7, codec=codec)
    for cut in range(len(data)):
        with pytest.raises(TokenFileError):
            decode_tokens(data[:cut])


def test_checksum_flip_is_refused(tmp_path):
    data = bytearray(encode_tokens(np.arange(16).reshape(1, 4, 4), HEADER, codebook_size=16))
    data[-8] ^= 0x04  # a payload bit
    path = tmp_path / "bad.vqt"
    path.write_bytes(bytes(data))
    with pytest.raises(TokenFileError, match=r"bad\.vqt: checksum mismatch"):
        read_tokens(path)


def test_bad_magic_unknown_codec_and_missing_file(tmp_path):
    data = encode_tokens(np.zeros((1, 2, 2), dtype=np.int64), HEADER, codebook_size=4)
    with pytest.raises(TokenFileError, match="bad magic"):
        decode_tokens(b"PNG!" + data[4:])
    with pytest.raises(TokenFileError, match="unknown codec 'zstd'"):
        decode_tokens(_rebuild(data, header={**_split(data)[0], "codec": "zstd"}))
    with pytest.raises(TokenFileError, match="missing.vqt"):
        read_tokens(tmp_path / "missing.vqt")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG" + bytes(1000))
    with pytest.raises(TokenFileError, match=r"photo\.png: not a vqtok token file"):
        read_tokens(tmp_path / "photo.png")


def test_code_at_or_above_codebook_size_is_refused():
    # K=5 and K=8 both pack at 3 bits, so a stored 6 is representable and must be caught by the range check.
    data = encode_tokens(np.array([[1, 2, 6, 4]]), HEADER, codebook_size=8)
    forged = _rebuild(data, header={**_split(data)[0], "codebook_size": 5})
    with pytest.raises(TokenFileError, match="code 6 at stage 0 is >= the codebook size 5"):
        decode_tokens(forged)


@pytest.mark.parametrize("codec", ["packed", "entropy"])
def test_huge_grid_claim_is_refused_without_allocating(codec):
    data = encode_tokens(np.arange(12).reshape(1, 3, 4), HEADER, codebook_size=16, codec=codec)
    header = {**_split(data)[0], "grid": [1_000_000, 1_000_000]}
    forged = _rebuild(data, header=header)
    tracemalloc.start()
    try:
        with pytest.raises(TokenFileError, match="header claims|counts 12 codes"):
            decode_tokens(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_header_length_limit():
    data = bytearray(encode_tokens(np.zeros((1, 1, 1), dtype=np.int64), HEADER, codebook_size=2))
    data[6:10] = struct.pack("<I", 10**9)
    with pytest.raises(TokenFileError, match="header length 1000000000 exceeds the limit"):
        decode_tokens(bytes(data))


def test_writer_refuses_headers_a_reader_would_refuse():
    codes = np.zeros((1, 1, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="header is 70.* bytes; the limit is 65536"):
        encode_tokens(codes, {**HEADER, "note": "x" * 70_000}, codebook_size=2)
    # The largest JSON a writer accepts compresses to fewer bytes, so the reader takes it.
    for chars in (" ~", "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'()*+,-./:;<=>?@[]^_`{|}"):
        text = "".join(np.random.default_rng(0).choice(list(chars), 65_000))
        header = {**HEADER, "note": text[: 65536 - 120]}
        data = encode_tokens(codes, header, codebook_size=2)
        assert decode_tokens(data).header["note"] == header["note"]


def test_model_table_must_be_given_and_must_match():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 64, size=(2, 8, 8))
    table = rng.integers(0, 100, size=(2, 64))
    data = encode_tokens(codes, HEADER, codebook_size=64, codec="entropy", table=table)
    assert _split(data)[0]["table"] == "model"
    with pytest.raises(TokenFileError, match="read it with its model"):
        decode_tokens(data)
    with pytest.raises(TokenFileError, match=r"shape \(1, 64\)"):
        decode_tokens(data, table=table[:1])
    other = table.copy()
    other[0, 0] += 1000
    with pytest.raises(TokenFileError, match="different frequency table"):
        decode_tokens(data, table=other)
    np.testing.assert_array_equal(decode_tokens(data, table=table).codes, codes)


def test_model_table_gives_every_code_a_nonzero_frequency():
    counts = np.zeros((2, 300), dtype=np.int64)
    counts[0, 5] = 10**12
    counts[1, :3] = [7, 0, 1]
    freqs = normalize_table(counts, entropy_precision(300))
    assert (freqs >= 1).all()
    assert (freqs.sum(1) == 1 << entropy_precision(300)).all()
    assert freqs.max() <= (1 << entropy_precision(300)) * 31 // 32
    # A code the table never saw still encodes.
    codes = np.array([[5, 299, 0], [2, 1, 299]])
    data = encode_tokens(codes, HEADER, codebook_size=300, codec="entropy", table=counts)
    np.testing.assert_array_equal(decode_tokens(data, table=counts).codes, codes)


def test_normalize_table_is_exact_integer_arithmetic():
    counts = np.array([[3, 1, 0, 0, 6]])
    freqs = normalize_table(counts, 12)
    # base 1 each, 4091 spare split 3:1:0:0:6 with the remainders to the largest fractions.
    assert freqs.tolist() == [[1 + 1227, 1 + 409, 1, 1, 1 + 2455]]
    assert normalize_table(counts.astype(np.uint16), 12).tolist() == freqs.tolist()


@pytest.mark.parametrize("k", [4, 256, 4096])
def test_entropy_size_close_to_cross_entropy(k):
    rng = np.random.default_rng(k)
    probs = 1.0 / np.arange(1, k + 1) ** 1.1
    probs /= probs.sum()
    codes = rng.choice(k, size=(2, 64, 64), p=probs)
    table = np.stack([np.bincount(row, minlength=k) for row in codes.reshape(2, -1)]) * 3 + 1
    data = encode_tokens(codes, HEADER, codebook_size=k, codec="entropy", table=table)
    freqs = normalize_table(table, _split(data)[0]["precision"])
    bits = -sum(np.log2(freqs[s][codes[s].ravel()] / freqs[s].sum()).sum() for s in range(2))
    header_bytes = _split(data)[1] - 10
    payload_bytes = len(data) - FIXED_OVERHEAD_BYTES - header_bytes
    assert payload_bytes <= bits / 8 + 2  # the range coder's flush is at most one byte
    assert payload_bytes < (codes.size * bits_per_code(k) + 7) // 8  # beats packing on skewed data
    np.testing.assert_array_equal(decode_tokens(data, table=table).codes, codes)


def test_per_file_table_is_compact_and_close_to_entropy():
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 40, size=(1, 4096)) * 1637  # 40 distinct codes spread over a 64k codebook
    data = encode_tokens(codes, HEADER, codebook_size=65536, codec="entropy")
    counts = np.bincount(codes.ravel())
    p = counts[counts > 0] / codes.size
    entropy_bytes = -(counts[counts > 0] * np.log2(p)).sum() / 8
    header_bytes = _split(data)[1] - 10
    assert len(data) - FIXED_OVERHEAD_BYTES - header_bytes <= 1.03 * entropy_bytes + 40 * 4 + 16


@pytest.mark.parametrize("k,table", [(2, None), (2, "model"), (2**20, "model"), (300, None)])
def test_max_symbols_bound_holds_for_the_most_compressible_stream(k, table):
    """A constant stream under the most skewed table is the densest possible payload; the reader's limit
    on codes per coded byte must still admit it."""
    n = 200_000
    codes = np.zeros((1, n), dtype=np.int64)
    counts = np.eye(1, k, 0, dtype=np.int64) * 10**15 if table == "model" else None
    data = encode_tokens(codes, HEADER, codebook_size=k, codec="entropy", table=counts)
    (payload_len,) = struct.unpack_from("<I", data, _split(data)[1])
    # A per-file table here is varint(1 code), varint(gap 0), varint(200000): 5 bytes before the stream.
    coded = payload_len - (5 if table is None else 0)
    assert n <= max_codes(coded)
    assert n > max_codes(coded) / 4  # and the limit is not so loose that a tiny file may claim much more
    np.testing.assert_array_equal(decode_tokens(data, table=counts).codes, codes)


def test_writer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="codes must be in"):
        encode_tokens(np.array([[0, 4]]), HEADER, codebook_size=4)
    with pytest.raises(ValueError, match="fingerprint"):
        encode_tokens(np.array([[0, 1]]), {"modality": "image"}, codebook_size=4)
    with pytest.raises(ValueError, match="unknown codec"):
        encode_tokens(np.array([[0, 1]]), HEADER, codebook_size=4, codec="zip")
    with pytest.raises(ValueError, match="header grid"):
        encode_tokens(np.zeros((1, 2, 2), dtype=np.int64), {**HEADER, "grid": [3, 3]}, codebook_size=4)


def _mutate(data: bytes, draw) -> bytes:
    """One random mutation: bit flip, insert, delete, overwrite, or a fresh random file with the magic."""
    kind = draw(st.sampled_from(["flip", "insert", "delete", "overwrite", "random"]))
    buf = bytearray(data)
    if kind == "random":
        return MAGIC + draw(st.binary(max_size=200))
    pos = draw(st.integers(0, len(buf) - 1))
    if kind == "flip":
        buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "insert":
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del buf[pos : pos + draw(st.integers(1, 8))]
    else:
        chunk = draw(st.binary(min_size=1, max_size=8))
        buf[pos : pos + len(chunk)] = chunk
    return bytes(buf)


def _fix_crc(data: bytes) -> bytes:
    """Recompute the trailing CRC so mutations reach the checks behind it."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])) if len(data) >= 4 else data


@settings(max_examples=300, deadline=None)
@given(data=st.data(), codec=st.sampled_from(["packed", "entropy"]), fix_crc=st.booleans())
def test_mutated_files_decode_or_raise_token_file_error(data, codec, fix_crc):
    codes = np.arange(30).reshape(2, 3, 5) % 11
    original = encode_tokens(codes, HEADER, codebook_size=11, codec=codec)
    mutated = _mutate(original, data.draw)
    if fix_crc:
        mutated = _fix_crc(mutated)
    try:
        tokens = decode_tokens(mutated)
    except TokenFileError:
        return
    assert tokens.codes.dtype == np.int64 and (tokens.codes < 11).all()


def test_format_document_spells_out_the_header_dictionary():
    text = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    block = text.split("the breaks below are for reading):\n\n```\n")[1].split("\n```")[0]
    assert block.replace("\n", "").encode() == HEADER_DICTIONARY
    assert f"the {len(HEADER_DICTIONARY)} bytes of" in text
