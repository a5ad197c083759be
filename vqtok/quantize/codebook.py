"""One codebook stage: code vectors, affine re-parameterization, codebook learning and upkeep."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqtok.config import QuantizerConfig
from vqtok.quantize.search import nearest
import vqtok.quantize.upkeep as upkeep
from vqtok.quantize.stages import QuantizerOutput, run_stages

_LAPLACE = 1e-5  # EMA cluster-size smoothing (VQ-VAE appendix)
_STD_EPS = 1e-5
_RESTART_NOISE = 1e-2  # restarted codes: a recent input plus this fraction of the batch's per-dim std
_MIN_AFFINE_SCALE = 1e-3  # |1 + s| when inverting the learned affine map


class VectorQuantizer(nn.Module):
    """One codebook of K = config.codebook_size codes of size D = config.dim.

    The codes the search and the decoder use are `codes()`: the stored codebook through the affine map
    (`affine`), l2-normalised when `cosine`. With codebook_update "loss" the codebook is a parameter trained by
    the codebook loss; with "ema" it is a buffer set from decayed cluster statistics. Training-mode calls
    through `ResidualVQ` (or `forward`) do all upkeep; every piece of state is a buffer, so `state_dict()`
    holds it all. Statistics count this stage's own training steps (a stage skipped by stage dropout does
    not age).

    With `alternate`, a lazily created Adam (lr = alternate_lr, `inner_optimizer()`) owns the codebook and affine
    parameters and steps them on the codebook loss inside each training forward. Its moment estimates are not
    part of the state dict (a model file does not need them); training checkpoints store them beside it.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        k, d, g = config.codebook_size, config.dim, config.affine_groups
        codebook = torch.randn(k, d)
        if config.codebook_update == "loss":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", codebook.clone())
        if config.affine == "learned":
            self.affine_scale = nn.Parameter(torch.zeros(g, d))
            self.affine_shift = nn.Parameter(torch.zeros(g, d))
        elif config.affine == "stats":
            self.register_buffer("z_mean", torch.zeros(d))
            self.register_buffer("z_var", torch.ones(d))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # Upkeep draws are seeded from (seed, draws) so they are reproducible and identical across ranks.
        self.register_buffer("rng", torch.stack([torch.randint(0, 2**62, ()), torch.zeros((), dtype=torch.long)]))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("last_used", torch.full((k,), -1, dtype=torch.long))
        self.register_buffer("last_reset", torch.zeros(k, dtype=torch.long))
        self.register_buffer("usage_ema", torch.zeros(k))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_error", torch.zeros(()))
        self._inner: torch.optim.Optimizer | None = None

    # ---- codes -------------------------------------------------------------------------------------

    def codes(self) -> Tensor:
        """The code vectors in use: (K, D) float32, differentiable w.r.t. codebook and affine parameters."""
        # An EMA codebook is rewritten in place after the search, while this step's graph may still hold it
        # (the learned affine map saves its input): give the graph a copy.
        return self._affine(self.codebook if isinstance(self.codebook, nn.Parameter) else self.codebook.clone())

    def _affine(self, c: Tensor) -> Tensor:
        cfg = self.config
        if cfg.affine == "learned":
            g = cfg.affine_groups
            c = (c.view(g, -1, cfg.dim) * (1 + self.affine_scale[:, None]) + self.affine_shift[:, None]).view_as(c)
        elif cfg.affine == "stats":
            mean_c, std_c = c.mean(0), c.std(0, unbiased=False) + _STD_EPS
            c = (c - mean_c) / std_c * (self.z_var + _STD_EPS**2).sqrt() + self.z_mean
        return F.normalize(c, dim=-1) if cfg.cosine else c

    @torch.no_grad()
    def _inverse_affine(self, c: Tensor, rows: Tensor | None = None) -> Tensor:
        """Stored-codebook values whose `codes()` rows (all, or `rows`) are c: (R, D) -> (R, D)."""
        cfg = self.config
        if cfg.affine == "learned":
            group = (torch.arange(cfg.codebook_size, device=c.device) if rows is None else rows) // (
                cfg.codebook_size // cfg.affine_groups)
            scale = 1 + self.affine_scale[group]
            scale = torch.where(scale.abs() < _MIN_AFFINE_SCALE, torch.full_like(scale, _MIN_AFFINE_SCALE), scale)
            return (c - self.affine_shift[group]) / scale
        if cfg.affine == "stats":
            mean_c, std_c = self.codebook.mean(0), self.codebook.std(0, unbiased=False) + _STD_EPS
            return (c - self.z_mean) / (self.z_var + _STD_EPS**2).sqrt() * std_c + mean_c
        return c

    def prepare_input(self, x: Tensor) -> Tensor:
        """The vectors this stage quantizes: x itself, or x l2-normalised for a cosine codebook."""
        return F.normalize(x, dim=-1) if self.config.cosine else x

    # ---- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x (N, D) -> nearest code indices (N,) int64. No state changes."""
        return nearest(self.prepare_input(x.float()), self.codes())[0]

    def decode(self, indices: Tensor) -> Tensor:
        """indices (N,) -> code vectors (N, D)."""
        return self.codes()[indices]

    def forward(self, z: Tensor) -> QuantizerOutput:
        """A one-stage quantizer: z (N, D) -> QuantizerOutput (indices (N, 1))."""
        return run_stages([self], z, self.config)[0]

    # ---- training-time upkeep ----------------------------------------------------------------------

    def _generator(self) -> torch.Generator:
        seed = int(self.rng[0]) * 1_000_003 + int(self.rng[1])
        self.rng[1] += 1
        return upkeep.generator(seed)

    @torch.no_grad()
    def before_search(self, x: Tensor) -> None:
        """Training upkeep ahead of the search on x (N, D) (already `prepare_input`-ed): first-batch
        initialisation, affine running statistics, restart of codes dead as of the previous step."""
        if not bool(self.initialised):
            self._initialise(x)
        elif self.config.affine == "stats":
            self._update_input_stats(x, self.config.affine_decay)
        if self.config.dead_code_steps > 0:
            self._restart_dead(x)

    def _initialise(self, x: Tensor) -> None:
        cfg = self.config
        if cfg.affine == "stats":
            self._update_input_stats(x, 0.0)
        if cfg.kmeans_init:
            centroids, sizes = upkeep.kmeans(upkeep.gather_rows(x), cfg.codebook_size, self._generator())
            upkeep.broadcast_(centroids, sizes)
            if cfg.affine == "stats":
                # The stats map re-standardises whatever is stored; storing the centroids keeps their layout.
                self.codebook.copy_(centroids)
            else:
                self.codebook.copy_(self._inverse_affine(centroids))
            if cfg.codebook_update == "ema":
                self.ema_count.copy_(sizes.clamp_min(1.0))
                self.ema_sum.copy_(self.codes() * self.ema_count[:, None])
        elif cfg.codebook_update == "ema":
            self.ema_sum.copy_(self.codes() * self.ema_count[:, None])
        self.last_reset.fill_(int(self.step) - 1)
        self.initialised.fill_(True)

    def _update_input_stats(self, x: Tensor, decay: float) -> None:
        moments = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])
        upkeep.all_reduce_sum_(moments)
        d = self.config.dim
        n = moments[-1].clamp_min(1.0)
        mean = moments[:d] / n
        var = (moments[d:2 * d] / n - mean * mean).clamp_min(0.0)
        self.z_mean.mul_(decay).add_((1 - decay) * mean)
        self.z_var.mul_(decay).add_((1 - decay) * var)

    def _restart_dead(self, x: Tensor) -> None:
        # Steps completed since the code was last chosen (or re-seeded, which counts as chosen a step ago).
        idle = self.step - 1 - torch.maximum(self.last_used, self.last_reset)
        dead = (idle >= self.config.dead_code_steps).nonzero().squeeze(1)
        n_dead = dead.numel()
        if n_dead == 0:
            return
        x = upkeep.gather_rows(x)
        gen = self._generator()
        pick = torch.randint(0, x.shape[0], (n_dead,), generator=gen).to(x.device)
        noise = torch.randn(n_dead, x.shape[1], generator=gen).to(x.device)
        new = x[pick] + noise * (_RESTART_NOISE * x.std(0, unbiased=False))
        upkeep.broadcast_(new)
        new = self.prepare_input(new)
        self.codebook[dead] = self._inverse_affine(new, dead)
        if self.config.codebook_update == "ema":
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = new
        self.last_reset[dead] = self.step - 1
        self.restarts += n_dead

    def inner_parameters(self) -> list[nn.Parameter]:
        """Parameters the alternating inner optimizer owns (empty unless `alternate`)."""
        if not self.config.alternate:
            return []
        return [p for p in self.parameters() if p.requires_grad]

    def inner_optimizer(self) -> torch.optim.Optimizer | None:
        """The alternating inner Adam over `inner_parameters()` (made on first use), or None when there is none."""
        params = self.inner_parameters()
        if self._inner is None and params:
            self._inner = torch.optim.Adam(params, lr=self.config.alternate_lr)
        return self._inner

    def alternate_step(self, x: Tensor, indices: Tensor) -> Tensor:
        """One inner Adam step on codebook_weight * ||x - codes()[indices]||^2; returns that loss (detached)."""
        params = self.inner_parameters()
        with torch.enable_grad():
            loss = self.config.codebook_weight * F.mse_loss(self.codes()[indices], x.detach())
        inner = self.inner_optimizer()
        if inner is None:
            return loss.detach()
        grads = torch.autograd.grad(loss, params)
        size = upkeep.world_size()
        for p, g in zip(params, grads):
            upkeep.all_reduce_sum_(g)
            p.grad = g / size
        inner.step()
        for p in params:
            p.grad = None
        return loss.detach()

    @torch.no_grad()
    def after_search(self, x: Tensor, indices: Tensor) -> None:
        """Training upkeep once x (N, D) has been assigned `indices` (N,): EMA codebook, usage statistics."""
        cfg = self.config
        k = cfg.codebook_size
        hist = torch.bincount(indices, minlength=k)
        if cfg.codebook_update == "ema":
            sums = torch.zeros(k, cfg.dim, device=x.device).index_add_(0, indices, x.float())
            counts = hist.float()
            upkeep.all_reduce_sum_(counts, sums)
            hist = counts.round().long()
            self.ema_count.mul_(cfg.ema_decay).add_((1 - cfg.ema_decay) * counts)
            self.ema_sum.mul_(cfg.ema_decay).add_((1 - cfg.ema_decay) * sums)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + _LAPLACE) / (total + k * _LAPLACE) * total
            self.codebook.copy_(self._inverse_affine(self.ema_sum / smoothed[:, None]))
        else:
            upkeep.all_reduce_sum_(hist)
        self.counts += hist
        self.last_used[hist > 0] = self.step
        rho = 1.0 - 1.0 / cfg.usage_window
        self.usage_ema.mul_(rho).add_((1 - rho) * hist.float() / hist.sum().clamp_min(1))
        self.step += 1

    # ---- statistics --------------------------------------------------------------------------------

    def usage_stats(self) -> dict[str, Any]:
        """usage: fraction of codes chosen in the last `usage_window` steps; dead: codes not chosen in them;
        perplexity: exp(entropy) of the code histogram, exponentially weighted over ~usage_window steps;
        restarts: codes re-seeded so far; quant_error: relative error after this stage, last step."""
        window = self.config.usage_window
        used = (self.last_used >= 0) & (self.last_used >= self.step - window)
        p = self.usage_ema / self.usage_ema.sum().clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        return {
            "usage": float(used.float().mean()),
            "perplexity": math.exp(float(entropy)) if float(self.usage_ema.sum()) > 0 else 0.0,
            "dead_codes": int((~used).sum()),
            "restarts": int(self.restarts),
            "quant_error": float(self.last_error),
        }

