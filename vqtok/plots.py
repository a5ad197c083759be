"""Pictures drawn with Pillow alone: reconstruction grids, codebook usage histograms, spectrogram comparisons,
rate-distortion curves (one chart or several stacked) and side-by-side crops.

Every function writes one PNG atomically and returns its path; `check_destination` says ahead of the work
behind a picture whether it can be written where asked.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

from vqtok.atomic import atomic_path
from vqtok.errors import VqtokError
from vqtok.stats import code_usage, log_mel, mel_distance

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID_BACKGROUND = (200, 200, 200)
BAR = (58, 105, 176)

# Anchor colours of matplotlib's viridis at 0, 1/8, ..., 1; the table interpolates between them.
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


def viridis_lut() -> np.ndarray:
    """A viridis-like colour table: (256, 3) uint8, dark purple (0) through teal to yellow (255)."""
    pos = np.linspace(0, len(_VIRIDIS_ANCHORS) - 1, 256)
    channels = [np.interp(pos, np.arange(len(_VIRIDIS_ANCHORS)), _VIRIDIS_ANCHORS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font scales only when FreeType is present; otherwise it is a fixed bitmap font.
    return ImageFont.load_default(size=12) if features.check("freetype2") else ImageFont.load_default()


def _text_size(text: str) -> tuple[int, int]:
    left, top, right, bottom = _font().getbbox(text)
    return int(right - left), int(bottom)


def _draw_vertical_text(img: Image.Image, text: str, center: tuple[int, int]) -> None:
    """Draw `text` rotated 90 degrees counter-clockwise, centred on `center` (x, y)."""
    w, h = _text_size(text)
    label = Image.new("RGBA", (w + 2, h + 2), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((1, 0), text, fill=INK, font=_font())
    label = label.rotate(90, expand=True)
    img.paste(label, (center[0] - label.width // 2, center[1] - label.height // 2), label)


def check_destination(path: str | os.PathLike) -> None:
    """Raise VqtokError, naming `path`, unless a PNG can be written there: a .png name, not a folder, in an
    existing folder this process may write in."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise VqtokError(f"{target}: is a folder; give a file name ending in .png")
    if target.suffix.lower() != ".png":
        raise VqtokError(f"{target}: plots are PNG images; give a file name ending in .png")
    if not folder.is_dir():
        raise VqtokError(f"{target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VqtokError(f"{target}: cannot write in folder {folder} (permission denied)")


def _save(img: Image.Image, path: str | os.PathLike) -> Path:
    try:
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
    except OSError as e:
        raise VqtokError(f"{path}: cannot write the plot ({e.strerror or e})") from e
    return Path(path)


def _compact(v: float) -> str:
    """A short tick label: 950, 1.2k, 34k, 1.5M."""
    if v >= 1e6:
        return f"{v / 1e6:.3g}M"
    if v >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction grid


def _to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] with C = 1 or 3 -> (B, H, W, 3) uint8."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_scale(height: int, width: int, target: int = 64) -> int:
    """Integer upscale factor that brings the longer image side near `target` pixels (never below 1)."""
    return max(1, round(target / max(height, width)))


def reconstruction_grid(
    inputs: torch.Tensor,
    recons: torch.Tensor,
    path: str | os.PathLike,
    max_items: int = 16,
    scale: int | None = None,
    columns: int = 8,
    gap: int = 2,
) -> Path:
    """Write a PNG comparing inputs (B, C, H, W) with reconstructions of the same shape, values in [0, 1].

    The first `max_items` items are laid out `columns` to a row; each row of inputs has its reconstructions
    directly below it, and consecutive input/reconstruction pairs of rows are separated by an extra 2 * gap.
    Images are upscaled by `scale` with nearest-neighbour (default `grid_scale`: 28 x 28 and 32 x 32 images
    become 56 and 64 px cells) and separated by `gap` px of grey. C may be 1 (grey) or 3 (RGB).

    Image size: width = gap + cols * (W * scale + gap),
    height = gap + 2 * pair_rows * (H * scale + gap) + (pair_rows - 1) * 2 * gap,
    with cols = min(n, columns) and pair_rows = ceil(n / cols) for n = min(B, max_items).
    """
    if inputs.shape != recons.shape:
        raise ValueError(f"reconstruction_grid: shapes differ, {tuple(inputs.shape)} vs {tuple(recons.shape)}")
    n = min(inputs.shape[0], max_items)
    if n == 0:
        raise ValueError("reconstruction_grid: no images to draw")
    top = _to_uint8_images(inputs[:n])
    bottom = _to_uint8_images(recons[:n])
    h, w = top.shape[1:3]
    s = scale or grid_scale(h, w)
    ch, cw = h * s, w * s
    cols = min(n, columns)
    pair_rows = math.ceil(n / cols)
    sep = 2 * gap
    width = gap + cols * (cw + gap)
    height = gap + 2 * pair_rows * (ch + gap) + (pair_rows - 1) * sep
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = GRID_BACKGROUND
    for i in range(n):
        r, c = divmod(i, cols)
        x0 = gap + c * (cw + gap)
        for half, images in enumerate((top, bottom)):
            y0 = gap + (2 * r + half) * (ch + gap) + r * sep
            canvas[y0:y0 + ch, x0:x0 + cw] = images[i].repeat(s, axis=0).repeat(s, axis=1)
    return _save(Image.fromarray(canvas), path)


# ---------------------------------------------------------------------------------------------------------------
# Usage histogram


def _bars(sorted_counts: np.ndarray, plot_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bars for counts (K,) sorted descending, fitted into `plot_width` pixel columns.

    With more codes than columns, each one-pixel bar shows the mean count of a run of consecutive ranks.
    Returns (values (n,), pixel edges (n + 1,) from the plot's left, first rank of each bar plus K (n + 1,)).
    """
    k = len(sorted_counts)
    if k <= plot_width:
        edges = np.floor(np.arange(k + 1) * plot_width / k).astype(np.int64)
        return sorted_counts, edges, np.arange(k + 1)
    starts = (np.arange(plot_width + 1) * k) // plot_width
    values = np.add.reduceat(sorted_counts, starts[:-1]) / np.diff(starts)
    return values, np.arange(plot_width + 1), starts


def usage_histogram(
    counts: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    log_scale: bool = False,
    width: int = 800,
    height: int = 420,
) -> Path:
    """Write a PNG bar chart of per-code counts (K,), most used code first, `width` x `height` px.

    The header gives usage %, dead codes, perplexity and entropy (from `stats.code_usage`). With K larger
    than the plot's pixel width, each bar is the mean count of a run of consecutive ranks (the x label says
    how many). `log_scale` plots log10(1 + count) so rarely used codes stay visible next to dominant ones.
    All-zero counts draw empty axes and say so.
    """
    c = (counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts))
    c = c.astype(np.float64)
    u = code_usage(c)
    left, right, top, bottom = 76, 16, 52, 42
    pw, ph = width - left - right, height - top - bottom
    if pw < 16 or ph < 16:
        raise ValueError(f"usage_histogram: {width} x {height} px leaves no room for the plot")
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()

    if title:
        draw.text((left, 6), title, fill=INK, font=font)
    if u.tokens:
        summary = (
            f"usage {100 * u.usage:.1f}% ({u.used:,} of {u.codebook_size:,} codes, {u.dead:,} dead)   "
            f"perplexity {u.perplexity:,.1f}   entropy {u.entropy_bits:.2f} of {u.max_entropy_bits:.2f} bits"
            f"   {u.tokens:,} tokens"
        )
    else:
        summary = f"no tokens counted ({u.codebook_size:,} codes)"
    # Long summaries on narrow pictures start further left rather than run off the edge.
    draw.text((max(8, min(left, width - 8 - _text_size(summary)[0])), 26), summary, fill=INK, font=font)

    values, edges, starts = _bars(np.sort(c)[::-1], pw)
    binned = len(values) < len(c)
    vmax = float(values.max()) if values.size else 0.0
    y_of = (lambda v: np.log10(1 + v) / math.log10(1 + vmax)) if log_scale else (lambda v: v / vmax)
    base = top + ph
    if vmax > 0:
        frac = y_of(values)
        gap = 1 if len(values) <= pw // 4 else 0  # separate bars only when they are wide enough to see
        for i, f in enumerate(frac):
            bar_h = int(round(f * ph))
            if bar_h > 0:
                draw.rectangle((left + edges[i], base - bar_h, left + edges[i + 1] - 1 - gap, base - 1), fill=BAR)

    # Axes, ticks and labels.
    draw.line((left - 1, top, left - 1, base), fill=INK)
    draw.line((left - 1, base, left + pw, base), fill=INK)
    if vmax > 0:
        if log_scale:
            ticks = [0.0] + [10.0**d for d in range(int(math.log10(vmax)) + 1)]
        else:
            ticks = [0.0, vmax / 2, vmax]
        for t in ticks:
            y = base - int(round(float(y_of(t)) * ph))
            draw.line((left - 5, y, left - 1, y), fill=INK)
            label = _compact(t)
            tw, th = _text_size(label)
            draw.text((left - 8 - tw, y - th // 2 - 1), label, fill=INK, font=font)
    k = u.codebook_size
    for rank in sorted({0, k // 2, k - 1}):
        b = int(np.searchsorted(starts, rank, side="right")) - 1
        x = left + (int(edges[b]) + int(edges[b + 1]) - 1) // 2
        draw.line((x, base, x, base + 4), fill=INK)
        label = f"{rank:,}"
        tw, _ = _text_size(label)
        draw.text((min(x - tw // 2, width - right - tw), base + 6), label, fill=INK, font=font)
    x_label = "code rank, most used first" + (f" (each bar: {k / len(values):.3g} codes)" if binned else "")
    tw, _ = _text_size(x_label)
    draw.text((left + (pw - tw) // 2, height - 18), x_label, fill=INK, font=font)
    y_label = ("mean tokens per code" if binned else "tokens per code") + (" (log)" if log_scale else "")
    _draw_vertical_text(img, y_label, (10, top + ph // 2))
    return _save(img, path)


# ---------------------------------------------------------------------------------------------------------------
# Spectrogram comparison


def _mono(wave: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(wave)) if not isinstance(wave, torch.Tensor) else wave.detach().cpu()
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"spectrogram_panels: {what} must be a mono waveform (T,), got {tuple(t.shape)}")
    return t.float()


def _hz_to_mel(f: float) -> float:
    # The HTK formula, which torchaudio's MelSpectrogram uses by default.
    return 2595.0 * math.log10(1.0 + f / 700.0)


def _time_step(duration: float) -> float:
    """A round tick step that puts at most 8 ticks on `duration` seconds."""
    for step in (0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if duration / step <= 8:
            return float(step)
    return 10 ** math.ceil(math.log10(duration / 8))


def spectrogram_comparison(
    reference: torch.Tensor | np.ndarray,
    reconstruction: torch.Tensor | np.ndarray,
    sample_rate: int,
    path: str | os.PathLike,
    width: int = 800,
    n_mels: int = 80,
    title: str = "",
    dynamic_range_db: float = 80.0,
) -> Path:
    """Write a PNG with the log-mel spectrogram of `reference` (T,) above that of `reconstruction` (T',): the
    two panels "input" and "reconstruction" of `spectrogram_panels` (see there)."""
    return spectrogram_panels([("input", reference), ("reconstruction", reconstruction)], sample_rate, path,
                              width=width, n_mels=n_mels, title=title, dynamic_range_db=dynamic_range_db)


def spectrogram_panels(
    waves: Sequence[tuple[str, torch.Tensor | np.ndarray]],
    sample_rate: int,
    path: str | os.PathLike,
    width: int = 800,
    n_mels: int = 80,
    title: str = "",
    dynamic_range_db: float = 80.0,
) -> Path:
    """Write a PNG with the log-mel spectrograms of `waves` = [(label, mono wave (T,))], one panel under the
    other; the first is the reference, and every other panel's label gives its log-mel distance to it.

    All use `stats.log_mel` (80 mel bands, 0 Hz to sample_rate / 2) and one shared colour scale: the
    brightest bin of any is 0 dB and colours span `dynamic_range_db` below it (viridis-like: dark purple
    quiet, yellow loud). Shorter signals are zero-padded so time lines up. The image is `width` px wide; each
    panel is 2 * n_mels px tall, low frequencies at the bottom, with frequency ticks in Hz and a time axis in
    seconds under the last.
    """
    if len(waves) < 2:
        raise ValueError("spectrogram_panels: needs a reference and at least one other wave")
    mono = [_mono(wave, "reference" if i == 0 else label) for i, (label, wave) in enumerate(waves)]
    length = max(w.numel() for w in mono)
    padded = torch.stack([torch.nn.functional.pad(w, (0, length - w.numel())) for w in mono])
    specs = log_mel(padded, sample_rate, n_mels=n_mels).numpy()  # (N, n_mels, frames), log10 magnitude
    distances = mel_distance(padded[1:], padded[:1].expand(len(mono) - 1, -1), sample_rate, n_mels=n_mels)
    labels = [waves[0][0]] + [f"{label}   log-mel distance {float(d):.3f}"
                              for (label, _), d in zip(waves[1:], distances)]

    left, right, top, bottom = 64, 72, 26, 40
    label_h, panel_gap = 18, 8
    pw, ph = width - left - right, 2 * n_mels
    if pw < 32:
        raise ValueError(f"spectrogram_panels: width {width} px leaves no room for the spectrograms")
    height = top + len(mono) * (label_h + ph) + (len(mono) - 1) * panel_gap + bottom
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()

    vmax = float(specs.max())
    vmin = vmax - dynamic_range_db / 20.0  # log10 magnitude: 20 dB per unit
    levels = np.clip((specs - vmin) / (vmax - vmin), 0.0, 1.0)
    lut = viridis_lut()
    header = f"{title}   " if title else ""
    header += f"{sample_rate:,} Hz, {length / sample_rate:.2f} s"
    draw.text((left, 6), header, fill=INK, font=font)

    duration = length / sample_rate
    panel_tops = []
    for i, name in enumerate(labels):
        y_label = top + i * (label_h + ph + panel_gap)
        y0 = y_label + label_h
        panel_tops.append(y0)
        draw.text((left, y_label + 1), name, fill=INK, font=font)
        # Resize the levels, not the colours, so interpolated pixels stay on the colour map.
        level_img = Image.fromarray(levels[i][::-1].astype(np.float32))  # flip: low frequencies at the bottom
        resized = np.asarray(level_img.resize((pw, ph), Image.Resampling.BILINEAR))
        img.paste(Image.fromarray(lut[np.round(resized.clip(0, 1) * 255).astype(np.int64)]), (left, y0))
        draw.rectangle((left - 1, y0 - 1, left + pw, y0 + ph), outline=INK)
        mel_top = _hz_to_mel(sample_rate / 2)
        for f in (0, 500, 1000, 2000, 4000, 8000, 16000, 32000):
            if f > sample_rate / 2:
                break
            y = y0 + ph - 1 - int(round(_hz_to_mel(f) / mel_top * (ph - 1)))
            draw.line((left - 5, y, left - 1, y), fill=INK)
            label = _compact(f)
            tw, th = _text_size(label)
            draw.text((left - 8 - tw, y - th // 2 - 1), label, fill=INK, font=font)
        _draw_vertical_text(img, "Hz", (10, y0 + ph // 2))

    base = panel_tops[-1] + ph
    _time_axis(draw, duration, left, pw, base, height)
    _colour_bar(img, draw, lut, left + pw + 12, panel_tops[0], base, dynamic_range_db)
    return _save(img, path)


def _time_axis(draw: ImageDraw.ImageDraw, duration: float, left: int, width: int, base: int, height: int) -> None:
    """Ticks in seconds along y = `base` under panels `width` px wide from x = `left`, titled at the bottom."""
    font = _font()
    step = _time_step(duration)
    for j in range(int(duration / step + 1e-9) + 1):
        t = j * step
        x = left + int(round(t / duration * (width - 1)))
        draw.line((x, base, x, base + 4), fill=INK)
        label = f"{t:g}"
        tw, _ = _text_size(label)
        draw.text((x - tw // 2, base + 6), label, fill=INK, font=font)
    tw, _ = _text_size("time (s)")
    draw.text((left + (width - tw) // 2, height - 16), "time (s)", fill=INK, font=font)


def _colour_bar(img: Image.Image, draw: ImageDraw.ImageDraw, lut: np.ndarray, x0: int, y0: int, y1: int,
                dynamic_range_db: float) -> None:
    """A 12 px colour bar from y0 (loud, 0 dB) to y1 (-dynamic_range_db), at x0."""
    font = _font()
    ramp = lut[np.linspace(255, 0, y1 - y0).round().astype(np.int64)]
    img.paste(Image.fromarray(np.repeat(ramp[:, None, :], 12, axis=1)), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + 12, y1), outline=INK)
    for y, label in ((y0, "0 dB"), (y1 - 10, f"-{dynamic_range_db:g} dB")):
        draw.text((x0 + 16, y), label, fill=INK, font=font)


# ---------------------------------------------------------------------------------------------------------------
# Rate-distortion curves

# One colour per curve, in order: the Okabe-Ito palette, told apart with the common colour-vision deficiencies.
SERIES_COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
                  (0, 0, 0))


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi], about `count` of
    them: the first at or below lo, the last at or above hi. lo == hi gets a unit-wide range around it."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    n = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 10) for i in range(n + 1)]


def rate_distortion_plot(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str = "",
    x_label: str = "bits per pixel",
    y_label: str = "PSNR (dB)",
    width: int = 800,
    height: int = 520,
) -> Path:
    """Write a PNG line chart, `width` x `height` px: one line with point markers per named curve of (x, y)
    points (drawn in x order), coloured from SERIES_COLOURS by place in the mapping, with a legend on the right.

    Both axes are linear and span round ticks (`nice_ticks`) around every point of every curve; curves with
    no points are left out of the drawing and the legend.
    """
    return _save(_line_chart(curves, title, x_label, y_label, width, height), path)


def rate_distortion_charts(
    charts: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | os.PathLike,
    title: str = "",
    x_label: str = "bits per pixel",
    width: int = 800,
    height: int = 420,
) -> Path:
    """Write a PNG of several `rate_distortion_plot` charts, one under the other, each `width` x `height` px:
    charts = {y label: curves}, sharing `x_label`; `title` goes above the first. A chart with no points at all
    is left out."""
    drawn = {y_label: curves for y_label, curves in charts.items() if any(len(p) for p in curves.values())}
    if not drawn:
        raise ValueError("rate_distortion_charts: no points to draw")
    images = [_line_chart(curves, title if i == 0 else "", x_label, y_label, width, height)
              for i, (y_label, curves) in enumerate(drawn.items())]
    img = Image.new("RGB", (width, height * len(images)), BACKGROUND)
    for i, chart in enumerate(images):
        img.paste(chart, (0, i * height))
    return _save(img, path)


def _line_chart(curves: Mapping[str, Sequence[tuple[float, float]]], title: str, x_label: str, y_label: str,
                width: int, height: int) -> Image.Image:
    """The picture `rate_distortion_plot` writes (see there)."""
    drawn = {name: sorted(points) for name, points in curves.items() if len(points)}
    if not drawn:
        raise ValueError("rate_distortion_plot: no points to draw")
    legend_w = 16 + max(_text_size(name)[0] for name in drawn) + 34
    left, right, top, bottom = 64, legend_w + 12, 34, 46
    pw, ph = width - left - right, height - top - bottom
    if pw < 64 or ph < 64:
        raise ValueError(f"rate_distortion_plot: {width} x {height} px leaves no room for the plot")
    xs = [x for pts in drawn.values() for x, _ in pts]
    ys = [y for pts in drawn.values() for _, y in pts]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))

    def to_px(x: float, y: float) -> tuple[int, int]:
        fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return left + round(fx * (pw - 1)), top + ph - 1 - round(fy * (ph - 1))

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    _draw_axes(draw, (left, top, pw, ph), x_ticks, y_ticks, to_px)
    if title:
        draw.text((left, 8), title, fill=INK, font=_font())
    tw, _ = _text_size(x_label)
    draw.text((left + (pw - tw) // 2, height - 20), x_label, fill=INK, font=_font())
    _draw_vertical_text(img, y_label, (12, top + ph // 2))
    # Colours follow each curve's place in `curves`, drawn or not, so stacked charts of one set match.
    colours = {name: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, name in enumerate(curves)}
    for i, (name, points) in enumerate(drawn.items()):
        colour = colours[name]
        pixels = [to_px(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        ly = top + 8 + i * 20
        lx = left + pw + 16
        draw.line((lx, ly, lx + 24, ly), fill=colour, width=2)
        draw.ellipse((lx + 9, ly - 3, lx + 15, ly + 3), fill=colour)
        draw.text((lx + 30, ly - _text_size(name)[1] // 2 - 1), name, fill=INK, font=_font())
    return img


def _draw_axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], x_ticks: list[float],
               y_ticks: list[float], to_px) -> None:
    """Light grid lines at every tick, the frame of the plot box (left, top, width, height) and tick labels."""
    left, top, pw, ph = box
    font = _font()
    for t in x_ticks:
        x, _ = to_px(t, y_ticks[0])
        draw.line((x, top, x, top + ph - 1), fill=GRID_BACKGROUND)
        label = f"{t:g}"
        tw, _ = _text_size(label)
        draw.text((x - tw // 2, top + ph + 6), label, fill=INK, font=font)
    for t in y_ticks:
        _, y = to_px(x_ticks[0], t)
        draw.line((left, y, left + pw - 1, y), fill=GRID_BACKGROUND)
        label = f"{t:g}"
        tw, th = _text_size(label)
        draw.text((left - 8 - tw, y - th // 2 - 1), label, fill=INK, font=font)
    draw.rectangle((left - 1, top - 1, left + pw, top + ph), outline=INK)


# ---------------------------------------------------------------------------------------------------------------
# Side-by-side crops


def crop_comparison(
    panels: Sequence[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    scale: int = 2,
    gap: int = 8,
) -> Path:
    """Write a PNG of images side by side, each under its label: panels = [(label, image (3, h, w))], uint8 or
    float in [0, 1], all of one size. Images are upscaled `scale` times with nearest-neighbour so compression
    artefacts stay visible; a label may hold several lines.

    Image size: width = gap + n * (w * scale + gap), height = label block + h * scale + gap.
    """
    if not panels:
        raise ValueError("crop_comparison: no panels to draw")
    images = [im.float() / 255.0 if im.dtype == torch.uint8 else im for _, im in panels]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"crop_comparison: panels differ in shape: {sorted(shapes)}")
    pixels = _to_uint8_images(torch.stack(images))
    h, w = pixels.shape[1] * scale, pixels.shape[2] * scale
    line_h = _text_size("Ag")[1] + 4
    label_h = gap + line_h * max(label.count("\n") + 1 for label, _ in panels)
    img = Image.new("RGB", (gap + len(panels) * (w + gap), label_h + h + gap), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, (label, _) in enumerate(panels):
        x0 = gap + i * (w + gap)
        for j, line in enumerate(label.split("\n")):
            draw.text((x0, gap + j * line_h), line, fill=INK, font=_font())
        img.paste(Image.fromarray(pixels[i].repeat(scale, axis=0).repeat(scale, axis=1)), (x0, label_h))
    return _save(img, path)
