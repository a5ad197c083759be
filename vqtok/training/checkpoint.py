"""Checkpoints of a training run: the trained modules, their optimizers and the RNG state in one safetensors
file, written atomically.

The data a step sees is a function of the seed and the step number (vqtok.data.streams.BatchPlan), so the
step, the modules, their optimizers and the global torch RNG are all a resumed run needs to continue exactly.
Each part is stored under its name: the tokenizer as "model.*" with its optimizer as "optim.*", and, in a run
with an adversarial stage, the discriminator as "disc.*" with "disc_optim.*", and, with alternating codebook
steps, each quantizer stage's inner optimizer as "vq<stage>_optim.*".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vqtok.atomic import atomic_path, write_bytes_atomic
from vqtok.errors import VqtokError

KEEP_CHECKPOINTS = 3


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, step: int, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Each module's state dict and each optimizer's state as tensors under "<name>.", the optimizers'
    scalars and param-group settings as JSON metadata, and the torch RNG. Keeps the newest KEEP_CHECKPOINTS
    files."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, module in modules.items() for k, v in module.state_dict().items()}
    metadata = {"step": str(step)}
    for name, optimizer in optimizers.items():
        opt_state = optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for pid, state in opt_state["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{name}.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                  for g in opt_state["param_groups"]]
        metadata |= {f"{name}.groups": json.dumps(groups), f"{name}.scalars": json.dumps(scalars)}
    tensors["rng.torch"] = torch.get_rng_state()
    folder = checkpoint_dir(out)
    with atomic_path(folder / f"step_{step:07d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    for old in sorted(folder.glob("step_*.safetensors"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


class Restored(NamedTuple):
    """What `load_checkpoint` restored: the step to go on from (0: nothing, the run starts over), the checkpoint
    read (None: the run had none yet) and, per newer checkpoint passed over, one line saying why."""

    step: int
    path: Path | None
    unreadable: list[str]


def load_checkpoint(out: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
                    ) -> Restored:
    """Restore the newest readable checkpoint in `out` into `modules`, `optimizers` (named as they were saved)
    and the torch RNG. A checkpoint that cannot be read (cut short by a full disk or a copy, say) is passed over
    for the next older one; a run stopped before its first checkpoint restores nothing. VqtokError when there
    are checkpoints but none can be read."""
    unreadable: list[str] = []
    for path in sorted(checkpoint_dir(out).glob("step_*.safetensors"), reverse=True):
        try:
            tensors, metadata = _read(path)
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            unreadable.append(f"{path}: unreadable checkpoint ({' '.join(str(err).split())})")
            continue
        _restore(tensors, metadata, modules, optimizers)
        return Restored(metadata["step"], path, unreadable)
    if unreadable:
        raise VqtokError("no readable checkpoint to resume from: " + "; ".join(unreadable))
    return Restored(0, None, [])


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors and its metadata, every value parsed from JSON; raises (SafetensorError, OSError,
    ValueError, KeyError) when the file is damaged."""
    with safe_open(str(path), framework="pt") as f:
        metadata = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
    tensors = load_file(str(path))
    if "step" not in metadata or "rng.torch" not in tensors:
        raise KeyError("no step number or RNG state")
    return tensors, metadata


def _restore(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], modules: dict[str, nn.Module],
             optimizers: dict[str, torch.optim.Optimizer]) -> None:
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    for name, optimizer in optimizers.items():
        if f"{name}.groups" not in metadata:
            # Checkpoints from before the alternating inner optimizers were stored lack theirs: those start
            # afresh, as they then did on every resume.
            continue
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith(name + "."):
                pid, field = key[len(name) + 1:].split(".", 1)
                state.setdefault(int(pid), {})[field] = value
        for key, value in metadata[f"{name}.scalars"].items():
            pid, field = key.split(".", 1)
            state.setdefault(int(pid), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": metadata[f"{name}.groups"]})
    torch.set_rng_state(tensors["rng.torch"])


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log has no steps twice, and lines that do not
    parse (a crash mid-write leaves half a line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
