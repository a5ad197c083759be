"""The adversarial stage of audio training: the multi-scale STFT discriminator's shapes, its hinge and feature
losses on hand-made inputs, and a tiny audio run that switches it on half-way, resumes exactly and ships a
model file without it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vqtok.cli import app
from conftest import copy_first
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.modelfile import CONTEXT_KEYS
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training.adversarial import (Adversary, Discriminator, discriminator_loss, feature_loss, generator_loss,
                                        stft_windows)
from vqtok.training.distributed import Processes
from vqtok.training.loop import train

RATE = 16000
STEPS, SWITCH = 12, 6
ADVERSARIAL = ("adv", "feature", "disc")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def audio_config() -> ModelConfig:
    """The sizes of tests/test_audio.py's trained model."""
    strides = (2, 4, 5, 8)
    return ModelConfig(modality="audio", in_channels=1, channels=32, res_blocks=1, sample_rate=RATE,
                       audio_strides=strides, downsample=math.prod(strides),
                       quantizer=QuantizerConfig(dim=16, codebook_size=64, stages=4, stage_dropout=0.5))


def train_config(**kw) -> TrainConfig:
    base = dict(steps=STEPS, batch_size=4, warmup=2, checkpoint_every=4, log_every=3, device="cpu",
                segment_seconds=0.4, audio_loss="spectral", adversarial_from=SWITCH)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fsdd16: Path) -> Path:
    """A 12-step run at 16 kHz (the 8 kHz files resampled) with the adversarial stage on after 6 steps and
    checkpoints every 4, so the step-8 checkpoint holds a discriminator two updates old."""
    out = tmp_path_factory.mktemp("adversarial") / "run"
    train([fsdd16], out, audio_config(), train_config(), sample_rate=RATE)
    return out


# ------------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("rate, windows", [(8000, [512, 256, 128, 64, 32]), (16000, [1024, 512, 256, 128, 64])])
def test_discriminator_shapes(rate: int, windows: list[int]) -> None:
    assert stft_windows(rate) == windows
    assert stft_windows(24000) == [2048, 1024, 512, 256, 128]  # EnCodec's own
    torch.manual_seed(0)
    samples = rate // 2
    logits, features = Discriminator(rate)(torch.randn(3, 1, samples) * 0.1)
    assert len(logits) == len(features) == 5
    for window, scale_logits, maps in zip(windows, logits, features):
        frames, bins = 1 + (samples - window) // (window // 4), window // 2 + 1
        assert scale_logits.shape == (3, 1, frames, math.ceil(bins / 8))
        assert [m.shape for m in maps] == [(3, 32, frames, math.ceil(bins / s)) for s in (1, 2, 4, 8, 8)]
        assert bool((maps[0] < 0).any()) and bool((maps[0] > 0).any())  # LeakyReLU, not ReLU


def test_discriminator_width_is_the_runs_choice() -> None:
    narrow = Discriminator(16000, 8)
    maps = narrow(torch.randn(1, 1, 8000) * 0.1)[1]
    assert all(m.shape[1] == 8 for scale in maps for m in scale)
    wide = sum(p.numel() for p in Discriminator(16000).parameters())
    assert sum(p.numel() for p in narrow.parameters()) < wide / 10  # most layers are filters x filters
    with pytest.raises(VqtokError, match="discriminator filters"):
        train_config(disc_filters=0).validate()


def test_hinge_losses_on_hand_made_logits() -> None:
    real = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([[0.0]])]
    fake = [torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([[-0.5]])]
    # Scale 1: relu(1 - real) = 0, 0.5, 2 (mean 5/6); relu(1 + fake) = 0, 1, 2 (mean 1). Scale 2: 1 and 0.5.
    assert float(discriminator_loss(real, fake)) == pytest.approx(((5 / 6 + 1) + (1 + 0.5)) / 2)
    # relu(1 - fake) = 3, 1, 0 (mean 4/3); 1.5.
    assert float(generator_loss(fake)) == pytest.approx((4 / 3 + 1.5) / 2)
    # Confident and right on both sides: nothing left to learn.
    assert float(discriminator_loss([torch.full((4,), 3.0)], [torch.full((4,), -3.0)])) == 0.0
    assert float(generator_loss([torch.full((4,), 1.0)])) == 0.0


def test_feature_loss_is_relative() -> None:
    torch.manual_seed(0)
    real = [[torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 3)], [torch.randn(2, 4, 7, 2)]]
    fake = [[r + 0.3 * torch.randn_like(r) for r in maps] for maps in real]
    assert float(feature_loss(real, real)) == 0.0
    loss = float(feature_loss(real, fake))
    assert loss > 0
    scaled = [[m * s for m, s in zip(maps, (1e3, 1e-2))] for maps in real], \
        [[m * s for m, s in zip(maps, (1e3, 1e-2))] for maps in fake]
    assert float(feature_loss(*scaled)) == pytest.approx(loss, rel=1e-5)
    # One layer by hand: mean |f(x) - f(G(z))| = 0.5 over mean |f(x)| = 1.
    assert float(feature_loss([[torch.tensor([1.0, -1.0])]], [[torch.tensor([0.0, -1.0])]])) == pytest.approx(0.5)


def test_segments_must_cover_the_longest_window() -> None:
    procs = Processes(0, 1, torch.device("cpu"))
    with pytest.raises(VqtokError, match="segment-seconds"):
        Adversary(RATE, 1000, train_config(), procs)
    before = torch.get_rng_state()
    Adversary(RATE, 1024, train_config(), procs)
    assert torch.equal(torch.get_rng_state(), before)  # built from the run's seed, the global RNG untouched
    narrow = Adversary(RATE, 1024, train_config(disc_filters=8), procs).disc
    assert sum(p.numel() for p in narrow.parameters()) == sum(p.numel() for p in Discriminator(RATE, 8).parameters())


# ------------------------------------------------------------------------------------------------- training


def test_terms_are_logged_from_the_switch(run: Path) -> None:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m for m in lines if m["split"] == "train"}
    assert sorted(logged) == [3, 6, 9, 12]
    for step, record in logged.items():
        assert all((key in record) == (step > SWITCH) for key in ADVERSARIAL), step
    for key in ADVERSARIAL:
        assert math.isfinite(logged[STEPS][key]) and logged[STEPS][key] > 0, key
    assert json.loads((run / "run.json").read_text())["train"]["adversarial_from"] == SWITCH


def test_model_file_has_no_discriminator(run: Path) -> None:
    shipped = set(load_file(str(run / "model.safetensors")))
    assert shipped == set(Tokenizer(audio_config()).state_dict()) | set(CONTEXT_KEYS)
    checkpoint = load_file(str(run / "checkpoints" / "step_0000012.safetensors"))
    assert any(k.startswith("disc.scales.") for k in checkpoint)
    assert any(k.startswith("disc_optim.") and k.endswith("exp_avg") for k in checkpoint)


def test_resume_after_the_switch_is_exact(run: Path, tmp_path: Path, fsdd16: Path) -> None:
    # A run killed after its step-8 checkpoint (two discriminator updates in): newer files never existed.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run, interrupted)
    (interrupted / "checkpoints" / "step_0000012.safetensors").unlink()
    (interrupted / "model.safetensors").unlink()
    result = train([fsdd16], interrupted, audio_config(), train_config(), sample_rate=RATE, resume=True)
    a, b = load_file(str(run / "model.safetensors")), load_file(str(result.model_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    a = load_file(str(run / "checkpoints" / "step_0000012.safetensors"))
    b = load_file(str(interrupted / "checkpoints" / "step_0000012.safetensors"))
    for key in (k for k in a if k.startswith("disc")):
        assert torch.equal(a[key], b[key]), key
    lines = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["split"] == "train"] == [3, 6, 9, 12]


def test_warm_up_is_a_plain_run(run: Path, fsdd16: Path, tmp_path: Path) -> None:
    """Up to the switch the run is the one without the stage, step for step."""
    plain = tmp_path / "plain"
    train([fsdd16], plain, audio_config(), train_config(adversarial_from=0), sample_rate=RATE)
    def logged(folder: Path) -> dict[int, dict[str, float]]:
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m for m in lines if m["split"] == "train" and m["step"] <= SWITCH}

    first, second = logged(run), logged(plain)
    assert sorted(first) == sorted(second) == [3, 6]
    for step in first:
        assert first[step]["loss"] == second[step]["loss"] and first[step]["si_snr"] == second[step]["si_snr"]


def test_options_reach_the_config_and_images_are_refused(sample_images: Path, tmp_path: Path) -> None:
    images = copy_first(sample_images, "*.png", 20, tmp_path / "images")
    result = CliRunner().invoke(app, ["train", str(images), "--out", str(tmp_path / "run"), "--steps", "4",
                                      "--adversarial-from", "2", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "audio models only" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
    from vqtok.defaults import training_configs

    _, tc = training_configs("audio", adversarial_from=100, adversarial_weight=0.5, feature_weight=3.0)
    assert (tc.adversarial_from, tc.adversarial_weight, tc.feature_weight) == (100, 0.5, 3.0)
    with pytest.raises(VqtokError, match="adversarial-from"):
        dataclasses.replace(tc, steps=100).validate()
