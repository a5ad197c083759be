"""The forward pass shared by one stage and a residual stack: search, losses, estimator, upkeep calls."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from vqtok.config import QuantizerConfig
from vqtok.quantize.search import nearest
import vqtok.quantize.upkeep as upkeep
from vqtok.quantize.estimators import rotation_trick, straight_through, synchronized


class QuantizerOutput(NamedTuple):
    """z_q (N, D): what the decoder sees, value = sum of the used stages' code vectors, with the estimator's
    gradient; indices (N, S_used) int64; losses: named scalar terms, already weighted ("commitment", and
    "codebook" unless the codebook is EMA-updated), to be added to the task loss."""

    z_q: Tensor
    indices: Tensor
    losses: dict[str, Tensor]


class Stage(Protocol):
    """What the shared pass needs of one codebook stage (vqtok.quantize.codebook.VectorQuantizer)."""

    training: bool
    last_error: Tensor

    def prepare_input(self, x: Tensor) -> Tensor: ...

    def codes(self) -> Tensor: ...

    def before_search(self, x: Tensor) -> None: ...

    def alternate_step(self, x: Tensor, indices: Tensor) -> Tensor: ...

    def after_search(self, x: Tensor, indices: Tensor) -> None: ...


def run_stages(stages: list[Stage], z: Tensor, config: QuantizerConfig) -> tuple[QuantizerOutput, Tensor]:
    """Quantize z (N, D) with `stages` in turn, each taking what the previous ones left over.

    Returns the output and the relative error ||z - q||^2 / ||z||^2 (detached scalar; in training, over the
    whole batch of every rank, so it is the same everywhere). In training mode every stage does its upkeep,
    applies its estimator (rotation or straight-through) and the synchronized term; in eval mode z_q is the
    plain straight-through value (no rotation, no state change, no collectives).

    Losses: codebook = codebook_weight * sum over stages of mean ||sg(r_s) - q_s||^2 (r_s: stage s input);
    commitment = beta * mean ||z - sg(q)||^2 on the sum q the decoder sees. With `alternate` the codebook
    term was already minimised by the inner step and is reported detached.
    """
    training = stages[0].training
    target = stages[0].prepare_input(z.float())
    residual = target.detach()
    qs, indices, codebook_terms, squares = [], [], [], [(residual**2).sum()]
    for vq in stages:
        if training:
            vq.before_search(residual)
        codes = vq.codes()
        idx = nearest(residual, codes.detach())[0]
        if training and config.alternate:
            codebook_terms.append(vq.alternate_step(residual, idx))
            codes = vq.codes().detach()
        elif config.codebook_update == "loss":
            codebook_terms.append(config.codebook_weight * F.mse_loss(codes[idx], residual))
        q = codes[idx]
        if training:
            vq.after_search(residual, idx)
        residual = residual - q.detach()
        squares.append((residual**2).sum())
        qs.append(q)
        indices.append(idx)
    q_sum = sum_codes(qs)
    q_value = q_sum.detach()
    losses = {"commitment": config.beta * F.mse_loss(target, q_value)}
    if codebook_terms:
        losses["codebook"] = torch.stack(codebook_terms).sum()
    if training and config.estimator == "rotation":
        z_q = rotation_trick(target, q_value)
    else:
        z_q = straight_through(target, q_value)
    if training and not config.alternate:
        z_q = synchronized(z_q, q_sum, config.sync_nu)
    sq = torch.stack(squares)
    if training:
        upkeep.all_reduce_sum_(sq)
    errors = sq[1:] / sq[0].clamp_min(1e-12)
    if training:
        for vq, e in zip(stages, errors):
            vq.last_error.copy_(e)
    return QuantizerOutput(z_q.to(z.dtype), torch.stack(indices, 1), losses), errors[-1]


def sum_codes(qs: list[Tensor]) -> Tensor:
    """Sum of per-stage code vectors in stage order (the order decode uses, so values match bit for bit)."""
    total = qs[0]
    for q in qs[1:]:
        total = total + q
    return total
