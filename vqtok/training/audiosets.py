"""Audio training and validation sets: random fixed-length segments for training, whole files for validation.

The reconstruction loss is a squared error on the waveform plus a lightly weighted multi-resolution log-mel
loss (L1 between log10 mel magnitude spectrograms at three FFT sizes, 512 / 1024 / 2048 at 16 kHz, scaled
with the sample rate); `train.py` adds the quantizer's own terms. The weighting is what a short CPU run can
learn from: with an L1 waveform term the output collapses to silence (the median of an unpredictable sample
is 0), and with the mel term at full weight the model matches spectra with incoherent phase (SI-SNR stays
near -35 dB for hundreds of steps); squared error at the nets' scale plus a small mel term does both.
The constants below record what was measured.

Validation runs each held-out file whole through the model, padded to a multiple of the hop and cropped back
before scoring (`AudioEvaluator`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio

from vqtok.data import io as data
from vqtok import plots, stats
from vqtok.nets.audio import INPUT_GAIN
from vqtok.config import ModelConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.evaluate import AudioEvaluator
from vqtok.nets.tokenizer import Tokenizer

# Weight of the log-mel term against the waveform squared error, measured at the nets' scale (INPUT_GAIN).
MEL_WEIGHT = 0.002
# Scale of the whole reconstruction loss against the quantizer's terms. At 1 the commitment loss (beta 0.25)
# holds the encoder output at its initial scale and SI-SNR stays below -30 dB for 300 steps; at 25 (the balance
# of beta = 0.01) it passes -10 dB by step 150 (FSDD, 8 stages of 1024 codes).
RECON_WEIGHT = 25.0
# Added to mel magnitudes before the log: keeps the log's gradient bounded on near-silent output.
MEL_FLOOR = 1e-2
# The validation files a run keeps when the data set is too small to hold any out.
FALLBACK_VAL_FILES = 8
# Seconds of the first validation file drawn in a preview.
PREVIEW_SECONDS = 10.0


def mel_sizes(sample_rate: int) -> list[tuple[int, int]]:
    """(n_fft, n_mels) per resolution of the mel loss: 512 / 1024 / 2048 at 16 kHz, scaled with the rate and
    rounded to powers of two (256 / 512 / 1024 at 8 kHz). Bands are n_fft / 16, at most 80, so the narrow
    low-frequency mel filters of a short FFT are never empty."""
    sizes = []
    for n in (512, 1024, 2048):
        n_fft = 2 ** max(6, round(math.log2(n * sample_rate / 16000)))
        sizes.append((n_fft, max(8, min(80, n_fft // 16))))
    return sizes


@functools.lru_cache(maxsize=16)
def _mel(sample_rate: int, n_fft: int, n_mels: int, device: torch.device) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4,
                                                n_mels=n_mels, power=1.0).to(device)


def mel_loss(recon: torch.Tensor, target: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Mean over resolutions of mean |log10(mel(recon) + floor) - log10(mel(target) + floor)| on magnitude mel
    spectrograms (Hann window, hop n_fft / 4): (B, 1, T) pairs -> scalar."""
    r, t = recon.flatten(1), target.flatten(1)
    total = recon.new_zeros(())
    sizes = mel_sizes(sample_rate)
    for n_fft, n_mels in sizes:
        mel = _mel(sample_rate, n_fft, n_mels, recon.device)
        total = total + (torch.log10(mel(r) + MEL_FLOOR) - torch.log10(mel(t) + MEL_FLOOR)).abs().mean()
    return total / len(sizes)


def segment_samples(train_config: TrainConfig, sample_rate: int, hop: int) -> int:
    """The training crop length: segment_seconds at the model's rate, rounded to a multiple of the hop (>= 1 hop)."""
    return max(1, round(train_config.segment_seconds * sample_rate / hop)) * hop


class AudioSet:
    """Mono waves (1, T_i) at the model's rate, kept in memory as float32.

    `sample` draws fixed-length segments: a file chosen with probability proportional to its length (so every
    second of audio is equally likely), then a uniform offset; a file shorter than the segment is placed at a
    random offset in silence.
    """

    def __init__(self, waves: list[torch.Tensor], sample_rate: int, hop: int, segment: int):
        if not waves:
            raise ValueError("AudioSet needs at least one wave")
        self.waves = waves
        self.sample_rate = sample_rate
        self.hop = hop
        self.segment = segment
        self.weights = torch.tensor([float(max(w.shape[-1], 1)) for w in waves])

    def __len__(self) -> int:
        return len(self.waves)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 1, segment) float32 in [-1, 1]."""
        picks = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator).tolist()
        out = torch.zeros(batch_size, 1, self.segment)
        for row, i in enumerate(picks):
            wave = self.waves[i][0]
            spare = wave.shape[0] - self.segment
            offset = int(torch.randint(abs(spare) + 1, (1,), generator=generator))
            if spare >= 0:
                out[row, 0] = wave[offset:offset + self.segment]
            else:
                out[row, 0, offset:offset + wave.shape[0]] = wave
        return out

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wave = F.mse_loss(recon * INPUT_GAIN, target * INPUT_GAIN)
        return RECON_WEIGHT * (wave + MEL_WEIGHT * mel_loss(recon, target, self.sample_rate))

    def batch_metrics(self, recon: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"si_snr": float(stats.si_snr(recon.flatten(1), target.flatten(1)).mean())}

    def evaluate(self, model: Tokenizer, batch_size: int, device: torch.device) -> dict[str, float]:
        evaluator = AudioEvaluator(model)
        for wave in self.waves:
            evaluator.add(wave.to(device))
        return evaluator.result()

    def preview(self, model: Tokenizer, path: Path, device: torch.device) -> None:
        wave = self.waves[0][:, : int(PREVIEW_SECONDS * self.sample_rate)].to(device)
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


def build_audio_sets(
    paths: list[Path], model_config: ModelConfig, train_config: TrainConfig
) -> tuple[AudioSet, AudioSet, list[tuple[Path, str]]]:
    """Decode every file once (mono, at the model's rate) and split it into training and validation sets.

    Returns (train, val, skipped files with their reasons). With fewer than 4 files nothing is held out and
    validation scores the first few training files.
    """
    from vqtok.training.imagesets import split_indices

    rate, hop = model_config.sample_rate, model_config.downsample
    waves, kept, skipped = data.load_audio_set(paths, rate)
    if not kept:
        first, why = skipped[0]
        raise VqtokError(f"none of the {len(paths)} audio files could be read (first: {first}: {why})")
    train_idx, val_idx = split_indices(len(kept), train_config)
    segment = segment_samples(train_config, rate, hop)
    train_set = AudioSet([waves[i] for i in train_idx], rate, hop, segment)
    val_waves = [waves[i] for i in (val_idx or train_idx[:FALLBACK_VAL_FILES])]
    return train_set, AudioSet(val_waves, rate, hop, segment), skipped
