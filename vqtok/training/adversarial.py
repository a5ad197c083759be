"""The adversarial stage of audio training: EnCodec's multi-scale STFT discriminator, its hinge losses and
relative feature matching (Défossez et al. 2022, "High Fidelity Neural Audio Compression", sec. 3.4), and
`Adversary`, which owns the discriminator, its optimizer and its update.

Each scale reads the complex STFT of the waveform (real and imaginary parts as two channels, laid out as
time x frequency) through 2-D convolutions: kernel (3, 9), then three with dilations 1, 2, 4 in time and
stride 2 in frequency, then (3, 3), each followed by LeakyReLU 0.2 and kept as a feature map, and a last (3, 3)
convolution to one channel of logits. The windows are EnCodec's at 24 kHz (2048 ... 128 samples, hop 1/4 of the
window) scaled to the model's rate, so every scale sees the same stretch of time at any rate. All
convolutions are weight-normalised, as in EnCodec.

The training loop switches the stage on after `TrainConfig.adversarial_from` plain steps (see
vqtok.training.loop); before then nothing here runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from vqtok.config import TrainConfig
from vqtok.errors import VqtokError
from vqtok.training.distributed import Processes

# EnCodec's STFT windows at 24 kHz, longest first; hop = window / 4.
WINDOWS_24K = (2048, 1024, 512, 256, 128)
# EnCodec's width, in every layer, is TrainConfig.disc_filters' default (32). On a CPU it is what an adversarial
# step costs: at 16 kHz with 8 x 0.5 s segments, the discriminator's update and the generator's pass through it
# took 4.6 s on one thread (16 filters: 1.35 s, 8: 0.96 s), against 0.27 s for a whole step of a --channels 128
# codec.
KERNEL = (3, 9)  # (time, frequency)
DILATIONS = (1, 2, 4)  # in time, one per strided layer
SLOPE = 0.2
# The discriminator's optimizer, as in DAC (AdamW, its weight decay torch's default 0.01); a constant rate.
DISC_LR = 1e-4
DISC_BETAS = (0.8, 0.99)
# Keeps the feature-matching ratio finite should a real feature map be all zeros.
FEATURE_EPS = 1e-8

Logits = list[torch.Tensor]
Features = list[list[torch.Tensor]]


def stft_windows(sample_rate: int) -> list[int]:
    """STFT window lengths in samples, longest first: WINDOWS_24K scaled to `sample_rate` and rounded to powers
    of two (1024 ... 64 at 16 kHz, 512 ... 32 at 8 kHz)."""
    return [2 ** max(4, round(math.log2(w * sample_rate / 24000))) for w in WINDOWS_24K]


def _conv(c_in: int, c_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
          dilation: tuple[int, int] = (1, 1)) -> nn.Module:
    # "Same" padding: the time axis keeps its length, frequency shrinks only by the stride.
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return weight_norm(nn.Conv2d(c_in, c_out, kernel, stride=stride, dilation=dilation, padding=padding))


class ScaleDiscriminator(nn.Module):
    """One STFT resolution: (B, 1, T) waveform, T >= window -> logits (B, 1, frames, ceil(bins / 8)) and the
    feature maps of its five hidden layers, (B, filters, frames, ceil(bins / s)) for s = 1, 2, 4, 8, 8, where
    frames = 1 + (T - window) // hop and bins = window / 2 + 1."""

    def __init__(self, window: int, filters: int):
        super().__init__()
        self.window, self.hop = window, window // 4
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        convs = [_conv(2, filters, KERNEL)]
        convs += [_conv(filters, filters, KERNEL, stride=(1, 2), dilation=(d, 1)) for d in DILATIONS]
        convs.append(_conv(filters, filters, (3, 3)))
        self.convs = nn.ModuleList(convs)
        self.post = _conv(filters, 1, (3, 3))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # EnCodec's spectrogram: no centring pad, normalised by the window's energy.
        spec = torch.stft(wave.flatten(1), self.window, self.hop, window=self.hann, center=False, normalized=True,
                          return_complex=True)
        x = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # (B, 2, frames, bins)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), SLOPE)
            features.append(x)
        return self.post(x), features


class Discriminator(nn.Module):
    """EnCodec's multi-scale STFT discriminator at `sample_rate` Hz: (B, 1, T) waveform on the [-1, 1] scale
    -> per scale (longest window first) its logits and its feature maps (see `ScaleDiscriminator`)."""

    def __init__(self, sample_rate: int, filters: int = TrainConfig.disc_filters):
        super().__init__()
        self.scales = nn.ModuleList(ScaleDiscriminator(w, filters) for w in stft_windows(sample_rate))

    def forward(self, wave: torch.Tensor) -> tuple[Logits, Features]:
        outs = [scale(wave) for scale in self.scales]
        return [logits for logits, _ in outs], [features for _, features in outs]


def discriminator_loss(real: Logits, fake: Logits) -> torch.Tensor:
    """Hinge loss of the discriminator, mean over scales of mean relu(1 - D(x)) + mean relu(1 + D(G(z))):
    per-scale logits of real and generated audio -> scalar."""
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def generator_loss(fake: Logits) -> torch.Tensor:
    """Hinge loss of the generator, mean over scales of mean relu(1 - D(G(z))): per-scale logits -> scalar."""
    return torch.stack([F.relu(1 - f).mean() for f in fake]).mean()


def feature_loss(real: Features, fake: Features) -> torch.Tensor:
    """EnCodec's relative feature matching: mean over every layer of every scale of
    mean |f(x) - f(G(z))| / mean |f(x)|. Per scale, per layer feature maps of matching shapes -> scalar;
    unchanged when both sides are scaled alike, so no layer dominates by its magnitude."""
    terms = [(f - r).abs().mean() / r.abs().mean().clamp_min(FEATURE_EPS)
             for real_maps, fake_maps in zip(real, fake) for r, f in zip(real_maps, fake_maps)]
    return torch.stack(terms).mean()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Inside, `module`'s weights need no gradient: a pass through it builds a graph to its input only (the
    backward skips the weight gradients), and leaves the weights' .grad alone."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Adversary:
    """The adversarial stage of one run on this process: the discriminator (`disc`; in DistributedDataParallel
    under torchrun, so its gradients are averaged and the ranks stay identical), its optimizer and its step.

    `segment` is the training segment length in samples; it must cover the longest STFT window. The
    discriminator's initial weights come from the run's seed without touching the global RNG, so a run is the
    same as one without the stage up to the switch. The loss weights come from `config`.
    """

    def __init__(self, sample_rate: int, segment: int, config: TrainConfig, procs: Processes):
        longest = max(stft_windows(sample_rate))
        if segment < longest:
            raise VqtokError(f"the adversarial stage needs training segments of at least {longest} samples (its "
                             f"longest STFT window at {sample_rate} Hz), got {segment}: raise --segment-seconds "
                             f"to {longest / sample_rate:.3f} or more")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.disc = Discriminator(sample_rate, config.disc_filters).to(procs.device)
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=DISC_LR, betas=DISC_BETAS)
        self.net = procs.wrap(self.disc)
        self.adversarial_weight, self.feature_weight = config.adversarial_weight, config.feature_weight

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One discriminator update on `real` against the detached `fake`, then the generator's terms against
        the updated discriminator (as EnCodec, DAC and HiFi-GAN order them). `real`, `fake`: (B, 1, T) waveforms.

        Returns adversarial_weight * adv + feature_weight * feature, with its graph to `fake`, and the figures
        to log: "adv", "feature" and "disc" (the discriminator's loss), detached scalars.
        """
        disc = self._update(real, fake.detach())
        with _frozen(self.disc):
            fake_logits, fake_maps = self.disc(fake)
            with torch.no_grad():  # the targets: constants to the generator
                _, real_maps = self.disc(real)
        adv, feature = generator_loss(fake_logits), feature_loss(real_maps, fake_maps)
        loss = self.adversarial_weight * adv + self.feature_weight * feature
        return loss, {"adv": adv.detach(), "feature": feature.detach(), "disc": disc}

    def _update(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One AdamW step on the hinge loss; real and fake go through as one batch. Returns the loss, detached."""
        logits, _ = self.net(torch.cat([real, fake]))
        halves = [chunk.chunk(2) for chunk in logits]
        loss = discriminator_loss([r for r, _ in halves], [f for _, f in halves])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
