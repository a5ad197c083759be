"""Tiled image encode and decode: receptive fields, codes and pixels equal to the whole-image computation,
large images routed through tiles by decode, and the decompression-bomb guards on both sides."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.data import io as data
from vqtok.jobs import pipeline, tiles
from vqtok.modelfile import save_model
from vqtok.nets.tokenizer import Tokenizer, image_decoder_context, image_encoder_context
from vqtok.tokens.tokfile import MAGIC, VERSION, header_bytes, read_tokens, write_tokens

HEIGHT, WIDTH = 302, 498  # not multiples of 4 or 8: the bottom and right windows are padded


def photo(height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """A deterministic photo-like uint8 (3, H, W): smooth colour fields, hard-edged shapes and sensor noise."""
    g = torch.Generator().manual_seed(7)
    smooth = F.interpolate(torch.rand(1, 3, 6, 9, generator=g), size=(height, width), mode="bicubic")[0]
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = ((yy - height * 0.4) ** 2 + (xx - width * 0.6) ** 2 < (height * 0.25) ** 2).float()
    bars = ((xx // 23) % 2 == 0).float() * (yy > height * 0.7).float()
    image = smooth * 0.6 + disc[None] * torch.tensor([0.3, -0.2, 0.1])[:, None, None] + bars[None] * 0.25
    image = image + 0.03 * torch.randn(3, height, width, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def seeded_model(downsample: int) -> Tokenizer:
    """An untrained model whose codebooks are k-means of its own encoder outputs on the photo (two stages),
    so codes vary from cell to cell and many cells sit near a tie, as with a trained model."""
    torch.manual_seed(0)
    config = ModelConfig(downsample=downsample, channels=32, res_channels=16,
                         quantizer=QuantizerConfig(dim=16, codebook_size=128, stages=2))
    model = Tokenizer(config)
    model.train()
    with torch.no_grad():
        model(photo()[None, :, :160, :240].float() / 255.0)
    return model.eval()


@pytest.fixture(scope="module", params=[4, 8])
def model(request) -> Tokenizer:
    return seeded_model(request.param)


def linear_copy(config: ModelConfig) -> Tokenizer:
    """A model with every ReLU replaced by the identity: its reach is the convolutions' geometry alone, with no
    path cut off by an inactive unit."""
    model = Tokenizer(config).double()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
    return model


@pytest.mark.parametrize("downsample,scale_blocks", [(4, 0), (8, 0), (16, 0), (8, 1)])
def test_contexts_are_the_exact_receptive_fields(downsample: int, scale_blocks: int) -> None:
    torch.manual_seed(0)
    model = linear_copy(ModelConfig(downsample=downsample, channels=16, res_channels=8, scale_blocks=scale_blocks))
    hop, cells, mid = downsample, 13, 6
    x = torch.rand(1, 3, cells * hop, cells * hop, dtype=torch.float64, requires_grad=True)
    model.encoder(x)[0, :, mid, mid].sum().backward()
    rows = (x.grad[0].abs().sum((0, 2)) != 0).nonzero().flatten()
    reach = max(mid * hop - int(rows.min()), int(rows.max()) - (mid * hop + hop - 1))
    assert reach == image_encoder_context(model.encoder)

    z = torch.randn(1, model.config.quantizer.dim, cells, cells, dtype=torch.float64, requires_grad=True)
    model.decoder(z)[0, :, mid * hop:(mid + 1) * hop, mid * hop:(mid + 1) * hop].sum().backward()
    used = (z.grad[0].abs().sum((0, 2)) != 0).nonzero().flatten()
    assert max(mid - int(used.min()), int(used.max()) - mid) == image_decoder_context(model.decoder)


def test_tiled_codes_equal_whole_image_codes(model: Tokenizer, monkeypatch) -> None:
    image = photo()
    whole = tiles.encode_tiled(model, image, tile=10**6)
    hop, tile = model.hop, 32
    assert whole.shape == (2, -(-HEIGHT // hop), -(-WIDTH // hop)) and whole.dtype == torch.int64
    assert len(torch.unique(whole[0])) >= 40, "the test model should use many codes"

    windows: list[tuple[int, ...]] = []
    hook = model.encoder.register_forward_hook(lambda _m, args, _out: windows.append(tuple(args[0].shape)))
    try:
        tiled = tiles.encode_tiled(model, image, tile=tile)
    finally:
        hook.remove()
    assert len(windows) >= 100 and max(s[2] * s[3] for s in windows) <= (tile + 8 * hop) ** 2
    assert torch.equal(tiled, whole)
    assert torch.equal(tiles.encode_tiled(model, image, stages=1, tile=5 * hop), whole[:1])

    # The plain whole-image forward (oneDNN convolutions, faiss search) breaks a few near-ties differently.
    padded, _ = data.pad_to_multiple(image, hop)
    plain = model.encode(padded[None].float() / 255.0)[0]
    assert float((plain == whole).float().mean()) >= 0.995

    monkeypatch.setattr(tiles, "image_encoder_context", lambda _encoder: hop)  # one cell of margin: too little
    assert float((tiles.encode_tiled(model, image, tile=tile) == whole).float().mean()) < 0.9


def test_tiled_decode_equals_whole_image_decode(model: Tokenizer, monkeypatch) -> None:
    codes = tiles.encode_tiled(model, photo())
    whole = tiles.decode_tiled(model, codes, tile=10**6, size=(HEIGHT, WIDTH))
    assert whole.shape == (3, HEIGHT, WIDTH) and whole.dtype == torch.uint8
    tiled = tiles.decode_tiled(model, codes, tile=6 * model.hop, size=(HEIGHT, WIDTH))
    assert torch.equal(tiled, whole)
    plain = model.decode(codes[None])[0, :, :HEIGHT, :WIDTH].mul(255).round().to(torch.uint8)
    assert int((plain.int() - whole.int()).abs().max()) <= 1
    full = tiles.decode_tiled(model, codes[:1], tile=6 * model.hop)
    assert full.shape == (3, codes.shape[1] * model.hop, codes.shape[2] * model.hop)

    monkeypatch.setattr(tiles, "image_decoder_context", lambda _decoder: 1)
    assert not torch.equal(tiles.decode_tiled(model, codes, tile=6 * model.hop, size=(HEIGHT, WIDTH)), whole)


def test_size_must_match_the_code_grid(model: Tokenizer) -> None:
    codes = torch.zeros(1, 10, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="code cells"):
        tiles.decode_tiled(model, codes, size=(10 * model.hop + 1, 10 * model.hop))


def test_needs_tiles_above_the_whole_image_limit() -> None:
    assert not tiles.needs_tiles(1, tiles.WHOLE_IMAGE_PIXELS)
    assert tiles.needs_tiles(1, tiles.WHOLE_IMAGE_PIXELS + 1)


# ------------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, Tokenizer]:
    model = seeded_model(4)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(model, path)
    return path, model


def write_image_tokens(path: Path, model: Tokenizer, codes: torch.Tensor, size: list[int]) -> None:
    header = {"fingerprint": model.fingerprint(), "modality": "image", "original_size": size, "source": path.name}
    write_tokens(path, codes.numpy(), header, codebook_size=model.config.quantizer.codebook_size)


def test_decode_files_tiles_images_above_the_limit(model_file, tmp_path: Path, monkeypatch) -> None:
    path, model = model_file
    codes = tiles.encode_tiled(model, photo())
    write_image_tokens(tmp_path / "t" / "photo.png.vqt", model, codes, [HEIGHT, WIDTH])
    original, calls = tiles.decode_tiled, []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiles, "WHOLE_IMAGE_PIXELS", HEIGHT * WIDTH - 1)
    monkeypatch.setattr(pipeline, "decode_tiled", spy)
    report = pipeline.decode_files(path, [tmp_path / "t"], tmp_path / "r", device="cpu")
    assert report.written and not report.failed and calls == [{"size": (HEIGHT, WIDTH)}]
    written = torch.from_numpy(np.array(Image.open(tmp_path / "r" / "photo.png"))).permute(2, 0, 1)
    assert torch.equal(written, original(model, codes, size=(HEIGHT, WIDTH)))


@pytest.mark.parametrize("workers, forked", [(0, True), (2, True), (2, False)])
def test_encode_files_tiles_images_above_the_limit(model_file, tmp_path: Path, monkeypatch, workers: int,
                                                   forked: bool) -> None:
    """Above the limit, `vqtok encode` goes through encode_tiled (in this process alone: no batch runs beside its
    kernel switch; or in a worker), and small images of the same run through batches."""
    path, model = model_file
    folder = tmp_path / "in"
    folder.mkdir()
    big, small = photo(), photo(40, 36)
    Image.fromarray(big.permute(1, 2, 0).numpy()).save(folder / "big.png")
    for i in range(5):
        Image.fromarray(small.permute(1, 2, 0).numpy()).save(folder / f"small{i}.png")
    calls = tmp_path / "calls"  # a file, so that worker processes can report their calls too
    original = tiles.encode_tiled

    def spy(model_, image, stages=None):
        with open(calls, "a") as log:
            log.write(f"{tuple(image.shape)}\n")
        return original(model_, image, stages)

    monkeypatch.setattr(tiles, "WHOLE_IMAGE_PIXELS", 40 * 36)
    monkeypatch.setattr(pipeline, "encode_tiled", spy)
    monkeypatch.setattr(pipeline, "FORKED_WORKERS", forked)
    report = pipeline.encode_files(path, [folder], tmp_path / "t", device="cpu", num_workers=workers)
    assert len(report.written) == 6 and not report.failed
    assert calls.read_text().splitlines() == [str((3, *data.pad_to_multiple(big, model.hop)[0].shape[-2:]))]
    tokens = read_tokens(tmp_path / "t" / "big.png.vqt").codes
    assert np.array_equal(tokens, original(model, big).numpy())


def token_file_bytes(header: dict) -> bytes:
    """A token file with `header` and an empty payload: enough for the header checks, which run first."""
    head = header_bytes(header)
    body = MAGIC + bytes(VERSION) + struct.pack("<I", len(head)) + head + struct.pack("<I", 0)
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("size, grid, message", [
    ([100_000, 100_000], [25_000, 25_000], "decompression-bomb guard"),
    ([40, 40], [25_000, 25_000], "code grid"),
    (None, [10, 10], "no valid original_size"),
])
def test_decode_refuses_absurd_sizes_before_reading_codes(model_file, tmp_path: Path, monkeypatch,
                                                          size, grid, message) -> None:
    path, model = model_file
    header = {"codec": "packed", "codebook_size": 128, "stages": 2, "grid": grid,
              "fingerprint": model.fingerprint(), "modality": "image", "original_size": size}
    bomb = tmp_path / "t" / "bomb.png.vqt"
    bomb.parent.mkdir()
    bomb.write_bytes(token_file_bytes(header))
    monkeypatch.setattr(pipeline, "read_tokens_for_model", lambda *_a: pytest.fail("codes were read"))
    report = pipeline.decode_files(path, [tmp_path / "t"], tmp_path / "r", device="cpu")
    (failed, reason), = report.failed
    assert failed == str(bomb) and reason.startswith(f"{bomb}: ") and message in reason and "\n" not in reason
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())


def test_decode_refuses_a_valid_file_above_the_pixel_limit(model_file, tmp_path: Path, monkeypatch) -> None:
    path, model = model_file
    codes = tiles.encode_tiled(model, photo(40, 60))
    write_image_tokens(tmp_path / "t" / "small.png.vqt", model, codes, [40, 60])
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 40 * 60 - 1)
    report = pipeline.decode_files(path, [tmp_path / "t"], tmp_path / "r", device="cpu")
    assert len(report.failed) == 1 and "decompression-bomb guard" in report.failed[0][1]
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 40 * 60)
    assert pipeline.decode_files(path, [tmp_path / "t"], tmp_path / "r", device="cpu").written


def test_encode_refuses_images_above_the_pixel_limit(model_file, tmp_path: Path, monkeypatch) -> None:
    path, _ = model_file
    (tmp_path / "in").mkdir()
    Image.fromarray(photo(40, 60).permute(1, 2, 0).numpy()).save(tmp_path / "in" / "big.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 40 * 60 - 1)
    result = CliRunner().invoke(app, ["encode", str(path), str(tmp_path / "in"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "big.png" in line]
    assert len(lines) == 1 and "decompression-bomb guard" in lines[0]
    assert not list(tmp_path.rglob("*.vqt"))
