"""The command line end to end on real sample images: train -> encode -> decode -> inspect -> eval, exit codes,
--json output, and one bad input per command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtok.data import io as data
from vqtok.cli import app
from vqtok.jobs.pipeline import code_table
from vqtok.modelfile import load, save_model
from vqtok.tokens.context import ContextTable
from vqtok.tokens.tokfile import FIXED_OVERHEAD_BYTES, header_bytes, read_tokens, write_tokens

runner = CliRunner()
TINY = ["--steps", "40", "--warmup", "5", "--batch-size", "16", "--channels", "32", "--code-dim", "16", "--codebook-size", "32",
        "--checkpoint-every", "20", "--device", "cpu"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_images: Path) -> Path:
    folder = tmp_path_factory.mktemp("data") / "images"
    (folder / "nested").mkdir(parents=True)
    for i, src in enumerate(sorted(sample_images.glob("*.png"))[:60]):
        shutil.copy(src, (folder / "nested" if i % 2 else folder) / src.name)
    return folder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, images: Path) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    result = invoke("train", images, "--out", run, *TINY, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 40 and summary["train_files"] + summary["val_files"] == 60
    return run / "model.safetensors"


def test_round_trip_tokens_equal_encoder_tokens(model_path: Path, images: Path, tmp_path: Path) -> None:
    tokens, recon = tmp_path / "tokens", tmp_path / "recon"
    # On the CPU, as the library call it is compared with: another device may break near-ties differently.
    result = invoke("encode", model_path, images, "--out", tokens, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 60
    model = load(model_path)
    for src in sorted(images.rglob("*.png"))[:5]:
        rel = src.relative_to(images)
        tok = read_tokens(tokens / rel.with_name(rel.name + ".vqt"))
        x = data.load_image(src).float().div(255).unsqueeze(0)
        assert np.array_equal(tok.codes, model.encode(x)[0].numpy())
        assert tok.header["original_size"] == [28, 28]
    result = invoke("decode", model_path, tokens, "--out", recon)
    assert result.exit_code == 0, result.output
    outputs = sorted(p.relative_to(recon) for p in recon.rglob("*.png"))
    assert outputs == sorted(p.relative_to(images) for p in images.rglob("*.png"))
    assert Image.open(recon / outputs[0]).size == (28, 28)


def test_token_file_size_is_packed_bits_plus_header(model_path: Path, images: Path, tmp_path: Path) -> None:
    assert invoke("encode", model_path, images, "--out", tmp_path).exit_code == 0
    path = next(tmp_path.rglob("*.vqt"))
    header_len = len(header_bytes(read_tokens(path).header))
    packed = (7 * 7 * 5 + 7) // 8  # K=32: 5 bits per code
    assert path.stat().st_size <= FIXED_OVERHEAD_BYTES + header_len + packed + 8


def test_encode_odd_sizes_decode_back_to_original_size(model_path: Path, tmp_path: Path) -> None:
    src = tmp_path / "odd"
    src.mkdir()
    Image.new("RGB", (37, 21), (200, 30, 30)).save(src / "wide.png")
    Image.new("L", (13, 50), 128).save(src / "tall.jpg")
    assert invoke("encode", model_path, src, "--out", tmp_path / "t").exit_code == 0
    assert invoke("decode", model_path, tmp_path / "t", "--out", tmp_path / "r").exit_code == 0
    assert Image.open(tmp_path / "r" / "wide.png").size == (37, 21)
    assert Image.open(tmp_path / "r" / "tall.png").size == (13, 50)


def test_encode_skips_bad_files_and_existing_outputs(model_path: Path, images: Path, tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    shutil.copytree(images, src)
    (src / "zero.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello")
    result = invoke("encode", model_path, src, "--out", tmp_path / "t", "--json")
    assert result.exit_code == 1  # the good files are all written; the exit code tells scripts some were not
    report = json.loads(result.stdout)
    assert report["written"] == 60 and len(report["failed"]) == 2
    assert "zero.png" in result.stderr and "text.jpg" in result.stderr
    again = json.loads(invoke("encode", model_path, src, "--out", tmp_path / "t", "--json").stdout)
    assert again["written"] == 0 and again["skipped_existing"] == 60
    forced = json.loads(invoke("encode", model_path, src, "--out", tmp_path / "t", "--force", "--json").stdout)
    assert forced["written"] == 60


def test_decode_refuses_tokens_of_another_model(model_path: Path, images: Path, tmp_path: Path) -> None:
    other = load(model_path)
    with torch.no_grad():
        next(other.decoder.parameters()).add_(0.01)
    from vqtok.modelfile import save_model

    other_path = tmp_path / "other.safetensors"
    save_model(other, other_path)
    assert invoke("encode", model_path, images, "--out", tmp_path / "t").exit_code == 0
    result = invoke("decode", other_path, tmp_path / "t", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert "written by model" in result.stderr
    assert not list((tmp_path / "r").rglob("*.png")) if (tmp_path / "r").exists() else True


def test_inspect_tokens_and_model(model_path: Path, images: Path, tmp_path: Path) -> None:
    assert invoke("encode", model_path, images, "--out", tmp_path / "t").exit_code == 0
    result = invoke("inspect", tmp_path / "t", "--json", "--plot", tmp_path / "usage.png")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stage = report["stages"][0]
    assert report["files"] == 60 and report["tokens"] == 60 * 49
    assert 0 < stage["usage"] <= 1 and 1 <= stage["perplexity"] <= 32
    assert stage["entropy_bits"] <= stage["max_entropy_bits"] == pytest.approx(5.0)
    assert Image.open(tmp_path / "usage.png").width > 100
    via_model = json.loads(invoke("inspect", model_path, "--data", images, "--json").stdout)
    assert via_model["stages"][0]["used"] == stage["used"]
    assert via_model["stages"][0]["perplexity"] == pytest.approx(stage["perplexity"])
    via_run = json.loads(invoke("inspect", model_path.parent, "--data", images, "--json").stdout)
    assert via_run["stages"][0]["used"] == stage["used"]
    table = invoke("inspect", tmp_path / "t")
    assert table.exit_code == 0 and "perplexity" in table.stdout


def test_eval_reports_quality(model_path: Path, images: Path) -> None:
    result = invoke("eval", model_path, images, "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert 5 < m["psnr"] < 60 and -1 < m["ssim"] <= 1 and m["mse"] > 0
    assert m["bits_per_pixel"] == pytest.approx(49 * 5 / (28 * 28))
    assert 0 < m["usage"] <= 1 and m["images"] == 60 and 0 <= m["quant_error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "{tmp}/missing.safetensors", "{images}", "--out", "{tmp}/t"], "missing.safetensors"),
        (["encode", "{model}", "{tmp}/nowhere", "--out", "{tmp}/t"], "nowhere"),
        (["decode", "{model}", "{tmp}/empty", "--out", "{tmp}/r"], "no .vqt token files"),
        (["inspect", "{model}"], "--data"),
        (["eval", "{tmp}/notes.txt", "{images}"], "notes.txt"),
        (["train", "{tmp}/empty", "--out", "{tmp}/run"], "no image or audio files"),
        (["train", "{images}", "--out", "{tmp}/run", "--downsample", "5"], "downsample"),
        (["train", "{images}", "--out", "{tmp}/run", "--speed-perturb", "0.1"], "for audio models only"),
        (["train", "{images}", "--out", "{tmp}/run", "--speed-perturb", "0.004"], "speed perturbation must be"),
        (["encode", "{model}", "{images}", "--out", "{tmp}/t", "--device", "cuda:7"], "cuda"),
        (["eval", "{model}", "{images}", "--plot", "{tmp}/eval.jpg"], "eval.jpg"),
        (["eval", "{model}", "{images}", "--plot", "{tmp}/nowhere/eval.png"], "nowhere"),
        (["inspect", "{model}", "--data", "{images}", "--plot", "{tmp}/empty"], "is a folder"),
    ],
)
def test_user_errors_are_one_line_exit_1(args, message, model_path: Path, images: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    filled = [a.format(tmp=tmp_path, images=images, model=model_path) for a in args]
    result = invoke(*filled)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_bad_usage_exits_2(model_path: Path, images: Path) -> None:
    assert invoke("train").exit_code == 2
    assert invoke("encode", "--nonsense").exit_code == 2
    assert invoke("train", "x", "--out", "y", "--estimator", "magic").exit_code == 2
    assert invoke("eval", model_path, images, "--batch-size", "0").exit_code == 2
    assert invoke("inspect", model_path, "--data", images, "--top", "0").exit_code == 2
    assert invoke("inspect", model_path, model_path, "--data", images).exit_code == 2


def _token_file(path: Path, stages: int, codebook_size: int = 8, fingerprint: str = "0123456789abcdef") -> None:
    codes = np.arange(stages * 9).reshape(stages, 3, 3) % codebook_size
    write_tokens(path, codes, {"fingerprint": fingerprint, "modality": "image"}, codebook_size=codebook_size)


def test_inspect_counts_every_stage_of_files_with_different_stage_counts(tmp_path: Path) -> None:
    # Files of one model encoded with --stages 1 and 2, in either order: every stage of every file counts.
    for first, second in (("a", "b"), ("b", "a")):
        folder = tmp_path / first
        folder.mkdir()
        _token_file(folder / f"{first}.vqt", 1)
        _token_file(folder / f"{second}.vqt", 2)
        report = json.loads(invoke("inspect", folder, "--json").stdout)
        assert report["tokens"] == 27 and [s["tokens"] for s in report["stages"]] == [18, 9]
    _token_file(tmp_path / "a" / "odd.vqt", 1, codebook_size=16)
    result = invoke("inspect", tmp_path / "a", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["tokens"] == 27
    assert "odd.vqt: codebook size 16" in result.stderr


def test_inspect_takes_several_sources_and_lists_top_codes(tmp_path: Path) -> None:
    _token_file(tmp_path / "a.vqt", 2)
    _token_file(tmp_path / "b.vqt", 1)
    report = json.loads(invoke("inspect", tmp_path / "a.vqt", tmp_path / "b.vqt", "--top", "8", "--json").stdout)
    assert report["files"] == 2 and report["tokens"] == 27
    assert len(report["stages"][0]["top"]) == 8


def test_inspect_model_data_resolves_the_model_past_a_folder_of_its_name(
        images: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    sample = tmp_path / "few"
    sample.mkdir()
    for src in sorted(images.glob("*.png"))[:3]:
        shutil.copy(src, sample / src.name)
    result = invoke("inspect", "mnist", "--data", sample, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] == 3 * 49


def test_help_shows_defaults() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--codebook-size" in result.stdout and "default: 512" in result.stdout


def test_encode_to_a_shard_for_training_on_tokens(model_path: Path, images: Path, tmp_path: Path) -> None:
    from vqtok import TokenDataset

    result = invoke("encode", model_path, images, "--out", tmp_path / "shard", "--shard", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    dataset = TokenDataset(tmp_path / "shard")
    assert len(dataset) == 60
    codes = np.load(tmp_path / "shard" / "shard.codes.npy", mmap_mode="r")
    assert codes.dtype == np.uint8 and codes.size == 60 * 49  # K=32 fits a byte
    model = load(model_path)
    first = dataset.meta(0)["source"]
    x = data.load_image(images / first).float().div(255).unsqueeze(0)
    assert torch.equal(dataset[0], model.encode(x)[0])
    again = invoke("encode", model_path, images, "--out", tmp_path / "shard", "--shard")
    assert again.exit_code == 1 and "--force" in again.stderr


def test_inspect_reads_shards_as_it_reads_token_files(model_path: Path, images: Path, tmp_path: Path) -> None:
    for args in ((), ("--shard",)):
        assert invoke("encode", model_path, images, "--out", tmp_path / f"t{len(args)}", *args).exit_code == 0
    files = json.loads(invoke("inspect", tmp_path / "t0", "--json").stdout)
    for source in (tmp_path / "t1", tmp_path / "t1" / "shard.shard.json"):
        result = invoke("inspect", source, "--json")
        assert result.exit_code == 0, result.output
        shard = json.loads(result.stdout)
        assert shard["files"] == files["files"] == 60 and shard["stages"] == files["stages"]


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory, sample_images: Path) -> Path:
    """Three 112 x 112 images of 4 x 4 digits each: 784 codes a file, enough for entropy coding to pay for its
    header fields (a 28 x 28 digit's 49 codes are not)."""
    folder = tmp_path_factory.mktemp("data") / "mosaics"
    folder.mkdir()
    digits = [np.asarray(Image.open(p)) for p in sorted(sample_images.glob("*.png"))[:48]]
    for i in range(3):
        rows = [np.concatenate(digits[16 * i + 4 * r:16 * i + 4 * r + 4], axis=1) for r in range(4)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(folder / f"mosaic{i}.png")
    return folder


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory, model_path: Path, mosaics: Path) -> Path:
    """The test model with the code counts of its own codes on the mosaics: the skewed table a longer training
    leaves (the test model's 40 steps with dead-code restarts leave it near uniform)."""
    model = load(model_path)
    x = torch.stack([data.load_image(p) for p in sorted(mosaics.glob("*.png"))]).float().div(255)
    codes = model.encode(x)
    for s, vq in enumerate(model.quantizer.quantizers):
        vq.counts.copy_(torch.bincount(codes[:, s].reshape(-1), minlength=vq.counts.numel()))
    path = tmp_path_factory.mktemp("fitted") / "model.safetensors"
    save_model(model, path)
    return path


def test_entropy_codec_round_trips(fitted_model: Path, images: Path, mosaics: Path, tmp_path: Path) -> None:
    model_table = code_table(load(fitted_model))  # a trained model carries context tables
    assert isinstance(model_table, ContextTable)
    for name, folder in (("digits", images), ("mosaics", mosaics)):
        for codec in ("packed", "entropy"):
            out = tmp_path / name / codec[0]
            assert invoke("encode", fitted_model, folder, "--out", out, "--codec", codec).exit_code == 0
        for packed in sorted((tmp_path / name / "p").rglob("*.vqt"))[:5]:
            entropy = tmp_path / name / "e" / packed.relative_to(tmp_path / name / "p")
            if name == "digits":  # entropy coding would cost more than packing: the file is written packed
                assert entropy.read_bytes() == packed.read_bytes()
            else:
                assert entropy.stat().st_size < packed.stat().st_size
                header = read_tokens(entropy, table=model_table).header
                assert (header["codec"], header["table"]) == ("entropy", "context")
            assert np.array_equal(read_tokens(entropy, table=model_table).codes, read_tokens(packed).codes)
    assert invoke("decode", fitted_model, tmp_path / "mosaics" / "e", "--out", tmp_path / "r").exit_code == 0
    assert len(list((tmp_path / "r").rglob("*.png"))) == 3


def test_inspect_entropy_coded_tokens_needs_the_model(fitted_model: Path, mosaics: Path, tmp_path: Path) -> None:
    assert invoke("encode", fitted_model, mosaics, "--out", tmp_path / "e", "--codec", "entropy").exit_code == 0
    without = invoke("inspect", tmp_path / "e")
    assert without.exit_code == 1 and "--model" in without.stderr
    with_model = invoke("inspect", tmp_path / "e", "--model", fitted_model, "--json")
    assert with_model.exit_code == 0 and json.loads(with_model.stdout)["tokens"] == 3 * 28 * 28


def test_eval_plot_draws_the_first_images(model_path: Path, images: Path, tmp_path: Path) -> None:
    result = invoke("eval", model_path, images, "--plot", tmp_path / "recon.png")
    assert result.exit_code == 0, result.output
    picture = Image.open(tmp_path / "recon.png")
    assert picture.width > 28 and picture.height > 56
    staged = invoke("eval", model_path, images, "--stages", "1", "--json")
    assert staged.exit_code == 0 and json.loads(staged.stdout)["stages"] == 1
    too_many = invoke("eval", model_path, images, "--stages", "2")  # the test model has one stage
    assert too_many.exit_code == 1 and "--stages" in too_many.stderr


def test_folder_runs_skip_a_damaged_token_file_and_exit_1(model_path: Path, images: Path, tmp_path: Path) -> None:
    assert invoke("encode", model_path, images, "--out", tmp_path / "e", "--codec", "entropy").exit_code == 0
    damaged = sorted((tmp_path / "e").rglob("*.vqt"))[3]
    data = bytearray(damaged.read_bytes())
    data[-6] ^= 0x01  # a payload bit: the CRC catches it
    damaged.write_bytes(bytes(data))
    for args in (("decode", model_path, tmp_path / "e", "--out", tmp_path / "r"),
                 ("inspect", tmp_path / "e", "--model", model_path)):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert f"{damaged.name}: checksum mismatch" in result.stderr.replace("\n", "")
    assert len(list((tmp_path / "r").rglob("*.png"))) == 59


def test_train_init_fine_tunes_and_refuses_model_options(model_path: Path, images: Path, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned"
    result = invoke("train", images, "--out", tuned, "--init", model_path, "--steps", "4", "--batch-size", "16",
                    "--checkpoint-every", "4", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert load(tuned / "model.safetensors").config == load(model_path).config
    result = invoke("train", images, "--out", tmp_path / "a", "--init", model_path, "--channels", "64",
                    "--strides", "2,4", "--steps", "4")
    assert result.exit_code == 1 and "drop --channels, --strides" in result.output
    result = invoke("train", images, "--out", tmp_path / "b", "--init", "speech", "--steps", "4")
    assert result.exit_code == 1 and "speech: an audio model cannot be trained on image files" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
