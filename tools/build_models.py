"""Build the shipped tokenizers in models/: train each with its recipe (or adopt a finished run of it), evaluate it
on its held-out data and on the small held-out sample kept in samples/heldout/, and write models/NAME/
model.safetensors, card.json (the figures, for `vqtok models` and tests/test_models.py) and README.md (the card).

    .venv/bin/python tools/build_models.py mnist                        # train into runs/models/mnist, then card
    .venv/bin/python tools/build_models.py photos --run runs/photos     # a run of the recipe, trained already
    .venv/bin/python tools/build_models.py                              # all of them (`make models`)
    .venv/bin/python tools/build_models.py --refresh speech             # measure models/speech again, no training

Training runs the recipe's `vqtok train` command from the repository root; an interrupted build continues its
run (--resume). A recipe with a fine-tune trains in two runs: the base into RUN-base (runs/models/NAME-base),
then the fine-tune from its model into RUN. An adopted run must have been made with the recipe's command (and,
with a fine-tune, from the recipe's base run beside it): its run.json is checked against it. Wall times are the
sums of the runs' training sessions in metrics.jsonl. Set OMP_NUM_THREADS=1 on a machine
that other jobs share (as the cards' trainings ran).

The script lives outside models/ because pyproject.toml installs that folder as the package vqtok.models: a
Python file there would be installed with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqtok import zoo
from vqtok.atomic import atomic_path, write_bytes_atomic
from vqtok.errors import VqtokError

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "models"
RUN = "RUN"  # stands for the run folder in a recipe's arguments
BASE = "BASE"  # stands for the base run's folder (RUN-base) in a fine-tune's arguments


@dataclass(frozen=True)
class Recipe:
    """How one shipped model is made and judged. Paths are relative to the repository root."""

    description: str  # what it tokenizes, one line
    train: tuple[str, ...]  # the `vqtok train` arguments, RUN for the run folder
    heldout: str  # data never seen in training, for the card's table
    sample: str  # a few files of it kept in the repository, for tests/test_models.py
    data: str  # the training data: what, where from, license
    intended_use: str
    limits: str
    # A second `vqtok train` that starts from the first run's model (`--init BASE`), RUN for its folder; the
    # first run then goes into BASE. Empty: the first run is the model.
    finetune: tuple[str, ...] = ()

    def steps(self) -> list[tuple[str, ...]]:
        """The `vqtok train` arguments of each run, in order (RUN and BASE unreplaced)."""
        if not self.finetune:
            return [self.train]
        return [tuple(BASE if arg == RUN else arg for arg in self.train), self.finetune]

    def commands(self, run: str = RUN, base: str = BASE) -> list[list[str]]:
        """The `vqtok train` commands of the runs, in order, with `run` and `base` for the folders."""
        folders = {RUN: run, BASE: base}
        return [["vqtok", "train", *(folders.get(arg, arg) for arg in args)] for args in self.steps()]


def inputs_and_options(args: tuple[str, ...]) -> tuple[list[str], dict[str, str | bool]]:
    """A run's data folders and options (--channels 96 -> {"channels": "96"}; a flag -> True)."""
    inputs: list[str] = []
    options: dict[str, str | bool] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--"):
            inputs.append(arg)
        elif rest and not rest[0].startswith("--"):
            options[arg[2:].replace("-", "_")] = rest.pop(0)
        else:
            options[arg[2:].replace("-", "_")] = True
    return inputs, options


def base_run(run: Path) -> Path:
    """Where a recipe with a fine-tune trains its base: beside `run`, as RUN-base."""
    return run.with_name(f"{run.name}-base")


def run_folders(recipe: Recipe, run: Path) -> list[Path]:
    """The folders of the recipe's runs, in training order: the base run and `run`, or `run` alone."""
    return [base_run(run), run] if recipe.finetune else [run]


RECIPES: dict[str, Recipe] = {
    "mnist": Recipe(
        description="28x28 grayscale digits",
        train=("../shared/data/mnist/train", "--out", RUN, "--steps", "1200", "--checkpoint-every", "400",
               "--num-workers", "1", "--device", "cpu"),
        heldout="../shared/data/mnist/test",
        sample="samples/heldout/mnist",
        data="MNIST (Yann LeCun, Corinna Cortes, Christopher J. C. Burges): the 9,000 digits of "
             "`../shared/data/mnist/train` (the first 9,000 of the t10k set; 5% of them validate during training); "
             "usually cited as CC BY-SA 3.0, whose share-alike terms carry over to this model",
        intended_use="Tokenizing MNIST-like digits, 7x7 codes a 28x28 digit, for small experiments with token "
                     "models (an autoregressive or masked model over digit tokens), and for trying vqtok end to "
                     "end in a few seconds.",
        limits="Knows white handwritten strokes on black and nothing else: other pictures encode, but come back "
               "as digit-like blur. A short CPU training (1,200 steps): the default 3,000-step `vqtok train` "
               "reaches 25.1 dB on the same test split. Reconstructions are RGB PNGs with grey values in all "
               "three channels.",
    ),
    "cifar10": Recipe(
        description="32x32 colour images",
        train=("../shared/data/cifar10/train", "--out", RUN, "--codebook-size", "1024", "--steps", "900",
               "--checkpoint-every", "300", "--num-workers", "1", "--device", "cpu"),
        heldout="../shared/data/cifar10/test",
        sample="samples/heldout/cifar10",
        data="CIFAR-10 (Alex Krizhevsky, 2009): its 50,000 training images (`../shared/data/cifar10/train`, "
             "JPEG re-encodes at quality ~75 of the public CIFAR-10-images copy; 512 of them validate during "
             "training); research use",
        intended_use="Tokenizing small colour thumbnails like CIFAR-10's, 8x8 codes a 32x32 image: token data "
                     "for small generative or classification models, and teaching.",
        limits="Trained on 32x32 images at one scale for 900 steps on a CPU: larger photos encode (one code per "
               "4x4 pixels) but lose fine detail and texture; use `photos` for those. The training images are "
               "JPEGs at quality ~75 and the model learnt their artefacts too. CIFAR-10's terms allow research "
               "use; the same goes for this model.",
    ),
    "photos": Recipe(
        description="natural photos of any size",
        train=("../shared/data/bsds500/train", "--out", RUN, "--size", "128", "--downsample", "8", "--channels", "96",
               "--res-blocks", "6", "--res-channels", "96", "--codebook-size", "1024", "--stages", "2",
               "--stage-dropout", "0.3", "--batch-size", "16", "--steps", "14000", "--warmup", "200",
               "--checkpoint-every", "1000", "--precision", "bf16", "--num-workers", "1", "--device", "cpu"),
        heldout="../shared/data/bsds500/val",
        sample="samples/heldout/photos",
        data="BSDS500 (Arbelaez, Maire, Fowlkes, Malik, TPAMI 2011), its 200 train photos "
             "(`../shared/data/bsds500/train`, 481x321 or 321x481 JPEGs from the Corel collection; 10 of them "
             "validate during training), as random 128x128 crops; free for non-commercial research and "
             "educational use, citing the paper",
        intended_use="Tokenizing photos of any size and shape, one code per 8x8 pixels from 2 residual codebooks "
                     "of 1,024 codes; encode with 1 or 2 stages (`vqtok encode --stages N`) for two rates. "
                     "Token data for image-generation experiments, and a baseline for learned image codecs "
                     "(benchmarks/rate_distortion.py puts it beside JPEG and WebP).",
        limits="Small (96 channels) and trained on 200 photos for 14,000 steps on a CPU: fine texture, text and "
               "faces come back blurred. At both rates its entropy-coded files beat JPEG at equal bits on "
               "BSDS500 val (+2.1 and +0.4 dB); WebP is sharper at both (by 0.6 and 1.2 dB). A third stage "
               "(0.46 bpp) stayed about 1 dB below JPEG, so the model stops at two. BSDS500 allows "
               "non-commercial research and educational use only; so does this model.",
    ),
    "speech": Recipe(
        description="16 kHz speech",
        train=("../shared/data/librispeech/train-clean-100", "--out", RUN, "--audio-net", "stft",
               "--synthesis-frames", "2", "--channels", "384", "--res-blocks", "6", "--code-dim", "8",
               "--codebook-size", "16384", "--audio-loss", "complex", "--segment-seconds", "0.5",
               "--speed-perturb", "0.1", "--gain-perturb-db", "6", "--steps", "24000", "--warmup", "200", "--checkpoint-every", "1000", "--precision", "bf16",
               "--num-workers", "0", "--device", "cpu"),
        heldout="../shared/data/librispeech/test-other",
        sample="samples/heldout/speech",
        data="LibriSpeech train-clean-100 (Panayotov, Chen, Povey, Khudanpur 2015): one read-speech clip from each "
             "of its 251 speakers, 52 minutes (`../shared/data/librispeech/train-clean-100`, FLAC 16 kHz; 5% of "
             "the clips validate during training), as random 0.5 s segments; CC BY 4.0: credit LibriSpeech "
             "when you use this model",
        intended_use="Tokenizing speech at 16 kHz: 50 code frames a second from 8 residual codebooks of 16,384 "
                     "codes, 0.7 kbps a stage; decode with any number of stages (`vqtok encode --stages N`) for 0.7 "
                     "to 5.6 kbps. Tokens for speech-language-model experiments, and a low-rate codec: `vqtok encode "
                     "--refine 50` chooses the codes by analysis by synthesis (same bits, about a second per "
                     "second of audio on two CPU cores), which puts 4 stages (2.9 kbps) above Opus at 6 kbps; "
                     "at one stage `--refine 50 --search 32` also searches the codebook (about 4 s per second "
                     "of audio); `vqtok decode --postfilter 0.3` sharpens the sound at no cost in bits "
                     "(benchmarks/speech.py puts it beside Opus and Codec 2).",
        finetune=("../shared/data/librispeech/train-clean-100", "--out", RUN, "--init", BASE, "--audio-loss",
                  "complex", "--adversarial-from", "1", "--disc-filters", "16", "--segment-seconds", "0.5",
                  "--speed-perturb", "0.1", "--gain-perturb-db", "6", "--steps", "900", "--lr", "1e-4", "--warmup",
                  "50", "--checkpoint-every", "250", "--precision", "bf16", "--num-workers", "0", "--device", "cpu"),
        limits="Trained on 52 minutes of read English audiobook speech on a CPU: expect audible artefacts, "
               "more so for other languages, spontaneous or noisy speech; music and other sounds are out of "
               "scope. Any input is mixed to mono and resampled to 16 kHz. On 3 LibriSpeech test-other clips of "
               "each of its 10 speakers (PESQ-wb / STOI), plain encoding scores 1.35 / 0.788 at one stage to "
               "1.60 / 0.843 from 4 stages on, below Opus at 6 kbps (1.80 / 0.856); with `--refine 50` 4 stages "
               "(2.9 kbps) score 1.82 / 0.880, above it; one stage with `--refine 50 --search 32` (0.84 kbps), "
               "decoded with `--postfilter 0.3`, 1.65 / 0.848, above every Codec 2 mode (3.2 kbps: 1.62 / "
               "0.835). Stages after the fourth add little: they use few of their codes "
               "(benchmarks/README.md, Speech).",
    ),
}

# `vqtok train` options that run.json records under another name, or not at all.
_RENAMED = {"size": "image_size", "code_dim": "dim"}
_UNRECORDED = {"out", "num_workers", "resume", "init"}


def finished(run: Path) -> bool:
    """Whether `run` holds a finished training run (the model file is written after the last step)."""
    return (run / "model.safetensors").is_file()


def train(recipe: Recipe, run: Path) -> None:
    """Run the recipe's `vqtok train` commands from the repository root, into `run` (and its base run), skipping
    a finished run and continuing an interrupted one; records this machine and its load beside each run
    (host.json), since run.json does not."""
    for command, folder in zip(recipe.commands(str(run), str(base_run(run))), run_folders(recipe, run)):
        if finished(folder):
            continue
        resume = ["--resume"] if (folder / "run.json").exists() else []
        host = {**hardware(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "load_average": os.getloadavg()[0]}
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / "host.json", (json.dumps(host, indent=2) + "\n").encode())
        command = [sys.executable, "-m", "vqtok", *command[1:], *resume]
        print("+", shlex.join(command), file=sys.stderr)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            raise VqtokError(f"{folder}: training failed (see above)")


def check_runs(run: Path, recipe: Recipe) -> list[dict[str, Any]]:
    """The run.json of each of the recipe's runs (the base, then `run`; or `run` alone), checked with
    `check_run`; a fine-tune must also have started from the base run's model."""
    if not recipe.finetune:
        return [check_run(run, recipe.train)]
    base, tuned = recipe.steps()
    infos = [check_run(base_run(run), base), check_run(run, tuned)]
    started = (infos[1].get("init") or {}).get("path")
    if started is None or Path(started).resolve() != (base_run(run) / "model.safetensors").resolve():
        raise VqtokError(f"{run}: fine-tuned from {started}, the recipe starts from {base_run(run)}")
    return infos


def check_run(run: Path, args: tuple[str, ...]) -> dict[str, Any]:
    """The run.json of `run` once checked to be a finished run of `vqtok train` with `args`: same data, and
    every option they set recorded with the same value."""
    info_path = run / "run.json"
    if not info_path.is_file():
        raise VqtokError(f"{run}: no run.json; not a vqtok training run")
    if not finished(run):
        raise VqtokError(f"{run}: unfinished (no model.safetensors); continue it with its command plus --resume")
    info = json.loads(info_path.read_text())
    inputs, options = inputs_and_options(args)
    if [(ROOT / p).resolve() for p in info["data"]["inputs"]] != [(ROOT / p).resolve() for p in inputs]:
        raise VqtokError(f"{run}: trained on {info['data']['inputs']}, the recipe trains on {inputs}")
    recorded = {**info["model"], **info["model"]["quantizer"], **info["train"]}
    for option, value in options.items():
        if option in _UNRECORDED:
            continue
        key = _RENAMED.get(option, option)
        if key not in recorded:
            raise VqtokError(f"{run}: run.json does not record --{option.replace('_', '-')}, so the run cannot be "
                             "checked against the recipe")
        have = recorded[key]
        if not _same(have, value):
            raise VqtokError(f"{run}: trained with --{option.replace('_', '-')} {have}, the recipe says {value}")
    return info


def _same(recorded: Any, given: str | bool) -> bool:
    try:
        return float(recorded) == float(given)
    except (TypeError, ValueError):
        return str(recorded) == str(given)


def wall_seconds(metrics: Path) -> float:
    """Seconds the run's training steps took, from its metrics.jsonl: a resumed run restarts the clock
    (elapsed_s), so each session's last figure is added up."""
    total = last = 0.0
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") != "train":
            continue
        if record["elapsed_s"] < last:
            total += last
        last = record["elapsed_s"]
    return total + last


def hardware() -> dict[str, Any]:
    """This machine's CPU model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


def parameter_count(model: Any) -> int:
    """Numbers the model was trained to hold: its parameters plus its codebooks, which an EMA-updated codebook
    keeps as buffers (its other buffers are statistics and counters)."""
    learned = dict(model.named_parameters())
    return sum(t.numel() for name, t in model.state_dict().items() if name in learned or name.endswith(".codebook"))


def eval_table(model: Path, modality: str, stages: int, data: str) -> dict[str, Any]:
    """`vqtok eval` figures of `model` on `data` with 1 to `stages` stages, on the CPU."""
    from vqtok.jobs.report import evaluate_model

    rows = []
    for n in range(1, stages + 1):
        result = evaluate_model(model, [ROOT / data], device="cpu", stages=n)
        if result.failed:
            raise VqtokError(f"{data}: {len(result.failed)} file(s) failed, first {result.failed[0]}")
        rows.append({**result.metrics, "stages": n})  # audio figures do not name their stage count
        print(f"{data}, {n} stage(s): " + ", ".join(zoo.phrase(k, result.metrics[k]) for k in
              (*zoo.RATES[modality], *zoo.QUALITY[modality]) if k in result.metrics), file=sys.stderr)
    files = rows[0]["images"] if modality == "image" else rows[0]["files"]
    return {"data": data, "files": int(files), "rows": rows}


def figures(source: Path, recipe: Recipe) -> dict[str, Any]:
    """The card's measured part for the model file `source`: headline (all stages), eval (held-out data) and
    sample (the repository's sample) tables, and the model's size and identity."""
    from vqtok.modelfile import FINGERPRINT_KEY, VERSION_KEY, load, read_metadata

    model = load(source)
    metadata = read_metadata(source)
    modality, stages = model.config.modality, model.config.quantizer.stages
    table = eval_table(source, modality, stages, recipe.heldout)
    full = table["rows"][-1]  # all stages: the model's top rate and quality
    return {
        "headline": {"stages": stages, **{k: full[k] for k in (*zoo.RATES[modality], *zoo.QUALITY[modality])
                                          if k in full}},
        "model": {
            "parameters": parameter_count(model),
            "file_bytes": source.stat().st_size,
            "fingerprint": metadata[FINGERPRINT_KEY],
            "vqtok_version": metadata[VERSION_KEY],
            "config": json.loads(model.config.to_json()),
        },
        "eval": table,
        "sample": eval_table(source, modality, stages, recipe.sample),
    }


def build(name: str, recipe: Recipe, run: Path, models: Path) -> dict[str, Any]:
    """Evaluate the run's model, then write it, its card.json and its README.md into models/NAME/; returns the
    card."""
    infos = check_runs(run, recipe)
    source = run / "model.safetensors"
    add_context_tables(source, recipe)
    store_half_nets(source)
    host_file = run / "host.json"
    measured = figures(source, recipe)
    modality = measured["model"]["config"]["modality"]
    card = {
        "name": name,
        "description": recipe.description,
        "modality": modality,
        "unit": zoo.UNITS[modality],
        "headline": measured["headline"],
        "model": measured["model"],
        "training": {
            "command": " && ".join(shlex.join(command) for command in recipe.commands()),
            "data": recipe.data,
            "steps": sum(info["train"]["steps"] for info in infos),
            "wall_seconds": sum(wall_seconds(folder / "metrics.jsonl") for folder in run_folders(recipe, run)),
            # Where the run was trained when this script trained it; else the machine the card was built on.
            "hardware": json.loads(host_file.read_text()) if host_file.is_file() else hardware(),
            "hardware_recorded": host_file.is_file(),
        },
        "eval": measured["eval"],
        "sample": measured["sample"],
        "intended_use": recipe.intended_use,
        "limits": recipe.limits,
    }
    folder = models / name
    with atomic_path(folder / zoo.MODEL_FILE) as tmp:
        shutil.copyfile(source, tmp)
    write_card(folder, card)
    return card


def refresh(name: str, recipe: Recipe, models: Path) -> dict[str, Any]:
    """Measure the shipped models/NAME again and rewrite its card (figures, intended use and limits from the
    recipe), keeping how it was trained: for changes that move the figures without retraining, such as the
    token file format or the evaluation. Returns the card."""
    folder = models / name
    card_file = folder / zoo.CARD_FILE
    if not card_file.is_file():
        raise VqtokError(f"{card_file}: no card to refresh; build the model first")
    card = json.loads(card_file.read_text())
    card.update(figures(folder / zoo.MODEL_FILE, recipe), intended_use=recipe.intended_use, limits=recipe.limits)
    write_card(folder, card)
    return card


def write_card(folder: Path, card: dict[str, Any]) -> None:
    """card.json and README.md (`card_markdown`) of a model folder, atomically."""
    write_bytes_atomic(folder / zoo.CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
    write_bytes_atomic(folder / "README.md", card_markdown(card).encode())


def add_context_tables(source: Path, recipe: Recipe) -> None:
    """Give a model trained before `vqtok train` fitted context tables its tables, fitted to the recipe's
    training files, rewriting the file in place (same weights and fingerprint; metadata kept)."""
    from vqtok.data.io import find_inputs
    from vqtok.jobs.contexts import fit_context_table
    from vqtok.modelfile import CONFIG_KEY, FINGERPRINT_KEY, VERSION_KEY, load, read_metadata, save_model

    model = load(source)
    if model.context_table is not None:
        return
    print(f"{source}: fitting context tables", file=sys.stderr)
    inputs, _ = inputs_and_options(recipe.train)
    model.context_table = fit_context_table(model, find_inputs([ROOT / p for p in inputs])[1])
    kept = {k: v for k, v in read_metadata(source).items() if k not in (CONFIG_KEY, VERSION_KEY, FINGERPRINT_KEY)}
    save_model(model, source, extra=kept)


def store_half_nets(source: Path) -> None:
    """Rewrite the run's model with its nets' weights in float16 (`save_model(half_nets=True)`), in place, so
    that the shipped file is about half the size; metadata kept. What the card measures is this file."""
    from safetensors import safe_open

    from vqtok.modelfile import CONFIG_KEY, FINGERPRINT_KEY, NETS, VERSION_KEY, load, read_metadata, save_model

    with safe_open(str(source), framework="pt") as f:
        if not any(f.get_slice(k).get_dtype() == "F32" for k in f.keys() if k.startswith(NETS)):
            return
    kept = {k: v for k, v in read_metadata(source).items() if k not in (CONFIG_KEY, VERSION_KEY, FINGERPRINT_KEY)}
    print(f"{source}: storing the nets' weights in float16", file=sys.stderr)
    save_model(load(source), source, extra=kept, half_nets=True)


def card_markdown(card: dict[str, Any]) -> str:
    """The model card: what the model is, how it was made, its figures, intended use and limits."""
    name, config = card["name"], card["model"]["config"]
    q, t, m = config["quantizer"], card["training"], card["model"]
    bits = (q["codebook_size"] - 1).bit_length()
    if card["modality"] == "image":
        f = config["downsample"]
        shape = f"one code per {f}x{f} pixels"
        use = f"`vqtok encode {name} pictures/ --out tokens/`, `vqtok decode {name} tokens/ --out recon/`"
    else:
        hop = math.prod(config["audio_strides"])
        shape = f"{config['sample_rate'] / hop:g} code frames a second at {config['sample_rate']} Hz"
        use = f"`vqtok encode {name} talk.flac --out tokens/`, `vqtok decode {name} tokens/ --out recon/`"
    stages = f"{q['stages']} residual codebooks" if q["stages"] > 1 else "one codebook"
    every = f", all {q['stages']} stages" if q["stages"] > 1 else ""
    hw = t["hardware"]
    where = f"{hw['cpu']}, {hw['cores']} cores"
    if t["hardware_recorded"]:
        if hw.get("omp_num_threads"):
            where += f", OMP_NUM_THREADS={hw['omp_num_threads']}"
        if hw.get("load_average") is not None:
            where += f"; 1-minute load average {hw['load_average']:.1f} from other jobs when training began"
        if hw.get("note"):
            where += f"; {hw['note']}"
    else:
        where += ": the machine this card was built on, as the run did not record its own"
    minutes, seconds = divmod(round(t["wall_seconds"]), 60)
    # The rebuild hint keeps the thread count the training ran with, where the run recorded it.
    threads = f"OMP_NUM_THREADS={hw['omp_num_threads']} " if t["hardware_recorded"] and hw.get("omp_num_threads") else ""
    steps = t["command"].split(" && ")
    commands = (["- Command, from the repository root (RUN: a new run folder):", "", f"      {steps[0]}"]
                if len(steps) == 1 else
                ["- Commands, from the repository root (BASE and RUN: two new run folders): a base run, then a "
                 "fine-tune from its model:", "", *(f"      {step}" for step in steps)])
    lines = [
        f"# `{name}`: {card['description']}",
        "",
        f"A vqtok {card['modality']} tokenizer: {shape}, from {stages} of {q['codebook_size']:,} codes "
        f"({bits} bits a code). {m['parameters']:,} parameters (nets and codebooks); `model.safetensors` is "
        f"{m['file_bytes'] / 1e6:.1f} MB ({m['file_bytes']:,} bytes). Made with vqtok {m['vqtok_version']}, "
        f"fingerprint `{m['fingerprint']}`.",
        "",
        f"On its held-out data{every}: "
        + ", ".join(zoo.phrase(k, v) for k, v in card["headline"].items() if k != "stages") + ".",
        "",
        f"Use it by name from any folder: {use}, `vqtok eval {name} heldout/`.",
        "",
        "## Training",
        "",
        f"- Data: {t['data']}.",
        *commands,
        "",
        f"- {t['steps']:,} steps in {minutes} min {seconds:02d} s of training ({where}).",
        f"- Rebuild this model and card: `{threads}.venv/bin/python tools/build_models.py {name}` "
        "(trains, then evaluates).",
        "",
        "## Evaluation",
        "",
        f"`vqtok eval {name} {card['eval']['data']} --stages N` on the CPU: {card['eval']['files']:,} held-out "
        "files, none seen in training. Rates are those of the token files `vqtok encode` writes (header "
        "included, which weighs most on small files), packed and with `--codec entropy`, beside the codes "
        "alone.",
        "",
        *_table(card["modality"], card["eval"]["rows"]),
        "",
        f"The same on the sample kept in the repository, `{card['sample']['data']}` "
        f"({card['sample']['files']} files); tests/test_models.py checks that `vqtok eval` reproduces it:",
        "",
        *_table(card["modality"], card["sample"]["rows"]),
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Limits",
        "",
        card["limits"],
        "",
    ]
    return "\n".join(lines)


def _table(modality: str, rows: list[dict[str, float]]) -> list[str]:
    """A markdown table of eval figures, one line per stage count."""
    codes = "bits_per_pixel" if modality == "image" else "kbps"
    more = ("ms_ssim",) if modality == "image" else ("mel_distance",)
    keys = [k for k in (codes, *zoo.RATES[modality], *zoo.QUALITY[modality], *more, "usage", "perplexity")
            if k in rows[0]]
    head = ["stages", *(f"{zoo.FIGURES[k][1]}: {zoo.FIGURES[k][0]}" if k in (codes, *zoo.RATES[modality])
                        else zoo.heading(k) for k in keys)]
    return ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head),
            *("| " + " | ".join([str(int(row["stages"])), *(zoo.show(k, row[k]) for k in keys)]) + " |"
              for row in rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to build: {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--run", type=Path, help="a finished run of the recipe to adopt instead of training "
                                                 "(one NAME only)")
    parser.add_argument("--refresh", action="store_true",
                        help="measure the shipped models again and rewrite their cards; no training")
    args = parser.parse_args(argv)
    names = args.names or list(RECIPES)
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        parser.error(f"no recipe for {', '.join(unknown)} (recipes: {', '.join(RECIPES)})")
    if args.run is not None and len(names) != 1:
        parser.error("--run takes one NAME")
    if args.run is not None and args.refresh:
        parser.error("--refresh measures the shipped model; it takes no --run")
    try:
        for name in names:
            if args.refresh:
                refresh(name, RECIPES[name], ROOT / "models")
                print(f"models/{name}: card measured again: models/{name}/README.md")
                continue
            run = args.run or RUNS / name
            if args.run is None and not finished(run):
                train(RECIPES[name], run)
            card = build(name, RECIPES[name], run, ROOT / "models")
            print(f"models/{name}: {card['model']['file_bytes'] / 1e6:.1f} MB, card: models/{name}/README.md")
    except VqtokError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
