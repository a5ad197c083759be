"""Measurements: reconstruction quality (PSNR, SSIM, MS-SSIM, SI-SNR, mel distance) and codebook usage.

Quality functions take a batch and return one value per item, so callers can average over a whole data set
with `RunningMean` instead of averaging per-batch means (which would weight a short last batch too much).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

# ---------------------------------------------------------------------------------------------------------------
# Averaging


class RunningMean:
    """Mean of per-item values fed one batch at a time: `add(values (B,))`, then `value`.

    An empty accumulator has value NaN, which prints as "nan" in a report instead of raising.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """Add per-item values of any shape (every element counts as one item)."""
        self.total += float(values.detach().double().sum())
        self.count += values.numel()

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Images


def _check_pair(x: torch.Tensor, y: torch.Tensor, ndim: int, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {tuple(x.shape)}")


def _float(t: torch.Tensor) -> torch.Tensor:
    """Promote integer and half tensors to float32; float64 stays float64 for full precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per item: x, y (B, ...) -> (B,)."""
    if x.shape != y.shape:
        raise ValueError(f"mse: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    diff = _float(x) - _float(y)
    return diff.reshape(diff.shape[0], -1).pow(2).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float = 100.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per item: x, y (B, C, H, W) -> (B,).

    PSNR = 10 log10(data_range^2 / MSE). Identical items (MSE = 0) would give +inf, which poisons any average,
    so every value is capped at `max_db` (100 dB, reached at MSE = 1e-10 * data_range^2, far below 8-bit
    rounding error). Pass `max_db=math.inf` for the uncapped value.
    """
    err = mse(x, y)
    db = 10.0 * torch.log10(data_range**2 / err)  # err = 0 gives +inf here, then the cap applies
    return db.clamp(max=max_db)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D Gaussian of `size` taps (odd), normalized to sum 1: (size,)."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-(r * r) / (2 * sigma * sigma))
    return w / w.sum()


def _ssim_terms(
    x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int, sigma: float, k1: float, k2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per item and channel: x, y (B, C, H, W) -> two (B, C).

    cs = (2 cov + C2) / (var_x + var_y + C2) and SSIM = luminance * cs, with l = (2 mu_x mu_y + C1) /
    (mu_x^2 + mu_y^2 + C1), both averaged over the "valid" window positions (see `ssim`).
    """
    c = x.shape[1]
    size = min(win_size, *x.shape[-2:])
    size -= 1 - size % 2  # largest odd size that fits
    g = _gaussian_window(size, sigma, x.dtype, x.device)
    # The Gaussian is separable: a column pass then a row pass costs 2 * size taps per pixel instead of size^2,
    # and the five maps go through one grouped convolution.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    blurred = F.conv2d(maps, g.view(1, 1, size, 1).expand(5 * c, 1, size, 1), groups=5 * c)
    blurred = F.conv2d(blurred, g.view(1, 1, 1, size).expand(5 * c, 1, 1, size), groups=5 * c)
    mu_x, mu_y, xx, yy, xy = blurred.split(c, dim=1)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per item: x, y (B, C, H, W) -> (B,), 1 for identical images.

    The local means, variances and covariance come from an 11 x 11 Gaussian window (sigma 1.5) evaluated only
    where it fits inside the image ("valid" positions), with population (not sample) statistics, and
    C1 = (k1 R)^2, C2 = (k2 R)^2 for R = data_range. The SSIM map is averaged over positions and then over
    channels. This matches scikit-image's `structural_similarity(x, y, channel_axis=..., data_range=1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`, whose border crop removes exactly the
    positions where the window does not fit.

    Images smaller than the window use the largest odd window that fits (same sigma, renormalized), so 5 x 5
    thumbnails still get a value instead of an error.
    """
    _check_pair(x, y, 4, "ssim")
    value, _cs = _ssim_terms(_float(x), _float(y), data_range, win_size, sigma, k1, k2)
    return value.mean(1)


# Wang, Simoncelli, Bovik 2003, "Multi-scale structural similarity for image quality assessment", finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_scales(height: int, width: int, win_size: int = 11, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many scales `ms_ssim` uses for an image of height x width: the most (up to 5) whose coarsest
    level, after halving (rounded up) once per extra scale, still holds a whole win_size window; at least 1."""
    scales, h, w = 1, height, width
    while scales < max_scales and min(-(-h // 2), -(-w // 2)) >= win_size:
        scales, h, w = scales + 1, -(-h // 2), -(-w // 2)
    return scales


def _halve(t: torch.Tensor) -> torch.Tensor:
    """2 x 2 average pooling of (B, C, H, W); an odd side first repeats its last row or column, which is what
    the reference MATLAB code's symmetric-boundary 2 x 2 filter followed by taking every other pixel gives."""
    t = F.pad(t, (0, t.shape[-1] % 2, 0, t.shape[-2] % 2), mode="replicate")
    return F.avg_pool2d(t, 2)


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) per item: x, y (B, C, H, W) -> (B,), 1 for identical images.

    Scale 1 is the image, each further scale a 2 x 2 average pooling of the previous one. Per channel,
    MS-SSIM = prod_{j<M} cs_j^w_j * (l_M cs_M)^w_M: the contrast-structure term at every scale but the last,
    SSIM (luminance times cs) at the last, each the mean over valid positions of the same 11 x 11 Gaussian
    window (sigma 1.5) and constants as `ssim`; then the mean over channels (as pytorch_msssim does). Negative
    terms are clamped to 0 first, since a fractional power of a negative number is undefined.

    With the standard 5 weights an image needs a shorter side of at least 161 px (161 -> 81 -> 41 -> 21 -> 11).
    Smaller images use the first M = `ms_ssim_scales(H, W)` scales with those weights rescaled to sum to 1
    (32 x 32 uses 2 scales; a shorter side under 21 px uses 1, where MS-SSIM equals SSIM), so values for images
    of different sizes compare only roughly; pytorch_msssim refuses such images instead.
    """
    _check_pair(x, y, 4, "ms_ssim")
    x, y = _float(x), _float(y)
    m = ms_ssim_scales(x.shape[-2], x.shape[-1], win_size, len(weights))
    w = torch.tensor(weights[:m], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    terms = []
    for scale in range(m):
        value, cs = _ssim_terms(x, y, data_range, win_size, sigma, k1, k2)
        terms.append(value if scale == m - 1 else cs)
        if scale < m - 1:
            x, y = _halve(x), _halve(y)
    stacked = torch.stack(terms).clamp_min(0.0)  # (M, B, C)
    return stacked.pow(w[:, None, None]).prod(0).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# Audio


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB per item: estimate, reference (B, T) -> (B,).

    Both signals are made zero-mean; the target is the projection of the estimate onto the reference,
    s = (<e, r> / ||r||^2) r, the noise is e - s, and SI-SNR = 10 log10(||s||^2 / ||e - s||^2). Scaling the
    estimate by any non-zero factor leaves the value unchanged. `eps` keeps silent references and perfect
    estimates finite.
    """
    _check_pair(estimate, reference, 2, "si_snr")
    est = _float(estimate)
    ref = _float(reference)
    est = est - est.mean(1, keepdim=True)
    ref = ref - ref.mean(1, keepdim=True)
    scale = (est * ref).sum(1, keepdim=True) / (ref.pow(2).sum(1, keepdim=True) + eps)
    target = scale * ref
    noise = est - target
    return 10.0 * torch.log10((target.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps))


def default_n_fft(sample_rate: int) -> int:
    """FFT size for a ~64 ms window, rounded to a power of two: 512 at 8 kHz, 1024 at 16 kHz, 2048 at 44.1 kHz."""
    return 2 ** max(8, round(math.log2(sample_rate * 0.064)))


@functools.lru_cache(maxsize=16)
def _mel_transform(
    sample_rate: int, n_fft: int, n_mels: int, device: torch.device
) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop_length=n_fft // 4,
        n_mels=n_mels,
        f_min=0.0,
        f_max=sample_rate / 2,
        power=1.0,
    ).to(device)


def log_mel(
    waves: torch.Tensor, sample_rate: int, n_fft: int | None = None, n_mels: int = 80, floor: float = 1e-5
) -> torch.Tensor:
    """log10 mel magnitude spectrogram: waves (B, T) -> (B, n_mels, frames).

    Magnitude (power 1) STFT with a Hann window of `n_fft` samples (default `default_n_fft(sample_rate)`),
    hop n_fft / 4, centered (reflect-padded) frames, `n_mels` triangular filters on the HTK mel scale
    (torchaudio's defaults, unnormalized) from 0 Hz to sample_rate / 2, then log10(max(mel, floor)). Clips shorter than n_fft are zero-padded to n_fft samples.
    """
    if waves.ndim != 2:
        raise ValueError(f"log_mel: expected waves (B, T), got shape {tuple(waves.shape)}")
    n_fft = n_fft or default_n_fft(sample_rate)
    waves = waves.float()
    if waves.shape[1] < n_fft:
        waves = F.pad(waves, (0, n_fft - waves.shape[1]))
    mel = _mel_transform(sample_rate, n_fft, n_mels, waves.device)(waves)
    return torch.log10(mel.clamp_min(floor))


def mel_distance(
    estimate: torch.Tensor,
    reference: torch.Tensor,
    sample_rate: int,
    n_ffts: Sequence[int] | None = None,
    n_mels: int = 80,
) -> torch.Tensor:
    """Log-mel spectral distance per item: estimate, reference (B, T) -> (B,), 0 for identical signals.

    For each FFT size n in `n_ffts` (default: the single size `default_n_fft(sample_rate)`, e.g. 1024 at
    16 kHz), the distance is mean |log10 M_n(estimate) - log10 M_n(reference)| over mel bands and frames, with
    M_n the magnitude mel spectrogram of `log_mel` (80 bands, 0 Hz to sample_rate / 2, floor 1e-5). Several
    sizes give a multi-resolution distance: the mean of the per-size distances. One unit is a factor of 10
    in magnitude (20 dB).
    """
    _check_pair(estimate, reference, 2, "mel_distance")
    sizes = list(n_ffts) if n_ffts else [default_n_fft(sample_rate)]
    total = torch.zeros(estimate.shape[0], device=estimate.device)
    for n in sizes:
        diff = log_mel(estimate, sample_rate, n, n_mels) - log_mel(reference, sample_rate, n, n_mels)
        total = total + diff.abs().mean(dim=(1, 2))
    return total / len(sizes)


# ---------------------------------------------------------------------------------------------------------------
# Codebook usage


def count_codes(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs: indices (any shape, integer) -> counts (codebook_size,) int64."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(
            f"count_codes: indices span [{int(flat.min())}, {int(flat.max())}], outside [0, {codebook_size})"
        )
    return torch.bincount(flat, minlength=codebook_size)


@dataclass(frozen=True)
class CodeUsage:
    """How a codebook of `codebook_size` codes was used by `tokens` tokens.

    usage: fraction of codes used at least once; dead: codes never used; perplexity: exp(entropy in nats),
    the number of equally likely codes with the same entropy (K for uniform use, 1 when one code takes
    every token); entropy_bits: bits per token of the empirical distribution, the rate an ideal entropy coder
    would reach, against max_entropy_bits = log2 K for fixed-width codes; top: (code, count, share) of the
    10 most used codes, most used first. With no tokens at all, entropy and perplexity are 0.
    """

    codebook_size: int
    tokens: int
    used: int
    usage: float
    dead: int
    perplexity: float
    entropy_bits: float
    max_entropy_bits: float
    top: list[tuple[int, int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (top as lists of [code, count, share])."""
        d = asdict(self)
        d["top"] = [list(t) for t in self.top]
        return d


def code_usage(counts: torch.Tensor | np.ndarray, top_k: int = 10) -> CodeUsage:
    """Summarize per-code counts (K,) into a `CodeUsage`."""
    c = counts if isinstance(counts, torch.Tensor) else torch.from_numpy(np.asarray(counts))
    if c.ndim != 1 or c.numel() == 0:
        raise ValueError(f"code_usage: expected counts of shape (K,), got {tuple(c.shape)}")
    c = c.detach().cpu().double()
    if bool((c < 0).any()):
        raise ValueError("code_usage: counts must be non-negative")
    k = c.numel()
    tokens = float(c.sum())
    used = int((c > 0).sum())
    if tokens > 0:
        p = c[c > 0] / tokens
        entropy_nats = float(-(p * p.log()).sum())
        perplexity = math.exp(entropy_nats)
    else:
        entropy_nats, perplexity = 0.0, 0.0
    # A stable descending sort keeps equal counts in code order, so the list is reproducible.
    order = torch.sort(c, descending=True, stable=True).indices[:top_k].tolist()
    top = [(i, int(c[i]), float(c[i]) / tokens) for i in order if c[i] > 0]
    return CodeUsage(
        codebook_size=k,
        tokens=int(round(tokens)),
        used=used,
        usage=used / k,
        dead=k - used,
        perplexity=perplexity,
        entropy_bits=entropy_nats / math.log(2),
        max_entropy_bits=math.log2(k),
        top=top,
    )


def quantization_error(z: torch.Tensor, q: torch.Tensor) -> float:
    """Relative quantization error ||z - q||^2 / ||z||^2 over the whole batch: z, q (..., D) -> float.

    0 means exact; 1 is what quantizing everything to zero would cost. An all-zero z gives 0 if q is also zero,
    otherwise inf.
    """
    if z.shape != q.shape:
        raise ValueError(f"quantization_error: shapes differ, {tuple(z.shape)} vs {tuple(q.shape)}")
    z64, q64 = z.detach().double(), q.detach().double()
    num = float((z64 - q64).pow(2).sum())
    den = float(z64.pow(2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
