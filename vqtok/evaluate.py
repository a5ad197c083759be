"""Reconstruction and codebook figures accumulated over batches: shared by validation during training and
by `vqtok eval`."""

from __future__ import annotations

import math

import torch

from . import stats
from .nets import Tokenizer


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
        out["usage"] = sum(u.usage for u in usages) / len(usages)
        out["perplexity"] = sum(u.perplexity for u in usages) / len(usages)
        out["dead_codes"] = float(sum(u.dead for u in usages))
        out["quant_error"] = self.err / max(self.energy, 1e-12)
        out["images"] = float(self.images)
        return out
