"""Training loop: AdamW with warm-up and cosine decay, held-out validation, atomic checkpoints, resume.

A run directory holds:
  run.json            configs, seed, data summary, vqtok version (written once, checked on --resume)
  metrics.jsonl       one JSON object per logged step ("split": "train") and per validation ("split": "val")
  checkpoints/        step_NNNNNNN.safetensors: model + optimizer + RNG state (the last few are kept)
  previews/           step_NNNNNNN.png: validation inputs above, reconstructions below
  model.safetensors   the final model (weights + config), what encode/decode/eval take
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from vqtok.data import io as data
from vqtok import __version__
from vqtok.atomic import atomic_path, write_bytes_atomic
from vqtok.config import ModelConfig, TrainConfig
from vqtok.device import pick_device
from vqtok.errors import VqtokError
from vqtok.modelfile import save_model
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training.imagesets import TrainingSet, build_training_sets

KEEP_CHECKPOINTS = 3


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    run_dir: Path
    model_path: Path
    steps: int
    seconds: float
    steps_per_second: float
    train_files: int
    val_files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


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
    on_progress: ProgressFn | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a tokenizer on the files under `inputs` and write the run directory `out`.

    The modality comes from the files. `size` is the image training crop side (None: fits the data);
    `sample_rate` the audio model's rate in Hz (None: the most common rate among the files).
    With `resume`, training continues from the newest checkpoint in `out` with the stored configs.
    """
    status = on_status or (lambda _msg: None)
    out = Path(out)
    train_config.validate()
    modality, paths = data.find_inputs(list(inputs))
    run_file = out / "run.json"
    if resume:
        if not run_file.exists():
            raise VqtokError(f"{out}: nothing to resume (no run.json); start a new run without --resume")
        stored = json.loads(run_file.read_text())
        model_config = ModelConfig.from_json(json.dumps(stored["model"]))
        train_config = TrainConfig(**stored["train"])
        if stored["data"]["fingerprint"] != _files_fingerprint(paths):
            raise VqtokError(f"{out}: the data files differ from the ones this run started with; cannot resume")
    else:
        if run_file.exists():
            raise VqtokError(f"{out} already holds a training run; pass --resume to continue it or pick another --out")
        model_config = _fit_model_config(model_config, modality, paths, size, sample_rate)
    model_config.validate()

    torch.manual_seed(train_config.seed)
    device = pick_device(train_config.device)
    status(f"reading {len(paths)} {modality} files")
    train_set, val_set, skipped = build_training_sets(paths, model_config, train_config)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        run_info = {
            "vqtok_version": __version__,
            "model": json.loads(model_config.to_json()),
            "train": dataclasses.asdict(train_config),
            "seed": train_config.seed,
            "data": {
                "inputs": [str(p) for p in inputs],
                "files": len(paths),
                "train_files": len(train_set),
                "val_files": len(val_set),
                "skipped": [[str(p), why] for p, why in skipped],
                "fingerprint": _files_fingerprint(paths),
            },
        }
        write_bytes_atomic(run_file, (json.dumps(run_info, indent=2) + "\n").encode())

    model = Tokenizer(model_config).to(device)
    optimizer = torch.optim.AdamW(
        model_param_groups(model, train_config.lr), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    sampler = torch.Generator().manual_seed(train_config.seed)
    start_step = 0
    if resume:
        start_step = _load_checkpoint(out, model, optimizer, sampler)
        status(f"resuming from step {start_step}")

    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_step)
    begin = time.perf_counter()
    last_log, last_time = start_step, begin
    step = start_step
    model.train()
    with metrics_path.open("a") as metrics_file:
        for step in range(start_step, train_config.steps):
            lr_now = learning_rate(step, train_config)
            for group in optimizer.param_groups:
                group["lr"] = lr_now * group.get("lr_mult", 1.0)
            batch = train_set.sample(train_config.batch_size, sampler).to(device, non_blocking=True)
            out_ = model(batch)
            recon_loss = train_set.reconstruction_loss(out_.recon, batch)
            loss = recon_loss + sum(out_.losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            done = step + 1
            if done % train_config.log_every == 0 or done == train_config.steps:
                now = time.perf_counter()
                record = {
                    "split": "train",
                    "step": done,
                    "lr": lr_now,
                    "loss": loss.item(),
                    "recon": recon_loss.item(),
                    **{k: v.item() for k, v in out_.losses.items()},
                    **train_set.batch_metrics(out_.recon.detach(), batch),
                    **_scalar_usage(model),
                    "steps_per_s": (done - last_log) / max(now - last_time, 1e-9),
                    "elapsed_s": now - begin,
                }
                last_log, last_time = done, now
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if on_progress:
                    on_progress(done, train_config.steps, record)
            if done % train_config.checkpoint_every == 0 or done == train_config.steps:
                val = evaluate_set(model, val_set, train_config.batch_size, device)
                metrics_file.write(json.dumps({"split": "val", "step": done, **val}) + "\n")
                metrics_file.flush()
                _save_checkpoint(out, model, optimizer, sampler, done)
                _write_preview(out, model, val_set, done, device)
                model.train()

    seconds = time.perf_counter() - begin
    model_path = out / "model.safetensors"
    model.eval()
    save_model(model, model_path, extra={"vqtok.train": json.dumps(dataclasses.asdict(train_config))})
    final = evaluate_set(model, val_set, train_config.batch_size, device)
    ran = train_config.steps - start_step
    return TrainResult(
        run_dir=out,
        model_path=model_path,
        steps=train_config.steps,
        seconds=seconds,
        steps_per_second=ran / seconds if seconds > 0 else 0.0,
        train_files=len(train_set),
        val_files=len(val_set),
        skipped=[(str(p), why) for p, why in skipped],
        final=final,
    )


def model_param_groups(model: Tokenizer, lr: float) -> list[dict[str, Any]]:
    """Encoder + decoder weights in one group; the quantizer says how its own parameters are optimised."""
    nets = [p for n, p in model.named_parameters() if not n.startswith("quantizer.")]
    groups: list[dict[str, Any]] = [{"params": nets, "lr_mult": 1.0}]
    for group in model.quantizer.param_groups(lr):
        group = dict(group)
        group.setdefault("lr_mult", group.get("lr", lr) / lr)
        groups.append(group)
    return [g for g in groups if g["params"]]


@torch.no_grad()
def evaluate_set(model: Tokenizer, val_set: TrainingSet, batch_size: int, device: torch.device) -> dict[str, float]:
    """Validation figures over the whole held-out set (eval mode: no rotation, no codebook upkeep)."""
    was_training = model.training
    model.eval()
    result = val_set.evaluate(model, batch_size, device)
    model.train(was_training)
    return result


def _fit_model_config(config: ModelConfig, modality: str, paths: list[Path], size: int | None,
                      sample_rate: int | None) -> ModelConfig:
    config = dataclasses.replace(config, modality=modality)
    if modality == "image":
        config.in_channels = 3
        config.image_size = size or data.default_image_size(paths, multiple=config.downsample)
    else:
        from vqtok.training.audiosets import default_sample_rate

        config.in_channels = 1
        config.downsample = math.prod(config.audio_strides)
        config.sample_rate = sample_rate or default_sample_rate(paths)
    return config


def _scalar_usage(model: Tokenizer) -> dict[str, float]:
    usage = model.quantizer.usage_stats()
    return {k: float(v) for k, v in usage.items() if isinstance(v, (int, float))}


def _files_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()[:16]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log has no steps twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def _save_checkpoint(out: Path, model: Tokenizer, optimizer: torch.optim.Optimizer,
                     sampler: torch.Generator, step: int) -> None:
    """Model, optimizer and RNG state as tensors; scalars and param-group settings as JSON metadata."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = sampler.get_state()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt_state["param_groups"]]
    metadata = {"step": str(step), "optim.groups": json.dumps(groups), "optim.scalars": json.dumps(scalars)}
    folder = _checkpoint_dir(out)
    with atomic_path(folder / f"step_{step:07d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    for old in sorted(folder.glob("step_*.safetensors"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


def _load_checkpoint(out: Path, model: Tokenizer, optimizer: torch.optim.Optimizer, sampler: torch.Generator) -> int:
    from safetensors import safe_open

    found = sorted(_checkpoint_dir(out).glob("step_*.safetensors"))
    if not found:
        raise VqtokError(f"{out}: no checkpoint to resume from in {_checkpoint_dir(out)}")
    path = found[-1]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in json.loads(metadata["optim.scalars"]).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optim.groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    sampler.set_state(tensors["rng.sampler"])
    return int(metadata["step"])


def _write_preview(out: Path, model: Tokenizer, val_set: TrainingSet, step: int, device: torch.device) -> None:
    was_training = model.training
    model.eval()
    val_set.preview(model, out / "previews" / f"step_{step:07d}.png", device)
    model.train(was_training)

