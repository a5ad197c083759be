"""Training runs end to end on real sample images, writes its run directory, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import copy_first
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.training.loop import learning_rate, train


def tiny_model() -> ModelConfig:
    return ModelConfig(channels=32, res_channels=16, quantizer=QuantizerConfig(dim=16, codebook_size=32))


def tiny_train(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=16, warmup=5, checkpoint_every=10, log_every=5, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture()
def images(tmp_path: Path, sample_images: Path) -> Path:
    return copy_first(sample_images, "*.png", 80, tmp_path / "images")


def test_run_directory_contents(images: Path, tmp_path: Path) -> None:
    (images / "broken.png").write_bytes(b"this is not a png")
    run = tmp_path / "run"
    result = train([images], run, tiny_model(), tiny_train())
    assert result.model_path == run / "model.safetensors" and result.model_path.exists()
    assert [Path(p).name for p, _ in result.skipped] == ["broken.png"]
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["model"]["image_size"] == 28 and info["data"]["files"] == 81
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train_lines] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "recon", "psnr", "usage", "perplexity", "lr"):
        assert key in train_lines[-1], key
    assert [m["step"] for m in lines if m["split"] == "val"] == [10, 20, 30]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000010.safetensors", "step_0000020.safetensors", "step_0000030.safetensors"]
    preview = Image.open(run / "previews" / "step_0000030.png")
    assert preview.width > 28 and preview.height > 56
    assert 0 < result.final["psnr"] < 100 and 0 < result.final["usage"] <= 1


def test_refuses_to_overwrite_a_run(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train([images], run, tiny_model(), tiny_train(steps=5, checkpoint_every=5))
    with pytest.raises(VqtokError, match="--resume"):
        train([images], run, tiny_model(), tiny_train(steps=5))


def test_resume_continues_exactly(images: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train([images], straight, tiny_model(), tiny_train(steps=20))
    interrupted = tmp_path / "interrupted"
    train([images], interrupted, tiny_model(), tiny_train(steps=20))
    # Simulate a run killed after its step-10 checkpoint: newer checkpoints and the final model never existed.
    (interrupted / "checkpoints" / "step_0000020.safetensors").unlink()
    (interrupted / "model.safetensors").unlink()
    result = train([images], interrupted, tiny_model(), tiny_train(steps=20), resume=True)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(result.model_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["split"] == "train"] == [5, 10, 15, 20]
    assert [m["step"] for m in lines if m["split"] == "val"] == [10, 20]


def test_resume_without_a_run(images: Path, tmp_path: Path) -> None:
    with pytest.raises(VqtokError, match="nothing to resume"):
        train([images], tmp_path / "new", tiny_model(), tiny_train(), resume=True)


def test_init_starts_from_a_models_weights(images: Path, tmp_path: Path) -> None:
    # Codebooks trained by the loss and never re-seeded, so at that learning rate they stay as they start too.
    shape = ModelConfig(channels=32, res_channels=16, quantizer=QuantizerConfig(
        dim=16, codebook_size=32, codebook_update="loss", dead_code_steps=0))
    first = train([images], tmp_path / "first", shape, tiny_train(steps=20)).model_path
    # A near-zero learning rate: what the fine-tuning run ends with is what it started from.
    other_shape = ModelConfig(channels=64, quantizer=QuantizerConfig(dim=8, codebook_size=16))
    tuned = train([images], tmp_path / "tuned", other_shape, tiny_train(steps=5, lr=1e-12), init=first).model_path
    fresh = train([images], tmp_path / "fresh", tiny_model(), tiny_train(steps=5, lr=1e-12)).model_path
    a, b, c = (load_file(str(p)) for p in (first, tuned, fresh))
    nets = [k for k in a if k.startswith(("encoder.", "decoder."))]
    assert nets and a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in nets)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in nets)
    books = [k for k in a if k.endswith(".codebook")]  # the starting model's: no k-means init again
    assert books and all(torch.allclose(a[k], b[k], atol=1e-6) for k in books)
    info = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert info["model"] == json.loads((tmp_path / "first" / "run.json").read_text())["model"]
    assert info["init"]["path"] == str(first) and len(info["init"]["fingerprint"]) == 16
    with pytest.raises(VqtokError, match="drop --size"):
        train([images], tmp_path / "sized", tiny_model(), tiny_train(steps=5), size=32, init=first)


def test_learning_rate_schedule() -> None:
    config = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(10, config) == pytest.approx(1e-3)
    assert learning_rate(100, config) == pytest.approx(1e-4)
    values = [learning_rate(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_workers_do_not_change_the_run(images: Path, tmp_path: Path) -> None:
    """Items are named by (file, seed) from the step number, so who reads them cannot change what is read."""
    models = []
    for workers in (0, 2):
        result = train([images], tmp_path / f"w{workers}", tiny_model(), tiny_train(steps=12), num_workers=workers)
        models.append(load_file(str(result.model_path)))
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key


def test_crops_are_random_and_seeded(tmp_path: Path) -> None:
    from vqtok.data.streams import BatchPlan, ImageCrops

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(big)
    small = tmp_path / "small.png"
    Image.new("RGB", (10, 20), (200, 10, 10)).save(small)
    crops = ImageCrops([big, small], 16)
    plan = BatchPlan(2, 8, seed=3, start=0, stop=4)
    items = [item for batch in plan for item in batch]
    assert sorted(f for f, _ in items) == [0] * 16 + [1] * 16  # epochs: every file once per epoch
    first = [crops[item][0] for item in items]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x in first)
    assert all(torch.equal(a, crops[item][0]) for a, item in zip(first, items))  # same item, same crop
    source = torch.from_numpy(np.array(Image.open(big))).permute(2, 0, 1)
    offsets, mirrored = set(), []
    for (f, _), crop in zip(items, first):
        if f == 0:  # a crop of the file at its own scale, mirrored or not
            windows = {(y, x): source[:, y:y + 16, x:x + 16] for y in range(25) for x in range(45)}
            hits = [(at, flip) for at, w in windows.items() for flip in (False, True)
                    if torch.equal(w.flip(-1) if flip else w, crop)]
            assert len(hits) == 1
            offsets.add(hits[0][0])
            mirrored.append(hits[0][1])
        else:  # smaller than the crop: resized up, so every pixel is the flat colour
            assert (crop[0] == 200).all()
    assert len(offsets) > 4
    assert 3 <= sum(mirrored) <= len(mirrored) - 3  # about half are mirrored
    # Two ranks take the two halves of every global batch.
    halves = [list(BatchPlan(2, 8, 3, 0, 4, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == list(plan)
    with pytest.raises(ValueError, match="multiple"):
        BatchPlan(2, 7, 3, 0, 4, rank=0, world=2)


def test_resume_starts_the_plan_at_the_step() -> None:
    from vqtok.data.streams import BatchPlan

    whole = list(BatchPlan(50, 8, seed=1, start=0, stop=20))
    assert list(BatchPlan(50, 8, seed=1, start=13, stop=20)) == whole[13:]
    weighted = BatchPlan(3, 64, seed=1, start=0, stop=50, weights=torch.tensor([1.0, 0.0, 3.0]))
    counts = np.bincount([f for batch in weighted for f, _ in batch], minlength=3)
    assert counts[1] == 0 and 2.5 < counts[2] / counts[0] < 3.5


def test_bad_worker_count(images: Path, tmp_path: Path) -> None:
    with pytest.raises(VqtokError, match="num-workers"):
        train([images], tmp_path / "run", tiny_model(), tiny_train(), num_workers=-1)


def test_bf16_runs_the_nets_in_bfloat16_and_keeps_float32_weights(images: Path, tmp_path: Path) -> None:
    fp32 = train([images], tmp_path / "fp32", tiny_model(), tiny_train(steps=20))
    bf16 = train([images], tmp_path / "bf16", tiny_model(), tiny_train(steps=20, precision="bf16"))
    info = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert info["train"]["precision"] == "bf16"
    weights = load_file(str(bf16.model_path))
    assert torch.bfloat16 not in {t.dtype for t in weights.values()}
    assert all(t.dtype == torch.float32 for k, t in weights.items() if k.endswith(".weight"))
    differ = [k for k, t in load_file(str(fp32.model_path)).items() if not torch.equal(t, weights[k])]
    assert differ  # the option changed the arithmetic
    # ...but not what is learned: after 20 steps both reconstruct the held-out images about as well.
    assert abs(bf16.final["psnr"] - fp32.final["psnr"]) < 1.0
    x = torch.rand(2, 3, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16.model.train()(x)
    assert out.recon.dtype == torch.bfloat16  # the decoder ran in bfloat16
    assert all(v.dtype == torch.float32 for v in out.losses.values())  # the quantizer in float32


def test_bad_precision(images: Path, tmp_path: Path) -> None:
    with pytest.raises(VqtokError, match="precision must be fp32 or bf16"):
        train([images], tmp_path / "run", tiny_model(), tiny_train(precision="fp16"))
