"""Device choice: `pick_device` turns a --device value into a torch.device or a one-line user error."""

from __future__ import annotations

import pytest
import torch

from vqtok.device import pick_device
from vqtok.errors import VqtokError


def test_cpu_and_auto_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "mps")
    with pytest.raises(VqtokError, match="CUDA is not available"):
        pick_device("cuda")


def test_a_cuda_index_beyond_the_machine_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # One GPU present: cuda and cuda:0 are fine, cuda:1 names a device that is not there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(VqtokError, match=r"'cuda:1'.*1 CUDA device"):
        pick_device("cuda:1")


def test_unknown_device_names_are_user_errors() -> None:
    with pytest.raises(VqtokError, match="unknown device 'gpu'"):
        pick_device("gpu")
