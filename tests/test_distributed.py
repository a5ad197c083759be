"""Training on two CPU processes with gloo, started by torchrun: the ranks stay bit-identical (with an adversarial
stage too), the loss follows a one-process run at the same global batch, and a killed two-process run resumes
to the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_first
from distributed_worker import TINY

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
STEPS, BATCH = 40, 16
# Relative difference allowed between the logged losses of the two-process and the one-process run. Both see
# the same items in the same order and the quantizer gathers the whole batch for its upkeep, so they differ
# only by float rounding (8 images convolved at a time instead of 16, gradients summed over two halves):
# measured 2e-6 after 40 steps on a 2-core x86 CPU.
LOSS_TOLERANCE = 1e-3


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run(command: list[str], cwd: Path) -> None:
    """Run a worker command; a failure shows the end of its output, where the workers' tracebacks are."""
    done = subprocess.run(command, env=run_env(), cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited with {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(WORKER.parent)])}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, sample_images: Path) -> Path:
    return copy_first(sample_images, "*.png", 120, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """One uninterrupted two-process run and one single-process run of the same configs."""
    root = tmp_path_factory.mktemp("dist")
    (root / "two").mkdir()
    (root / "one").mkdir()
    args = [str(WORKER), str(images), str(root / "two" / "run"), str(root / "two"), str(STEPS), str(BATCH), "1"]
    run(torchrun(*args), root)
    args = [str(WORKER), str(images), str(root / "one" / "run"), str(root / "one"), str(STEPS), str(BATCH), "0"]
    run([sys.executable, *args], root)
    return root


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["split"] == "train"}


def test_ranks_end_bit_identical(runs: Path) -> None:
    rank0, rank1 = load_file(str(runs / "two" / "rank0.safetensors")), load_file(str(runs / "two" / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    # Weights, codebooks, EMA statistics, usage counters, upkeep RNG: every tensor, bit for bit.
    assert any("ema_sum" in k for k in rank0) and any("last_used" in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Rank 0 wrote the model; the other rank wrote nothing into the run directory.
    saved = load_file(str(runs / "two" / "run" / "model.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)


def test_loss_follows_one_process_at_the_same_global_batch(runs: Path) -> None:
    two, one = losses(runs / "two" / "run"), losses(runs / "one" / "run")
    assert sorted(two) == sorted(one) == list(range(2, STEPS + 1, 2))
    first = min(two)
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=LOSS_TOLERANCE), step
    # Training happened: the loss fell.
    assert two[STEPS] < 0.7 * two[first]


def test_adversarial_ranks_end_bit_identical(fsdd16: Path, tmp_path: Path) -> None:
    """The discriminator is averaged like the nets: 8 steps of audio, the adversarial stage on after 4."""
    args = [str(WORKER), str(fsdd16), str(tmp_path / "run"), str(tmp_path), "8", "4", "0", "4"]
    run(torchrun(*args), tmp_path)
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and any(k.startswith("disc.scales.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000008.safetensors"))
    assert all(torch.equal(checkpoint[k], rank0[k]) for k in rank0 if k.startswith("disc."))
    assert any(k.startswith("disc_optim.") for k in checkpoint)  # it was trained, not just built


def _kill_processes_mentioning(text: str) -> int:
    """SIGKILL every process whose command line contains `text` (torchrun puts its workers in new sessions,
    so a process-group kill would leave them running)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes to kill through /proc")
def test_killed_two_process_run_resumes_to_the_same_model(runs: Path, images: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed-run"
    flags = [str(x) for x in ("--steps", STEPS, "--batch-size", BATCH, "--channels", TINY["channels"],
                              "--code-dim", TINY["code_dim"], "--codebook-size", TINY["codebook_size"],
                              "--warmup", TINY["warmup"], "--checkpoint-every", TINY["checkpoint_every"],
                              "--device", "cpu", "--num-workers", "1")]
    command = torchrun("-m", "vqtok", "train", str(images), "--out", str(run), *flags)
    proc = subprocess.Popen(command, env=run_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = run / "checkpoints" / "step_0000010.safetensors"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), "the run wrote no checkpoint"
    assert _kill_processes_mentioning(str(run)) >= 2
    proc.wait(timeout=60)
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(command + ["--resume", "--json"], env=run_env(), cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["steps"] == STEPS  # one JSON report: rank 0's
    a = load_file(str(run / "model.safetensors"))
    b = load_file(str(runs / "two" / "run" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if m["split"] == "val"]
    assert steps == [10, 20, 30, 40]
