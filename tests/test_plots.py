import math

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.plots import (
    BAR,
    GRID_BACKGROUND,
    grid_scale,
    reconstruction_grid,
    spectrogram_comparison,
    usage_histogram,
    viridis_lut,
)


def _open(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.array(img.convert("RGB"))


def _random_images(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


# --- reconstruction grid ---------------------------------------------------------------------------------------


def test_grid_scale_targets_64_px():
    assert grid_scale(28, 28) == 2
    assert grid_scale(32, 32) == 2
    assert grid_scale(8, 8) == 8
    assert grid_scale(256, 256) == 1


@pytest.mark.parametrize("b,c,h,w", [(20, 1, 28, 28), (3, 3, 32, 32), (9, 3, 10, 14)])
def test_grid_size_and_cell_contents(tmp_path, b, c, h, w):
    inputs = _random_images(b, c, h, w, seed=1)
    recons = _random_images(b, c, h, w, seed=2)
    out = reconstruction_grid(inputs, recons, tmp_path / "sub" / "grid.png")
    assert out == tmp_path / "sub" / "grid.png"
    arr = _open(out)

    n = min(b, 16)
    s = grid_scale(h, w)
    cols = min(n, 8)
    pairs = math.ceil(n / cols)
    gap = 2
    assert arr.shape == (gap + 2 * pairs * (h * s + gap) + (pairs - 1) * 2 * gap, gap + cols * (w * s + gap), 3)

    def expected(images, i, y, x):
        v = (images[i, :, y, x].clamp(0, 1) * 255).round().to(torch.uint8)
        return v.expand(3).tolist()

    g = torch.Generator().manual_seed(3)
    for i in range(n):
        r, col = divmod(i, cols)
        x0 = gap + col * (w * s + gap)
        for half, images in enumerate((inputs, recons)):
            y0 = gap + (2 * r + half) * (h * s + gap) + r * 2 * gap
            for _ in range(5):
                y, x = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
                # Every pixel of an upscaled source pixel carries its value (nearest-neighbour).
                for dy, dx in ((0, 0), (s - 1, s - 1)):
                    got = arr[y0 + y * s + dy, x0 + x * s + dx].tolist()
                    assert got == expected(images, i, y, x), (i, half, y, x)
    # The gap column left of the first cell is background.
    assert (arr[:, 0] == GRID_BACKGROUND).all()


def test_grid_explicit_scale_and_validation(tmp_path):
    x = _random_images(2, 3, 4, 4)
    arr = _open(reconstruction_grid(x, x, tmp_path / "g.png", scale=3))
    assert arr.shape == (2 + 2 * (12 + 2), 2 + 2 * (12 + 2), 3)
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_grid(x, x[:, :, :3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="1 or 3"):
        reconstruction_grid(x[:, :2], x[:, :2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# --- usage histogram -------------------------------------------------------------------------------------------


def _bar_columns(arr):
    """Columns containing at least one bar-coloured pixel."""
    return np.nonzero((arr == BAR).all(axis=2).any(axis=0))[0]


def _bar_heights(arr):
    mask = (arr == BAR).all(axis=2)
    return mask.sum(axis=0)


@pytest.mark.parametrize("k", [2, 300, 65536])
def test_histogram_writes_png_of_requested_size(tmp_path, k):
    g = torch.Generator().manual_seed(k)
    counts = torch.randint(0, 50, (k,), generator=g)
    arr = _open(usage_histogram(counts, tmp_path / f"h{k}.png", title=f"K={k}", width=640, height=360))
    assert arr.shape == (360, 640, 3)
    heights = _bar_heights(arr)
    cols = _bar_columns(arr)
    assert cols.size > 0
    # Sorted descending: bar heights never grow from left to right.
    assert (np.diff(heights[cols]) <= 0).all()


def test_histogram_two_codes_heights_follow_counts(tmp_path):
    arr = _open(usage_histogram(np.array([10, 40]), tmp_path / "h.png"))
    heights = _bar_heights(arr)
    cols = _bar_columns(arr)
    tall, short = heights[cols[0]], heights[cols[-1]]
    assert short / tall == pytest.approx(0.25, abs=0.02)
    # Two bars of about half the plot width each.
    assert abs(len(cols) - 2 * np.sum(heights[cols] == short)) <= 4


def test_histogram_log_scale_keeps_rare_codes_visible(tmp_path):
    counts = np.zeros(64)
    counts[0], counts[1] = 100000, 1
    lin = _bar_heights(_open(usage_histogram(counts, tmp_path / "lin.png")))
    log = _bar_heights(_open(usage_histogram(counts, tmp_path / "log.png", log_scale=True)))
    plot_height = 420 - 52 - 42
    # Linear: the single-token code has no visible bar. Log: log10(2) / log10(100001) of the plot height.
    assert set(lin[lin > 0].tolist()) == {plot_height}
    heights = sorted(set(log[log > 0].tolist()))
    assert len(heights) == 2 and heights[1] == plot_height
    assert heights[0] == pytest.approx(plot_height * math.log10(2) / math.log10(100001), abs=1)


def test_histogram_all_zero_counts(tmp_path):
    arr = _open(usage_histogram(torch.zeros(16, dtype=torch.long), tmp_path / "z.png"))
    assert arr.shape == (420, 800, 3)
    assert _bar_columns(arr).size == 0


def test_histogram_large_k_bins(tmp_path):
    # 65,536 codes, only the first 1,000 used: after sorting, bars fill roughly the first 1000/65536 of the plot.
    counts = torch.zeros(65536)
    counts[:1000] = 7
    arr = _open(usage_histogram(counts, tmp_path / "big.png"))
    cols = _bar_columns(arr)
    plot_width = 800 - 76 - 16
    assert 1 <= len(cols) <= math.ceil(plot_width * 1000 / 65536) + 1


# --- spectrogram comparison ------------------------------------------------------------------------------------


def test_viridis_lut_endpoints_and_monotone_brightness():
    lut = viridis_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[0].tolist() == [68, 1, 84] and lut[-1].tolist() == [253, 231, 37]
    luma = lut.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luma) > -1.0).all()


def test_spectrogram_comparison(tmp_path):
    sr = 8000
    t = torch.arange(sr) / sr
    tone = torch.sin(2 * math.pi * 1000 * t)
    quiet = 1e-3 * torch.sin(2 * math.pi * 1000 * t[: sr // 2])  # shorter and 60 dB quieter
    arr = _open(spectrogram_comparison(tone, quiet, sr, tmp_path / "s.png", width=600))
    n_mels = 80
    assert arr.shape[1] == 600
    assert arr.shape[0] > 2 * 2 * n_mels

    lut = viridis_lut().astype(int)

    def levels(col):
        """Colour-map level (0-255) of each pixel in column `col`, and whether the pixel is a colour-map colour."""
        dist = ((arr[:, col, None, :].astype(int) - lut[None]) ** 2).sum(-1)
        return dist.argmin(1), dist.min(1) < 30

    level, is_map = levels(300)
    rows = np.nonzero(is_map)[0]
    split = rows[np.argmax(np.diff(rows))] + 1  # first row of the gap between the two panels
    top_rows, bottom_rows = rows[rows < split], rows[rows >= split]
    assert len(top_rows) == len(bottom_rows) == 2 * n_mels
    # The loud 1 kHz tone is near the top of the colour scale in the input panel.
    assert level[top_rows].max() >= 240
    # The reconstruction panel is 60 dB quieter: at most ~20 dB above the bottom of an 80 dB scale.
    assert level[bottom_rows].max() <= 0.3 * 255
    # Its second half is zero padding: the very bottom of the scale.
    level_late, _ = levels(500)
    assert level_late[bottom_rows].max() <= 8


def test_spectrogram_accepts_numpy_and_rejects_stereo(tmp_path):
    wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    arr = _open(spectrogram_comparison(wave[None], wave, 16000, tmp_path / "n.png"))
    assert arr.shape[1] == 800
    with pytest.raises(ValueError, match="mono"):
        spectrogram_comparison(np.zeros((2, 100)), wave, 16000, tmp_path / "bad.png")
