"""Vector quantizer: estimators, codebook learning, affine maps, upkeep, residual stages, state round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqtok.config import QuantizerConfig
from vqtok.errors import VqtokError
from vqtok.quantize import ResidualVQ, VectorQuantizer, rotation_trick
from vqtok.quantize.upkeep import kmeans_pp_seed
from vqtok.quantize.search import nearest


def make(seed: int = 0, **overrides) -> ResidualVQ:
    base = dict(dim=8, codebook_size=16, estimator="ste", codebook_update="loss", beta=0.25, affine="off",
                sync_nu=0.0, kmeans_init=False,
                dead_code_steps=0)
    torch.manual_seed(seed)
    return ResidualVQ(QuantizerConfig(**(base | overrides)))


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.1) -> torch.Tensor:
    """n points around `clusters` centres with very different populations (where seeding matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 3
    weights = torch.linspace(1.0, 20.0, clusters)
    which = torch.multinomial(weights, n, replacement=True, generator=g)
    return centres[which] + spread * torch.randn(n, dim, generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ---- rotation trick ---------------------------------------------------------------------------------


def test_rotation_forward_value_is_q() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(512, 64, generator=g) * torch.rand(512, 1, generator=g) * 5
    q = torch.randn(512, 64, generator=g)
    q[:64] = -e[:64] * 0.7 + 1e-3 * q[:64]  # nearly opposite: close to the fallback boundary
    out = rotation_trick(e.requires_grad_(), q)
    assert out.dtype == torch.float32
    assert rel_err(out, q) < 1e-5
    for t in (torch.bfloat16, torch.float16):
        out = rotation_trick(e.detach().to(t).requires_grad_(), q.to(t))
        assert out.dtype == t
        assert rel_err(out, q.to(t)) < 1e-5


def test_rotation_gradient_is_lambda_r_transpose_g() -> None:
    g = torch.Generator().manual_seed(2)
    e = torch.randn(6, 5, generator=g, dtype=torch.float64)
    q = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(6, 5, generator=g, dtype=torch.float64)
    e.requires_grad_()
    rotation_trick(e, q).backward(grad)
    for i in range(6):
        ei, qi = e[i].detach(), q[i]
        u, qh = ei / ei.norm(), qi / qi.norm()
        r = (u + qh) / (u + qh).norm()
        rot = torch.eye(5, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, u)
        assert torch.allclose(rot @ ei, ei.norm() * qh, atol=1e-10)  # R takes e's direction onto q's
        assert torch.allclose(rot.T @ rot, torch.eye(5, dtype=torch.float64), atol=1e-10)
        expected = qi.norm() / ei.norm() * rot.T @ grad[i]
        assert torch.allclose(e.grad[i], expected, rtol=1e-5, atol=1e-6)


def test_rotation_preserves_angle_between_gradient_and_vector() -> None:
    g = torch.Generator().manual_seed(3)
    e = torch.randn(100, 16, generator=g).requires_grad_()
    q = torch.randn(100, 16, generator=g)
    grad = torch.randn(100, 16, generator=g)
    rotation_trick(e, q).backward(grad)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(e.grad, e.detach()), cos(grad, q), atol=1e-5)
    # Only the angle is preserved: straight-through would give cos(grad, e) instead, which differs.
    assert not torch.allclose(cos(grad, e.detach()), cos(grad, q), atol=1e-2)


def test_rotation_reduces_to_scaled_straight_through_for_parallel_vectors() -> None:
    g = torch.Generator().manual_seed(4)
    e = torch.randn(32, 8, generator=g)
    grad = torch.randn(32, 8, generator=g)
    for scale in (1.0, 3.0):
        leaf = e.clone().requires_grad_()
        rotation_trick(leaf, scale * e).backward(grad)
        assert torch.allclose(leaf.grad, scale * grad, atol=1e-5)


@pytest.mark.parametrize("case", ["zero", "opposite", "opposite_scaled", "tiny"])
def test_rotation_is_finite_at_degenerate_inputs(case: str) -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 16, generator=g)
    e = {"zero": torch.zeros(8, 16), "opposite": -q, "opposite_scaled": -0.3 * q,
         "tiny": 1e-8 * torch.randn(8, 16, generator=g)}[case].requires_grad_()
    grad = torch.randn(8, 16, generator=g)
    out = rotation_trick(e, q)
    out.backward(grad)
    assert torch.isfinite(out).all() and torch.equal(out, q)
    assert torch.isfinite(e.grad).all()
    assert float(e.grad.norm(dim=1).max()) <= 100.0 * float(grad.norm(dim=1).max()) + 1e-4


# ---- estimator inside the quantizer, synchronized commitment ------------------------------------------


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
@pytest.mark.parametrize("stages", [1, 2])
def test_sync_nu_gives_codebook_nu_times_task_gradient(estimator: str, stages: int) -> None:
    nu = 0.3
    vq = make(estimator=estimator, stages=stages, sync_nu=nu, affine="learned").train()
    z = torch.randn(200, 8).requires_grad_()
    weight = torch.randn(200, 8)
    out = vq(z)
    (out.z_q * weight).sum().backward()  # task loss only: dL/dz_q = weight
    for s, stage in enumerate(vq.quantizers):
        expected = torch.zeros(16, 8).index_add_(0, out.indices[:, s], nu * weight)
        assert torch.allclose(stage.codebook.grad, expected, atol=1e-5)
    # The encoder's gradient is the estimator's alone: sync adds nothing to it.
    ref = z.detach().clone().requires_grad_()
    q_value = out.z_q.detach()
    est = rotation_trick(ref, q_value) if estimator == "rotation" else ref + (q_value - ref).detach()
    (est * weight).sum().backward()
    assert torch.allclose(z.grad, ref.grad, atol=1e-5)


def test_eval_mode_is_plain_quantization() -> None:
    vq = make(estimator="rotation", sync_nu=0.5).eval()
    z = torch.randn(50, 8).requires_grad_()
    out = vq(z)
    assert torch.equal(out.z_q, vq.quantizers[0].codes()[out.indices[:, 0]])
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert vq.quantizers[0].codebook.grad is None


def test_bf16_input_gives_bf16_output() -> None:
    vq = make(estimator="rotation").train()
    out = vq(torch.randn(40, 8).bfloat16())
    assert out.z_q.dtype == torch.bfloat16 and torch.isfinite(out.z_q.float()).all()


def test_losses_are_weighted_and_named() -> None:
    z = torch.randn(100, 8)
    vq = make(beta=0.5, codebook_weight=2.0).train()
    out = vq(z)
    q = vq.quantizers[0].codes().detach()[out.indices[:, 0]]
    mse = float(((z - q) ** 2).mean())
    assert out.losses["codebook"].requires_grad
    assert float(out.losses["commitment"]) == pytest.approx(0.5 * mse, rel=1e-5)
    assert float(out.losses["codebook"].detach()) == pytest.approx(2.0 * mse, rel=1e-5)
    assert set(make(codebook_update="ema").train()(z).losses) == {"commitment"}


# ---- codebook learning ------------------------------------------------------------------------------


def test_ema_update_matches_closed_form() -> None:
    decay, k = 0.9, 4
    vq = VectorQuantizer(dataclasses.replace(QuantizerConfig(), dim=2, codebook_size=k, codebook_update="ema",
                                             ema_decay=decay, affine="off", kmeans_init=False, dead_code_steps=0,
                                             sync_nu=0.0, estimator="ste")).train()
    codebook = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    count0 = torch.tensor([2.0, 1.0, 0.5, 3.0])
    sum0 = codebook * count0[:, None]
    vq.codebook.copy_(codebook)
    vq.ema_count.copy_(count0)
    vq.ema_sum.copy_(sum0)
    vq.initialised.fill_(True)
    x = torch.tensor([[0.5, 0.1], [-0.2, 0.3], [3.5, 0.5], [4.2, -0.1], [4.0, 0.4], [0.2, 3.0]])
    out = vq(x)
    assign = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.equal(out.indices[:, 0], assign)
    n = torch.bincount(assign, minlength=k).float()
    s = torch.zeros(k, 2).index_add_(0, assign, x)
    count1 = decay * count0 + (1 - decay) * n
    sum1 = decay * sum0 + (1 - decay) * s
    total = count1.sum()
    smoothed = (count1 + 1e-5) / (total + k * 1e-5) * total
    assert torch.allclose(vq.ema_count, count1)
    assert torch.allclose(vq.ema_sum, sum1)
    assert torch.allclose(vq.codebook, sum1 / smoothed[:, None], atol=1e-6)
    assert not any(p is vq.codebook for p in vq.parameters())


def test_kmeans_init_lowers_distortion() -> None:
    x = clustered(2000, 16, 32, seed=6)
    with_init, without = make(dim=16, codebook_size=32, kmeans_init=True), make(dim=16, codebook_size=32)
    with_init.train()(x)
    without.train()(x)
    err = {name: float(nearest(x, m.quantizers[0].codes().detach())[1].mean())
           for name, m in (("kmeans", with_init), ("random", without))}
    assert err["kmeans"] < 0.1 * err["random"]


def test_kmeans_pp_seeding_beats_uniform_seeding() -> None:
    wins = 0
    for seed in range(5):
        x = clustered(2000, 8, 24, seed=seed, spread=0.05)
        g = torch.Generator().manual_seed(seed)
        pp = kmeans_pp_seed(x, 24, torch.rand(24, generator=g))
        uniform = x[torch.randperm(x.shape[0], generator=g)[:24]]
        wins += float(nearest(x, pp)[1].mean()) < float(nearest(x, uniform)[1].mean())
    assert wins >= 4


def test_dead_code_is_restarted_near_the_data() -> None:
    vq = make(dim=4, codebook_size=8, dead_code_steps=3, affine="learned").train()
    stage = vq.quantizers[0]
    with torch.no_grad():
        stage.affine_scale.fill_(1.0)  # codes = 2 * stored + 0.5: restarts must invert this map
        stage.affine_shift.fill_(0.5)
        stage.codebook[0] = 1e3
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        vq(torch.randn(256, 4, generator=g))
    assert int(stage.counts[0]) == 0 and int(stage.restarts) == 0
    x = torch.randn(256, 4, generator=g)
    vq(x)  # the code has now been idle for 3 steps: re-seeded from this batch before the search
    assert int(stage.restarts) >= 1
    code = stage.codes().detach()[0]
    assert float(((x - code) ** 2).sum(1).min()) < 0.01
    assert int(stage.counts[0]) > 0


# ---- affine re-parameterization -----------------------------------------------------------------------


def test_learned_affine_starts_as_identity() -> None:
    z = clustered(500, 8, 10, seed=8)
    outs = []
    for affine in ("off", "learned"):
        vq = make(affine=affine, kmeans_init=True, estimator="rotation", sync_nu=0.2).train()
        outs.append(vq(z))
    assert torch.equal(outs[0].z_q, outs[1].z_q) and torch.equal(outs[0].indices, outs[1].indices)
    assert all(torch.equal(outs[0].losses[k], outs[1].losses[k]) for k in outs[0].losses)


def test_affine_groups_scale_their_own_codes() -> None:
    vq = make(affine="learned", affine_groups=4)
    stage = vq.quantizers[0]
    with torch.no_grad():
        stage.affine_scale[2] = 1.0
    ratio = stage.codes().detach() / stage.codebook.detach()
    assert torch.allclose(ratio[8:12], torch.full((4, 8), 2.0))
    assert torch.allclose(ratio[:8], torch.ones(8, 8)) and torch.allclose(ratio[12:], torch.ones(4, 8))


def test_stats_affine_matches_input_mean_and_std() -> None:
    vq = make(affine="stats", affine_decay=0.5, kmeans_init=False).train()
    stage = vq.quantizers[0]
    mean, std = torch.linspace(-3, 3, 8), torch.linspace(0.5, 4, 8)
    g = torch.Generator().manual_seed(9)
    for _ in range(6):
        vq(torch.randn(4000, 8, generator=g) * std + mean)
    assert torch.allclose(stage.z_mean, mean, atol=0.15)
    assert torch.allclose(stage.z_var.sqrt(), std, rtol=0.05)
    codes = stage.codes().detach()
    assert torch.allclose(codes.mean(0), stage.z_mean, atol=1e-4)
    assert torch.allclose(codes.std(0, unbiased=False), stage.z_var.sqrt(), rtol=1e-3)
    assert not any(True for _ in vq.param_groups(1.0)[0]["params"] if _ is not stage.codebook)


# ---- alternating optimisation -------------------------------------------------------------------------


def test_alternating_step_updates_codebook_before_z_q() -> None:
    vq = make(alternate=True, alternate_lr=0.05, affine="learned").train()
    stage = vq.quantizers[0]
    z = torch.randn(300, 8).requires_grad_()
    before = stage.codes().detach().clone()
    out = vq(z)
    after = stage.codes().detach()
    assert not torch.allclose(before, after)
    assert torch.equal(out.indices[:, 0], nearest(z.detach(), before)[0])  # assignments from the old codebook
    assert torch.equal(out.z_q.detach(), after[out.indices[:, 0]])  # values from the updated one
    loss_after = ((z.detach() - after[out.indices[:, 0]]) ** 2).mean()
    assert float(loss_after) < float(out.losses["codebook"])  # the inner step lowered the codebook loss
    out.z_q.sum().backward()
    assert stage.codebook.grad is None and stage.affine_scale.grad is None
    assert vq.param_groups(1e-3) == []


# ---- residual stages, encode / decode, stage dropout --------------------------------------------------


def test_more_stages_lower_the_error() -> None:
    z = torch.randn(2000, 8)
    vq = make(stages=4, kmeans_init=True).train()
    vq(z)
    vq.eval()
    with torch.no_grad():
        errors = [float(((vq.decode(vq.encode(z, s)) - z) ** 2).sum() / (z**2).sum()) for s in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert vq.usage_stats()["quant_error"] == pytest.approx(errors[-1], rel=1e-4)


@pytest.mark.parametrize("overrides", [
    dict(stages=3, affine="learned", estimator="rotation", sync_nu=0.2),
    dict(stages=2, affine="stats", codebook_update="ema"),
    dict(cosine=True, affine="learned"),
])
def test_decode_of_encode_equals_eval_forward(overrides: dict) -> None:
    vq = make(kmeans_init=True, dead_code_steps=2, **overrides).train()
    params = [p for g in vq.param_groups(0.1) for p in g["params"]]
    opt = torch.optim.SGD(params or [torch.zeros(1, requires_grad=True)], lr=0.1)
    g = torch.Generator().manual_seed(10)
    for _ in range(4):
        out = vq((torch.randn(300, 8, generator=g) * 2).requires_grad_())
        opt.zero_grad()
        (out.z_q.square().mean() + sum(out.losses.values())).backward()
        opt.step()
    vq.eval()
    z = torch.randn(300, 8, generator=g)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    out = vq(z)
    idx = vq.encode(z)
    assert torch.equal(idx, out.indices)
    assert torch.equal(vq.decode(idx), out.z_q)
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items())  # eval changes nothing


def test_stage_dropout_uses_random_prefixes_in_training_only() -> None:
    vq = make(stages=4, stage_dropout=1.0).train()
    assert {vq(torch.randn(20, 8)).indices.shape[1] for _ in range(30)} == {1, 2, 3}
    vq = make(stages=4, stage_dropout=0.5).train()
    assert 5 < sum(vq(torch.randn(20, 8)).indices.shape[1] == 4 for _ in range(40)) < 35
    assert vq(torch.randn(20, 8), stages=3).indices.shape[1] == 3
    assert vq.eval()(torch.randn(20, 8)).indices.shape[1] == 4
    with pytest.raises(VqtokError):
        vq(torch.randn(20, 8), stages=5)


def test_cosine_with_several_stages_is_refused() -> None:
    with pytest.raises(VqtokError, match="cosine"):
        make(cosine=True, stages=2)


def test_usage_statistics_and_counts() -> None:
    vq = make(stages=2, codebook_size=16, usage_window=3, kmeans_init=True).train()
    z = clustered(400, 8, 4, seed=11)  # 4 tight clusters: few codes chosen in stage 0
    for _ in range(5):
        vq(z)
    counts = vq.code_counts()
    assert counts.shape == (2, 16) and counts.dtype == torch.int64
    assert torch.equal(counts.sum(1), torch.tensor([2000, 2000]))
    stats = vq.usage_stats()
    used0 = float((counts[0] > 0).float().mean())
    assert stats["usage_per_stage"][0] == pytest.approx(used0)
    assert stats["dead_per_stage"][0] == 16 - int((counts[0] > 0).sum())
    p = counts[0][counts[0] > 0].double() / 2000  # same batch every step: the window's histogram is this one
    assert stats["perplexity_per_stage"][0] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    assert stats["usage"] == pytest.approx(sum(stats["usage_per_stage"]) / 2)
    assert 0.0 < stats["quant_error"] < 1.0


# ---- state, parameter groups ---------------------------------------------------------------------------


def test_state_dict_round_trip_through_safetensors_resumes_identically(tmp_path) -> None:
    overrides = dict(stages=3, codebook_update="ema", affine="stats", estimator="rotation", stage_dropout=0.5,
                     dead_code_steps=2, kmeans_init=True)
    a = make(seed=0, **overrides).train()
    g = torch.Generator().manual_seed(12)
    batches = [torch.randn(200, 8, generator=g) for _ in range(8)]
    for z in batches[:4]:
        a(z)
    save_file(a.state_dict(), tmp_path / "q.safetensors")
    b = make(seed=1, **overrides).train()
    b.load_state_dict(load_file(tmp_path / "q.safetensors"))
    for z in batches[4:]:
        oa, ob = a(z), b(z)
        assert torch.equal(oa.z_q, ob.z_q) and torch.equal(oa.indices, ob.indices)
        assert all(torch.equal(oa.losses[k], ob.losses[k]) for k in oa.losses)
    assert a.usage_stats() == b.usage_stats()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("overrides", [
    dict(), dict(affine="learned", affine_lr_mult=5.0, stages=2), dict(codebook_update="ema", affine="learned"),
    dict(affine="stats"), dict(alternate=True, affine="learned"), dict(codebook_update="ema"),
])
def test_param_groups_cover_each_trainable_parameter_once(overrides: dict) -> None:
    vq = make(**overrides)
    groups = vq.param_groups(0.01)
    listed = [p for g in groups for p in g["params"]]
    owned = {id(p) for stage in vq.quantizers for p in stage.inner_parameters()}
    trainable = {id(p) for p in vq.parameters() if p.requires_grad}
    assert len(listed) == len({id(p) for p in listed})
    assert {id(p) for p in listed} == trainable - owned
    assert trainable == owned if overrides.get("alternate") else not owned
    for g in groups:
        is_affine = any(p is s.affine_scale for s in vq.quantizers if hasattr(s, "affine_scale") for p in g["params"])
        mult = vq.config.affine_lr_mult if is_affine else 1.0
        assert g["lr"] == pytest.approx(0.01 * mult) and g["lr_mult"] == mult


def test_collective_upkeep_runs_in_a_process_group(tmp_path) -> None:
    """A one-rank gloo group takes every all-reduce / broadcast path and must match the single-process run."""
    import torch.distributed as dist

    overrides = dict(stages=2, codebook_update="ema", affine="stats", kmeans_init=True, dead_code_steps=1)
    alt = dict(alternate=True, affine="learned")
    g = torch.Generator().manual_seed(13)
    batches = [torch.randn(100, 8, generator=g) for _ in range(3)]
    single = [[m(z) for z in batches] for m in (make(**overrides).train(), make(**alt).train())]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped = [[m(z) for z in batches] for m in (make(**overrides).train(), make(**alt).train())]
    finally:
        dist.destroy_process_group()
    for outs_a, outs_b in zip(single, grouped):
        for a, b in zip(outs_a, outs_b):
            assert torch.equal(a.indices, b.indices) and torch.allclose(a.z_q, b.z_q, atol=1e-6)


@pytest.mark.cuda
def test_cuda_training_step_under_bf16_autocast() -> None:
    vq = make(stages=2, estimator="rotation", affine="learned", sync_nu=0.2, kmeans_init=True, dead_code_steps=1,
              codebook_size=64).cuda().train()
    z = torch.randn(4096, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
        (out.z_q.float().square().mean() + sum(out.losses.values())).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(vq.quantizers[0].codebook.grad).all()
    vq.eval()
    z = torch.randn(1000, 8, device="cuda")
    assert torch.equal(vq.decode(vq.encode(z)), vq(z).z_q)
