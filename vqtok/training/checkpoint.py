"""Checkpoints of a training run: model, optimizer and RNG state in one safetensors file, written atomically.

The data a step sees is a function of the seed and the step number (vqtok.data.streams.BatchPlan), so the
step, the model, the optimizer and the global torch RNG are all a resumed run needs to continue exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqtok.atomic import atomic_path, write_bytes_atomic
from vqtok.errors import VqtokError
from vqtok.nets.tokenizer import Tokenizer

KEEP_CHECKPOINTS = 3


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, model: Tokenizer, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Model, optimizer and RNG state as tensors; scalars and param-group settings as JSON metadata. Keeps the
    newest KEEP_CHECKPOINTS files."""
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
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt_state["param_groups"]]
    metadata = {"step": str(step), "optim.groups": json.dumps(groups), "optim.scalars": json.dumps(scalars)}
    folder = checkpoint_dir(out)
    with atomic_path(folder / f"step_{step:07d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    for old in sorted(folder.glob("step_*.safetensors"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


def load_checkpoint(out: Path, model: Tokenizer, optimizer: torch.optim.Optimizer) -> int:
    """Restore the newest checkpoint in `out` into `model`, `optimizer` and the torch RNG; returns its step."""
    found = sorted(checkpoint_dir(out).glob("step_*.safetensors"))
    if not found:
        raise VqtokError(f"{out}: no checkpoint to resume from in {checkpoint_dir(out)}")
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
    return int(metadata["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log has no steps twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
