"""Tokenizer shapes, and the model file: a self-describing safetensors that `load` rebuilds alone."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.errors import VqtokError
from vqtok.modelfile import load, read_metadata, save_model
from vqtok.nets.tokenizer import Tokenizer


def small_config(downsample: int = 4, size: int = 32, stages: int = 1) -> ModelConfig:
    return ModelConfig(channels=16, res_channels=8, downsample=downsample, image_size=size,
                       quantizer=QuantizerConfig(dim=8, codebook_size=16, stages=stages))


@pytest.mark.parametrize("downsample", [4, 8, 16])
@pytest.mark.parametrize("scale_blocks", [0, 2])
def test_grid_is_input_over_downsample(downsample: int, scale_blocks: int) -> None:
    config = small_config(downsample)
    config.scale_blocks = scale_blocks
    model = Tokenizer(config).eval()
    x = torch.rand(2, 3, 32, 48)
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, 1, 32 // downsample, 48 // downsample)
    assert torch.equal(model.encode(x), out.indices)


def test_decode_of_encode_matches_forward_in_eval() -> None:
    model = Tokenizer(small_config(stages=2)).eval()
    x = torch.rand(3, 3, 16, 16)
    out = model(x)
    assert torch.allclose(model.decode(model.encode(x)), out.recon.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("x", [torch.rand(1, 3, 30, 32), torch.rand(3, 32, 32), torch.rand(1, 1, 32, 32),
                               torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)])
def test_encode_refuses_what_it_cannot_take_whole(x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="expected images"):
        Tokenizer(small_config()).eval().encode(x)


@pytest.mark.parametrize("codes", [torch.full((1, 1, 4, 4), 16), torch.full((1, 1, 4, 4), -1),
                                   torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long)])
def test_decode_refuses_codes_outside_the_model(codes: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="codes"):
        Tokenizer(small_config(stages=2)).eval().decode(codes)


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_config(stages=2)).eval()
    path = tmp_path / "model.safetensors"
    fingerprint = save_model(model, path)
    loaded = load(path)
    assert loaded.config == model.config
    assert loaded.fingerprint() == fingerprint == read_metadata(path)["vqtok.fingerprint"]
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.allclose(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_half_nets_halve_the_nets_and_load_as_saved(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tokenizer(small_config(stages=2)).eval()
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_model(model, full)
    before = model.fingerprint()
    codebook = model.quantizer.quantizers[0].codebook.clone()
    fingerprint = save_model(model, half, half_nets=True)
    assert fingerprint != before  # the model in memory was rounded, and the fingerprint says so
    loaded = load(half)
    assert loaded.fingerprint() == fingerprint == read_metadata(half)["vqtok.fingerprint"]
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.quantizer.quantizers[0].codebook, codebook)  # codebooks stay float32
    with safe_open(str(half), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.startswith(("encoder.", "decoder."))} == {torch.float16}
    assert {d for k, d in dtypes.items() if k.startswith("quantizer.") and d.is_floating_point} == {torch.float32}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_fingerprint_changes_with_weights() -> None:
    model = Tokenizer(small_config())
    before = model.fingerprint()
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model.fingerprint() != before


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x80\x04\x95pickle-ish"])
def test_load_rejects_non_model_files(tmp_path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(VqtokError, match="model.safetensors"):
        load(path)


def test_load_rejects_safetensors_without_config(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(VqtokError, match="not a vqtok model"):
        load(path)


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(VqtokError, match="no such model file"):
        load(tmp_path / "absent.safetensors")


def test_config_json_round_trip_ignores_unknown_keys() -> None:
    config = small_config(stages=3)
    text = config.to_json().replace('"modality"', '"from_the_future": 1, "modality"')
    assert ModelConfig.from_json(text) == config


def test_scale_blocks_sit_at_each_resolution_between_pixels_and_codes() -> None:
    plain, deeper = small_config(downsample=8), small_config(downsample=8)
    deeper.scale_blocks = 2
    count = lambda net: sum(1 for m in net.modules() if m.__class__.__name__ == "ResBlock")  # noqa: E731
    model, base = Tokenizer(deeper), Tokenizer(plain)
    # downsample 8: two resolutions between the pixels and the code grid, two blocks at each, on each side.
    assert count(model.encoder) - count(base.encoder) == 4 and count(model.decoder) - count(base.decoder) == 4
    assert ModelConfig.from_json(deeper.to_json()) == deeper
    with pytest.raises(VqtokError, match="image models only"):
        ModelConfig(modality="audio", in_channels=1, scale_blocks=1).validate()


@pytest.mark.parametrize("bad", [dict(downsample=3), dict(image_size=30), dict(channels=2), dict(scale_blocks=-1)])
def test_config_validation(bad: dict) -> None:
    config = small_config()
    for key, value in bad.items():
        setattr(config, key, value)
    with pytest.raises(VqtokError):
        config.validate()
