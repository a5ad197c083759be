"""The shipped tokenizers: every recipe's model is in models/ and `vqtok eval` reproduces its card on the sample
kept in the repository; names resolve wherever a command takes a model, from any folder; `vqtok models` lists
them; the wheel carries them; tools/build_models.py turns a run into a model card."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vqtok import zoo
from vqtok.cli import app
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.errors import VqtokError
from vqtok.modelfile import load, save_model
from vqtok.nets.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

_spec = importlib.util.spec_from_file_location("build_models", ROOT / "tools" / "build_models.py")
build_models = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build_models  # its dataclass looks its module up there
_spec.loader.exec_module(build_models)

# A card's sample figures are measured by the same code on the same files, so they come back exactly on the
# machine that built it; elsewhere another CPU's kernels or thread count change float sums in their last bits,
# which can move the odd code to a neighbour with an almost equal distance. On a 20-file sample one such code
# moves PSNR / SI-SNR by a few thousandths of a dB and an entropy-coded file by a few bits: 0.05 dB and 1% of
# the rate leave room for that, while another model or a change in what eval measures moves them further.
DB_TOLERANCE = 0.05
RATE_TOLERANCE = 0.01
# Every shipped model rides in the wheel and the repository: each stays under 40 MB (the speech model takes 36.6
# MB: 12 M net parameters in float16, 24 MB, and 8 codebooks of 16,384 codes with their usage statistics, 8 MB),
# all together well under PyPI's 100 MB per file.
MAX_MODEL_BYTES = 40_000_000
MAX_ALL_MODELS_BYTES = 60_000_000


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def card_of(name: str) -> dict:
    """The card of a model the repository ships; fails (not skips) when it is missing."""
    folder = ROOT / "models" / name
    for file in (zoo.MODEL_FILE, zoo.CARD_FILE, "README.md"):
        if not (folder / file).is_file():
            pytest.fail(f"models/{name}/{file} missing: run python tools/build_models.py {name}")
    return json.loads((folder / zoo.CARD_FILE).read_text())


@pytest.mark.parametrize("name", list(build_models.RECIPES))
def test_card_records_its_recipes_commands(name: str) -> None:
    commands = build_models.RECIPES[name].commands()
    assert card_of(name)["training"]["command"] == " && ".join(shlex.join(command) for command in commands)


@pytest.mark.parametrize("name", list(build_models.RECIPES))
def test_card_figures_are_reproduced_by_eval(name: str, one_torch_thread) -> None:
    card = card_of(name)
    assert (ROOT / "models" / name / zoo.MODEL_FILE).stat().st_size < MAX_MODEL_BYTES
    assert sum(p.stat().st_size for p in (ROOT / "models").glob(f"*/{zoo.MODEL_FILE}")) < MAX_ALL_MODELS_BYTES
    assert card["sample"]["data"] == build_models.RECIPES[name].sample
    quality = zoo.QUALITY[card["modality"]][0]
    for row in card["sample"]["rows"]:
        result = invoke("eval", name, ROOT / card["sample"]["data"], "--stages", int(row["stages"]),
                        "--device", "cpu", "--json")
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        assert got[quality] == pytest.approx(row[quality], abs=DB_TOLERANCE), (name, row["stages"], quality)
        for rate in zoo.RATES[card["modality"]]:
            assert got[rate] == pytest.approx(row[rate], rel=RATE_TOLERANCE), (name, row["stages"], rate)


def test_refresh_measures_the_shipped_model_again_and_keeps_its_training(tmp_path: Path, one_torch_thread) -> None:
    name = "mnist"
    folder = tmp_path / name
    shutil.copytree(ROOT / "models" / name, folder)
    card = json.loads((folder / zoo.CARD_FILE).read_text())
    stale_rows = [{**row, "bpp_packed_file": 99.0} for row in card["sample"]["rows"]]
    stale = {**card, "sample": {**card["sample"], "rows": stale_rows}, "limits": "old text"}
    (folder / zoo.CARD_FILE).write_text(json.dumps(stale))
    recipe = dataclasses.replace(build_models.RECIPES[name], heldout=build_models.RECIPES[name].sample)
    fresh = build_models.refresh(name, recipe, tmp_path)
    assert fresh["training"] == card["training"] and fresh["model"] == card["model"]
    assert fresh["limits"] == recipe.limits
    for got, row in zip(fresh["sample"]["rows"], card["sample"]["rows"], strict=True):
        assert got["bpp_packed_file"] == pytest.approx(row["bpp_packed_file"], rel=RATE_TOLERANCE)
    assert json.loads((folder / zoo.CARD_FILE).read_text()) == fresh
    assert "old text" not in (folder / "README.md").read_text()
    with pytest.raises(VqtokError, match="no card to refresh"):
        build_models.refresh("photos", recipe, tmp_path)


# Issue-level promise of the speech model: on speech of another corpus, speakers and rate it stays this close
# (PESQ-wb) to its LibriSpeech test-other figure.
GENERALISATION_PESQ = 0.3


def test_speech_model_generalises_to_another_corpus_and_rate(one_torch_thread) -> None:
    """samples/heldout/speech-24k: six FSDD speakers (spoken digits, not audiobooks) stored at 24 kHz, which vqtok
    resamples to the model's 16 kHz."""
    import soundfile

    card = card_of("speech")
    folder = ROOT / "samples" / "heldout" / "speech-24k"
    assert {soundfile.info(f).samplerate for f in folder.iterdir()} == {24000}
    result = invoke("eval", "speech", folder, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert abs(got["pesq_wb"] - card["headline"]["pesq_wb"]) <= GENERALISATION_PESQ, (got, card["headline"])


def test_names_work_from_any_folder(tmp_path: Path, monkeypatch, one_torch_thread) -> None:
    card_of("mnist")
    sample = ROOT / "samples" / "heldout" / "mnist"
    monkeypatch.chdir(tmp_path)
    encoded = invoke("encode", "mnist", sample, "--out", "tokens", "--json")
    assert encoded.exit_code == 0, encoded.output
    assert json.loads(encoded.stdout)["written"] == 20
    assert invoke("decode", "mnist", "tokens", "--out", "recon").exit_code == 0
    assert len(list(Path("recon").glob("*.png"))) == 20
    via_model = invoke("inspect", "mnist", "--data", sample, "--json")
    assert via_model.exit_code == 0, via_model.output
    assert json.loads(via_model.stdout)["files"] == 20
    assert invoke("inspect", "tokens", "--model", "mnist").exit_code == 0
    without_data = invoke("inspect", "mnist")
    assert without_data.exit_code == 1 and "--data" in without_data.stderr


def test_a_file_beats_a_name_and_a_folder_does_not(tmp_path: Path, monkeypatch) -> None:
    card_of("mnist")
    monkeypatch.chdir(tmp_path)
    Path("mnist").mkdir()  # e.g. a folder of digits: never a model file, so the name still means the shipped one
    assert zoo.resolve("mnist") == zoo.models_dir() / "mnist" / zoo.MODEL_FILE
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    own = Tokenizer(ModelConfig(channels=8, res_channels=8, quantizer=QuantizerConfig(dim=4, codebook_size=8)))
    save_model(own, "mnist")
    assert zoo.resolve("mnist") == Path("mnist")
    assert load("mnist").fingerprint() == own.fingerprint()
    # A path is never taken for a name, even when its last part is one.
    with pytest.raises(VqtokError, match="no such model file"):
        zoo.resolve(Path("runs") / "mnist")


def test_a_folder_means_the_model_file_in_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(VqtokError, match=f"{run}: a folder with no model.safetensors in it"):
        zoo.resolve(run)
    own = Tokenizer(ModelConfig(channels=8, res_channels=8, quantizer=QuantizerConfig(dim=4, codebook_size=8)))
    save_model(own, run / zoo.MODEL_FILE)
    assert zoo.resolve(run) == run / zoo.MODEL_FILE
    assert load(run).fingerprint() == own.fingerprint()
    assert load(zoo.models_dir() / "mnist").fingerprint() == load("mnist").fingerprint()
    result = invoke("encode", tmp_path, ROOT / "samples" / "heldout" / "mnist", "--out", tmp_path / "t")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: a folder with no model.safetensors in it; MODEL is a model file, a folder holding one "
        "(a training run), or a shipped model's name"], result.stderr


def test_unknown_name_is_one_error_listing_the_shipped_names(tmp_path: Path) -> None:
    result = invoke("encode", "mnsit", ROOT / "samples" / "heldout" / "mnist", "--out", tmp_path / "t")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mnsit: no such model file"), result.stderr
    assert zoo.names() and all(name in lines[0] for name in zoo.names())


def test_models_lists_the_cards() -> None:
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == zoo.names()
    for row in rows:
        card = card_of(row["name"])
        assert row["modality"] == card["modality"] and row["file_bytes"] == card["model"]["file_bytes"]
        assert [f["stages"] for f in row["figures"]] == [r["stages"] for r in card["eval"]["rows"]]
        for figures, full in zip(row["figures"], card["eval"]["rows"]):
            assert all(figures[k] == full[k] for k in (*zoo.RATES[row["modality"]], zoo.QUALITY[row["modality"]][0]))
    table = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and all(name in table.stdout for name in zoo.names())


def test_models_listing_does_not_import_torch() -> None:
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom vqtok.cli import app\n"
             "r = CliRunner().invoke(app, ['models', '--json'])\nprint(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "False"]


def test_the_wheel_carries_vqtok_and_the_models() -> None:
    """pyproject.toml lists the packages by hand (models/ is mapped into vqtok/models/): the list must name every
    package under vqtok/, and its package-data patterns every file a shipped model consists of."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vqtok").rglob("__init__.py"))
    assert sorted(config["packages"]) == sorted([*found, "vqtok.models"])
    assert config["package-dir"] == {"vqtok.models": "models"}
    patterns = config["package-data"]["vqtok.models"]
    for name in zoo.names():
        for file in (zoo.MODEL_FILE, zoo.CARD_FILE, "README.md"):
            assert any(fnmatch.fnmatch(f"{name}/{file}", p) for p in patterns), f"{name}/{file}"


# Tiny runs of both modalities, each with 2 stages: (training arguments, held-out sample, its files, codebook
# numbers kept as buffers (an EMA codebook, the image default), rate and quality figures of the headline).
TINY = {
    "image": (("samples/images", "--out", build_models.RUN, "--steps", "40", "--warmup", "5", "--batch-size", "16",
               "--channels", "32", "--code-dim", "16", "--codebook-size", "32", "--stages", "2",
               "--checkpoint-every", "20", "--device", "cpu"),
              "samples/heldout/mnist", 20, 2 * 32 * 16, ("bpp_packed_file", "bpp_entropy_file", "psnr", "ssim")),
    "audio": (("samples/audio", "--out", build_models.RUN, "--steps", "4", "--warmup", "1", "--channels", "16",
               "--code-dim", "8", "--codebook-size", "16", "--stages", "2", "--segment-seconds", "0.2",
               "--checkpoint-every", "4", "--num-workers", "0", "--device", "cpu"),
              "samples/heldout/speech", 3, 0, ("kbps_packed_file", "kbps_entropy_file", "si_snr", "pesq_wb", "stoi")),
}


@pytest.mark.parametrize("modality", list(TINY))
def test_build_makes_a_card_from_a_run(modality: str, tmp_path: Path, one_torch_thread) -> None:
    args, sample, files, codebook_buffers, headline = TINY[modality]
    recipe = build_models.Recipe(description=f"test {modality}", train=args, heldout=sample, sample=sample,
                                 data="samples", intended_use="tests", limits="tiny")
    run = tmp_path / "run"
    trained = invoke("train", ROOT / args[0], *(str(run) if a == build_models.RUN else a for a in args[1:]))
    assert trained.exit_code == 0, trained.output
    card = build_models.build("tiny", recipe, run, tmp_path / "models")
    folder = tmp_path / "models" / "tiny"
    assert json.loads((folder / zoo.CARD_FILE).read_text()) == card
    assert (folder / zoo.MODEL_FILE).read_bytes() == (run / "model.safetensors").read_bytes()
    assert card["modality"] == modality and card["training"]["wall_seconds"] > 0
    assert card["training"]["command"] == "vqtok train " + " ".join(args)
    assert [row["stages"] for row in card["eval"]["rows"]] == [1, 2] and card["sample"]["files"] == files
    assert card["headline"] == {"stages": 2, **{k: card["eval"]["rows"][1][k] for k in headline}}
    model = load(folder / zoo.MODEL_FILE)
    assert card["model"]["parameters"] == sum(p.numel() for p in model.parameters()) + codebook_buffers
    readme = (folder / "README.md").read_text()
    assert card["training"]["command"] in readme and "| stages |" in readme and "## Limits" in readme

    steps = args[args.index("--steps") + 1]
    changed = dataclasses.replace(recipe, train=tuple("41" if a == steps else a for a in args))
    with pytest.raises(VqtokError, match=f"--steps {steps}, the recipe says 41"):
        build_models.check_run(run, changed.train)


def test_build_trains_a_fine_tune_from_its_base(tmp_path: Path, one_torch_thread) -> None:
    args, sample = TINY["image"][:2]
    tune = ("samples/images", "--out", build_models.RUN, "--init", build_models.BASE, "--steps", "10", "--warmup", "2",
            "--batch-size", "16", "--checkpoint-every", "10", "--device", "cpu")
    recipe = build_models.Recipe(description="test fine-tune", train=args, heldout=sample, sample=sample,
                                 data="samples", intended_use="tests", limits="tiny", finetune=tune)
    run = tmp_path / "run"
    build_models.train(recipe, run)
    base = tmp_path / "run-base"
    assert build_models.finished(base) and build_models.finished(run)
    card = build_models.build("tiny", recipe, run, tmp_path / "models")
    assert card["training"]["steps"] == 50
    base_args = (build_models.BASE if a == build_models.RUN else a for a in args)
    assert card["training"]["command"] == f"vqtok train {' '.join(base_args)} && vqtok train {' '.join(tune)}"
    assert card["training"]["wall_seconds"] > build_models.wall_seconds(run / "metrics.jsonl") > 0
    readme = (tmp_path / "models" / "tiny" / "README.md").read_text()
    assert all(f"      {command}" in readme for command in card["training"]["command"].split(" && "))

    # A fine-tune of another model is not this recipe's run.
    (tmp_path / "other").mkdir()
    shutil.copytree(base, tmp_path / "other" / "run-base")
    other = tmp_path / "other" / "run"
    shutil.copytree(run, other)
    with pytest.raises(VqtokError, match="fine-tuned from .*run-base/model.safetensors, the recipe starts from"):
        build_models.check_runs(other, recipe)


def test_wall_time_adds_up_resumed_sessions(tmp_path: Path) -> None:
    lines = [{"split": "train", "step": 25, "elapsed_s": 10.0}, {"split": "val", "step": 50},
             {"split": "train", "step": 50, "elapsed_s": 20.0},
             {"split": "train", "step": 75, "elapsed_s": 4.0}, {"split": "train", "step": 100, "elapsed_s": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert build_models.wall_seconds(tmp_path / "metrics.jsonl") == 29.0
