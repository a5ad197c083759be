import json
import math

import numpy as np
import pytest
import torch

from vqtok.stats import (
    RunningMean,
    code_usage,
    count_codes,
    default_n_fft,
    log_mel,
    mel_distance,
    mse,
    psnr,
    quantization_error,
    si_snr,
    ssim,
)


def _images(b=4, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth structure plus texture, so SSIM sees real local statistics.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(6 * xx + 4 * yy)
    return (base + 0.15 * torch.rand(b, c, h, w, generator=g)).clamp(0, 1).double()


# --- PSNR / MSE ------------------------------------------------------------------------------------------------


def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # MSE 0.01 -> 20 dB
    y[1] += 0.2  # second item: MSE 0.09 -> 10 log10(1/0.09)
    assert torch.allclose(mse(x, y), torch.tensor([0.01, 0.09]), atol=1e-7)
    got = psnr(x, y)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(20.0, abs=1e-4)
    assert got[1].item() == pytest.approx(10 * math.log10(1 / 0.09), abs=1e-4)
    # data_range scales the peak: range 2 adds 20 log10(2) dB.
    assert psnr(x, y, data_range=2.0)[0].item() == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-4)


def test_psnr_identical_is_capped_or_inf():
    x = _images(b=2)
    assert torch.equal(psnr(x, x), torch.full((2,), 100.0, dtype=x.dtype))
    assert torch.isinf(psnr(x, x, max_db=math.inf)).all()


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_running_mean_weights_items_not_batches():
    m = RunningMean()
    assert math.isnan(m.value)
    m.add(torch.tensor([1.0, 1.0, 1.0]))
    m.add(torch.tensor([5.0]))
    assert m.value == pytest.approx(2.0)
    assert m.count == 4


# --- SSIM ------------------------------------------------------------------------------------------------------


def _ssim_reference(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Direct Wang et al. SSIM with explicit loops: x, y (C, H, W) in [0, 1]."""
    r = np.arange(win) - (win - 1) / 2
    g1 = np.exp(-(r**2) / (2 * sigma**2))
    w2 = np.outer(g1, g1)
    w2 /= w2.sum()
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for ch in range(x.shape[0]):
        values = []
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                px = x[ch, i:i + win, j:j + win]
                py = y[ch, i:i + win, j:j + win]
                mx = (w2 * px).sum()
                my = (w2 * py).sum()
                vx = (w2 * (px - mx) ** 2).sum()
                vy = (w2 * (py - my) ** 2).sum()
                cxy = (w2 * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_ssim_matches_direct_reference():
    x = _images(b=2, h=16, w=15, seed=1)
    g = torch.Generator().manual_seed(2)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)
    got = ssim(x, y)
    for i in range(2):
        want = _ssim_reference(x[i].numpy(), y[i].numpy())
        assert got[i].item() == pytest.approx(want, abs=1e-9)
    # float32 input agrees to float32 precision.
    assert torch.allclose(ssim(x.float(), y.float()).double(), got, atol=2e-5)


def test_ssim_properties():
    x = _images(b=3, h=28, w=28)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=x.dtype))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    scores = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] < 0.5
    # Symmetric in its arguments.
    y = (x + 0.1 * noise).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x))


def test_ssim_small_images_shrink_the_window():
    x = _images(b=2, h=6, w=5, seed=4)
    y = (x * 0.8).clamp(0, 1)
    got = ssim(x, y)
    # The largest odd window that fits a 6 x 5 image is 5 x 5.
    want = [_ssim_reference(x[i].numpy(), y[i].numpy(), win=5) for i in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=x.dtype))


def test_ssim_single_channel_and_uint8_like_range():
    x = _images(b=1, c=1, h=28, w=28)
    y = (x + 0.05).clamp(0, 1)
    a = ssim(x, y)
    b = ssim(x * 255, y * 255, data_range=255.0)
    assert torch.allclose(a, b, atol=1e-9)


# --- audio -----------------------------------------------------------------------------------------------------


def _tones(b=2, t=8000, sr=8000, seed=0):
    g = torch.Generator().manual_seed(seed)
    time = torch.arange(t, dtype=torch.float64) / sr
    freqs = 200 + 600 * torch.rand(b, 1, generator=g, dtype=torch.float64)
    return torch.sin(2 * math.pi * freqs * time) + 0.3 * torch.sin(2 * math.pi * 2.7 * freqs * time)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_si_snr_known_value(snr_db):
    ref = _tones(b=3)
    ref = ref - ref.mean(1, keepdim=True)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    noise = noise - noise.mean(1, keepdim=True)
    # Remove the part of the noise along the reference, so the projection recovers the reference exactly.
    noise = noise - (noise * ref).sum(1, keepdim=True) / ref.pow(2).sum(1, keepdim=True) * ref
    gain = (ref.pow(2).sum(1, keepdim=True) / noise.pow(2).sum(1, keepdim=True) / 10 ** (snr_db / 10)).sqrt()
    got = si_snr(ref + gain * noise, ref)
    assert got.shape == (3,)
    assert torch.allclose(got, torch.full((3,), snr_db, dtype=got.dtype), atol=1e-6)


def test_si_snr_scale_and_offset_invariant():
    ref = _tones(b=2)
    g = torch.Generator().manual_seed(6)
    est = ref + 0.2 * torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    base = si_snr(est, ref)
    assert torch.allclose(si_snr(3.7 * est, ref), base, atol=1e-9)
    assert torch.allclose(si_snr(0.01 * est + 0.5, ref), base, atol=1e-9)
    assert (si_snr(ref, ref) > 60).all()  # perfect estimate: large but finite
    assert torch.isfinite(si_snr(torch.zeros_like(ref), ref)).all()


def test_default_n_fft():
    assert default_n_fft(8000) == 512
    assert default_n_fft(16000) == 1024
    assert default_n_fft(44100) == 2048


def test_log_mel_shape_and_short_clip():
    waves = _tones(b=2, t=16000, sr=16000).float()
    spec = log_mel(waves, 16000)
    assert spec.shape == (2, 80, 16000 // 256 + 1)
    short = log_mel(waves[:, :300], 16000)  # shorter than n_fft: zero-padded, still one frame or more
    assert short.shape[:2] == (2, 80) and short.shape[2] >= 1
    assert spec.min() >= -5.0  # the 1e-5 floor


def test_mel_distance_zero_for_identical_positive_otherwise():
    ref = _tones(b=2, t=8000, sr=8000).float()
    assert torch.allclose(mel_distance(ref, ref, 8000), torch.zeros(2))
    g = torch.Generator().manual_seed(7)
    small = mel_distance(ref + 0.01 * torch.randn(ref.shape, generator=g), ref, 8000)
    large = mel_distance(ref + 0.3 * torch.randn(ref.shape, generator=g), ref, 8000)
    assert (small > 0).all() and (large > small).all()
    # Halving a broadband signal (no band at the 1e-5 floor) shifts every log-magnitude by log10(2).
    broad = ref + 0.1 * torch.randn(ref.shape, generator=g)
    half = mel_distance(0.5 * broad, broad, 8000)
    assert half.tolist() == pytest.approx([math.log10(2)] * 2, abs=1e-4)
    multi = mel_distance(0.5 * broad, broad, 8000, n_ffts=[512, 1024])
    assert multi.tolist() == pytest.approx([math.log10(2)] * 2, abs=1e-4)


# --- codebook usage --------------------------------------------------------------------------------------------


def test_count_codes():
    idx = torch.tensor([[0, 1, 1], [3, 3, 3]])
    assert count_codes(idx, 5).tolist() == [1, 2, 0, 3, 0]
    with pytest.raises(ValueError, match="outside"):
        count_codes(torch.tensor([5]), 5)
    assert count_codes(torch.zeros(0, dtype=torch.long), 4).tolist() == [0, 0, 0, 0]


def test_code_usage_uniform():
    u = code_usage(torch.full((256,), 7))
    assert u.perplexity == pytest.approx(256.0)
    assert u.entropy_bits == pytest.approx(8.0)
    assert u.max_entropy_bits == pytest.approx(8.0)
    assert (u.used, u.dead, u.usage, u.tokens) == (256, 0, 1.0, 256 * 7)
    assert [t[0] for t in u.top] == list(range(10))  # ties keep code order


def test_code_usage_one_hot_and_known_histogram():
    counts = np.zeros(16, dtype=np.int64)
    counts[5] = 40
    u = code_usage(counts)
    assert u.perplexity == pytest.approx(1.0)
    assert u.entropy_bits == pytest.approx(0.0)
    assert (u.used, u.dead, u.usage) == (1, 15, 1 / 16)
    assert u.top == [(5, 40, 1.0)]

    # p = (1/2, 1/4, 1/8, 1/8): H = 1.75 bits.
    u = code_usage(np.array([4, 0, 2, 1, 1, 0]))
    assert u.entropy_bits == pytest.approx(1.75)
    assert u.perplexity == pytest.approx(2**1.75)
    assert u.max_entropy_bits == pytest.approx(math.log2(6))
    assert (u.used, u.dead, u.tokens) == (4, 2, 8)
    assert u.top == [(0, 4, 0.5), (2, 2, 0.25), (3, 1, 0.125), (4, 1, 0.125)]
    d = json.loads(json.dumps(u.to_dict()))
    assert d["top"][0] == [0, 4, 0.5] and d["codebook_size"] == 6


def test_code_usage_empty_and_invalid():
    u = code_usage(torch.zeros(8, dtype=torch.long))
    assert (u.tokens, u.used, u.dead, u.perplexity, u.entropy_bits, u.top) == (0, 0, 8, 0.0, 0.0, [])
    with pytest.raises(ValueError):
        code_usage(torch.tensor([1, -1]))
    with pytest.raises(ValueError):
        code_usage(torch.ones(2, 2))


def test_quantization_error():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    q = torch.tensor([[3.0, 3.0], [0.0, 1.0]])
    assert quantization_error(z, q) == pytest.approx(2 / 25)
    assert quantization_error(z, z) == 0.0
    assert quantization_error(z, torch.zeros_like(z)) == pytest.approx(1.0)
    assert quantization_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert math.isinf(quantization_error(torch.zeros(3), torch.ones(3)))
