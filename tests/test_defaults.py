"""Per-modality training defaults, and a command line that starts without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.defaults import AUDIO, training_configs


def test_images_start_from_the_dataclass_defaults() -> None:
    model, train = training_configs("image")
    assert model == ModelConfig() and train == TrainConfig()


def test_audio_defaults_apply_where_not_given() -> None:
    model, train = training_configs("audio", beta=1.5, stages=None)
    q = model.quantizer
    assert (q.codebook_size, q.stages, q.stage_dropout, q.affine, q.beta) == (1024, 8, 0.5, "learned", 1.5)
    assert (model.channels, train.batch_size, train.segment_seconds) == (64, 8, AUDIO["segment_seconds"])
    assert train.audio_loss == "spectral" and training_configs("image")[1].audio_loss == "waveform"


def test_net_and_loss_options_reach_the_configs() -> None:
    model, train = training_configs("audio", res_channels=48, activation="snake", audio_loss="spectral",
                                    audio_net="stft")
    assert (model.res_channels, model.activation, train.audio_loss) == (48, "snake", "spectral")
    assert model.audio_net == "stft" and training_configs("audio")[0].audio_net == "conv"


def test_one_stage_audio_has_no_stage_dropout() -> None:
    assert training_configs("audio", stages=1)[0].quantizer.stage_dropout == 0.0
    assert training_configs("image", stages=4)[0].quantizer.stage_dropout == QuantizerConfig().stage_dropout


def test_unknown_option() -> None:
    with pytest.raises(TypeError, match="colour"):
        training_configs("image", colour="red")


def test_help_and_usage_errors_do_not_import_torch() -> None:
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom vqtok.cli import app\n"
             "r1 = CliRunner().invoke(app, ['--help'])\nr2 = CliRunner().invoke(app, ['train'])\n"
             "print(r1.exit_code, r2.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "2", "False"]
