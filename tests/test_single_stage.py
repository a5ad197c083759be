"""`train --single-stage P`: the share of training steps that quantize with the first residual stage alone (the
lowest bitrate), drawn from the seed and the step; later stages never train when every step is single-stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import copy_first
from vqtok.cli import app
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.modelfile import load
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training.loop import single_stage_step, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def draws(share: float, seed: int = 0, steps: int = 4000) -> list[bool]:
    config = TrainConfig(single_stage=share, seed=seed)
    return [single_stage_step(config, step) for step in range(steps)]


def test_share_of_single_stage_steps_follows_the_option_and_repeats() -> None:
    assert not any(draws(0.0)) and all(draws(1.0))
    picked = draws(0.3)
    assert abs(sum(picked) / len(picked) - 0.3) < 0.03
    assert picked == draws(0.3)  # a resumed run, or another process, draws the same steps
    assert picked != draws(0.3, seed=1)


def test_share_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(VqtokError, match="single-stage share"):
        TrainConfig(single_stage=1.5).validate()


def audio_config() -> ModelConfig:
    strides = (2, 4, 5, 8)
    return ModelConfig(modality="audio", in_channels=1, channels=16, res_blocks=1, sample_rate=8000,
                       audio_strides=strides, downsample=math.prod(strides),
                       quantizer=QuantizerConfig(dim=8, codebook_size=16, stages=3, stage_dropout=0.0))


@pytest.mark.parametrize("share, trains_later_stages", [(1.0, False), (0.0, True)])
def test_single_stage_steps_leave_later_stages_untrained(fsdd16: Path, tmp_path: Path, share: float,
                                                         trains_later_stages: bool) -> None:
    config = TrainConfig(steps=4, batch_size=2, warmup=1, checkpoint_every=4, device="cpu", segment_seconds=0.2,
                         audio_loss="spectral", single_stage=share)
    train([fsdd16], tmp_path / "run", audio_config(), config)
    trained = load(tmp_path / "run" / "model.safetensors")
    torch.manual_seed(config.seed)
    initial = Tokenizer(audio_config())
    first, later = trained.quantizer.quantizers[0], trained.quantizer.quantizers[1]
    assert not torch.equal(first.codebook, initial.quantizer.quantizers[0].codebook)
    assert (not torch.equal(later.codebook, initial.quantizer.quantizers[1].codebook)) == trains_later_stages


def test_one_stage_model_refuses_the_option(sample_images: Path, tmp_path: Path) -> None:
    images = copy_first(sample_images, "*.png", 20, tmp_path / "images")
    result = CliRunner().invoke(app, ["train", str(images), "--out", str(tmp_path / "run"), "--steps", "4",
                                      "--single-stage", "0.5", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--single-stage needs a model with several residual stages" in lines[0], result.stderr
    assert not (tmp_path / "run" / "run.json").exists()
