"""Configuration dataclasses with validation and a JSON round trip.

`ModelConfig` (with its `QuantizerConfig`) is everything needed to rebuild a model: it is stored as JSON in the
safetensors metadata of every model file. `TrainConfig` describes one training run and is stored in the run
directory beside the seed it used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vqtok.errors import VqtokError

Modality = Literal["image", "audio"]

# The lowest audio model rate, Hz. Below it a model holds under 500 Hz of bandwidth, too little for speech, and
# the log-mel losses and previews, whose bands span 0 Hz to half the rate, degenerate (at 1 Hz the preview's
# spectrogram is empty and drawing it fails).
MIN_SAMPLE_RATE = 1000


@dataclass
class QuantizerConfig:
    """The vector quantizer: codebook shape, gradient estimator and codebook learning.

    dim: code vector size D. codebook_size: codes per stage K. stages: residual stages (1 = plain VQ).
    estimator: "ste" (straight-through, van den Oord et al. 2017) or "rotation" (Fifty et al. 2024).
    codebook_update: "loss" (codebook loss, weight `codebook_weight`) or "ema" (decayed cluster statistics).
    beta: commitment loss weight. affine: "off", "learned" (per-dimension scale/shift, Huh et al. 2023) or
    "stats" (codebook mean/std matched to running encoder-output statistics). sync_nu: synchronized
    commitment weight (0 = off). alternate: inner codebook optimisation step before the encoder update.
    kmeans_init: k-means++ initialisation from the first batch. dead_code_steps: re-seed a code unused for
    this many steps (0 = never). cosine: l2-normalised codes and inputs. usage_window: steps in the rolling
    usage statistics. stage_dropout: probability that training uses a random prefix of the stages.
    """

    dim: int = 64
    codebook_size: int = 512
    stages: int = 1
    estimator: Literal["ste", "rotation"] = "rotation"
    codebook_update: Literal["loss", "ema"] = "ema"
    codebook_weight: float = 1.0
    beta: float = 2.0
    ema_decay: float = 0.99
    affine: Literal["off", "learned", "stats"] = "off"
    affine_groups: int = 1
    affine_lr_mult: float = 1.0
    affine_decay: float = 0.99
    sync_nu: float = 0.0
    alternate: bool = False
    alternate_lr: float = 1e-3
    kmeans_init: bool = True
    dead_code_steps: int = 2
    cosine: bool = False
    usage_window: int = 100
    stage_dropout: float = 0.0

    def validate(self) -> None:
        _check(self.dim >= 1, f"code dim must be >= 1, got {self.dim}")
        _check(2 <= self.codebook_size <= 2**20, f"codebook size must be in [2, 2^20], got {self.codebook_size}")
        _check(self.stages >= 1, f"stages must be >= 1, got {self.stages}")
        _check(self.estimator in ("ste", "rotation"), f"estimator must be ste or rotation, got {self.estimator!r}")
        _check(self.codebook_update in ("loss", "ema"), f"codebook update must be loss or ema, got {self.codebook_update!r}")
        _check(self.affine in ("off", "learned", "stats"), f"affine must be off, learned or stats, got {self.affine!r}")
        _check(0.0 <= self.ema_decay < 1.0, f"ema decay must be in [0, 1), got {self.ema_decay}")
        _check(0.0 <= self.affine_decay < 1.0, f"affine decay must be in [0, 1), got {self.affine_decay}")
        _check(self.beta >= 0 and self.codebook_weight >= 0, "loss weights must be >= 0")
        _check(self.sync_nu >= 0, f"sync nu must be >= 0, got {self.sync_nu}")
        _check(self.affine_lr_mult >= 0, f"affine learning-rate multiplier must be >= 0, got {self.affine_lr_mult}")
        _check(self.alternate_lr > 0, f"alternate learning rate must be > 0, got {self.alternate_lr}")
        _check(self.affine_groups >= 1 and self.codebook_size % self.affine_groups == 0,
               f"affine groups ({self.affine_groups}) must divide the codebook size ({self.codebook_size})")
        _check(self.dead_code_steps >= 0, "dead code steps must be >= 0")
        _check(self.usage_window >= 1, "usage window must be >= 1")
        _check(0.0 <= self.stage_dropout <= 1.0, "stage dropout must be in [0, 1]")
        _check(not self.cosine or self.stages == 1,
               f"a cosine codebook needs stages = 1 (residuals are not unit vectors), got {self.stages}")


@dataclass
class ModelConfig:
    """Encoder / quantizer / decoder shapes.

    modality: "image" (2-D convolutions, RGB in [0, 1]) or "audio" (1-D convolutions, mono waveform).
    channels: hidden width at the code resolution. downsample: total stride (image: 4, 8 or 16 per side;
    audio: product of `audio_strides`). res_blocks: residual blocks at the code resolution, on each side.
    res_channels: hidden width inside those blocks (images). scale_blocks: images only; residual blocks at each
    resolution between the pixels and the code grid, on each side (0 = the VQ-VAE paper's single strided
    convolution per factor of 2).
    image_size: training crop side in pixels (images). sample_rate: Hz (audio). activation: the convolutional
    audio nets' nonlinearity, "elu" or "snake". audio_net: "conv" (SEANet convolutions at the sample rate,
    vqtok.nets.audio) or "stft" (ConvNeXt blocks at the code rate around an STFT, as Vocos: vqtok.nets.spectral;
    there `channels` is the blocks' width and `res_blocks` their number on each side). synthesis_frames: stft
    nets only; inverse-STFT frames the decoder predicts per code frame (hop / synthesis_frames samples apart,
    windows of 4 such hops), so it resolves time finer than the code rate at no extra width.
    """

    modality: Modality = "image"
    in_channels: int = 3
    channels: int = 64
    downsample: int = 4
    res_blocks: int = 2
    res_channels: int = 32
    scale_blocks: int = 0
    image_size: int = 32
    sample_rate: int = 16000
    audio_strides: tuple[int, ...] = (2, 4, 5, 8)
    activation: Literal["elu", "snake"] = "elu"
    audio_net: Literal["conv", "stft"] = "conv"
    synthesis_frames: int = 1
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def validate(self) -> None:
        _check(self.modality in ("image", "audio"), f"modality must be image or audio, got {self.modality!r}")
        _check(self.channels >= 8, f"channels must be >= 8, got {self.channels}")
        _check(self.res_blocks >= 0, f"residual blocks must be >= 0, got {self.res_blocks}")
        _check(self.res_channels >= 1, f"residual block channels must be >= 1, got {self.res_channels}")
        if self.modality == "image":
            _check(self.downsample in (4, 8, 16), f"downsample must be 4, 8 or 16, got {self.downsample}")
            _check(self.image_size >= self.downsample and self.image_size % self.downsample == 0,
                   f"image size must be a positive multiple of the downsampling factor {self.downsample}, "
                   f"got {self.image_size}")
            _check(self.scale_blocks >= 0, f"scale blocks must be >= 0, got {self.scale_blocks}")
        else:
            _check(self.scale_blocks == 0, "scale blocks apply to image models only")
            _check(self.sample_rate >= MIN_SAMPLE_RATE,
                   f"sample rate must be at least {MIN_SAMPLE_RATE} Hz, got {self.sample_rate}")
            _check(self.activation in ("elu", "snake"), f"activation must be elu or snake, got {self.activation!r}")
            _check(self.audio_net in ("conv", "stft"), f"audio net must be conv or stft, got {self.audio_net!r}")
            _check(self.audio_net == "conv" or self.activation == "elu",
                   "the stft audio nets use GELU: --activation applies to the conv nets only")
            hop = math.prod(self.audio_strides)
            _check(self.synthesis_frames == 1 or self.audio_net == "stft",
                   "--synthesis-frames applies to the stft audio nets only")
            _check(self.synthesis_frames >= 1 and hop % self.synthesis_frames == 0,
                   f"synthesis frames must be >= 1 and divide the hop ({hop} samples), got {self.synthesis_frames}")
        self.quantizer.validate()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Rebuild from `to_json` output. Unknown keys (from a newer vqtok) are ignored, missing ones defaulted."""
        raw = json.loads(text)
        q = _known_fields(QuantizerConfig, raw.pop("quantizer", {}))
        m = _known_fields(cls, raw)
        if "audio_strides" in m:
            m["audio_strides"] = tuple(m["audio_strides"])
        config = cls(**m, quantizer=QuantizerConfig(**q))
        config.validate()
        return config


@dataclass
class TrainConfig:
    """One training run. lr: peak AdamW learning rate after `warmup` steps, then cosine decay to lr * min_lr_ratio.

    val_fraction / max_val: held-out share of the files (capped at max_val files). checkpoint_every: steps.
    segment_seconds: random training crop length for audio. audio_loss: "waveform" (squared error plus a light
    log-mel term), "spectral" (multi-scale log-mel L1 plus the squared error) or "complex" ("spectral" plus the
    error of compressed complex spectra, which rewards the phase); see training/audiosets.py.
    precision: "fp32", or "bf16" to run the encoder and decoder under bfloat16 autocast (weights, optimizer, the
    quantizer and the losses stay float32): ~1.7x faster steps on a CPU with AVX512-BF16 or AMX, and on recent
    GPUs.
    adversarial_from: audio only; 0 = off, else the number of plain steps after which every step also trains a
    multi-scale STFT discriminator and adds adversarial_weight * its hinge loss + feature_weight * relative
    feature matching to the generator's loss (see training/adversarial.py). The default weights are DAC's,
    against the spectral loss's mel weight of 15. disc_filters: the discriminator's width in every layer
    (EnCodec's 32); its CPU cost grows with it (one thread, 8 x 0.5 s at 16 kHz: 4.6 s a step at 32, 0.96 s at 8).
    speed_perturb / gain_perturb_db: audio only; each training segment plays at a random speed within
    1 +- speed_perturb (pitch and formants move with it) and is scaled by a random gain within +- gain_perturb_db
    (see data/streams.py's AudioSegments); 0 = off.
    single_stage: share of steps (0 to 1) that quantize with the first residual stage alone, on top of the model's
    stage dropout: more of the decoder's training goes to the lowest bitrate (`encode --stages 1`). The draw is
    seeded by the run's seed and the step, so it repeats on resume and agrees across processes.
    """

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.05
    max_val: int = 512
    checkpoint_every: int = 500
    log_every: int = 25
    segment_seconds: float = 1.0
    audio_loss: Literal["waveform", "spectral", "complex"] = "waveform"
    adversarial_from: int = 0
    adversarial_weight: float = 1.0
    feature_weight: float = 2.0
    disc_filters: int = 32
    speed_perturb: float = 0.0
    gain_perturb_db: float = 0.0
    single_stage: float = 0.0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"

    def validate(self) -> None:
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        _check(self.warmup >= 0, f"warm-up steps must be >= 0, got {self.warmup}")
        _check(0 <= self.val_fraction < 1, f"validation fraction must be in [0, 1), got {self.val_fraction}")
        _check(self.checkpoint_every >= 1, "checkpoint interval must be >= 1")
        _check(self.segment_seconds > 0, "segment length must be > 0 s")
        _check(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}")
        _check(self.audio_loss in ("waveform", "spectral", "complex"),
               f"audio loss must be waveform, spectral or complex, got {self.audio_loss!r}")
        _check(0 <= self.adversarial_from < self.steps,
               f"adversarial-from must be 0 (off) or a step below --steps {self.steps}, got {self.adversarial_from}")
        _check(self.adversarial_weight >= 0 and self.feature_weight >= 0, "adversarial weights must be >= 0")
        _check(self.disc_filters >= 1, f"discriminator filters must be >= 1, got {self.disc_filters}")
        # Speeds move in steps of 1/100, so a bound below 0.01 would silently do nothing.
        _check(self.speed_perturb == 0 or 0.01 <= self.speed_perturb <= 0.5,
               f"speed perturbation must be 0 (off) or in [0.01, 0.5], got {self.speed_perturb}")
        _check(0 <= self.single_stage <= 1, f"single-stage share must be in [0, 1], got {self.single_stage}")
        _check(0 <= self.gain_perturb_db <= 40, f"gain perturbation must be in [0, 40] dB, got {self.gain_perturb_db}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VqtokError(message)


def _known_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}
