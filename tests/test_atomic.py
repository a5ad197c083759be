"""Atomic outputs: complete or absent, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from vqtok.atomic import atomic_path, write_bytes_atomic
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.data import io as data
from vqtok.modelfile import save_model
from vqtok.nets.tokenizer import Tokenizer


def expected_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_writer_leaves_normal_permissions(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a" / "bytes.vqt", b"abc")
    data.save_image(tmp_path / "image.png", torch.zeros(3, 4, 4))
    # safetensors replaces the file it is given, so the mode must be set after it has written.
    save_model(Tokenizer(ModelConfig(channels=8, res_channels=8, quantizer=QuantizerConfig(dim=4, codebook_size=4))),
               tmp_path / "model.safetensors")
    for name in ("a/bytes.vqt", "image.png", "model.safetensors"):
        assert mode(tmp_path / name) == expected_mode(), name
    assert (tmp_path / "a" / "bytes.vqt").read_bytes() == b"abc"


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
