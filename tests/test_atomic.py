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


def test_a_stale_temporary_name_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A crashed process with this process id may have left the next temporary name behind: the write takes
    # another name and leaves the stale file alone.
    import itertools

    import vqtok.atomic as atomic

    monkeypatch.setattr(atomic, "_COUNTER", itertools.count(7))
    stale = tmp_path / f".out.vqt.{os.getpid()}-7.tmp.vqt"
    stale.write_bytes(b"stale")
    write_bytes_atomic(tmp_path / "out.vqt", b"new")
    assert (tmp_path / "out.vqt").read_bytes() == b"new"
    assert stale.read_bytes() == b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([stale.name, "out.vqt"])


def test_a_write_into_a_missing_folder_makes_it_and_a_file_in_the_way_fails(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a" / "b" / "c.vqt", b"x")
    assert (tmp_path / "a" / "b" / "c.vqt").read_bytes() == b"x"
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "file" / "c.vqt", b"x")


def test_a_folder_made_by_another_writer_meanwhile_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two encode workers write the first files of a new folder at once: one's open fails for the missing folder,
    # the other makes it before the first looks. The first must then write into it, not fail.
    import vqtok.atomic as atomic

    real_open = os.open
    folder = tmp_path / "new"

    def open_racing(path, flags, mode=0o777):
        if not folder.exists():
            folder.mkdir()  # the other writer, between this open and the folder check
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(atomic.os, "open", open_racing)
    write_bytes_atomic(folder / "c.vqt", b"x")
    assert (folder / "c.vqt").read_bytes() == b"x"
