"""Context tables for the entropy codec: exact round trips on every grid, fewer bits where neighbours predict
codes, refusal of the wrong tables, and their place in the model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import SAMPLES
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.errors import TokenFileError, VqtokError
from vqtok.jobs.contexts import fit_context_table, group_count
from vqtok.jobs.pipeline import code_table
from vqtok.modelfile import (CONTEXT_COUNTS, CONTEXT_INDEX, CONTEXT_SHAPE, CONTEXT_VALUE, load, read_metadata,
                             save_model)
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens import context
from vqtok.tokens.context import ContextTable
from vqtok.tokens.tokfile import decode_tokens, encode_tokens

HEADER = {"fingerprint": "0123abcd", "modality": "image"}
K, STAGES, GROUPS = 64, 3, 8


def markov_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Codes (STAGES, *shape) in which a code is usually its left neighbour (stage 1) or the code above it in
    the previous stage, plus 1: what a context model can predict and a single table cannot."""
    codes = rng.integers(0, K, size=(STAGES, *shape))
    flat = codes.reshape(STAGES, -1, shape[-1]) if shape and shape[-1] else codes.reshape(STAGES, 0, 0)
    for j in range(1, flat.shape[2]):
        keep = rng.random(flat.shape[1]) < 0.9
        flat[0, keep, j] = (flat[0, keep, j - 1] + 1) % K
    for s in range(1, STAGES):
        keep = rng.random(flat.shape[1:]) < 0.9
        flat[s][keep] = (flat[s - 1][keep] + 1) % K
    return flat.reshape(codes.shape)


def codebooks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(K, 4)).astype(np.float32) for _ in range(STAGES)]


@pytest.fixture(scope="module")
def table() -> ContextTable:
    rng = np.random.default_rng(1)
    files = [markov_codes(rng, (12, 16)) for _ in range(40)]
    return context.fit(codebooks(), files, np.ones((STAGES, K), dtype=np.int64), GROUPS)


GRIDS = st.one_of(
    st.tuples(st.integers(0, 9), st.integers(0, 9)),  # image (H, W)
    st.tuples(st.integers(0, 40)),  # mono audio (T,)
    st.tuples(st.integers(1, 2), st.integers(0, 20)),  # audio (C, T)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid=GRIDS, seed=st.integers(0, 2**32 - 1), stages=st.integers(1, STAGES))
def test_round_trip_on_every_grid(table: ContextTable, grid: tuple[int, ...], seed: int, stages: int) -> None:
    codes = markov_codes(np.random.default_rng(seed), grid)[:stages]
    blob = encode_tokens(codes, HEADER, codebook_size=K, codec="entropy", table=table[:stages])
    back = decode_tokens(blob, table=table[:stages])
    assert back.header["table"] == "context"
    assert back.codes.shape == codes.shape and np.array_equal(back.codes, codes)


def test_context_tables_cost_fewer_bits_than_one_table_per_stage(table: ContextTable) -> None:
    codes = markov_codes(np.random.default_rng(7), (32, 32))
    order0 = np.maximum(np.stack([np.bincount(s.ravel(), minlength=K) for s in codes]), 1)
    with_context = len(encode_tokens(codes, HEADER, codebook_size=K, codec="entropy", table=table))
    one_table = len(encode_tokens(codes, HEADER, codebook_size=K, codec="entropy", table=order0))
    packed = len(encode_tokens(codes, HEADER, codebook_size=K))
    # 90% of the codes follow from their context, known to within its group of K / G = 8 codes: about 3.8 bits
    # a code against 6 packed; one table per stage cannot help codes that are uniform overall.
    assert with_context < 0.75 * min(one_table, packed)


def test_wrong_or_missing_tables_are_refused(table: ContextTable) -> None:
    codes = markov_codes(np.random.default_rng(3), (6, 6))
    blob = encode_tokens(codes, HEADER, codebook_size=K, codec="entropy", table=table)
    with pytest.raises(TokenFileError, match="context tables; read it with its model"):
        decode_tokens(blob)
    with pytest.raises(TokenFileError, match="context tables; read it with its model"):
        decode_tokens(blob, table=table.order0)
    other = context.fit(codebooks(seed=5), [codes], table.order0, GROUPS)
    with pytest.raises(TokenFileError, match="different context tables"):
        decode_tokens(blob, table=other)
    with pytest.raises(TokenFileError, match="stages"):
        decode_tokens(blob, table=table[:2])


def test_a_context_table_still_reads_files_coded_with_one_table_per_stage(table: ContextTable) -> None:
    codes = markov_codes(np.random.default_rng(4), (5, 7))
    blob = encode_tokens(codes, HEADER, codebook_size=K, codec="entropy", table=table.order0)
    assert np.array_equal(decode_tokens(blob, table=table).codes, codes)


def test_fit_is_deterministic_and_keeps_every_code_codable() -> None:
    rng = np.random.default_rng(2)
    files = [markov_codes(rng, (8, 8)) for _ in range(5)]
    first = context.fit(codebooks(), files, np.ones((STAGES, K), dtype=np.int64), GROUPS)
    second = context.fit(codebooks(), files, np.ones((STAGES, K), dtype=np.int64), GROUPS)
    assert np.array_equal(first.groups, second.groups) and np.array_equal(first.counts, second.counts)
    assert first.counts.shape == (STAGES, GROUPS + 1, K) and first.smoothed().min() > 0
    assert set(np.unique(first.groups)) == set(range(GROUPS))


def test_group_count_follows_the_codebook_size() -> None:
    assert [group_count(k) for k in (4, 32, 512, 1024, 16384)] == [2, 4, 64, 64, 64]


def test_model_file_keeps_the_tables_and_the_fingerprint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tokenizer(ModelConfig(channels=16, res_channels=8, downsample=8,
                                  quantizer=QuantizerConfig(dim=4, codebook_size=32, stages=2))).eval()
    fingerprint = model.fingerprint()
    paths = sorted((SAMPLES / "heldout" / "photos").glob("*.jpg"))
    model.context_table = fit_context_table(model, paths)
    assert model.context_table.counts.shape == (2, group_count(32) + 1, 32)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert loaded.fingerprint() == fingerprint
    table = code_table(loaded)
    assert isinstance(table, ContextTable)
    assert np.array_equal(table.counts, model.context_table.counts)
    assert np.array_equal(table.groups, model.context_table.groups)
    assert np.array_equal(table.order0, model.code_frequencies())


def small_model_with_table(codebook_size: int, fitted_codes: int) -> Tokenizer:
    """A 2-stage model whose context table was fitted on `fitted_codes` random codes a stage: most of its
    (2, G + 1, K) cells stay zero when K is large, as with a real fit."""
    torch.manual_seed(0)
    model = Tokenizer(ModelConfig(channels=16, res_channels=8, downsample=8,
                                  quantizer=QuantizerConfig(dim=4, codebook_size=codebook_size, stages=2))).eval()
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, codebook_size, size=(2, 1, fitted_codes))]
    model.context_table = context.fit([vq.codes().detach().numpy() for vq in model.quantizer.quantizers], codes,
                                      model.code_frequencies(), group_count(codebook_size))
    return model


def test_model_file_stores_a_large_table_by_its_nonzero_counts(tmp_path: Path) -> None:
    model = small_model_with_table(16384, fitted_codes=2000)
    dense_bytes = model.context_table.counts.size * 4
    save_model(model, tmp_path / "m.safetensors")
    table = code_table(load(tmp_path / "m.safetensors"))
    assert np.array_equal(table.counts, model.context_table.counts)
    assert np.array_equal(table.groups, model.context_table.groups)
    # 2 x 65 x 16,384 int32 counts would take 8.5 MB; 4,000 fitted codes leave at most 4,000 nonzero cells.
    stored = load_file(str(tmp_path / "m.safetensors"))
    counts_bytes = sum(stored[k].nbytes for k in (CONTEXT_SHAPE, CONTEXT_INDEX, CONTEXT_VALUE))
    assert counts_bytes <= 4000 * 8 + 24 < dense_bytes / 100


def test_model_files_with_dense_tables_still_load(tmp_path: Path) -> None:
    model = small_model_with_table(32, fitted_codes=200)
    save_model(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    for key in (CONTEXT_SHAPE, CONTEXT_INDEX, CONTEXT_VALUE):
        del tensors[key]
    tensors[CONTEXT_COUNTS] = torch.from_numpy(model.context_table.counts.astype(np.int32))
    save_file(tensors, str(tmp_path / "dense.safetensors"), metadata=read_metadata(tmp_path / "m.safetensors"))
    assert np.array_equal(code_table(load(tmp_path / "dense.safetensors")).counts, model.context_table.counts)


def test_model_file_with_broken_sparse_counts_is_refused(tmp_path: Path) -> None:
    model = small_model_with_table(32, fitted_codes=200)
    save_model(model, tmp_path / "m.safetensors")
    metadata = read_metadata(tmp_path / "m.safetensors")
    for key, change in ((CONTEXT_INDEX, lambda t: t + 10**6), (CONTEXT_VALUE, lambda t: t[:-1]),
                        (CONTEXT_SHAPE, lambda t: t * 10**5)):
        tensors = load_file(str(tmp_path / "m.safetensors"))
        tensors[key] = change(tensors[key])
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
        with pytest.raises(VqtokError, match="bad.safetensors: bad context tables"):
            load(tmp_path / "bad.safetensors")


def test_file_codes_encode_as_vqtok_encode_does_and_report_unreadable_files(tmp_path: Path, monkeypatch) -> None:
    # A photo above the whole-image limit goes in tiles (bounded memory), with the codes a whole forward gives.
    from vqtok.jobs import contexts, pipeline, tiles

    torch.manual_seed(0)
    model = Tokenizer(ModelConfig(channels=16, res_channels=8, downsample=8,
                                  quantizer=QuantizerConfig(dim=4, codebook_size=32, stages=2))).eval()
    photo = sorted((SAMPLES / "heldout" / "photos").glob("*.jpg"))[0]
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    whole = list(contexts.file_codes(model, [photo]))
    tiled_images = []

    def encode_tiled(model, image, stages):
        tiled_images.append(image.shape)
        return tiles.encode_tiled(model, image, stages, tile=128)

    monkeypatch.setattr(tiles, "WHOLE_IMAGE_PIXELS", 64 * 64)
    monkeypatch.setattr(pipeline, "encode_tiled", encode_tiled)
    errors: list[tuple[Path, str]] = []
    tiled = list(contexts.file_codes(model, [tmp_path / "broken.jpg", photo],
                                     on_error=lambda p, why: errors.append((p, why))))
    assert len(tiled_images) == 1 and len(tiled) == 1 and np.array_equal(tiled[0], whole[0])
    assert [p for p, _ in errors] == [tmp_path / "broken.jpg"]
