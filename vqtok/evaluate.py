"""Reconstruction and codebook figures accumulated over batches (images) or files (audio): shared by validation
during training and by `vqtok eval`."""

from __future__ import annotations

import math

import torch

from vqtok.data import io as data
from vqtok import stats
from vqtok.nets.tokenizer import Tokenizer


def codebook_figures(usages: list[stats.CodeUsage], err: float, energy: float) -> dict[str, float]:
    """usage and perplexity averaged over stages, dead codes summed, relative quantization error."""
    return {
        "usage": sum(u.usage for u in usages) / len(usages),
        "perplexity": sum(u.perplexity for u in usages) / len(usages),
        "dead_codes": float(sum(u.dead for u in usages)),
        "quant_error": err / max(energy, 1e-12),
    }


class ImageEvaluator:
    """Feeds images through a tokenizer and accumulates PSNR, SSIM, MSE (per image, on the original pixels),
    code counts per stage, relative quantization error and bits per pixel."""

    def __init__(self, model: Tokenizer):
        q = model.config.quantizer
        self.model = model
        self.codebook_size = q.codebook_size
        self.counts = torch.zeros(q.stages, q.codebook_size, dtype=torch.long)
        self.images = 0
        self.sums = {"psnr": 0.0, "ssim": 0.0, "mse": 0.0, "bits_per_pixel": 0.0}
        self.err = 0.0
        self.energy = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1], H and W multiples of the downsampling factor; `size` = the original
        (h, w) to score (the rest is padding). Returns the clamped reconstructions (B, 3, H, W)."""
        out = self.model(x)
        recon = out.recon.clamp(0.0, 1.0)
        h, w = size or x.shape[-2:]
        ref, rec = x[..., :h, :w], recon[..., :h, :w]
        psnr = stats.psnr(rec, ref)
        self.sums["psnr"] += float(psnr.clamp(max=100.0).sum())
        self.sums["ssim"] += float(stats.ssim(rec, ref).sum())
        self.sums["mse"] += float(stats.mse(rec, ref).sum())
        stages, grid = out.indices.shape[1], out.indices.shape[2:]
        bits = stages * math.prod(grid) * math.ceil(math.log2(self.codebook_size))
        self.sums["bits_per_pixel"] += bits / (h * w) * x.shape[0]
        self.images += x.shape[0]
        flat = out.indices.movedim(1, -1).reshape(-1, stages)
        for s in range(stages):
            self.counts[s] += stats.count_codes(flat[:, s].cpu(), self.codebook_size)
        z = self.model._to_vectors(out.z)
        q = self.model.quantizer.decode(flat)
        self.err += float(((z - q) ** 2).sum())
        self.energy += float((z**2).sum())
        return recon

    def result(self) -> dict[str, float]:
        """Means per image, plus usage / perplexity / dead codes (first stage, then per stage lists)."""
        n = max(self.images, 1)
        out = {k: v / n for k, v in self.sums.items()}
        usages = [stats.code_usage(c) for c in self.counts]
        out.update(codebook_figures(usages, self.err, self.energy))
        out["images"] = float(self.images)
        return out


class AudioEvaluator:
    """Feeds whole waves through a tokenizer and accumulates SI-SNR and log-mel distance (per file, on the
    original samples), code counts per stage, relative quantization error and the bitrate.

    `stages` limits the residual stages used (None: all), which is how one model is scored at several bitrates.
    """

    def __init__(self, model: Tokenizer, stages: int | None = None):
        q = model.config.quantizer
        self.model = model
        self.stages = stages or q.stages
        self.codebook_size = q.codebook_size
        self.counts = torch.zeros(self.stages, q.codebook_size, dtype=torch.long)
        self.files = 0
        self.samples = 0
        self.sums = {"si_snr": 0.0, "mel_distance": 0.0}
        self.err = 0.0
        self.energy = 0.0

    @torch.no_grad()
    def add(self, wave: torch.Tensor) -> torch.Tensor:
        """wave: (1, T) in [-1, 1] at the model's rate. Returns the clamped reconstruction (1, T)."""
        padded, length = data.pad_length(wave, self.model.hop)
        out = self.model(padded[None], self.stages)
        recon = out.recon[0, :, :length].clamp(-1.0, 1.0)
        rate = self.model.config.sample_rate
        self.sums["si_snr"] += float(stats.si_snr(recon, wave)[0])
        self.sums["mel_distance"] += float(stats.mel_distance(recon, wave, rate)[0])
        flat = out.indices.movedim(1, -1).reshape(-1, self.stages)
        for s in range(self.stages):
            self.counts[s] += stats.count_codes(flat[:, s].cpu(), self.codebook_size)
        z = self.model._to_vectors(out.z)
        q = self.model.quantizer.decode(flat)
        self.err += float(((z - q) ** 2).sum())
        self.energy += float((z**2).sum())
        self.files += 1
        self.samples += length
        return recon

    def kbps(self) -> float:
        """stages x log2 K bits per code frame x frames per second, in kilobits per second."""
        rate = self.model.config.sample_rate
        return self.stages * math.log2(self.codebook_size) * rate / self.model.hop / 1000.0

    def result(self) -> dict[str, float]:
        """Means per file; usage / perplexity averaged over stages, then one entry per stage."""
        n = max(self.files, 1)
        out = {k: v / n for k, v in self.sums.items()}
        out["kbps"] = self.kbps()
        usages = [stats.code_usage(c) for c in self.counts]
        out.update(codebook_figures(usages, self.err, self.energy))
        out["files"] = float(self.files)
        out["audio_seconds"] = self.samples / self.model.config.sample_rate
        for s, u in enumerate(usages):
            out[f"usage_stage_{s + 1}"] = u.usage
            out[f"perplexity_stage_{s + 1}"] = u.perplexity
        return out
