"""Token shards: memory-mappable files numpy opens directly, and TokenDataset over one or more shards."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from vqtok.errors import TokenFileError
from vqtok.tokens.shards import ShardWriter, TokenDataset, code_dtype, write_shard


def _items(k: int, stages: int, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    """Image-like and audio-like items with different grids; codes span [0, K)."""
    rng = np.random.default_rng(seed)
    grids = [(4, 4), (2, 7), (5,), (1, 9), (3, 3)]
    items = []
    for i, grid in enumerate(grids):
        codes = rng.integers(0, k, size=(stages, *grid))
        codes.reshape(-1)[0] = k - 1
        items.append((f"item{i}.png", codes, {"label": i, "fingerprint": "fp1"}))
    return items


@pytest.mark.parametrize("k,dtype", [(256, np.uint8), (512, np.uint16), (65536, np.uint16), (2**20, np.uint32)])
def test_shard_round_trip_and_numpy_mmap(tmp_path, k, dtype):
    items = _items(k, stages=2)
    descriptor = write_shard(tmp_path, items, name="train", codebook_size=k)
    assert descriptor == tmp_path / "train.shard.json"
    assert code_dtype(k) == dtype

    codes = np.load(tmp_path / "train.codes.npy", mmap_mode="r")
    index = np.load(tmp_path / "train.index.npy", mmap_mode="r")
    assert isinstance(codes, np.memmap) and codes.dtype == dtype and codes.ndim == 1
    assert index.dtype == np.int64 and index.shape == (len(items) + 1,)
    for i, (_, item_codes, _) in enumerate(items):
        np.testing.assert_array_equal(codes[index[i] : index[i + 1]], item_codes.ravel())

    info = json.loads(descriptor.read_text())
    assert info["codebook_size"] == k and info["stages"] == 2 and info["dtype"] == np.dtype(dtype).name
    assert info["fingerprint"] == "fp1" and info["items"] == len(items)

    ds = TokenDataset(tmp_path)
    assert len(ds) == len(items)
    for i, (name, item_codes, meta) in enumerate(items):
        got = ds[i]
        assert got.dtype == torch.long and tuple(got.shape) == item_codes.shape
        assert torch.equal(got, torch.from_numpy(item_codes))
        assert ds.meta(i) == {**meta, "name": name, "shape": list(item_codes.shape)}
    assert torch.equal(ds[-1], torch.from_numpy(items[-1][1]))
    with pytest.raises(IndexError):
        ds[len(items)]


def test_dataset_over_several_shards_and_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    items_a, items_b = _items(300, 1, seed=1), _items(300, 1, seed=2)
    write_shard(a, items_a[:2], name="part0", codebook_size=300)
    write_shard(a, items_a[2:], name="part1", codebook_size=300)
    write_shard(b, items_b, codebook_size=300)
    ds = TokenDataset([a, b / "shard.shard.json"])
    expected = items_a + items_b
    assert len(ds) == len(expected)
    for i, (name, codes, _) in enumerate(expected):
        assert ds.meta(i)["name"] == name
        assert torch.equal(ds[i], torch.from_numpy(codes))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)
    assert torch.equal(next(iter(loader)), torch.from_numpy(expected[0][1]))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[7], ds[7])


def test_shard_writer_streams_and_takes_k_from_meta(tmp_path):
    with ShardWriter(tmp_path, "s") as writer:
        for i in range(50):
            writer.add(f"clip{i}.wav", np.full((4, 1, 3 + i), i % 7), {"codebook_size": 7, "fingerprint": "fpA"})
    ds = TokenDataset(tmp_path)
    assert len(ds) == 50 and ds.codebook_size == 7 and ds.stages == 4 and ds.fingerprint == "fpA"
    assert tuple(ds[49].shape) == (4, 1, 52) and int(ds[49][0, 0, 0]) == 49 % 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.codes.npy", "s.index.npy", "s.items.jsonl", "s.shard.json"]


def test_writer_refuses_mixed_items_and_leaves_nothing(tmp_path):
    items = _items(16, 2)
    items.append(("odd", np.zeros((3, 4, 4), dtype=np.int64), {}))
    with pytest.raises(ValueError, match="has 3 stages"):
        write_shard(tmp_path, items, codebook_size=16)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="codes must be in"):
        write_shard(tmp_path, [("big", np.full((1, 2), 16), {})], codebook_size=16)
    with pytest.raises(ValueError, match="another tokenizer"):
        write_shard(tmp_path, [("x", np.zeros((1, 2), dtype=np.int64), {"fingerprint": "other"})],
                    codebook_size=16, fingerprint="fp1")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_missing_files_raise_token_file_error(tmp_path):
    write_shard(tmp_path, _items(512, 1), codebook_size=512)
    index_path = tmp_path / "shard.index.npy"
    good_index = np.load(index_path)

    np.save(index_path, good_index[::-1].copy())  # offsets out of order
    with pytest.raises(TokenFileError, match="shard.index.npy: offsets"):
        TokenDataset(tmp_path)
    np.save(index_path, good_index.astype(np.int32))
    with pytest.raises(TokenFileError, match="shard.index.npy: expected an int64"):
        TokenDataset(tmp_path)
    index_path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(TokenFileError, match="shard.index.npy: not a readable"):
        TokenDataset(tmp_path)
    index_path.unlink()
    with pytest.raises(TokenFileError, match="shard.index.npy: shard file is missing"):
        TokenDataset(tmp_path)
    np.save(index_path, good_index)
    TokenDataset(tmp_path)

    codes_path = tmp_path / "shard.codes.npy"
    codes_path.write_bytes(codes_path.read_bytes()[:-3])  # truncated data
    with pytest.raises(TokenFileError, match="shard.codes.npy"):
        TokenDataset(tmp_path)

    with pytest.raises(TokenFileError, match="nowhere: no such shard"):
        TokenDataset(tmp_path / "nowhere")


def test_items_must_match_the_index(tmp_path):
    write_shard(tmp_path, _items(256, 1), codebook_size=256)
    items_path = tmp_path / "shard.items.jsonl"
    lines = items_path.read_text().splitlines()
    items_path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(TokenFileError, match="4 items, the index has 5"):
        TokenDataset(tmp_path)
    first = json.loads(lines[0])
    first["shape"] = [1, 99]
    items_path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(TokenFileError, match="item 0 has a shape"):
        TokenDataset(tmp_path)


def test_mixed_tokenizers_are_refused(tmp_path):
    write_shard(tmp_path / "a", _items(256, 1), codebook_size=256)
    write_shard(tmp_path / "b", _items(512, 1), codebook_size=512)
    with pytest.raises(TokenFileError, match="differ from"):
        TokenDataset([tmp_path / "a", tmp_path / "b"])
