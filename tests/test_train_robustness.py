"""Training under things going wrong: divergence, runs stopped early or left damaged, resumes with other
options or another spelling of the data, unreadable data in worker processes, impossible option values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import copy_first
from vqtok.cli import app
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.training.checkpoint import truncate_metrics
from vqtok.training.loop import train

TINY_CLI = ["--steps", "4", "--warmup", "1", "--batch-size", "8", "--channels", "16", "--code-dim", "8",
            "--codebook-size", "16", "--checkpoint-every", "2", "--device", "cpu"]


def tiny_model(**quantizer) -> ModelConfig:
    return ModelConfig(channels=16, res_channels=8, quantizer=QuantizerConfig(dim=8, codebook_size=16, **quantizer))


def tiny_train(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=8, warmup=1, checkpoint_every=2, log_every=2, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture()
def images(tmp_path: Path, sample_images: Path) -> Path:
    return copy_first(sample_images, "*.png", 24, tmp_path / "images")


def same_models(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def interrupted_copy(run: Path, to: Path, keep: int) -> Path:
    """A copy of a finished run as a crash after its step-`keep` checkpoint would have left it."""
    shutil.copytree(run, to)
    (to / "model.safetensors").unlink()
    for ckpt in (to / "checkpoints").glob("step_*.safetensors"):
        if int(ckpt.stem[5:]) > keep:
            ckpt.unlink()
    return to


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "Traceback" not in text


@pytest.fixture()
def nan_from_step_3(monkeypatch) -> None:
    """The image loss turns NaN from the third training step on (validation does not call it)."""
    from vqtok.training.imagesets import ImageTask

    plain, calls = ImageTask.reconstruction_loss, []

    def loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return plain(recon, target) * (float("nan") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(ImageTask, "reconstruction_loss", staticmethod(loss))


@pytest.mark.usefixtures("nan_from_step_3")
def test_a_diverging_loss_stops_the_run(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(VqtokError, match=r"diverged at step 4: the loss is nan; checkpoints up to step 2 are kept\. "
                                         r"Start a new run .* lower --lr than 0.001 or more --warmup steps than 1"):
        train([images], run, tiny_model(), tiny_train(steps=8, log_every=2, checkpoint_every=2))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("val", 2)]  # no NaN line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002.safetensors"]
    assert not (run / "model.safetensors").exists()


@pytest.mark.usefixtures("nan_from_step_3")
def test_no_checkpoint_of_non_finite_weights(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(VqtokError, match=r"diverged at step 4: the weights hold NaN or infinite values; "
                                         r"checkpoints up to step 2 are kept"):
        train([images], run, tiny_model(), tiny_train(steps=8, log_every=100, checkpoint_every=2))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002.safetensors"]
    # With a learning rate far too high the weights overflow within the first steps.
    with pytest.raises(VqtokError, match=r"diverged at step 2: .*; no checkpoint was written\. Start a new run"):
        train([images], tmp_path / "high", tiny_model(), tiny_train(steps=8, lr=1e6))


def test_resume_before_the_first_checkpoint_starts_over(images: Path, tmp_path: Path) -> None:
    straight = train([images], tmp_path / "straight", tiny_model(), tiny_train()).model_path
    early = interrupted_copy(straight.parent, tmp_path / "early", keep=0)
    (early / "metrics.jsonl").write_text('{"split": "train", "step": 2, "loss": 1.0}\n')
    notes: list[str] = []
    resumed = train([images], early, tiny_model(), tiny_train(), resume=True, on_status=notes.append)
    assert "no checkpoint yet: starting from step 0 with the stored configs" in notes
    assert same_models(straight, resumed.model_path)
    steps = [json.loads(line)["step"] for line in (early / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 2, 4, 4]  # train and val lines, the stale one dropped


def test_cosine_with_several_stages_is_refused_before_any_run(images: Path, tmp_path: Path) -> None:
    with pytest.raises(VqtokError, match="cosine codebook needs stages = 1"):
        QuantizerConfig(cosine=True, stages=2).validate()
    with pytest.raises(VqtokError, match="cosine"):
        train([images], tmp_path / "run", tiny_model(cosine=True, stages=2), tiny_train())
    assert not (tmp_path / "run").exists()


def test_resume_passes_over_unreadable_checkpoints(images: Path, tmp_path: Path) -> None:
    straight = train([images], tmp_path / "straight", tiny_model(), tiny_train(steps=6)).model_path
    run = interrupted_copy(straight.parent, tmp_path / "run", keep=6)
    newest = run / "checkpoints" / "step_0000006.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"split": "train", "st')  # a half-written last line
    notes: list[str] = []
    resumed = train([images], run, tiny_model(), tiny_train(steps=6), resume=True, on_status=notes.append)
    assert any(n.startswith(f"skipped {newest}: unreadable checkpoint") for n in notes)
    assert any(n.startswith("resuming from step 4") for n in notes)
    assert same_models(straight, resumed.model_path)
    for ckpt in (run / "checkpoints").glob("*"):
        ckpt.write_bytes(b"")
    with pytest.raises(VqtokError, match=r"no readable checkpoint to resume from: .*step_0000006.safetensors"):
        train([images], run, tiny_model(), tiny_train(steps=6), resume=True)


def test_a_damaged_run_record(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train([images], run, tiny_model(), tiny_train(steps=2))
    (run / "run.json").write_text('{"model": {')
    with pytest.raises(VqtokError, match=r"run.json: not a readable run record") as err:
        train([images], run, tiny_model(), tiny_train(steps=2), resume=True)
    assert one_line(str(err.value))


def test_truncate_metrics_drops_half_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_refuses_other_options(images: Path, tmp_path: Path) -> None:
    from vqtok.training.loop import check_resume_options

    run = tmp_path / "run"
    train([images], run, tiny_model(), tiny_train(steps=2))
    check_resume_options(run, {"steps": 2, "lr": 1e-3, "code_dim": 8, "size": 28, "device": "cuda"})
    with pytest.raises(VqtokError, match=r"--steps 300 \(the run's: 2\), --lr 0.5 \(the run's: 0.001\)"):
        check_resume_options(run, {"steps": 300, "lr": 0.5, "device": "cpu"})
    with pytest.raises(VqtokError, match=r"--code-dim 4 \(the run's: 8\)"):
        check_resume_options(run, {"code_dim": 4})
    with pytest.raises(VqtokError, match=r"--size 32 \(the run's: 28\)"):
        check_resume_options(run, {"size": 32})
    with pytest.raises(VqtokError, match=r"--init mnist \(the run's: None\)"):
        check_resume_options(run, {"init": "mnist"})


def test_cli_resume_with_other_options(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(images), "--out", str(run), *TINY_CLI]).exit_code == 0
    other = runner.invoke(app, ["train", str(images), "--out", str(run), *TINY_CLI, "--lr", "0.5", "--resume"])
    assert other.exit_code == 1 and "--lr 0.5 (the run's: 0.001)" in other.output
    # The same options (strides, enums and all), or none, resume; --device and --num-workers are free.
    same = ["--strides", "2,4,5,8", "--estimator", "rotation", "--num-workers", "0"]
    for extra in (same, []):
        (run / "model.safetensors").unlink()
        again = runner.invoke(app, ["train", str(images), "--out", str(run), *(TINY_CLI if extra else []), *extra,
                                    "--resume"])
        assert again.exit_code == 0, again.output


def test_alternating_codebook_steps_resume_exactly(images: Path, tmp_path: Path) -> None:
    model = tiny_model(alternate=True, codebook_update="loss", alternate_lr=1e-2)
    straight = train([images], tmp_path / "straight", model, tiny_train(steps=6)).model_path
    run = interrupted_copy(straight.parent, tmp_path / "run", keep=2)
    assert same_models(straight, train([images], run, model, tiny_train(steps=6), resume=True).model_path)


def test_out_must_be_a_writable_folder(images: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    for out in (taken, taken / "run"):
        with pytest.raises(VqtokError, match=f"{taken}: a file, where --out {out} needs a folder"):
            train([images], out, tiny_model(), tiny_train())


def test_resume_with_the_data_spelled_otherwise(images: Path, tmp_path: Path, monkeypatch) -> None:
    from vqtok.training.loop import _files_fingerprint

    monkeypatch.chdir(images.parent)
    run = tmp_path / "run"
    train([Path(images.name)], run, tiny_model(), tiny_train(steps=2))
    (run / "model.safetensors").unlink()
    train([images], run, tiny_model(), tiny_train(steps=2), resume=True)
    # A run recorded with the fingerprint of the paths as spelled (as vqtok did before) resumes too.
    info = json.loads((run / "run.json").read_text())
    info["data"]["fingerprint"] = _files_fingerprint(sorted(Path(images.name).glob("*.png")), resolve=False)
    (run / "run.json").write_text(json.dumps(info))
    train([Path(images.name)], run, tiny_model(), tiny_train(steps=2), resume=True)


def test_unreadable_data_read_by_workers_gives_one_line(images: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i, src in enumerate(sorted(images.glob("*.png"))[:5]):
        (bad / f"{i}.png").write_bytes(src.read_bytes()[:60])
    with pytest.raises(VqtokError) as err:
        train([bad], tmp_path / "run", tiny_model(), tiny_train(steps=2), num_workers=1)
    assert str(err.value).startswith("none of the 4 files could be read") and one_line(str(err.value))


def test_audio_segments_too_short_for_the_loss(fsdd16: Path, tmp_path: Path) -> None:
    model = ModelConfig(modality="audio", channels=16, res_blocks=1, quantizer=QuantizerConfig(dim=8, codebook_size=16))
    for loss in ("waveform", "spectral", "complex"):
        with pytest.raises(VqtokError, match=rf"the {loss} loss needs training segments .*--segment-seconds to"):
            train([fsdd16], tmp_path / "run", model, tiny_train(segment_seconds=0.05, audio_loss=loss))
    assert not (tmp_path / "run").exists()
    with pytest.raises(VqtokError, match="sample rate must be at least 1000 Hz, got 1"):
        train([fsdd16], tmp_path / "run", model, tiny_train(), sample_rate=1)


@pytest.mark.parametrize("config", [
    ModelConfig(res_channels=0), ModelConfig(res_blocks=-1), ModelConfig(quantizer=QuantizerConfig(alternate_lr=-1)),
    ModelConfig(quantizer=QuantizerConfig(affine_lr_mult=-1)), TrainConfig(warmup=-10),
    ModelConfig(modality="audio", sample_rate=999)])
def test_impossible_option_values(config) -> None:
    with pytest.raises(VqtokError):
        config.validate()


def test_non_positive_size_is_refused(images: Path, tmp_path: Path) -> None:
    with pytest.raises(VqtokError, match="image size must be a positive multiple .* got 0"):
        train([images], tmp_path / "run", tiny_model(), tiny_train(), size=0)


def test_train_json_lists_the_skipped_files(images: Path, tmp_path: Path) -> None:
    (images / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["train", str(images), "--out", str(tmp_path / "run"), *TINY_CLI, "--json"])
    assert result.exit_code == 1  # files were skipped
    report = json.loads(result.stdout)
    assert report["skipped"] == 1
    assert [(Path(f["file"]).name, "broken.png" in f["error"]) for f in report["failed"]] == [("broken.png", True)]


def test_a_bad_file_no_step_draws_is_still_reported(images: Path, tmp_path: Path) -> None:
    # Fitting the entropy codec's tables reads every training file, drawn by a step or not.
    (images / "broken.png").write_bytes(b"not a picture")
    result = train([images], tmp_path / "run", tiny_model(), tiny_train(steps=1, batch_size=2, val_fraction=0.0))
    assert [Path(f).name for f, _ in result.skipped] == ["broken.png"]
