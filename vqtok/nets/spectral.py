"""Frame-rate audio encoder and decoder around a short-time Fourier transform, in the Vocos style.

The convolutional SEANet nets (vqtok.nets.audio) run most of their layers at the sample rate, in narrow
channels that a CPU computes slowly. These nets run every layer at the code rate (one frame per hop) and leave
the sample rate to an FFT:

- Encoder: frames of n_fft = 4 x hop samples (Hann window), one per hop and centred on that hop's span, ->
  log magnitude and power-law compressed real and imaginary parts (3 x (n_fft / 2 + 1) features) -> a
  linear map to `config.channels` (the overlapping windows already span four hops) -> `config.res_blocks`
  ConvNeXt blocks -> LayerNorm -> a linear map to the code dimension.
- Decoder (Siuzdak 2023, Vocos): a kernel-7 convolution from the code dimension -> ConvNeXt blocks ->
  LayerNorm -> a linear map to a log magnitude and a phase per frequency bin of `synthesis_frames` spectra
  per code frame -> inverse FFT, window and overlap-add, normalised by the summed squared window. With
  several spectra per code frame the synthesis windows are shorter (4 x hop / synthesis_frames samples), so
  an onset or a pitch change is not smeared over four code hops.

Every layer is zero padded at the signal's edges the way the convolutional nets are, so a frame's codes depend
only on the samples within the encoder's `context` of it, and a sample only on the frames within the decoder's:
what chunked encoding and decoding of long files rely on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.config import ModelConfig
from vqtok.nets.audio import INPUT_GAIN  # the convolutional nets' waveform scaling: unit-scale features
# The analysis and synthesis window spans this many hops (Vocos and WavTokenizer use 4).
WINDOW_HOPS = 4
# Power-law compression of the spectrum's real and imaginary parts (as in speech enhancement): |S|^0.3 keeps
# quiet bins visible beside loud ones without the log's singularity at 0.
COMPRESSION = 0.3
KERNEL = 7


class ConvNeXtBlock(nn.Module):
    """x + gamma * Linear(GELU(Linear(LayerNorm(depthwise_conv_k7(x))))), hidden width 3 x channels:
    (B, C, F) -> (B, C, F)."""

    def __init__(self, channels: int, layer_scale: float):
        super().__init__()
        self.depthwise = nn.Conv1d(channels, channels, KERNEL, padding=KERNEL // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.expand = nn.Linear(channels, 3 * channels)
        self.project = nn.Linear(3 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).transpose(1, 2)  # (B, F, C)
        y = self.project(F.gelu(self.expand(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class Backbone(nn.Module):
    """Convolution (kernel `embed_kernel`) from `c_in` to `channels`, LayerNorm, `blocks` ConvNeXt blocks,
    LayerNorm: (B, c_in, F) -> (B, F, channels)."""

    def __init__(self, c_in: int, channels: int, blocks: int, embed_kernel: int):
        super().__init__()
        self.embed = nn.Conv1d(c_in, channels, embed_kernel, padding=embed_kernel // 2)
        self.norm_in = nn.LayerNorm(channels, eps=1e-6)
        # Vocos scales each block's branch by 1 / blocks at the start, so the stack begins near the identity.
        self.blocks = nn.Sequential(*(ConvNeXtBlock(channels, 1.0 / max(1, blocks)) for _ in range(blocks)))
        self.norm_out = nn.LayerNorm(channels, eps=1e-6)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(self.embed(x).transpose(1, 2)).transpose(1, 2)
        return self.norm_out(self.blocks(x).transpose(1, 2))

    @property
    def reach(self) -> int:
        """Frames on each side of a frame that can change its output."""
        return self.embed.kernel_size[0] // 2 + (KERNEL // 2) * len(self.blocks)


def _init_weights(module: nn.Module) -> None:
    # Vocos's initialisation: truncated normal, std 0.02, zero biases.
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def _window(n_fft: int, like: torch.Tensor) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=like.device)


class SpectralEncoder(nn.Module):
    """(B, 1, T) waveform in [-1, 1], T a multiple of the hop -> (B, D, T / hop)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hop = math.prod(config.audio_strides)
        self.n_fft = WINDOW_HOPS * self.hop
        bins = self.n_fft // 2 + 1
        self.backbone = Backbone(3 * bins * config.in_channels, config.channels, config.res_blocks, embed_kernel=1)
        self.out = nn.Linear(config.channels, config.quantizer.dim)
        _init_weights(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        spec = analysis(x.float().reshape(b * c, t) * INPUT_GAIN, self.n_fft, self.hop)  # (B C, F, bins)
        compressed = compress(spec)
        features = torch.cat([torch.log(spec.abs() + 1e-5), compressed.real, compressed.imag], dim=-1)
        features = features.reshape(b, c, -1, features.shape[-1]).permute(0, 1, 3, 2).reshape(b, -1, t // self.hop)
        return self.out(self.backbone(features.to(x.dtype))).transpose(1, 2)

    @property
    def context(self) -> int:
        """Input samples on each side of a code frame that can change its value (an upper bound): the frame's
        window reaches (n_fft - hop) / 2 past its hop, and the backbone's convolutions reach whole frames."""
        return (self.n_fft - self.hop) // 2 + self.hop + self.backbone.reach * self.hop


class SpectralDecoder(nn.Module):
    """(B, D, F) code vectors -> (B, 1, F * code hop) waveform on the [-1, 1] scale (unclamped), synthesised
    from `config.synthesis_frames` STFT frames per code frame."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.frames_per_code = config.synthesis_frames
        self.hop = math.prod(config.audio_strides) // self.frames_per_code  # between synthesis frames
        self.n_fft = WINDOW_HOPS * self.hop
        # Vocos caps the predicted magnitude so that an early, untrained step cannot overflow the inverse FFT.
        # Its fixed cap (100) would clip speech here: at the nets' scale (INPUT_GAIN) a harmonic of amplitude
        # 0.03 already reaches it in a 1,280-sample window. This cap is the DC bin of a full-scale signal, the
        # largest magnitude any waveform in [-1, 1] has.
        self.max_log_magnitude = math.log(INPUT_GAIN * self.n_fft / 2)
        self.channels_out = config.in_channels
        self.backbone = Backbone(config.quantizer.dim, config.channels, config.res_blocks, embed_kernel=KERNEL)
        # Per code frame: frames_per_code spectra of n_fft / 2 + 1 bins, a log magnitude and a phase each. The
        # width hardly depends on frames_per_code: finer frames have proportionally fewer bins.
        self.head = nn.Linear(config.channels, config.in_channels * self.frames_per_code * (self.n_fft + 2))
        _init_weights(self.head)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, frames = z.shape
        c, u, bins = self.channels_out, self.frames_per_code, self.n_fft // 2 + 1
        h = self.head(self.backbone(z)).float()  # (B, F, C * U * 2 bins)
        h = h.reshape(b, frames, c, u, 2, bins).permute(0, 2, 1, 3, 4, 5).reshape(b * c, frames * u, 2, bins)
        spec = torch.polar(torch.exp(h[:, :, 0].clamp(max=self.max_log_magnitude)), h[:, :, 1])
        return synthesis(spec, self.n_fft, self.hop).reshape(b, c, -1) / INPUT_GAIN

    @property
    def context(self) -> int:
        """Code frames on each side of an output sample that can change its value (an upper bound): the code
        frames of the synthesis windows that overlap the sample, plus the backbone's reach."""
        code_hop = self.hop * self.frames_per_code
        return -(-self.n_fft // (2 * code_hop)) + 1 + self.backbone.reach


def compress(spec: torch.Tensor) -> torch.Tensor:
    """Complex spectra with each magnitude |S| replaced by |S|^COMPRESSION, phase kept (same shape)."""
    return spec * (spec.abs() + 1e-7).pow(COMPRESSION - 1.0)


def analysis(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(N, T) signal, T a multiple of `hop` -> (N, T / hop, n_fft / 2 + 1) complex spectra of Hann-windowed
    frames of n_fft samples, frame f centred on samples [f hop, (f + 1) hop), zero padded past the edges."""
    pad = (n_fft - hop) // 2  # frame f starts at f * hop - pad
    padded = F.pad(x, (pad, n_fft - hop - pad))
    return torch.fft.rfft(padded.unfold(-1, n_fft, hop) * _window(n_fft, x), dim=-1)


def synthesis(spec: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """The inverse of `analysis`: (N, F, n_fft / 2 + 1) complex -> (N, F hop) by inverse FFT, windowing and
    overlap-add, divided by the summed squared window (which frames at the edges leave smaller but not 0)."""
    frames = spec.shape[1]
    window = _window(n_fft, spec.real)
    wave = _overlap_add(torch.fft.irfft(spec, n=n_fft, dim=-1) * window, hop)
    envelope = _overlap_add((window * window).expand(1, frames, -1), hop)
    pad = (n_fft - hop) // 2
    return (wave / envelope.clamp(min=1e-8))[:, pad:pad + frames * hop]


def _overlap_add(pieces: torch.Tensor, hop: int) -> torch.Tensor:
    """(N, F, n) frames, each starting one hop after the last -> (N, (F - 1) * hop + n) summed signal."""
    n, frames, size = pieces.shape
    out = F.fold(pieces.transpose(1, 2), output_size=(1, (frames - 1) * hop + size), kernel_size=(1, size),
                 stride=(1, hop))
    return out.reshape(n, -1)
