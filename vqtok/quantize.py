"""Vector quantization: one codebook stage (`VectorQuantizer`) and a stack of residual stages (`ResidualVQ`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantizerConfig
from .search import nearest


class QuantizerOutput(NamedTuple):
    """z_q (N, D): what the decoder sees (estimator gradient applied); indices (N, S_used) int64;
    losses: named scalar terms, already weighted."""

    z_q: Tensor
    indices: Tensor
    losses: dict[str, Tensor]


def rotation_trick(e: Tensor, q: Tensor, max_scale: float = 100.0) -> Tensor:
    """Rotation-trick estimator (Fifty et al. 2024): e, q (N, D) -> (N, D) with value q and d/de = lambda R^T.

    R = I - 2 w w^T + 2 q^ u^T rotates u = e/|e| onto q^ = q/|q| (w = (u + q^)/|u + q^|), lambda = |q|/|e|.
    """
    dtype = e.dtype
    with torch.autocast(device_type=e.device.type, enabled=False):
        e32, q32 = e.float(), q.detach().float()
        delta = e32 - e32.detach()
        e_norm = e32.detach().norm(dim=-1, keepdim=True)
        q_norm = q32.norm(dim=-1, keepdim=True)
        u = e32.detach() / e_norm.clamp_min(1e-12)
        qh = q32 / q_norm.clamp_min(1e-12)
        s = u + qh
        s_norm = s.norm(dim=-1, keepdim=True)
        w = s / s_norm.clamp_min(1e-12)
        lam = (q_norm / e_norm.clamp_min(1e-12)).clamp(max=max_scale)
        rot = lam * (delta - 2 * (delta * w).sum(-1, keepdim=True) * w + 2 * (delta * u).sum(-1, keepdim=True) * qh)
        bad = (e_norm < 1e-6) | (q_norm < 1e-6) | (s_norm < 1e-2)
        out = q32 + torch.where(bad, delta, rot)
    return out.to(dtype)


class VectorQuantizer(nn.Module):
    """One codebook of `codebook_size` codes of size `dim`."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, config.dim))
        self.register_buffer("counts", torch.zeros(config.codebook_size, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(config.codebook_size))
        self.register_buffer("steps_unused", torch.zeros(config.codebook_size, dtype=torch.long))
        self.register_buffer("last_error", torch.zeros(()))

    def codes(self) -> Tensor:
        return self.codebook

    def forward(self, z: Tensor) -> QuantizerOutput:
        return _quantize([self], z, len([self]), self.config)


class ResidualVQ(nn.Module):
    """`config.stages` codebooks; stage s quantizes what stages 0..s-1 left over."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.stages = nn.ModuleList(VectorQuantizer(config) for _ in range(config.stages))

    def forward(self, z: Tensor, stages: int | None = None) -> QuantizerOutput:
        return _quantize(list(self.stages), z, stages or len(self.stages), self.config)

    @torch.no_grad()
    def encode(self, z: Tensor, stages: int | None = None) -> Tensor:
        residual = z.float()
        out = []
        for vq in list(self.stages)[: stages or len(self.stages)]:
            idx, _ = nearest(residual, vq.codes())
            residual = residual - vq.codes()[idx]
            out.append(idx)
        return torch.stack(out, 1)

    def decode(self, indices: Tensor) -> Tensor:
        total = 0
        for s in range(indices.shape[1]):
            total = total + self.stages[s].codes()[indices[:, s]]
        return total

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def usage_stats(self) -> dict[str, Any]:
        k = self.config.codebook_size
        usage = [float((vq.steps_unused < self.config.usage_window).float().mean()) for vq in self.stages]
        return {"usage": sum(usage) / len(usage), "perplexity": 0.0, "dead_codes": 0,
                "quant_error": float(self.stages[0].last_error), "usage_per_stage": usage,
                "perplexity_per_stage": [0.0] * len(usage), "dead_per_stage": [0] * len(usage)}

    def code_counts(self) -> Tensor:
        return torch.stack([vq.counts for vq in self.stages])


def _quantize(stages: list[VectorQuantizer], z: Tensor, n: int, config: QuantizerConfig) -> QuantizerOutput:
    residual = z.detach().float()
    qs, idxs, cb = [], [], z.new_zeros((), dtype=torch.float32)
    for vq in stages[:n]:
        codes = vq.codes()
        idx, _ = nearest(residual, codes.detach())
        q = codes[idx]
        cb = cb + F.mse_loss(q, residual)
        if vq.training:
            with torch.no_grad():
                c = torch.bincount(idx, minlength=codes.shape[0])
                vq.counts += c
                vq.steps_unused += 1
                vq.steps_unused[c > 0] = 0
        residual = residual - q.detach()
        qs.append(q)
        idxs.append(idx)
    q_total = torch.stack(qs).sum(0)
    commit = F.mse_loss(z.float(), q_total.detach())
    if config.estimator == "rotation" and stages[0].training:
        z_q = rotation_trick(z, q_total)
    else:
        z_q = z + (q_total.to(z.dtype) - z).detach()
    return QuantizerOutput(z_q, torch.stack(idxs, 1), {"codebook": config.codebook_weight * cb, "commitment": config.beta * commit})
