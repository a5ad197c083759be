"""How close `vqtok encode` (and `vqtok train`) come to the speed the machine's cores allow, on real images.

Two data sets from ../shared/data: CIFAR-10 test JPEGs (32x32; the first --cifar files in sorted order) and
every BSDS500 photo there (train + val, 481x321 or 321x481 JPEG, encoded whole). Each gets the default image
model (`ModelConfig()`, untrained: the forward cost does not depend on the weights) and:

- decode: images/s of one process, one thread, doing what a worker does per file (read, decode, pad);
- forward: images/s of the model alone, one thread, on images already in memory, in the batches encode
  forms (`encode_batch`, CPU_BATCH_IMAGES / CPU_BATCH_PIXELS);
- bound B = cores / (decode + forward core-seconds per image): what encode would reach if every core did
  nothing but decode files and run the model;
- write: core-seconds to create one token file of the run's mean size (`write_bytes_atomic` into a mirrored
  folder tree, one thread): the file system's own cost per output file, which B leaves out. The .vqt rows
  also give their ratio to B_w = cores / (decode + forward + write), what an encode that writes one file per
  image could reach;
- encode: `encode_files` (the work of `vqtok encode`) end to end, files on disk -> .vqt files and -> one
  --shard, with 0, 1 and 2 workers (on a CPU each worker decodes, encodes and writes its share; 0: all in one
  process): images/s (files / the run's own seconds: model load, file walk and writing included), its ratio
  to B, and the CPU time it took per image (this process and its workers), which a busy machine inflates far
  less than the wall clock: decode + forward over it is the share of the work that was decoding and the
  model, the rest being the pipeline's own costs. The speed of this kind of virtual machine drifts by up to
  30% within minutes, so each run's ratios use decode and forward timed again on a small sample just before
  and just after it (the B row is the first, fuller measurement);
- train: `vqtok train --num-workers W` images/s (steps_per_second x batch size) with 0, 1 and 2 workers
  (CIFAR: batches of 128 32x32 crops; BSDS: 16 crops of 128x128).

    python benchmarks/throughput.py                      # about 4-5 minutes on 2 cores
    python benchmarks/throughput.py --cifar 2000 --train-steps 0
    python benchmarks/throughput.py --device cuda        # the model on a GPU: B is its forward-only rate there

Every run reads a copy of the files made in a temporary folder just before (so the page cache holds them)
and starts after a sync (`settle`), so it never pays for writing back the previous step's files;
training runs are fresh `python -m vqtok train` processes. On a machine shared with other jobs the images/s
figures drop with the cores the others take; the CPU ms per image much less. Results:
benchmarks/results/throughput.json (written atomically). Without ../shared/data the script says so and
exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import best_seconds  # noqa: E402  (benchmarks/timing.py; the script folder is on sys.path)
from vqtok.allocator import keep_freed_memory  # noqa: E402
from vqtok.atomic import write_bytes_atomic  # noqa: E402
from vqtok.config import ModelConfig  # noqa: E402
from vqtok.data import io as data  # noqa: E402
from vqtok.device import pick_device  # noqa: E402
from vqtok.errors import VqtokError  # noqa: E402
from vqtok.data.readers import ImageFiles, available_cores, batch_rows, decoded_chunks, shape_batches  # noqa: E402
from vqtok.jobs.pipeline import (CPU_BATCH_IMAGES, CPU_BATCH_PIXELS,  # noqa: E402
                                 DEVICE_BATCH_IMAGES, DEVICE_BATCH_PIXELS, encode_batch, encode_files)
from vqtok.modelfile import save_model  # noqa: E402
from vqtok.nets.tokenizer import Tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WORKERS = (0, 1, 2)


def copy_files(sources: list[Path], root: Path, dest: Path) -> int:
    """Copy `sources` (under `root`) to `dest`, keeping their relative paths; returns the bytes copied."""
    total = 0
    for src in sources:
        target = dest / src.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        total += target.stat().st_size
    return total


def decode_seconds(paths: list[Path], multiple: int, repeats: int) -> float:
    """Core-seconds per image to read, decode and pad a file (one process, one thread)."""
    files = ImageFiles(paths, multiple)
    return best_seconds(lambda: [files[i] for i in range(len(files))], repeats) / len(paths)


def forward_seconds(model: Tokenizer, paths: list[Path], repeats: int) -> float:
    """Seconds per image of the model alone, in the batches `vqtok encode` forms on the model's device: on a CPU
    core-seconds (one thread); on an accelerator from uint8 images in host memory to codes back in it."""
    cpu = next(model.parameters()).device.type == "cpu"
    images, pixels = (CPU_BATCH_IMAGES, CPU_BATCH_PIXELS) if cpu else (DEVICE_BATCH_IMAGES, DEVICE_BATCH_PIXELS)
    chunks = decoded_chunks(paths, model.hop, images, 0)
    batches = [b for _, b in shape_batches(chunks, images, lambda i, why: None, pixels)]
    rows = [batch_rows(b.shape, images, pixels) for b in batches]
    # .cpu() waits for the device, as `vqtok encode`'s writer does.
    return best_seconds(lambda: [encode_batch(model, b, None, r).cpu() for b, r in zip(batches, rows)],
                        repeats) / len(paths)


def part_seconds(model: Tokenizer, decode_paths: list[Path], forward_paths: list[Path],
                 repeats: int) -> tuple[float, float]:
    """(decode, forward) seconds per image on one thread (`decode_seconds`, `forward_seconds`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (decode_seconds(decode_paths, model.hop, repeats), forward_seconds(model, forward_paths, repeats))
    finally:
        torch.set_num_threads(threads)  # encode picks its own thread count within the caller's


def settle() -> None:
    """Write dirty pages out before a timed run, so it never pays for the previous step's writeback. It also
    shortens a cost that deleting files leaves behind: ext4's inode allocator steps over every inode freed in
    the last minute, or in the last six while its inode table block is unwritten (fs/ext4/ialloc.c,
    recently_deleted). On this machine, after earlier runs had deleted some 10^5 files, creating a token file
    cost 0.2-0.8 ms instead of 0.02-0.04, nearly all of it in that check (perf). So the script deletes
    nothing until it ends."""
    os.sync()


def write_seconds(names: list[Path], size: int, folder: Path, repeats: int) -> float:
    """Core-seconds per file to write a `size`-byte token file atomically for each of `names` (relative paths),
    into a fresh folder under `folder` each repeat (one thread)."""
    payload = bytes(size)
    rounds = itertools.count()

    def write_all() -> None:
        out = folder / str(next(rounds))
        for name in names:
            write_bytes_atomic(out / f"{name}.vqt", payload)

    return best_seconds(write_all, repeats, settle) / len(names)  # the files stay: see encode_runs


def vqtok(*args: object) -> dict[str, Any]:
    """Run `python -m vqtok ARGS --json` in a fresh process; its JSON report."""
    cmd = [sys.executable, "-m", "vqtok", *map(str, args), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def cpu_seconds() -> tuple[float, float]:
    """(all, kernel) CPU seconds used so far by this process and by its children that have ended (the decoding
    workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(r.ru_utime + r.ru_stime for r in usage), sum(r.ru_stime for r in usage)


def encode_runs(model_path: Path, folder: Path, files: int, tmp: Path, parts: Callable[[], tuple[float, float]],
                device: str) -> dict[str, dict[int, dict[str, float]]]:
    """images/s and CPU ms per image of an encode to .vqt files and to a shard, for each worker count, and the
    (decode, forward) seconds per image `parts()` measures just before and just after each run (their means)."""
    runs: dict[str, dict[int, dict[str, float]]] = {"vqt": {}, "shard": {}}
    for kind in runs:
        for workers in WORKERS:
            out = tmp / f"{folder.name}-encode-{kind}-{workers}"
            before = parts()
            settle()
            start = cpu_seconds()
            report = encode_files(model_path, [folder], out, device=device, num_workers=workers, shard=kind == "shard")
            if report.failed:
                raise SystemExit(f"encode of {folder} skipped files: {report.failed[:3]}")
            (cpu, kernel), (cpu_start, kernel_start) = cpu_seconds(), start
            after = parts()
            runs[kind][workers] = {"images_per_second": files / report.seconds,
                                   "cpu_ms_per_image": 1e3 * (cpu - cpu_start) / files,
                                   "kernel_ms_per_image": 1e3 * (kernel - kernel_start) / files,
                                   "bytes_per_image": report.bytes / files,
                                   "decode_ms_around": 500 * (before[0] + after[0]),
                                   "forward_ms_around": 500 * (before[1] + after[1])}
            # Outputs stay until the end: on an ext4 without a journal, files created within ~30 s of many
            # deletions cost 5-20x more (the inode allocator steps over each recently freed inode), so deleting a
            # run's 10,000 files would slow the next run's.
    return runs


def train_rates(folder: Path, tmp: Path, device: str, steps: int, batch_size: int, size: int) -> dict[int, float]:
    """images/s of `vqtok train` (steps_per_second x batch size) for each worker count."""
    rates = {}
    for workers in WORKERS:
        run = tmp / f"train-{workers}"
        settle()
        try:
            report = vqtok("train", folder, "--out", run, "--steps", steps, "--warmup", 1, "--batch-size", batch_size,
                           "--size", size, "--checkpoint-every", steps, "--device", device, "--num-workers", workers)
        except SystemExit as err:
            print(f"train with --num-workers {workers} did not run: {err}", file=sys.stderr)
            return rates
        rates[workers] = report["steps_per_second"] * batch_size
        shutil.rmtree(run)
    return rates


def bench(name: str, sources: list[Path], root: Path, image_size: int, train: tuple[int, int, int],
          tmp: Path, repeats: int, device: str) -> dict[str, Any]:
    """Every figure for one data set; train = (steps, batch size, crop side), steps 0 skips training. On an
    accelerator the bound is the model's forward-only rate there (decoding runs on the CPU beside it)."""
    folder = tmp / name
    size_bytes = copy_files(sources, root, folder)
    _, paths = data.find_inputs([folder])
    torch.manual_seed(0)
    model = Tokenizer(ModelConfig(image_size=image_size)).eval()
    model_path = tmp / f"{name}.safetensors"
    save_model(model, model_path)
    # Timing the model on a few hundred 32x32 images or a dozen photos is as exact as on all of them.
    sample = paths[:: max(1, len(paths) // 2000)] if image_size <= 64 else paths[:: max(1, len(paths) // 12)]
    decode_s, forward_s = part_seconds(model.to(device), paths[:: max(1, len(paths) // 2000)], sample, repeats)
    cores = available_cores()
    bound = cores / (decode_s + forward_s) if device == "cpu" else 1 / forward_s
    print(f"{name}: {len(paths)} files ({size_bytes / 2**20:.1f} MiB), decode {1e3 * decode_s:.3f} ms, "
          f"forward {1e3 * forward_s:.3f} ms per image, bound {bound:.1f} images/s on {cores} cores", file=sys.stderr)
    # Around each encode run, the parts again on a smaller sample: this machine's speed drifts by up to 30% within
    # minutes, so each run is compared with the bound of its own minutes.
    small = sample[:: max(1, len(sample) // (500 if image_size <= 64 else 6))]
    encode = encode_runs(model_path, folder, len(paths), tmp, lambda: part_seconds(model, small, small, 1), device)
    vqt_bytes = round(np.mean([run["bytes_per_image"] for run in encode["vqt"].values()]))
    write_s = write_seconds([p.relative_to(folder) for p in paths], vqt_bytes, tmp / f"{name}-writes", repeats)
    steps, batch_size, crop = train
    return {"files": len(paths), "megabytes": size_bytes / 2**20, "cores": cores, "device": device,
            "decode_images_per_second": 1 / decode_s, "forward_images_per_second": 1 / forward_s,
            "decode_ms": 1e3 * decode_s, "forward_ms": 1e3 * forward_s, "bound_images_per_second": bound,
            "write_ms": 1e3 * write_s, "vqt_bytes": vqt_bytes,
            "bound_with_writes_images_per_second": cores / (decode_s + forward_s + write_s), "encode": encode,
            "train": {"steps": steps, "batch_size": batch_size, "crop": crop,
                      "images_per_second": train_rates(folder, tmp, device, *train) if steps else {}}}


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table. On an accelerator B is the forward-only rate there, and B_w and the CPU-share column
    are left out (decoding and writing run on the CPU beside the model)."""
    lines = ["| data | measure | workers | images/s | / B | / B_w | CPU ms per image (kernel) | decode + forward / CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        device = r.get("device", "cpu")
        cpu_bound = device == "cpu"
        bound, work = r["bound_images_per_second"], r["decode_ms"] + r["forward_ms"]
        bound_w = r["bound_with_writes_images_per_second"]
        forward_label = "forward only (1 thread)" if cpu_bound else f"forward only ({device})"
        lines += [f"| {name} | decode only (1 thread) | - | {r['decode_images_per_second']:.1f} | | | "
                  f"{r['decode_ms']:.3f} | |",
                  f"| {name} | {forward_label} | - | {r['forward_images_per_second']:.1f} | | | "
                  f"{r['forward_ms']:.3f} | |",
                  f"| {name} | write {r['vqt_bytes']}-byte token files only (1 thread) | - | "
                  f"{1e3 / r['write_ms']:.1f} | | | {r['write_ms']:.3f} | |"]
        if cpu_bound:
            lines += [f"| {name} | **bound B** ({r['cores']} cores) | - | {bound:.1f} | 1.00 | | {work:.3f} | 1.00 |",
                      f"| {name} | **bound B_w** (B with file writes) | - | {bound_w:.1f} | {bound_w / bound:.2f} | "
                      f"1.00 | {work + r['write_ms']:.3f} | |"]
        else:
            lines.append(f"| {name} | **bound B** (forward only, {device}) | - | {bound:.1f} | 1.00 | | | |")
        for kind, label in (("vqt", "encode -> .vqt files"), ("shard", "encode -> --shard")):
            for workers, run in r["encode"][kind].items():
                rate, cpu = run["images_per_second"], run["cpu_ms_per_image"]
                # The parts timed in this run's own minutes.
                local = run["decode_ms_around"] + run["forward_ms_around"] if cpu_bound else run["forward_ms_around"]
                bound_here = 1e3 * (r["cores"] if cpu_bound else 1) / local
                with_writes = rate * (local + r["write_ms"]) / (1e3 * r["cores"])  # rate / B_w of these minutes
                versus_w = f"{with_writes:.2f}" if kind == "vqt" and cpu_bound else ""
                share = f"{local / cpu:.2f}" if cpu_bound else ""
                lines.append(f"| {name} | {label} | {workers} | {rate:.1f} | {rate / bound_here:.2f} | {versus_w} | "
                             f"{cpu:.3f} ({run['kernel_ms_per_image']:.3f}) | {share} |")
        for workers, rate in r["train"]["images_per_second"].items():
            lines.append(f"| {name} | train (batch {r['train']['batch_size']}, {r['train']['crop']} px crops) "
                         f"| {workers} | {rate:.1f} | | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--cifar", type=int, default=10000, help="CIFAR-10 test files to use (sorted order)")
    parser.add_argument("--train-steps", type=int, default=30, help="steps per CIFAR training run; 0 skips training")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of decode-only and forward-only")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, or cuda (B is then the "
                        "forward-only rate there; the goal is end to end >= 0.8 B)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    args = parser.parse_args()
    cifar, bsds = args.data / "cifar10" / "test", args.data / "bsds500"
    if not (cifar.is_dir() and bsds.is_dir()):
        print(f"skipped: the real data folder {args.data} (cifar10/test, bsds500) is absent")
        return 0
    try:
        pick_device(args.device)
    except VqtokError as err:
        raise SystemExit(f"error: {err}") from None
    keep_freed_memory()  # as `vqtok` does on start (vqtok.cli.main), so encode_files here runs as it does there
    results = {}
    with tempfile.TemporaryDirectory(prefix="vqtok-throughput-") as tmp:
        _, cifar_files = data.find_inputs([cifar])
        results["cifar10-test"] = bench("cifar10-test", cifar_files[: args.cifar], cifar, 32,
                                        (args.train_steps, 128, 32), Path(tmp), args.repeats, args.device)
        _, bsds_files = data.find_inputs([bsds])
        results["bsds500"] = bench("bsds500", bsds_files, bsds, 320, (args.train_steps // 3, 16, 128), Path(tmp),
                                   args.repeats, args.device)
    print(table(results))
    print(f"({platform.processor() or platform.machine()}, {available_cores()} cores, torch {torch.__version__})")
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                          "platform": platform.platform(), "cores": available_cores()},
              "forward_batch": {"images": CPU_BATCH_IMAGES, "pixels": CPU_BATCH_PIXELS}, "results": results}
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
