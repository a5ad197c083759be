"""Reconstruction and codebook figures accumulated over batches (images) or files (audio): shared by validation
during training and by `vqtok eval`."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from vqtok.data import io as data
from vqtok import stats
from vqtok.tokens import tokfile
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
    """Feeds images through a tokenizer and accumulates, per image on its original pixels, PSNR, SSIM, MS-SSIM
    and MSE, plus code counts per stage, the relative quantization error and bits per pixel.

    `stages` limits the residual stages used (None: all), a lower bitrate. Bits per pixel come three ways:
    `bits_per_pixel`, the codes alone at ceil(log2 K) bits each (grid * stages * ceil(log2 K) / (h * w));
    and, for images passed to `add` with their source names, the whole token file `vqtok encode` would write
    (magic, JSON header, payload, checksum), built in memory: `bpp_packed_file` for the packed codec and, when
    a model code `table` (S, K) is given, `bpp_entropy_file` for `--codec entropy`.
    """

    def __init__(self, model: Tokenizer, stages: int | None = None, table: np.ndarray | None = None):
        q = model.config.quantizer
        self.model = model
        self.stages = stages or q.stages
        self.codebook_size = q.codebook_size
        self.table = None if table is None else np.asarray(table)[: self.stages]
        self.counts = torch.zeros(self.stages, q.codebook_size, dtype=torch.long)
        self.images = 0
        self.file_images = 0
        self.sums = {"psnr": 0.0, "ssim": 0.0, "ms_ssim": 0.0, "mse": 0.0, "bits_per_pixel": 0.0}
        self.file_sums = {"bpp_packed_file": 0.0} | ({} if table is None else {"bpp_entropy_file": 0.0})
        self.err = 0.0
        self.energy = 0.0

    @functools.cached_property
    def fingerprint(self) -> str:
        # Hashes every weight, so only runs that measure token files pay for it.
        return self.model.fingerprint()

    @torch.no_grad()
    def add(self, x: torch.Tensor, size: tuple[int, int] | None = None,
            sources: Sequence[str] | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1], H and W multiples of the downsampling factor; `size` = the original
        (h, w) to score (the rest is padding); `sources`: the B names `vqtok encode` would record in each token
        file header (the path relative to the input folder, posix form), which makes the measured file sizes
        exact. Returns the clamped reconstructions (B, 3, H, W)."""
        out = self.model(x, self.stages)
        recon = out.recon.clamp(0.0, 1.0)
        h, w = size or x.shape[-2:]
        ref, rec = x[..., :h, :w], recon[..., :h, :w]
        self.sums["psnr"] += float(stats.psnr(rec, ref).sum())
        self.sums["ssim"] += float(stats.ssim(rec, ref).sum())
        self.sums["ms_ssim"] += float(stats.ms_ssim(rec, ref).sum())
        self.sums["mse"] += float(stats.mse(rec, ref).sum())
        grid = out.indices.shape[2:]
        bits = self.stages * math.prod(grid) * tokfile.bits_per_code(self.codebook_size)
        self.sums["bits_per_pixel"] += bits / (h * w) * x.shape[0]
        self.images += x.shape[0]
        if sources is not None:
            self._add_files(out.indices.cpu().numpy(), (h, w), sources)
        flat = out.indices.movedim(1, -1).reshape(-1, self.stages)
        for s in range(self.stages):
            self.counts[s] += stats.count_codes(flat[:, s].cpu(), self.codebook_size)
        z = self.model._to_vectors(out.z)
        q = self.model.quantizer.decode(flat)
        self.err += float(((z - q) ** 2).sum())
        self.energy += float((z**2).sum())
        return recon

    def _add_files(self, codes: np.ndarray, size: tuple[int, int], sources: Sequence[str]) -> None:
        """Accumulate 8 * token file bytes / (h * w) per image for codes (B, S, h', w')."""
        if len(sources) != len(codes):
            raise ValueError(f"{len(sources)} source names for a batch of {len(codes)} images")
        pixels = size[0] * size[1]
        for item, source in zip(codes, sources):
            header = token_header(self.fingerprint, size, source)
            packed = tokfile.encode_tokens(item, header, codebook_size=self.codebook_size)
            self.file_sums["bpp_packed_file"] += 8.0 * len(packed) / pixels
            if self.table is not None:
                coded = tokfile.encode_tokens(item, header, codebook_size=self.codebook_size, codec="entropy",
                                              table=self.table)
                self.file_sums["bpp_entropy_file"] += 8.0 * len(coded) / pixels
        self.file_images += len(codes)

    def result(self) -> dict[str, float]:
        """Means per image (file bits per pixel over the images added with source names, when any), plus
        usage / perplexity / dead codes averaged over stages."""
        n = max(self.images, 1)
        out = {k: v / n for k, v in self.sums.items()}
        if self.file_images:
            out.update({k: v / self.file_images for k, v in self.file_sums.items()})
        usages = [stats.code_usage(c) for c in self.counts]
        out.update(codebook_figures(usages, self.err, self.energy))
        out["images"] = float(self.images)
        return out


def token_header(fingerprint: str, size: tuple[int, int], source: str) -> dict[str, object]:
    """The header fields `vqtok encode` writes into an image token file (vqtok.jobs.pipeline.encode_files):
    the model fingerprint, the modality, the original (h, w) and the input's relative name."""
    return {"fingerprint": fingerprint, "modality": "image", "original_size": list(size), "source": source}


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
