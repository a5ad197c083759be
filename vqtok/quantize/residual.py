"""Residual vector quantization: `config.stages` codebooks, stage s quantizing what stages < s left over."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqtok.config import QuantizerConfig
from vqtok.errors import VqtokError
from vqtok.quantize.search import FAISS_MIN_ROWS, nearest
import vqtok.quantize.upkeep as upkeep
from vqtok.quantize.codebook import VectorQuantizer
from vqtok.quantize.stages import QuantizerOutput, run_stages, sum_codes


# Rows per search in `encode_blocks`: below FAISS_MIN_ROWS, so every block takes the same (torch) path.
BLOCK_ROWS = min(512, FAISS_MIN_ROWS - 1)


class ResidualVQ(nn.Module):
    """A stack of `config.stages` `VectorQuantizer`s, each with its own codebook (and affine map).

    Training-mode `forward` does all codebook upkeep. With stage_dropout p, a training call that does not
    name `stages` uses, with probability p, a shorter prefix of 1..S-1 stages drawn uniformly (draws are
    seeded from a buffer, so they repeat on resume and agree across ranks).
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.quantizers = nn.ModuleList(VectorQuantizer(config) for _ in range(config.stages))
        self.register_buffer("rng", torch.stack([torch.randint(0, 2**62, ()), torch.zeros((), dtype=torch.long)]))
        self.register_buffer("last_error", torch.zeros(()))

    def _used(self, stages: int | None) -> int:
        total = len(self.quantizers)
        if stages is not None or not self.training or self.config.stage_dropout == 0.0 or total == 1:
            return self._checked(stages)
        gen = upkeep.generator(int(self.rng[0]) * 1_000_003 + int(self.rng[1]))
        self.rng[1] += 1
        drop, prefix = torch.rand((), generator=gen), torch.randint(1, total, (), generator=gen)
        return int(prefix) if float(drop) < self.config.stage_dropout else total

    def forward(self, z: Tensor, stages: int | None = None) -> QuantizerOutput:
        """z (N, D) -> QuantizerOutput with z_q (N, D) in z's dtype and indices (N, S_used)."""
        out, error = run_stages(list(self.quantizers)[: self._used(stages)], z, self.config)
        if self.training:
            self.last_error.copy_(error)
        return out

    @torch.no_grad()
    def encode(self, z: Tensor, stages: int | None = None) -> Tensor:
        """z (N, D) -> indices (N, S) int64 of the first S = stages (default all) stages. No state changes."""
        residual = self.quantizers[0].prepare_input(z.float())
        out = []
        for vq in list(self.quantizers)[: self._checked(stages)]:
            codes = vq.codes()
            idx = nearest(residual, codes)[0]
            residual = residual - codes[idx]
            out.append(idx)
        return torch.stack(out, 1)

    @torch.no_grad()
    def encode_blocks(self, z: Tensor, stages: int | None = None, rows: int = BLOCK_ROWS) -> Tensor:
        """`encode` in blocks of exactly `rows` vectors (the last zero-padded): z (N, D) -> (N, S) int64.

        The search backends pick their algorithm and matmul shapes by the number of rows (faiss from
        `FAISS_MIN_ROWS` up), so a vector almost equidistant from two codes can land on either depending on how
        many vectors are searched with it. In blocks of one height, a vector's codes depend only on the vector:
        what makes token files identical across batch sizes, workers, parts and tiles.
        """
        blocks = torch.nn.functional.pad(z, (0, 0, 0, -len(z) % rows)).split(rows)
        return torch.cat([self.encode(block, stages) for block in blocks])[: len(z)]

    def _checked(self, stages: int | None) -> int:
        total = len(self.quantizers)
        if stages is None:
            return total
        if not 1 <= stages <= total:
            raise VqtokError(f"stages must be in [1, {total}], got {stages}")
        return stages

    def decode(self, indices: Tensor) -> Tensor:
        """indices (N, S') -> (N, D) float32: the sum of the first S' stages' code vectors."""
        if not 1 <= indices.shape[1] <= len(self.quantizers):
            raise VqtokError(f"indices have {indices.shape[1]} stages, the quantizer has {len(self.quantizers)}")
        return sum_codes([vq.codes()[indices[:, s]] for s, vq in enumerate(self.quantizers) if s < indices.shape[1]])

    def param_groups(self, lr: float) -> list[dict]:
        """Groups for the outer AdamW: codebooks at lr, affine parameters at lr * affine_lr_mult, no weight
        decay on either. EMA codebooks (buffers) and, with `alternate`, everything the inner optimizer owns
        are left out."""
        owned = {id(p) for vq in self.quantizers for p in vq.inner_parameters()}
        codebooks, affine = [], []
        for vq in self.quantizers:
            for name, p in vq.named_parameters():
                if id(p) in owned or not p.requires_grad:
                    continue
                (affine if name.startswith("affine_") else codebooks).append(p)
        mult = self.config.affine_lr_mult
        groups = [
            {"params": codebooks, "lr": lr, "lr_mult": 1.0, "weight_decay": 0.0},
            {"params": affine, "lr": lr * mult, "lr_mult": mult, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def usage_stats(self) -> dict[str, Any]:
        """Means over stages of usage and perplexity, sums of dead codes and restarts, the relative
        quantization error of the last training step, and per-stage lists (see VectorQuantizer.usage_stats)."""
        per = [vq.usage_stats() for vq in self.quantizers]
        n = len(per)
        return {
            "usage": sum(s["usage"] for s in per) / n,
            "perplexity": sum(s["perplexity"] for s in per) / n,
            "dead_codes": sum(s["dead_codes"] for s in per),
            "restarts": sum(s["restarts"] for s in per),
            "quant_error": float(self.last_error),
            "usage_per_stage": [s["usage"] for s in per],
            "perplexity_per_stage": [s["perplexity"] for s in per],
            "dead_per_stage": [s["dead_codes"] for s in per],
            "quant_error_per_stage": [s["quant_error"] for s in per],
        }

    def code_counts(self) -> Tensor:
        """(S, K) int64: how often each code was chosen over all training steps so far."""
        return torch.stack([vq.counts for vq in self.quantizers])
