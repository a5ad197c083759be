"""Rate-distortion measurement: MS-SSIM, the token-file bits per pixel of `vqtok eval`, the rate-distortion and
crop pictures, and benchmarks/rate_distortion.py end to end on a tiny untrained model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok import plots
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.jobs.pipeline import encode_files
from vqtok.jobs.report import evaluate_model
from vqtok.modelfile import save_model
from vqtok.nets.tokenizer import Tokenizer
from vqtok.stats import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales, ssim

ROOT = Path(__file__).resolve().parents[1]
# Original sizes that are not multiples of the downsampling factor (8), one in a subfolder.
IMAGE_SIZES = {"a.png": (37, 45), "sub/b.png": (50, 29)}


def _images(b=2, c=3, h=48, w=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(7 * xx + 5 * yy)
    return (base + 0.2 * torch.rand(b, c, h, w, generator=g)).clamp(0, 1).double()


# --- MS-SSIM ---------------------------------------------------------------------------------------------------


def _hand_terms(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure of one channel, window by window with explicit sums."""
    r = np.arange(11) - 5.0
    g = np.exp(-r * r / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    full, cs = [], []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va, vb = (win * pa * pa).sum() - ma * ma, (win * pb * pb).sum() - mb * mb
            cov = (win * pa * pb).sum() - ma * mb
            contrast = (2 * cov + c2) / (va + vb + c2)
            full.append((2 * ma * mb + c1) / (ma * ma + mb * mb + c1) * contrast)
            cs.append(contrast)
    return float(np.mean(full)), float(np.mean(cs))


def _hand_halve(a: np.ndarray) -> np.ndarray:
    """2 x 2 means after repeating the last row / column of an odd side."""
    a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)), mode="edge")
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean(axis=(1, 3))


def test_ms_ssim_matches_hand_computation_on_two_scales():
    # 23 x 25: halving gives 12 x 13, which still holds an 11 x 11 window; one more would not. Odd sides
    # exercise the edge repeat of the pooling.
    x = _images(b=1, c=2, h=23, w=25, seed=1)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)).clamp(0, 1)
    assert ms_ssim_scales(23, 25) == 2
    w = np.array(MS_SSIM_WEIGHTS[:2]) / sum(MS_SSIM_WEIGHTS[:2])
    per_channel = []
    for ch in range(2):
        a, b = x[0, ch].numpy(), y[0, ch].numpy()
        _, cs1 = _hand_terms(a, b)
        full2, _ = _hand_terms(_hand_halve(a), _hand_halve(b))
        per_channel.append(cs1 ** w[0] * full2 ** w[1])
    assert ms_ssim(x, y)[0].item() == pytest.approx(np.mean(per_channel), rel=1e-10)


def test_ms_ssim_identical_is_one_and_symmetric():
    x = _images()
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)).clamp(0, 1)
    same = ms_ssim(x, x)
    assert same.shape == (2,) and torch.allclose(same, torch.ones(2, dtype=x.dtype))
    assert torch.allclose(ms_ssim(x, y), ms_ssim(y, x), rtol=0, atol=1e-12)
    assert (ms_ssim(x, y) < 1).all()


def test_ms_ssim_decreases_with_noise():
    x = _images(b=1, h=180, w=170)  # 5 scales
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    values = [ms_ssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert 0 <= values[-1] < values[0] < 1


def test_ms_ssim_scale_count_follows_image_size():
    # The coarsest scale must hold an 11 x 11 window: 161 -> 81 -> 41 -> 21 -> 11.
    assert [ms_ssim_scales(s, s) for s in (10, 20, 21, 32, 41, 160, 161, 481)] == [1, 1, 2, 2, 3, 4, 5, 5]
    assert ms_ssim_scales(321, 481) == 5 and ms_ssim_scales(481, 40) == 2


def test_ms_ssim_on_one_scale_equals_ssim():
    x = _images(h=18, w=30)
    y = (x * 0.8 + 0.1).clamp(0, 1)
    assert torch.allclose(ms_ssim(x, y), ssim(x, y), rtol=0, atol=1e-12)


def test_ms_ssim_stays_finite_for_anticorrelated_images():
    x = _images(h=64, w=64)
    value = ms_ssim(x, 1 - x)
    assert torch.isfinite(value).all() and (value >= 0).all() and (value < 0.5).all()


def test_ms_ssim_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="ms_ssim: shapes differ"):
        ms_ssim(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 31))


# --- Token-file bits per pixel in `vqtok eval` -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 2-stage model (downsample 8, K = 256) whose code counts (the entropy codec's table) are
    those of its own codes on random images, as training would leave them: far from uniform."""
    torch.manual_seed(0)
    config = ModelConfig(channels=16, res_channels=8, res_blocks=1, downsample=8,
                         quantizer=QuantizerConfig(dim=8, codebook_size=256, stages=2))
    model = Tokenizer(config).eval()
    codes = model.encode(torch.rand(4, 3, 64, 64))
    for s, vq in enumerate(model.quantizer.quantizers):
        vq.counts.copy_(torch.bincount(codes[:, s].reshape(-1), minlength=256))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for name, (h, w) in IMAGE_SIZES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        base = 128 + 80 * np.sin(xx / 5.0 + yy / 7.0)[..., None] * np.array([1.0, 0.6, -0.4])
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


@pytest.mark.parametrize("stages", [1, 2])
def test_eval_file_bpp_equals_written_token_files(model_path: Path, photos: Path, tmp_path: Path, stages: int):
    metrics = evaluate_model(model_path, [photos], device="cpu", stages=stages).metrics
    for codec in ("packed", "entropy"):
        out = tmp_path / codec
        report = encode_files(model_path, [photos], out, codec=codec, stages=stages, device="cpu", num_workers=0)
        assert not report.failed
        per_image = [8 * (out / f"{name}.vqt").stat().st_size / (h * w) for name, (h, w) in IMAGE_SIZES.items()]
        assert metrics[f"bpp_{codec}_file"] == pytest.approx(np.mean(per_image), rel=1e-12)
    codes_only = [stages * math.ceil(h / 8) * math.ceil(w / 8) * 8 / (h * w) for h, w in IMAGE_SIZES.values()]
    assert metrics["bits_per_pixel"] == pytest.approx(np.mean(codes_only))
    # A packed file is its codes' bits plus the header and fixed fields.
    assert metrics["bpp_packed_file"] > metrics["bits_per_pixel"]
    assert metrics["stages"] == stages and 0 < metrics["ms_ssim"] <= 1


# --- Pictures --------------------------------------------------------------------------------------------------


def test_rate_distortion_plot_draws_every_curve(tmp_path: Path):
    curves = {"JPEG": [(0.3, 26.0), (1.0, 31.4), (2.7, 37.9)], "WebP": [(0.35, 28.0), (1.1, 34.3)],
              "vqtok": [(0.5, 29.0)], "empty": []}
    path = plots.rate_distortion_plot(curves, tmp_path / "rd.png", title="test", width=640, height=400)
    img = Image.open(path).convert("RGB")
    assert img.size == (640, 400)
    colours = {c for _, c in img.getcolors(640 * 400)}
    assert set(plots.SERIES_COLOURS[:3]) <= colours and plots.SERIES_COLOURS[3] not in colours
    with pytest.raises(ValueError, match="no points"):
        plots.rate_distortion_plot({"empty": []}, tmp_path / "none.png")


def test_nice_ticks_cover_the_range_in_round_steps():
    ticks = plots.nice_ticks(0.17, 3.55)
    assert ticks[0] <= 0.17 and ticks[-1] >= 3.55 and 4 <= len(ticks) <= 9
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0]) and steps[0] in (0.5, 1.0)


def test_crop_comparison_lays_out_panels(tmp_path: Path):
    a = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    b = torch.zeros(3, 20, 30)
    path = plots.crop_comparison([("one", a), ("two\nlines", b)], tmp_path / "crop.png", scale=2, gap=8)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] == 8 + 2 * (60 + 8)
    label_h = img.shape[0] - 40 - 8
    panel = img[label_h:label_h + 40, 8:68]
    assert np.array_equal(panel, a.permute(1, 2, 0).numpy().repeat(2, 0).repeat(2, 1))
    assert (img[label_h:label_h + 40, 76:136] == 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        plots.crop_comparison([("a", a), ("b", torch.zeros(3, 20, 31))], tmp_path / "bad.png")


# --- benchmarks/rate_distortion.py -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rate_distortion", ROOT / "benchmarks" / "rate_distortion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interpolation_and_gain_sign(bench):
    curve = [{"bpp": 1.0, "psnr": 30.0}, {"bpp": 0.5, "psnr": 27.0}, {"bpp": 2.0, "psnr": 36.0}]
    assert bench.interpolate(curve, 0.75) == pytest.approx(28.5)
    assert bench.interpolate(curve, 0.4) is None and bench.interpolate(curve, 2.1) is None
    row = {"psnr": 29.0, "bpp_packed_file": 1.5, "bpp_entropy_file": 0.75}
    bench.compare(row, {"jpeg": curve})
    assert row["gain_db_vs_jpeg_at_entropy"] == pytest.approx(0.5)
    assert row["gain_db_vs_jpeg_at_packed"] == pytest.approx(-4.0)


def test_benchmark_end_to_end(bench, model_path: Path, tmp_path: Path, monkeypatch, capsys):
    # Photos of odd sizes in a flat folder (the benchmark names token files by file name).
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for name, (h, w) in {"p.png": (131, 141), "q.png": (140, 133)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["rate_distortion.py", "--model", str(model_path), "--images", str(folder),
                                      "--out", str(out), "--device", "cpu"])
    bench.main()
    result = json.loads((out / "rate_distortion.json").read_text())
    assert result["count"] == 2 and [r["stages"] for r in result["vqtok"]] == [1, 2]
    assert [p["quality"] for p in result["jpeg"]] == list(bench.QUALITIES["JPEG"])
    assert [p["quality"] for p in result["webp"]] == list(bench.QUALITIES["WEBP"])
    low, high = result["vqtok"]
    assert low["bpp_packed_file"] < high["bpp_packed_file"] and low["bpp_packed_payload"] < low["bpp_packed_file"]
    assert Image.open(out / "rate_distortion.png").width > 100
    assert Image.open(out / "rate_distortion_crop.png").height >= bench.CROP * 2
    assert "| stages |" in capsys.readouterr().out
