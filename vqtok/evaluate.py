"""Reconstruction and codebook figures accumulated over batches (images) or files (audio): shared by validation
during training and by `vqtok eval`."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from vqtok.data import io as data
from vqtok import speech, stats
from vqtok.jobs.audiostream import WaveSignal, postfiltered
from vqtok.jobs.refine import Refinement, refined_codes
from vqtok.tokens import tokfile
from vqtok.tokens.tokfile import CodeTable
from vqtok.nets.tokenizer import Tokenizer, TokenizerOutput


def codebook_figures(usages: list[stats.CodeUsage], err: float, energy: float) -> dict[str, float]:
    """usage and perplexity averaged over stages, dead codes summed, relative quantization error."""
    return {
        "usage": sum(u.usage for u in usages) / len(usages),
        "perplexity": sum(u.perplexity for u in usages) / len(usages),
        "dead_codes": float(sum(u.dead for u in usages)),
        "quant_error": err / max(energy, 1e-12),
    }


class TokenFileSizes:
    """The sizes of the token files `vqtok encode` would write with a model, built in memory: with the packed
    codec and, when a model code `table` (S, K) is given, with `--codec entropy` (which writes a file packed
    when entropy coding would make it larger: `tokfile.encode_with_fallback`)."""

    def __init__(self, model: Tokenizer, stages: int, table: CodeTable | None = None):
        self.model = model
        self.codebook_size = model.config.quantizer.codebook_size
        self.table = None if table is None else table[:stages]
        self.codecs = ("packed",) if table is None else ("packed", "entropy")

    @functools.cached_property
    def fingerprint(self) -> str:
        # Hashes every weight, so only runs that measure token files pay for it.
        return self.model.fingerprint()

    def sizes(self, codes: np.ndarray, fields: dict[str, object]) -> dict[str, int]:
        """Bytes of the whole token file (magic, JSON header, payload, checksum) per codec, for one file's codes
        (S, *grid) and the header `fields` `vqtok encode` records besides the fingerprint and modality."""
        header = {"fingerprint": self.fingerprint, "modality": self.model.config.modality, **fields}
        sizes = {}
        for codec in self.codecs:
            table = self.table if codec == "entropy" else None
            blob = tokfile.encode_with_fallback(codes, header, codebook_size=self.codebook_size, codec=codec,
                                                table=table)
            sizes[codec] = len(blob)
        return sizes


class ImageEvaluator:
    """Feeds images through a tokenizer and accumulates, per image on its original pixels, PSNR, SSIM, MS-SSIM
    and MSE, plus code counts per stage, the relative quantization error and bits per pixel.

    `stages` limits the residual stages used (None: all), a lower bitrate. Bits per pixel come three ways:
    `bits_per_pixel`, the codes alone at ceil(log2 K) bits each (grid * stages * ceil(log2 K) / (h * w));
    and, for images passed to `add` with their source names, the whole token file `vqtok encode` would write
    (magic, JSON header, payload, checksum), built in memory: `bpp_packed_file` for the packed codec and, when
    a model code `table` (S, K) is given, `bpp_entropy_file` for `--codec entropy` (see TokenFileSizes).
    """

    def __init__(self, model: Tokenizer, stages: int | None = None, table: CodeTable | None = None):
        q = model.config.quantizer
        self.model = model
        self.stages = stages or q.stages
        self.codebook_size = q.codebook_size
        self.token_files = TokenFileSizes(model, self.stages, table)
        self.counts = torch.zeros(self.stages, q.codebook_size, dtype=torch.long)
        self.images = 0
        self.file_images = 0
        self.sums = {"psnr": 0.0, "ssim": 0.0, "ms_ssim": 0.0, "mse": 0.0, "bits_per_pixel": 0.0}
        self.file_sums = {f"bpp_{codec}_file": 0.0 for codec in self.token_files.codecs}
        self.err = 0.0
        self.energy = 0.0

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
            sizes = self.token_files.sizes(item, {"original_size": list(size), "source": source})
            for codec, n in sizes.items():
                self.file_sums[f"bpp_{codec}_file"] += 8.0 * n / pixels
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


class AudioEvaluator:
    """Feeds whole waves through a tokenizer and accumulates SI-SNR and log-mel distance (per file, on the
    original samples), code counts per stage, relative quantization error and the bitrate.

    `stages` limits the residual stages used (None: all), which is how one model is scored at several bitrates.
    The bitrate comes two ways: `kbps`, the codes alone (stages x log2 K x frames per second); and, for files
    passed to `add` with their header fields, the whole token file `vqtok encode` would write, built in
    memory, over the file's duration: `kbps_packed_file` and, when a model code `table` (S, K) is given,
    `kbps_entropy_file` (see TokenFileSizes). With `score_speech`, each file is also scored at 16 kHz with PESQ
    wide-band (`pesq_wb`) and STOI (`stoi`), each over the files it accepts (`pesq_skipped`, `stoi_skipped`
    count the others) and each when its package is installed (vqtok.speech). A true `refine`: the codes are chosen as `vqtok encode
    --refine / --search` chooses them (vqtok.jobs.refine). A non-zero `postfilter`: every figure is of the
    reconstruction `vqtok decode --postfilter` writes (vqtok.postfilter at that strength).
    """

    def __init__(self, model: Tokenizer, stages: int | None = None, table: CodeTable | None = None,
                 score_speech: bool = False, refine: Refinement = Refinement(), postfilter: float = 0.0):
        q = model.config.quantizer
        self.model = model
        self.refine = refine
        self.postfilter = postfilter
        self.stages = stages or q.stages
        self.codebook_size = q.codebook_size
        self.token_files = TokenFileSizes(model, self.stages, table)
        self.score_speech = score_speech
        self.counts = torch.zeros(self.stages, q.codebook_size, dtype=torch.long)
        self.files = 0
        self.samples = 0
        self.sums = {"si_snr": 0.0, "mel_distance": 0.0}
        self.sized_files = 0
        self.file_sums = {f"kbps_{codec}_file": 0.0 for codec in self.token_files.codecs}
        self.speech_sums: dict[str, float] = {}
        self.speech_files: dict[str, int] = {}
        self.speech_skipped: dict[str, int] = {}
        self.err = 0.0
        self.energy = 0.0

    @torch.no_grad()
    def add(self, wave: torch.Tensor, fields: dict[str, object] | None = None) -> torch.Tensor:
        """wave: (1, T) in [-1, 1] at the model's rate; `fields`: the header fields `vqtok encode` would record
        for this file besides the fingerprint and modality (`vqtok.jobs.pipeline.audio_header` plus "source",
        the path relative to the input folder), which makes the measured file sizes exact. Returns the clamped
        reconstruction (1, T)."""
        padded, length = data.pad_length(wave, self.model.hop)
        if self.refine:
            signal = WaveSignal(wave, self.model.config.sample_rate)
            indices = refined_codes(self.model, signal, self.refine, self.stages).movedim(1, 0).to(wave.device)
            out = TokenizerOutput(self.model.decode(indices), indices, {}, self.model.encoder(padded[None]))
        else:
            out = self.model(padded[None], self.stages)
        rate = self.model.config.sample_rate
        recon = postfiltered(out.recon[0, :, :length], rate, self.postfilter).clamp(-1.0, 1.0)
        self.sums["si_snr"] += float(stats.si_snr(recon, wave)[0])
        self.sums["mel_distance"] += float(stats.mel_distance(recon, wave, rate)[0])
        if fields is not None:
            self._add_file(out.indices[0].cpu().numpy(), fields)
        if self.score_speech:
            self._add_speech(speech.at_speech_rate(wave, rate), speech.at_speech_rate(recon, rate))
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

    def _add_file(self, codes: np.ndarray, fields: dict[str, object]) -> None:
        """Accumulate 8 * token file bytes / duration in kbps for one file's codes (S, frames); the duration is
        the original file's (original_length / original_sample_rate)."""
        seconds = int(fields["original_length"]) / int(fields["original_sample_rate"])
        for codec, n in self.token_files.sizes(codes, fields).items():
            self.file_sums[f"kbps_{codec}_file"] += 8.0 * n / seconds / 1000.0
        self.sized_files += 1

    def _add_speech(self, reference: torch.Tensor, decoded: torch.Tensor) -> None:
        """Accumulate PESQ and STOI of one file, both (T,) at 16 kHz; a file a measure refuses is counted, not
        scored."""
        for key, value in speech.speech_scores(reference, decoded).items():
            self.speech_skipped.setdefault(key, 0)
            if value is None:
                self.speech_skipped[key] += 1
                continue
            self.speech_sums[key] = self.speech_sums.get(key, 0.0) + value
            self.speech_files[key] = self.speech_files.get(key, 0) + 1

    def kbps(self) -> float:
        """stages x log2 K bits per code frame x frames per second, in kilobits per second."""
        rate = self.model.config.sample_rate
        return self.stages * math.log2(self.codebook_size) * rate / self.model.hop / 1000.0

    def result(self) -> dict[str, float]:
        """Means per file (file kbps over the files added with header fields, PESQ over the files it scored),
        usage / perplexity averaged over stages, the refine / search / postfilter settings that are not 0, then
        one entry per stage."""
        n = max(self.files, 1)
        out = {k: v / n for k, v in self.sums.items()}
        out.update({k: v / self.speech_files[k] for k, v in self.speech_sums.items()})
        out.update({f"{key.split('_')[0]}_skipped": float(n) for key, n in self.speech_skipped.items()})
        out["kbps"] = self.kbps()
        if self.sized_files:
            out.update({k: v / self.sized_files for k, v in self.file_sums.items()})
        usages = [stats.code_usage(c) for c in self.counts]
        out.update(codebook_figures(usages, self.err, self.energy))
        out["files"] = float(self.files)
        out["audio_seconds"] = self.samples / self.model.config.sample_rate
        # How the figures were made, where that differs from a plain encode and decode.
        settings = {"refine_steps": self.refine.steps, "search": self.refine.search, "postfilter": self.postfilter}
        out.update({k: float(v) for k, v in settings.items() if v})
        for s, u in enumerate(usages):
            out[f"usage_stage_{s + 1}"] = u.usage
            out[f"perplexity_stage_{s + 1}"] = u.perplexity
        return out
