"""`--device auto|cpu|cuda|mps` to a torch.device."""

from __future__ import annotations

import torch

from vqtok.errors import VqtokError


def pick_device(name: str = "auto") -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VqtokError(f"device {name!r} requested but CUDA is not available (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VqtokError("device 'mps' requested but MPS is not available (use --device cpu or auto)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VqtokError(f"unknown device {name!r} (expected auto, cpu, cuda, cuda:N or mps)") from None
    # torch accepts any index here and fails only at the first allocation, with a CUDA error far from the cause.
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VqtokError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device
