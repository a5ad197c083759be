"""Training loop: AdamW with warm-up and cosine decay, data streamed from disk by DataLoader workers, held-out
validation, atomic checkpoints, exact resume, and several processes under torchrun.

A run directory holds:
  run.json            configs, seed, data summary, the model it started from (--init), vqtok version (written
                      once, checked on --resume)
  metrics.jsonl       one JSON object per logged step ("split": "train") and per validation ("split": "val")
  checkpoints/        step_NNNNNNN.safetensors: model + optimizer + RNG state (the last few are kept)
  previews/           step_NNNNNNN.png: validation inputs above, reconstructions below
  model.safetensors   the final model (weights + config), what encode/decode/eval take

Under torchrun every process trains on its block of each global batch (`--batch-size` is the global batch, so
a run's result does not depend on how many processes share it); the nets are wrapped in
DistributedDataParallel and the quantizer keeps its own state identical on every rank (see
vqtok.quantize.upkeep). Only rank 0 writes to the run directory.

An audio run with `adversarial_from` set trains a discriminator alongside from that step on
(vqtok.training.adversarial); it lives in the checkpoints but not in the final model file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, NoReturn, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from vqtok import __version__, zoo
from vqtok.atomic import write_bytes_atomic
from vqtok.config import ModelConfig, TrainConfig
from vqtok.data import io as data
from vqtok.data.readers import default_workers
from vqtok.data.streams import Batch, BatchPlan, batches_of, collate, unwrap_worker_errors
from vqtok.defaults import MODEL_FIELDS, QUANTIZER_FIELDS, TRAIN_FIELDS
from vqtok.errors import VqtokError
from vqtok.jobs.contexts import fit_context_table
from vqtok.modelfile import FINGERPRINT_KEY, load, read_metadata, save_model
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training import distributed
from vqtok.training.adversarial import Adversary
from vqtok.training.audioloss import complex_window, mel_sizes, spectral_scales
from vqtok.training.audiosets import AudioTask, default_sample_rate
from vqtok.training.checkpoint import load_checkpoint, save_checkpoint, truncate_metrics
from vqtok.training.distributed import Processes
from vqtok.training.imagesets import ImageTask

Task = ImageTask | AudioTask


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced. `final` (validation figures) is filled on rank 0
    only; `model` is this process's trained model, `discriminator` its discriminator in a run with an
    adversarial stage (a training-only part: the model file does not hold it)."""

    run_dir: Path
    model_path: Path
    steps: int
    seconds: float
    steps_per_second: float
    train_files: int
    val_files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    model: Tokenizer | None = field(default=None, repr=False)
    discriminator: nn.Module | None = field(default=None, repr=False)


# A callback that receives (step, total_steps, metrics) after each logged step; the CLI draws a progress bar.
ProgressFn = Callable[[int, int, dict[str, float]], None]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    inputs: Sequence[Path],
    out: Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    size: int | None = None,
    sample_rate: int | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    num_workers: int | None = None,
    on_progress: ProgressFn | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a tokenizer on the files under `inputs` and write the run directory `out`.

    The modality comes from the files. `size` is the image training crop side (None: fits the data);
    `sample_rate` the audio model's rate in Hz (None: the most common rate among the files). With `resume`,
    training continues from the newest checkpoint in `out` with the stored configs. `init` (fine-tuning): a model
    file or shipped model name to start from; its architecture, quantizer, rate or size and weights replace
    `model_config`, `size` and `sample_rate`, and its codebooks count as initialised. A run stopped before its
    first checkpoint resumes from step 0 with its stored configs. `num_workers`: DataLoader
    worker processes reading files (0: read in this process; None: picked from the core count). Started by
    torchrun, this process joins the process group and trains its share of every batch.
    """
    procs = distributed.start(train_config.device)
    try:
        result = _train(procs, inputs, Path(out), model_config, train_config, size, sample_rate, resume, init,
                        default_workers() if num_workers is None else num_workers,
                        on_progress if procs.main else None, (on_status or (lambda _m: None)) if procs.main
                        else (lambda _m: None))
        # Rank 0 still fits the context tables, saves and validates after the others are done. A rank that tore
        # down its gloo connections and exited meanwhile could abort in the transport's threads (seen in
        # a test run: "terminate called without an active exception"), so every rank leaves together. On an
        # error there is no waiting: torchrun stops the other ranks when one fails.
        procs.barrier()
        return result
    finally:
        procs.close()


def _train(procs: Processes, inputs: Sequence[Path], out: Path, model_config: ModelConfig,
           train_config: TrainConfig, size: int | None, sample_rate: int | None, resume: bool,
           init: str | Path | None, workers: int, on_progress: ProgressFn | None,
           status: Callable[[str], None]) -> TrainResult:
    train_config.validate()
    if workers < 0:
        raise VqtokError(f"--num-workers must be >= 0, got {workers}")
    if train_config.batch_size % procs.world:
        raise VqtokError(f"--batch-size {train_config.batch_size} must be a multiple of the {procs.world} "
                         "processes (it is the global batch, split evenly across them)")
    _check_out(out)
    modality, paths = data.find_inputs(list(inputs))
    starting = _starting_model(init, modality, size, sample_rate) if init is not None and not resume else None
    if starting is not None:
        model_config = starting.config
    model_config, train_config = _run_configs(out, paths, modality, model_config, train_config, size,
                                              sample_rate, resume, fitted=starting is not None)
    if train_config.precision == "bf16" and procs.device.type not in ("cpu", "cuda"):
        raise VqtokError(f"--precision bf16 runs on cpu or cuda, not {procs.device.type}")
    if train_config.adversarial_from and modality != "audio":
        raise VqtokError("--adversarial-from is for audio models only (its discriminator reads spectrograms); "
                         "these files are images")
    if (train_config.speed_perturb or train_config.gain_perturb_db) and modality != "audio":
        raise VqtokError("--speed-perturb and --gain-perturb-db are for audio models only; these files are images")
    if train_config.single_stage and model_config.quantizer.stages == 1:
        raise VqtokError("--single-stage needs a model with several residual stages; this one has 1")
    status(f"found {len(paths)} {modality} files")
    task: Task = ImageTask(paths, model_config, train_config) if modality == "image" else \
        AudioTask(paths, model_config, train_config)
    if isinstance(task, AudioTask):
        _check_segment(task.train_data.length, model_config, train_config.audio_loss)
    # Made apart from the global RNG (so the model's initialisation does not depend on it), and before the run
    # directory is written, since it checks the segment length.
    adversary = Adversary(model_config.sample_rate, task.train_data.length, train_config, procs) \
        if train_config.adversarial_from else None

    torch.manual_seed(train_config.seed)
    model = Tokenizer(model_config).to(procs.device)
    if starting is not None:
        model.load_state_dict(starting.state_dict())
    procs.barrier()  # every rank has checked the run directory before rank 0 writes to it
    # Written once the model is built, so a config the model refuses leaves no run behind.
    if procs.main and not resume:
        _write_run_info(out, inputs, paths, task, model_config, train_config, init)
    optimizer = torch.optim.AdamW(model_param_groups(model, train_config.lr), lr=train_config.lr,
                                  weight_decay=train_config.weight_decay)
    first = 0
    if resume:
        restored = load_checkpoint(out, *_checkpointed(model, optimizer, adversary))
        for line in restored.unreadable:
            status(f"skipped {line}")
        first = restored.step
        status(f"resuming from step {first} ({restored.path})" if restored.path is not None else
               "no checkpoint yet: starting from step 0 with the stored configs")
    run = _Run(procs, task, model, optimizer, adversary, train_config, out, workers, on_progress)
    begin = time.perf_counter()
    run.steps(first)
    seconds = time.perf_counter() - begin
    skipped = sorted(set(procs.gather(sorted(run.skipped))))
    final: dict[str, float] = {}
    if procs.main:
        model.eval()
        status("fitting the entropy codec's context tables")
        # It reads training files the steps may never have drawn: a bad one among them is reported too.
        unread: list[tuple[str, str]] = []
        model.context_table = fit_context_table(model, [Path(p) for p in task.train_data.paths], train_config.seed,
                                                on_error=lambda path, why: unread.append((str(path), why)))
        skipped = sorted(set(skipped) | set(unread))
        save_model(model, out / "model.safetensors",
                   extra={"vqtok.train": json.dumps(dataclasses.asdict(train_config))})
        final = run.validate()
    ran = train_config.steps - first
    return TrainResult(out, out / "model.safetensors", train_config.steps, seconds,
                       ran / seconds if seconds > 0 else 0.0, len(task.train_data), len(task.val_data),
                       skipped, final, procs.rank, model, adversary.disc if adversary else None)


def _run_configs(out: Path, paths: list[Path], modality: str, model_config: ModelConfig,
                 train_config: TrainConfig, size: int | None, sample_rate: int | None,
                 resume: bool, fitted: bool = False) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run uses: the stored ones on resume (after checking the data is the same), else the given
    ones, fitted to the data unless `fitted` (a model to start from fixed them)."""
    run_file = out / "run.json"
    if resume:
        stored = stored_run(out)
        # Runs started before fingerprints hashed resolved paths stored the hash of the paths as spelled.
        if stored.fingerprint not in (_files_fingerprint(paths), _files_fingerprint(paths, resolve=False)):
            raise VqtokError(f"{out}: the data files differ from the ones this run started with; cannot resume")
        return stored.model, dataclasses.replace(stored.train, device=train_config.device)
    if run_file.exists():
        raise VqtokError(f"{out} already holds a training run; pass --resume to continue it or pick another --out")
    if not fitted:
        model_config = _fit_model_config(model_config, modality, paths, size, sample_rate)
    model_config.validate()
    return model_config, train_config


class StoredRun(NamedTuple):
    """What a run directory's run.json records: its configs, the fingerprint of its data files and the model
    it started from (the name or path given to --init; None: it started from scratch)."""

    model: ModelConfig
    train: TrainConfig
    fingerprint: str
    init: str | None


def stored_run(out: Path) -> StoredRun:
    """The record of the run in `out`, to resume it; VqtokError naming run.json when it is absent or damaged."""
    run_file = out / "run.json"
    if not run_file.exists():
        raise VqtokError(f"{out}: nothing to resume (no run.json); start a new run without --resume")
    try:
        info = json.loads(run_file.read_text())
        return StoredRun(ModelConfig.from_json(json.dumps(info["model"])), TrainConfig(**info["train"]),
                         info["data"]["fingerprint"], info.get("init", {}).get("model"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, VqtokError) as err:
        raise VqtokError(f"{run_file}: not a readable run record ({' '.join(str(err).split())}); "
                         "start a new run in another --out") from None


def check_resume_options(out: Path, given: dict[str, Any]) -> None:
    """With --resume a run goes on with the configs it stored: refuse options the user gave whose values differ
    from the run's, rather than ignore them. `given`: the options typed on the command line, named and valued
    as vqtok.defaults.training_configs takes them, plus "size", "sample_rate" and "init" as `train` takes them.
    Options that do not shape the run (device) are free."""
    run = stored_run(out)
    model, quantizer = run.model, run.model.quantizer
    stored: dict[str, Any] = {name: getattr(quantizer, field) for name, field in QUANTIZER_FIELDS.items()}
    stored |= {name: getattr(model, field) for name, field in MODEL_FIELDS.items()}
    stored |= {name: getattr(run.train, field) for name, field in TRAIN_FIELDS.items() if name != "device"}
    stored["init"] = run.init
    if model.modality == "image":
        stored["size"] = model.image_size
    else:
        stored["sample_rate"] = model.sample_rate
        # An audio model's downsampling is its strides' product, whatever --downsample said.
        del stored["downsample"]
    differ = [f"--{name.replace('_', '-')} {_shown(value)} (the run's: {_shown(stored[name])})"
              for name, value in given.items() if name in stored and value != stored[name]]
    if differ:
        raise VqtokError(f"{out}: --resume continues the run with its stored options, and these differ: "
                         f"{', '.join(differ)}; drop them, or start a new run in another --out")


def _shown(value: Any) -> str:
    """An option value as typed: strides as 2,4,5,8."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def single_stage_step(config: TrainConfig, step: int) -> bool:
    """Whether training step `step` quantizes with the first stage alone: on the share `config.single_stage` of
    the steps, drawn from the seed and the step only, so a resumed run and every process agree."""
    share = config.single_stage
    return share > 0 and random.Random(config.seed * 1_000_003 + step).random() < share


def _starting_model(init: str | Path, modality: str, size: int | None, sample_rate: int | None) -> Tokenizer:
    """The model a fine-tuning run starts from, after checking it fits the training files."""
    model = load(init)
    config = model.config
    if config.modality != modality:
        raise VqtokError(f"{init}: an {config.modality} model cannot be trained on {modality} files")
    if size is not None or sample_rate is not None:
        raise VqtokError(f"{init}: the image size and sample rate are the starting model's "
                         f"({config.image_size} px, {config.sample_rate} Hz); drop --size and --sample-rate")
    return model


def _write_run_info(out: Path, inputs: Sequence[Path], paths: list[Path], task: Task, model_config: ModelConfig,
                    train_config: TrainConfig, init: str | Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "vqtok_version": __version__,
        "model": json.loads(model_config.to_json()),
        "train": dataclasses.asdict(train_config),
        "seed": train_config.seed,
        "data": {
            "inputs": [str(p) for p in inputs],
            "files": len(paths),
            "train_files": len(task.train_data),
            "val_files": len(task.val_data),
            "fingerprint": _files_fingerprint(paths),
        },
    }
    if init is not None:
        path = zoo.resolve(init)
        info["init"] = {"model": str(init), "path": str(path), "fingerprint": read_metadata(path)[FINGERPRINT_KEY]}
    write_bytes_atomic(out / "run.json", (json.dumps(info, indent=2) + "\n").encode())


def _checkpointed(model: Tokenizer, optimizer: torch.optim.Optimizer, adversary: Adversary | None
                  ) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
    """The modules and optimizers a checkpoint holds, by the names they are stored under: the alternating
    codebook steps' inner optimizers too, so a resumed run continues exactly."""
    modules: dict[str, nn.Module] = {"model": model}
    optimizers = {"optim": optimizer}
    for stage, vq in enumerate(model.quantizer.quantizers):
        inner = vq.inner_optimizer()
        if inner is not None:
            optimizers[f"vq{stage}_optim"] = inner
    if adversary is not None:
        modules["disc"], optimizers["disc_optim"] = adversary.disc, adversary.optimizer
    return modules, optimizers


class _Run:
    """The state of the steps of one run on one process: model (wrapped for DDP), optimizer, the adversarial
    stage if any, data, logs."""

    def __init__(self, procs: Processes, task: Task, model: Tokenizer, optimizer: torch.optim.Optimizer,
                 adversary: Adversary | None, config: TrainConfig, out: Path, workers: int,
                 on_progress: ProgressFn | None):
        self.procs, self.task, self.model, self.optimizer = procs, task, model, optimizer
        self.adversary = adversary
        self.config, self.out, self.workers, self.on_progress = config, out, workers, on_progress
        self.skipped: set[tuple[str, str]] = set(task.skipped)
        # Stage dropout, single-stage steps and the alternating inner step leave parameters out of some steps'
        # graphs.
        q = model.config.quantizer
        unused = q.alternate or (q.stages > 1 and (q.stage_dropout > 0 or config.single_stage > 0))
        self.net = procs.wrap(model, find_unused_parameters=unused)

    def _loader(self, dataset: Any, batches: Iterable[list[Any]], workers: int) -> DataLoader:
        # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, which would make
        # the model's random draws depend on the number of loaders made so far.
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                          pin_memory=self.procs.device.type == "cuda", generator=torch.Generator(),
                          prefetch_factor=4 if workers else None)

    def steps(self, start: int) -> None:
        """Train from step `start` (a checkpoint's, or 0) to the end, logging, validating and checkpointing as
        configured."""
        cfg, task = self.config, self.task
        self.saved = start  # the step of the newest checkpoint on disk (0: none)
        plan = BatchPlan(len(task.train_data), cfg.batch_size, cfg.seed, start, cfg.steps, self.procs.rank,
                         self.procs.world, task.weights)
        metrics_path = self.out / "metrics.jsonl"
        if self.procs.main:
            truncate_metrics(metrics_path, start)
        self.model.train()
        self._clock = (start, time.perf_counter(), time.perf_counter())
        with (metrics_path.open("a") if self.procs.main else _NoFile()) as log:
            loader = unwrap_worker_errors(self._loader(task.train_data, plan, self.workers))
            for step, batch in zip(range(start, cfg.steps), loader):
                outcome = self._step(step, batch)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    self._log(log, done, outcome)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    self._checkpoint(log, done)

    def _step(self, step: int, batch: Batch) -> _StepOutcome:
        lr = learning_rate(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        self.skipped.update(batch.skipped)
        x = self.task.prepare(batch.inputs.to(self.procs.device, non_blocking=True))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            out = self.net(x, 1 if single_stage_step(self.config, step) else None)
        out = out._replace(recon=out.recon.float())
        recon = self.task.reconstruction_loss(out.recon, x)
        loss = recon + sum(out.losses.values())
        adversarial: dict[str, torch.Tensor] = {}
        if self.adversary is not None and step >= self.config.adversarial_from:  # plain steps never run it
            extra, adversarial = self.adversary.step(x, out.recon)
            loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        losses = {"loss": loss.detach(), "recon": recon.detach(), **{k: v.detach() for k, v in out.losses.items()},
                  **adversarial}
        return _StepOutcome(lr, losses, out.recon.detach(), x)

    def _log(self, log: Any, done: int, step_out: _StepOutcome) -> None:
        """One metrics line: losses and batch figures averaged over the processes, codebook figures. Stops the
        run when the loss is not finite: every process sees the same mean, so all stop alike."""
        local = {"lr": step_out.lr, **{k: float(v) for k, v in step_out.losses.items()}}
        local.update(self.task.batch_metrics(step_out.recon, step_out.inputs))
        figures = self.procs.mean(local)
        if not math.isfinite(figures["loss"]):
            self._stop_diverged(done, f"the loss is {figures['loss']}")
        if not self.procs.main:
            return
        last_step, last_time, begin = self._clock
        now = time.perf_counter()
        usage = {k: float(v) for k, v in self.model.quantizer.usage_stats().items() if isinstance(v, (int, float))}
        record = {"split": "train", "step": done, **figures, **usage,
                  "steps_per_s": (done - last_step) / max(now - last_time, 1e-9), "elapsed_s": now - begin}
        self._clock = (done, now, begin)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if self.on_progress:
            self.on_progress(done, self.config.steps, record)

    def _checkpoint(self, log: Any, done: int) -> None:
        """Rank 0 validates, saves a checkpoint and a preview; the other ranks go on to the next step and wait
        for it in that step's collectives."""
        if not self.procs.main:
            self.saved = done
            return
        # Weights can turn non-finite between two logged steps; such a checkpoint could only resume into NaN.
        modules, optimizers = _checkpointed(self.model, self.optimizer, self.adversary)
        if not _finite(modules.values()):
            self._stop_diverged(done, "the weights hold NaN or infinite values")
        log.write(json.dumps({"split": "val", "step": done, **self.validate()}) + "\n")
        log.flush()
        save_checkpoint(self.out, done, modules, optimizers)
        self.saved = done
        self.model.eval()
        self.task.preview(self.model, self.out / "previews" / f"step_{done:07d}.png", self.procs.device)
        self.model.train()

    def _stop_diverged(self, done: int, what: str) -> NoReturn:
        kept = f"checkpoints up to step {self.saved} are kept" if self.saved else "no checkpoint was written"
        raise VqtokError(f"training diverged at step {done}: {what}; {kept}. Start a new run (another --out) "
                         f"with a lower --lr than {self.config.lr} or more --warmup steps than {self.config.warmup}")

    def validate(self) -> dict[str, float]:
        """Validation figures over the fixed held-out items (eval mode: no rotation, no codebook upkeep)."""
        was_training = self.model.training
        self.model.eval()
        task = self.task
        size = self.config.batch_size if task.modality == "image" else 1  # audio segments differ in length
        # Read in this process: workers forked now would copy a process grown by training, and their
        # copy-on-write pages would cost more memory than the few held-out files cost time.
        loader = self._loader(task.val_data, batches_of(task.val_items, size), 0)
        with torch.no_grad():
            result = task.evaluate(self.model, self._inputs(loader), self.procs.device)
        self.model.train(was_training)
        return result

    def _inputs(self, loader: DataLoader) -> Iterator[torch.Tensor]:
        for batch in loader:
            self.skipped.update(batch.skipped)
            yield self.task.prepare(batch.inputs)


class _StepOutcome(NamedTuple):
    """What one step leaves for its metrics line: learning rate, loss terms (detached scalars), and the batch's
    reconstructions and inputs."""

    lr: float
    losses: dict[str, torch.Tensor]
    recon: torch.Tensor
    inputs: torch.Tensor


class _NoFile:
    """Stands in for the metrics file on ranks that do not write one."""

    def __enter__(self) -> "_NoFile":
        return self

    def __exit__(self, *_: Any) -> None:
        return None


def _finite(modules: Iterable[nn.Module]) -> bool:
    """Whether every floating-point weight and buffer of `modules` is finite (one device sync)."""
    checks = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def model_param_groups(model: Tokenizer, lr: float) -> list[dict[str, Any]]:
    """Encoder + decoder weights in one group; the quantizer says how its own parameters are optimised."""
    nets = [p for n, p in model.named_parameters() if not n.startswith("quantizer.")]
    groups: list[dict[str, Any]] = [{"params": nets, "lr_mult": 1.0}]
    for group in model.quantizer.param_groups(lr):
        group = dict(group)
        group.setdefault("lr_mult", group.get("lr", lr) / lr)
        groups.append(group)
    return [g for g in groups if g["params"]]


def _fit_model_config(config: ModelConfig, modality: str, paths: list[Path], size: int | None,
                      sample_rate: int | None) -> ModelConfig:
    config = dataclasses.replace(config, modality=modality)
    if modality == "image":
        config.in_channels = 3
        config.image_size = data.default_image_size(paths, multiple=config.downsample) if size is None else size
    else:
        config.in_channels = 1
        config.downsample = math.prod(config.audio_strides)
        config.sample_rate = default_sample_rate(paths) if sample_rate is None else sample_rate
    return config


def _check_out(out: Path) -> None:
    """Refuse a run folder that cannot be made or written, before any training."""
    nearest = next(p for p in (out, *out.parents) if p.exists())
    if not nearest.is_dir():
        raise VqtokError(f"{nearest}: a file, where --out {out} needs a folder; pick another --out")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise VqtokError(f"{nearest}: not writable (permission denied), so --out {out} cannot be written; "
                         "pick another --out")


def _check_segment(segment: int, model_config: ModelConfig, loss: str) -> None:
    """Refuse training segments (`segment` samples) too short for the `loss` reconstruction loss: its STFTs pad
    each segment by half their window by reflection, which needs a segment longer than that."""
    rate, hop = model_config.sample_rate, model_config.downsample
    windows = [n_fft for n_fft, _ in (mel_sizes if loss == "waveform" else spectral_scales)(rate)]
    if loss == "complex":
        windows.append(complex_window(rate))
    needed = max(windows) // 2 + 1
    if segment < needed:
        enough = math.ceil(needed / hop) * hop  # segments are whole hops
        raise VqtokError(f"the {loss} loss needs training segments of more than {needed - 1} samples (half its "
                         f"longest STFT window at {rate} Hz), got {segment}: raise --segment-seconds to "
                         f"{math.ceil(1000 * enough / rate) / 1000:.3f} or more")


def _files_fingerprint(paths: list[Path], resolve: bool = True) -> str:
    """A hash of the data files' absolute paths (`resolve`), so a folder spelled another way is the same data;
    without `resolve`, of the paths as spelled."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.resolve() if resolve else p).encode() + b"\0")
    return h.hexdigest()[:16]
