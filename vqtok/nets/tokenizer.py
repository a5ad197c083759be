"""Encoder and decoder stacks, and `Tokenizer` = encoder + residual vector quantizer + decoder.

Images use 2-D convolutions in the VQ-VAE paper's style: stride-2 4x4 convolutions down to the code grid, a 3x3
convolution and residual blocks (ReLU, 3x3, ReLU, 1x1) at the code resolution, then a 1x1 projection to the code
dimension; the decoder mirrors it with transposed convolutions. `scale_blocks` adds residual blocks at each
resolution in between (as VQGAN's encoder and decoder have at every level), so the decoder has more than one
layer per factor of 2 to draw detail finer than a code cell. Pixels enter in [0, 1] and are mapped to
[-1, 1] inside, so callers never normalise.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from vqtok.config import ModelConfig
from vqtok.quantize import ResidualVQ


class ResBlock(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x)))), the VQ-VAE paper's residual block; `conv` picks 1-D or 2-D."""

    def __init__(self, channels: int, hidden: int, conv: type[nn.Conv1d] | type[nn.Conv2d]):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), conv(channels, hidden, 3, padding=1), nn.ReLU(), conv(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _res_stack(config: ModelConfig, conv: type[nn.Conv1d] | type[nn.Conv2d]) -> list[nn.Module]:
    return [ResBlock(config.channels, config.res_channels, conv) for _ in range(config.res_blocks)]


def _scale_stack(config: ModelConfig, width: int) -> list[nn.Module]:
    """The image stacks' residual blocks at one resolution between the pixels and the code grid."""
    return [ResBlock(width, width, nn.Conv2d) for _ in range(config.scale_blocks)]


class ImageEncoder(nn.Module):
    """(B, C_in, H, W) in [0, 1] -> (B, D, H/f, W/f) with f = config.downsample."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        n_down = int(math.log2(config.downsample))
        widths = [config.in_channels] + [c // 2] + [c] * (n_down - 1)
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.ReLU()]
            if i < n_down - 1:
                layers += _scale_stack(config, widths[i + 1])
        layers.append(nn.Conv2d(c, c, 3, padding=1))
        layers += _res_stack(config, nn.Conv2d)
        layers += [nn.ReLU(), nn.Conv2d(c, config.quantizer.dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2.0 - 1.0)


class ImageDecoder(nn.Module):
    """(B, D, h, w) -> (B, C_in, h*f, w*f), unclamped values on the [0, 1] pixel scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        n_up = int(math.log2(config.downsample))
        layers: list[nn.Module] = [nn.Conv2d(config.quantizer.dim, c, 3, padding=1)]
        layers += _res_stack(config, nn.Conv2d)
        layers.append(nn.ReLU())
        widths = [c] * (n_up - 1) + [c // 2] + [config.in_channels]
        for i in range(n_up):
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
            if i < n_up - 1:
                layers += [nn.ReLU(), *_scale_stack(config, widths[i + 1])]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z) * 0.5 + 0.5


def _input_span(net: nn.Module, lo: int, hi: int) -> tuple[int, int]:
    """The input positions (along one axis) that can reach outputs lo..hi of `net`, walking its convolutions
    from the last to the first.

    A convolution's output j reads inputs j*s - p .. j*s - p + (k - 1)*d; a transposed convolution's output o
    receives input i when o = i*s - p + t*d for some tap t in 0..k-1. In a residual block the branch's
    convolutions compose one after the other and the skip path reaches no further than the branch, so walking
    every convolution in order gives an upper bound (exact for these stacks, see tests/test_tiles.py).
    """
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    for conv in reversed(convs):
        k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
        if isinstance(conv, nn.ConvTranspose2d):
            lo, hi = -(-(lo + p - (k - 1) * d) // s), (hi + p) // s
        else:
            lo, hi = lo * s - p, hi * s - p + (k - 1) * d
    return lo, hi


def _total_stride(net: nn.Module) -> int:
    return math.prod(m.stride[0] for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def image_encoder_context(encoder: ImageEncoder) -> int:
    """Pixels beyond a code cell's own hop x hop block, on any side, that can change its encoder output.

    Default stack (downsample 4): 15 pixels. Tiles whose windows extend this far past their core (rounded up to
    whole cells) give the same codes as the whole image.
    """
    hop = _total_stride(encoder)
    lo, hi = _input_span(encoder, 0, 0)
    return max(-lo, hi - (hop - 1))


def image_decoder_context(decoder: ImageDecoder) -> int:
    """Code cells on any side of a cell that can change the decoder's output pixels within that cell's block.

    Default stack (downsample 4): 4 cells.
    """
    hop = _total_stride(decoder)
    lo, hi = _input_span(decoder, 0, hop - 1)
    return max(-lo, hi)


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # same shape as the input, [0, 1] scale (unclamped)
    indices: torch.Tensor  # (B, S, *grid) int64
    losses: dict[str, torch.Tensor]  # the quantizer's weighted terms
    z: torch.Tensor  # (B, D, *grid) encoder output


def build_stacks(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder for the config's modality."""
    if config.modality == "image":
        return ImageEncoder(config), ImageDecoder(config)
    if config.audio_net == "stft":
        from vqtok.nets.spectral import SpectralDecoder, SpectralEncoder

        return SpectralEncoder(config), SpectralDecoder(config)
    from vqtok.nets.audio import AudioDecoder, AudioEncoder

    return AudioEncoder(config), AudioDecoder(config)


class Tokenizer(nn.Module):
    """Encoder + `ResidualVQ` + decoder. Inputs are batches of images (B, 3, H, W) in [0, 1] with H, W multiples
    of `config.downsample`, or waveforms (B, 1, T) with T a multiple of the hop."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder, self.decoder = build_stacks(config)
        self.quantizer = ResidualVQ(config.quantizer)
        # The entropy codec's context tables (vqtok.tokens.context.ContextTable), fitted after training and
        # stored in the model file; not weights, so not in the state dict or the fingerprint.
        self.context_table = None

    @property
    def hop(self) -> int:
        """Input samples (audio) or pixels per side (images) per code position."""
        return self.config.downsample

    def _to_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *grid) -> (B * prod(grid), D)."""
        return z.movedim(1, -1).reshape(-1, z.shape[1])

    def _from_vectors(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B * prod(grid), D) -> (B, D, *grid) shaped like `like`."""
        return v.reshape(like.shape[0], *like.shape[2:], -1).movedim(-1, 1)

    def forward(self, x: torch.Tensor, stages: int | None = None) -> TokenizerOutput:
        """Under autocast (training with --precision bf16) the encoder and decoder run in the autocast dtype and
        the quantizer in float32: code search, EMA statistics and the codebook losses need its precision."""
        z = self.encoder(x)
        with torch.autocast(x.device.type, enabled=False):
            z = z.float()
            out = self.quantizer(self._to_vectors(z), stages)
        recon = self.decoder(self._from_vectors(out.z_q, z))
        indices = out.indices.reshape(z.shape[0], *z.shape[2:], -1).movedim(-1, 1)
        return TokenizerOutput(recon, indices, out.losses, z)

    def _expected_input(self) -> str:
        c = self.config.in_channels
        if self.config.modality == "image":
            return f"images (B, {c}, H, W) in [0, 1], H and W multiples of {self.hop}"
        return f"waveforms (B, {c}, T) in [-1, 1], T a multiple of {self.hop}"

    def _check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is what `encode` takes: a float batch of the model's channels whose spatial sizes
        are multiples of the hop (a size that is not would lose its last partial code cell without a word)."""
        dims = 4 if self.config.modality == "image" else 3
        if (x.ndim != dims or x.shape[1] != self.config.in_channels or not x.is_floating_point()
                or any(n % self.hop for n in x.shape[2:])):
            raise ValueError(f"expected {self._expected_input()}, got {x.dtype} of shape {tuple(x.shape)}")

    def _check_indices(self, indices: torch.Tensor) -> None:
        """ValueError unless indices are (B, S, *grid) integer codes of 1..stages stages, each in [0, K)."""
        dims = 4 if self.config.modality == "image" else 3
        q = self.config.quantizer
        if indices.ndim != dims or not 1 <= indices.shape[1] <= q.stages or indices.is_floating_point():
            raise ValueError(f"expected integer codes (B, S, {'h, w' if dims == 4 else 'frames'}) with S in 1..{q.stages}, "
                             f"got {indices.dtype} of shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= q.codebook_size):
            raise ValueError(f"codes must be in [0, {q.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]")

    @torch.no_grad()
    def encode(self, x: torch.Tensor, stages: int | None = None) -> torch.Tensor:
        """x (B, C, *spatial): images in [0, 1] with H, W multiples of the hop, or waveforms in [-1, 1] with T a
        multiple of it -> indices (B, S, *grid) int64; ValueError for anything else."""
        self._check_input(x)
        z = self.encoder(x)
        idx = self.quantizer.encode(self._to_vectors(z), stages)
        return idx.reshape(z.shape[0], *z.shape[2:], -1).movedim(-1, 1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, S, *grid), S <= the model's stages, codes in [0, K) -> reconstruction (B, C, *spatial),
        clamped to the valid range; ValueError for anything else."""
        self._check_indices(indices)
        flat = indices.movedim(1, -1).reshape(-1, indices.shape[1])
        v = self.quantizer.decode(flat)
        grid = indices.shape[2:]
        z_q = v.reshape(indices.shape[0], *grid, -1).movedim(-1, 1)
        out = self.decoder(z_q)
        return out.clamp(0.0, 1.0) if self.config.modality == "image" else out.clamp(-1.0, 1.0)

    def code_frequencies(self) -> np.ndarray:
        """(S, K) int64 code counts seen in training, each at least 1 so the entropy codec can code every code."""
        return np.maximum(self.quantizer.code_counts().cpu().numpy().astype(np.int64), 1)

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over every tensor of the model (names, dtypes, shapes, bytes)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

