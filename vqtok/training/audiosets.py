"""Audio training: random fixed-length segments streamed from the files, the reconstruction loss, and
validation on a fixed, seeded segment of each held-out file.

The reconstruction losses are vqtok.training.audioloss's; the training loop adds the quantizer's own terms.

Validation runs up to VAL_SECONDS of each held-out file (a whole file when it is shorter) through the model,
padded to a multiple of the hop and cropped back before scoring (`AudioEvaluator`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from vqtok import plots, stats
from vqtok.config import ModelConfig, TrainConfig
from vqtok.data import io as data
from vqtok.data.streams import AudioSegments, Item, fixed_items, read_audio_headers, split_files
from vqtok.errors import VqtokError
from vqtok.evaluate import AudioEvaluator
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training.audioloss import reconstruction_loss

# The validation files a run keeps when the data set is too small to hold any out.
FALLBACK_VAL_FILES = 8
# Validation segments: up to this many seconds of each held-out file, from a seeded offset.
VAL_SECONDS = 10.0


def segment_samples(train_config: TrainConfig, sample_rate: int, hop: int) -> int:
    """The training crop length: segment_seconds at the model's rate, rounded to a multiple of the hop (>= 1 hop)."""
    return max(1, round(train_config.segment_seconds * sample_rate / hop)) * hop


class AudioTask:
    """Training segments of `segment_seconds` and validation segments of up to VAL_SECONDS, mono at the
    model's rate, streamed from the files. Training draws a file with probability proportional to its length
    (so every second of audio is equally likely), then a uniform offset. Headers are read once up front
    (rate and length: a few bytes per file); files whose header cannot be read are skipped then."""

    modality = "audio"

    def __init__(self, paths: list[Path], model_config: ModelConfig, train_config: TrainConfig):
        files, self.skipped = read_audio_headers(paths)
        if not files:
            first, why = self.skipped[0]
            raise VqtokError(f"none of the {len(paths)} audio files could be read (first: {why})")
        train_idx, val_idx = split_files(len(files), train_config.seed, train_config.val_fraction,
                                         train_config.max_val)
        self.sample_rate, self.hop = model_config.sample_rate, model_config.downsample
        self.loss = train_config.audio_loss
        segment = segment_samples(train_config, self.sample_rate, self.hop)
        train_files = [files[i] for i in train_idx]
        self.train_data = AudioSegments(train_files, self.sample_rate, segment, speed_perturb=train_config.speed_perturb,
                                        gain_db=train_config.gain_perturb_db)
        self.weights = torch.tensor([f.frames / f.rate for f in train_files], dtype=torch.float64)
        val_files = [files[i] for i in (val_idx or train_idx[:FALLBACK_VAL_FILES])]
        self.val_data = AudioSegments(val_files, self.sample_rate, round(VAL_SECONDS * self.sample_rate),
                                      pad_short=False)
        self.val_items: list[Item] = fixed_items(range(len(val_files)), train_config.seed)

    @staticmethod
    def prepare(batch: torch.Tensor) -> torch.Tensor:
        return batch

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(recon, target, self.sample_rate, self.loss)

    @staticmethod
    def batch_metrics(recon: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"si_snr": float(stats.si_snr(recon.flatten(1), target.flatten(1)).mean())}

    def evaluate(self, model: Tokenizer, batches: Iterable[torch.Tensor], device: torch.device) -> dict[str, float]:
        """Figures over every validation segment; batches are (1, 1, T) (segments differ in length)."""
        evaluator = AudioEvaluator(model)
        for wave in batches:
            evaluator.add(wave[0].to(device))
        return evaluator.result()

    def preview(self, model: Tokenizer, path: Path, device: torch.device) -> None:
        """Log-mel spectrograms of the first validation segment and its reconstruction."""
        wave = self.val_data[self.val_items[0]][0].to(device)
        padded, length = data.pad_length(wave, self.hop)
        with torch.no_grad():
            recon = model(padded[None]).recon[0, :, :length].clamp(-1.0, 1.0)
        plots.spectrogram_comparison(wave[0].cpu(), recon[0].cpu(), self.sample_rate, path, title="validation")


def default_sample_rate(paths: list[Path], sample: int = 200) -> int:
    """The most common sample rate among up to `sample` evenly spaced files (headers only; ties go to the
    higher rate). Unreadable files do not vote; they are reported when the set is loaded."""
    step = max(1, len(paths) // sample)
    rates: dict[int, int] = {}
    for path in paths[::step]:
        try:
            rate = data.audio_info(path)[0]
        except VqtokError:
            continue
        rates[rate] = rates.get(rate, 0) + 1
    if not rates:
        raise VqtokError(f"none of the {len(paths)} audio files has a readable header")
    return max(rates, key=lambda r: (rates[r], r))
