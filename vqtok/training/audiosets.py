"""Audio training: random fixed-length segments streamed from the files, the reconstruction loss, and
validation on a fixed, seeded segment of each held-out file.

Three reconstruction losses (`TrainConfig.audio_loss`); the training loop adds the quantizer's own terms.
- "waveform": a squared error on the waveform plus a lightly weighted multi-resolution log-mel loss (L1 between
  log10 mel magnitude spectrograms at three FFT sizes, 512 / 1024 / 2048 at 16 kHz, scaled with the sample
  rate). The weighting is what a short CPU run can learn from: with an L1 waveform term the output collapses
  to silence (the median of an unpredictable sample is 0), and with the mel term at full weight the model
  matches spectra with incoherent phase (SI-SNR stays near -35 dB for hundreds of steps).
- "spectral": the multi-scale log-mel L1 of DAC (seven windows, 32 to 2048 samples at 16 kHz, 5 to 320 mel
  bands) at DAC's weight, plus the waveform squared error at unit weight to anchor the phase. It trades
  SI-SNR for what listeners and PESQ / STOI hear: spectral envelopes at every time scale.
- "complex": "spectral" plus the squared error of power-law compressed complex spectra (|S|^0.3 with S's
  phase, 1024-sample window at 16 kHz), relative to the target's, at weight 2. Magnitude losses leave the
  phase free, and a decoder that synthesises through an inverse STFT (`--audio-net stft`) then overlaps frames
  of unrelated phase (SI-SNR -27 dB after 3,000 steps on LibriSpeech); this term makes it -14 dB and raises
  PESQ and STOI (benchmarks/README.md).
The constants below record what was measured.

Validation runs up to VAL_SECONDS of each held-out file (a whole file when it is shorter) through the model,
padded to a multiple of the hop and cropped back before scoring (`AudioEvaluator`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
import torchaudio

from vqtok import plots, stats
from vqtok.config import ModelConfig, TrainConfig
from vqtok.data import io as data
from vqtok.data.streams import AudioSegments, Item, fixed_items, read_audio_headers, split_files
from vqtok.errors import VqtokError
from vqtok.evaluate import AudioEvaluator
from vqtok.nets.audio import INPUT_GAIN
from vqtok.nets.spectral import compress
from vqtok.nets.tokenizer import Tokenizer

# Weight of the log-mel term against the waveform squared error, measured at the nets' scale (INPUT_GAIN).
MEL_WEIGHT = 0.002
# Scale of the whole reconstruction loss against the quantizer's terms. At 1 the commitment loss (beta 0.25)
# holds the encoder output at its initial scale and SI-SNR stays below -30 dB for 300 steps; at 25 (the balance
# of beta = 0.01) it passes -10 dB by step 150 (FSDD, 8 stages of 1024 codes).
RECON_WEIGHT = 25.0
# Added to mel magnitudes before the log: keeps the log's gradient bounded on near-silent output.
MEL_FLOOR = 1e-2
# The "spectral" loss: (window at 16 kHz, mel bands) per scale and the weight of their mean, as in DAC; the
# floor is DAC's clamp, low enough that quiet passages count (speech sits ~40 dB above it).
SPECTRAL_SCALES = ((32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320))
SPECTRAL_WEIGHT = 15.0
SPECTRAL_FLOOR = 1e-5
# The "complex" loss adds to "spectral" the error of power-law compressed complex spectra (as in speech
# enhancement), which rewards the waveform's phase where the signal has energy.
COMPLEX_WINDOW = 1024
COMPLEX_WEIGHT = 2.0
# The validation files a run keeps when the data set is too small to hold any out.
FALLBACK_VAL_FILES = 8
# Validation segments: up to this many seconds of each held-out file, from a seeded offset.
VAL_SECONDS = 10.0


def mel_sizes(sample_rate: int) -> list[tuple[int, int]]:
    """(n_fft, n_mels) per resolution of the mel loss: 512 / 1024 / 2048 at 16 kHz, scaled with the rate and
    rounded to powers of two (256 / 512 / 1024 at 8 kHz). Bands are n_fft / 16, at most 80, so the narrow
    low-frequency mel filters of a short FFT are never empty."""
    sizes = []
    for n in (512, 1024, 2048):
        n_fft = 2 ** max(6, round(math.log2(n * sample_rate / 16000)))
        sizes.append((n_fft, max(8, min(80, n_fft // 16))))
    return sizes


def spectral_scales(sample_rate: int) -> list[tuple[int, int]]:
    """(window, mel bands) per scale of the "spectral" loss: SPECTRAL_SCALES at 16 kHz, windows scaled with the
    rate and rounded to powers of two; bands capped at window / 4 so no mel filter falls between FFT bins."""
    scales = []
    for window, bands in SPECTRAL_SCALES:
        n_fft = 2 ** max(4, round(math.log2(window * sample_rate / 16000)))
        scales.append((n_fft, min(bands, n_fft // 4)))
    return scales


@functools.lru_cache(maxsize=32)
def _mel(sample_rate: int, n_fft: int, n_mels: int, device: torch.device) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4,
                                                n_mels=n_mels, power=1.0).to(device)


def log_mel_l1(recon: torch.Tensor, target: torch.Tensor, sample_rate: int, scales: list[tuple[int, int]],
               floor: float) -> torch.Tensor:
    """Mean over scales of mean |log10(mel(recon) + floor) - log10(mel(target) + floor)| on magnitude mel
    spectrograms (Hann window, hop n_fft / 4): (B, 1, T) pairs -> scalar."""
    r, t = recon.flatten(1), target.flatten(1)
    total = recon.new_zeros(())
    for n_fft, n_mels in scales:
        mel = _mel(sample_rate, n_fft, n_mels, recon.device)
        total = total + (torch.log10(mel(r) + floor) - torch.log10(mel(t) + floor)).abs().mean()
    return total / len(scales)


def complex_window(sample_rate: int) -> int:
    """The "complex" loss's STFT window: 1024 samples at 16 kHz, scaled with the rate to a power of two."""
    return 2 ** max(6, round(math.log2(COMPLEX_WINDOW * sample_rate / 16000)))


def compressed_spectrum_error(recon: torch.Tensor, target: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Squared error between power-law compressed complex spectra (|S|^0.3 with S's phase; Hann window, hop
    n_fft / 4) relative to the target's compressed energy: (B, 1, T) pairs -> scalar, 0 only when the spectra
    match in magnitude and phase, 1 for silence against any target, 2 for the right magnitudes at random phase."""
    window = torch.hann_window(n_fft, device=recon.device)

    def compressed(x: torch.Tensor) -> torch.Tensor:
        return compress(torch.stft(x.flatten(1).float(), n_fft, n_fft // 4, window=window, return_complex=True))

    r, t = compressed(recon), compressed(target)
    return (r - t).abs().pow(2).mean() / t.abs().pow(2).mean().detach().clamp(min=1e-8)


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
        self.train_data = AudioSegments(train_files, self.sample_rate, segment)
        self.weights = torch.tensor([f.frames / f.rate for f in train_files], dtype=torch.float64)
        val_files = [files[i] for i in (val_idx or train_idx[:FALLBACK_VAL_FILES])]
        self.val_data = AudioSegments(val_files, self.sample_rate, round(VAL_SECONDS * self.sample_rate),
                                      pad_short=False)
        self.val_items: list[Item] = fixed_items(range(len(val_files)), train_config.seed)

    @staticmethod
    def prepare(batch: torch.Tensor) -> torch.Tensor:
        return batch

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wave = F.mse_loss(recon * INPUT_GAIN, target * INPUT_GAIN)
        if self.loss in ("spectral", "complex"):
            mel = log_mel_l1(recon, target, self.sample_rate, spectral_scales(self.sample_rate), SPECTRAL_FLOOR)
            loss = wave + SPECTRAL_WEIGHT * mel
            if self.loss == "complex":
                loss = loss + COMPLEX_WEIGHT * compressed_spectrum_error(recon * INPUT_GAIN, target * INPUT_GAIN,
                                                                         complex_window(self.sample_rate))
            return loss
        mel = log_mel_l1(recon, target, self.sample_rate, mel_sizes(self.sample_rate), MEL_FLOOR)
        return RECON_WEIGHT * (wave + MEL_WEIGHT * mel)

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
