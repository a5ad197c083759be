"""Peak memory and wall time of encoding and decoding large photos: 1, 12 and 48 megapixels.

    python benchmarks/memory.py                          # 1, 12 and 48 MP at downsample 4 and 8
    python benchmarks/memory.py --sizes 48 --downsample 4
    python benchmarks/memory.py --cli-encode-max-mp 12   # skip `vqtok encode` above 12 MP

Photos: a BSDS500 photo (../shared/data/bsds500) upscaled (bicubic) to 1152x864, 4000x3000 and 8000x6000 and
saved as JPEG (quality 90); without the data set, smooth random colour fields with hard edges and noise. Models:
the default image model (vqtok.config.ModelConfig(), untrained) at downsample 4 and 8, its codebook set by
k-means on its own encoder outputs for a crop of the photo so the codes vary as a trained model's do
(compute and memory do not depend on the weights).

Each step runs in a child process and is measured there:
- `vqtok encode`: `python -m vqtok encode MODEL photo.jpg --out DIR`, the command as it stands;
- tiled encode: `data.load_image` then `jobs.tiles.encode_tiled`, then the token file (the same header as the
  command writes); the child also reports how far each of the two parts raised its memory, and its own peak
  RSS (it restarts the kernel's high-water mark between the parts);
- `vqtok decode`: `python -m vqtok decode MODEL tokens --out DIR` of the tiled encode's token file.
Peak RSS is the kernel's high-water mark of the child, as GNU time reports it (for a command that forks decode
workers, the largest single process); "tree" is the peak of the proportional set sizes of the child and all its
descendants summed, sampled every 50 ms (PSS splits a shared page among the processes that map it, so it reads
lower than RSS for torch's libraries, which other Python processes on the machine share). A baseline row encodes a 64x48 photo: the fixed cost of starting
Python, importing torch and loading the model. Where both encodes ran, the fraction of equal codes is
reported (1.0 when the command tiles the image too).

Prints a markdown table and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok.config import ModelConfig  # noqa: E402
from vqtok.data import io as data  # noqa: E402
from vqtok.jobs.tiles import TILE, encode_tiled  # noqa: E402
from vqtok.modelfile import load, save_model  # noqa: E402
from vqtok.nets.tokenizer import Tokenizer  # noqa: E402
from vqtok.tokens.tokfile import read_tokens, write_tokens  # noqa: E402

BSDS = ROOT.parent / "shared" / "data" / "bsds500"
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"
SIZES = {1: (1152, 864), 12: (4000, 3000), 48: (8000, 6000)}  # megapixels -> (width, height)
LIMIT_MB = 1536
TIME = "/usr/bin/time"  # GNU time: reports its child's peak RSS (see `run`)
# Children run with this environment; main() sets their thread count.
CHILD_ENV = dict(os.environ)


def source_photo() -> Image.Image:
    """The photo every test image is made from: the first BSDS500 training photo, or a synthetic one."""
    photos = sorted((BSDS / "train").glob("*.jpg")) if BSDS.is_dir() else []
    if photos:
        return Image.open(photos[0]).convert("RGB")
    g = np.random.default_rng(0)
    small = Image.fromarray(g.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((480, 320), Image.BICUBIC)
    arr = np.asarray(small).astype(np.int16)
    arr[100:220, 150:330] += 60
    arr += g.integers(-8, 9, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_photo(path: Path, width: int, height: int) -> None:
    source_photo().resize((width, height), Image.BICUBIC).save(path, quality=90)


def make_model(path: Path, downsample: int) -> None:
    """The default image model at `downsample`, codebook initialised by k-means on a 256x256 photo crop."""
    torch.manual_seed(0)
    model = Tokenizer(ModelConfig(downsample=downsample))
    crop = torch.from_numpy(np.array(source_photo().crop((0, 0, 256, 256)))).permute(2, 0, 1)
    model.train()
    with torch.no_grad():
        model(crop[None].float() / 255.0)
    save_model(model.eval(), path)


def run(command: list[str]) -> dict:
    """Run a child process: exit code, wall seconds, peak RSS (MB, its own high-water mark) and the peak of its
    process tree's summed PSS (MB, sampled), and the last lines of its output.

    The child is started by /usr/bin/time rather than by this process: a child started from here (vfork, then
    exec) is charged this process's own high-water mark, about 1 GB once torch is loaded.
    """
    begin = time.perf_counter()
    with tempfile.NamedTemporaryFile("r") as usage:
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", usage.name, *command], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=CHILD_ENV)
        peak_tree = [0.0]
        sampler = threading.Thread(target=_sample_tree, args=(proc, peak_tree), daemon=True)
        sampler.start()
        output = proc.stdout.read() if proc.stdout else ""
        proc.wait()
        sampler.join()
        peak_kb = int(usage.read().split()[-1])
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - begin, 2),
            "peak_rss_mb": round(peak_kb / 1024), "peak_tree_mb": round(peak_tree[0]),
            "output": output.strip().splitlines()[-3:]}


def _sample_tree(proc: subprocess.Popen, peak: list[float]) -> None:
    while proc.poll() is None:
        total, todo = 0.0, [proc.pid]
        while todo:
            pid = todo.pop()
            total += _pss_mb(pid)
            todo.extend(_children(pid))
        peak[0] = max(peak[0], total)
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except (OSError, ValueError):
        return []


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def tiled_encode_child(model_path: Path, photo: Path, target: Path) -> None:
    """The child side of a tiled encode. Prints JSON: the peak memory above the level each part started from
    (MB) of loading the photo and of encoding it, the encode's seconds, and the process's peak RSS (MB).

    Each part restarts the kernel's high-water mark, which also clears it for getrusage, so the overall peak is
    the largest mark read before each restart and at the end.
    """
    marks = []

    def restart() -> float:
        marks.append(_own_mb("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark (VmHWM) becomes the current RSS
        return _own_mb("VmRSS:")

    model = load(model_path)
    start = restart()
    image = data.load_image(photo)
    load_peak = _own_mb("VmHWM:") - start
    start = restart()
    begin = time.perf_counter()
    codes = encode_tiled(model, image)
    seconds = time.perf_counter() - begin
    encode_peak = _own_mb("VmHWM:") - start
    header = {"fingerprint": model.fingerprint(), "modality": "image", "original_size": list(image.shape[1:]),
              "source": photo.name}
    write_tokens(target, codes.numpy(), header, codebook_size=model.config.quantizer.codebook_size)
    restart()
    print(json.dumps({"load_peak_mb": round(load_peak), "encode_peak_mb": round(encode_peak),
                      "encode_seconds": round(seconds, 2), "peak_rss_mb": round(max(marks))}))


def _own_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


def measure_size(work: Path, model_path: Path, megapixels: int, cli_encode: bool) -> dict:
    """Every step for one photo size; the photo and outputs live under `work`."""
    width, height = SIZES[megapixels]
    photo = work / f"photo{megapixels}.jpg"
    make_photo(photo, width, height)
    row: dict = {"megapixels": megapixels, "width": width, "height": height}
    if cli_encode:
        row["cli_encode"] = run([sys.executable, "-m", "vqtok", "encode", str(model_path), str(photo),
                                 "--out", str(work / "cli"), "--force"])
    tokens = work / "tiled" / f"{photo.name}.vqt"
    tokens.parent.mkdir(exist_ok=True)
    row["tiled_encode"] = run([sys.executable, __file__, "--child", str(model_path), str(photo), str(tokens)])
    if row["tiled_encode"]["returncode"] == 0:
        child = json.loads(row["tiled_encode"]["output"][-1])
        child["peak_rss_mb"] = max(child["peak_rss_mb"], row["tiled_encode"]["peak_rss_mb"])
        row["tiled_encode"].update(child)
        cli_tokens = work / "cli" / f"{photo.name}.vqt"
        if cli_encode and cli_tokens.exists():
            row["codes_equal_fraction"] = float(np.mean(read_tokens(cli_tokens).codes == read_tokens(tokens).codes))
        row["cli_decode"] = run([sys.executable, "-m", "vqtok", "decode", str(model_path), str(tokens),
                                 "--out", str(work / "decoded"), "--force"])
        decoded = work / "decoded" / f"photo{megapixels}.png"
        row["decoded_size_ok"] = decoded.exists() and Image.open(decoded).size == (width, height)
    for name in (photo, tokens, work / "decoded" / f"photo{megapixels}.png"):
        name.unlink(missing_ok=True)
    return row


def baseline(work: Path, model_path: Path) -> dict:
    photo = work / "tiny.jpg"
    make_photo(photo, 64, 48)
    return run([sys.executable, "-m", "vqtok", "encode", str(model_path), str(photo), "--out", str(work / "t"),
                "--force"])


def table(results: dict) -> str:
    lines = ["| downsample | photo | step | peak RSS MB | tree PSS MB | seconds | notes |",
             "|---:|---|---|---:|---:|---:|---|"]
    for ds, entry in results["models"].items():
        b = entry["baseline"]
        lines.append(f"| {ds} | 64x48 | `vqtok encode` (start-up) | {b['peak_rss_mb']} | {b['peak_tree_mb']} "
                     f"| {b['seconds']} | |")
        for row in entry["sizes"]:
            photo = f"{row['width']}x{row['height']} ({row['megapixels']} MP)"
            for step, label in (("cli_encode", "`vqtok encode`"), ("tiled_encode", "tiled encode"),
                                ("cli_decode", "`vqtok decode`")):
                if step not in row:
                    continue
                r = row[step]
                notes = [] if r["returncode"] == 0 else [f"exit {r['returncode']}"]
                if r["peak_rss_mb"] > results["limit_mb"]:
                    notes.append(f"over {results['limit_mb']} MB")
                if step == "tiled_encode" and "load_peak_mb" in r:
                    notes.append(f"load +{r['load_peak_mb']} MB, encode +{r['encode_peak_mb']} MB "
                                 f"in {r['encode_seconds']} s")
                if step == "cli_encode" and "codes_equal_fraction" in row:
                    notes.append(f"codes equal to tiled: {row['codes_equal_fraction']:.5f}")
                if step == "cli_decode":
                    notes.append("PNG size ok" if row.get("decoded_size_ok") else "PNG size WRONG")
                lines.append(f"| {ds} | {photo} | {label} | {r['peak_rss_mb']} | {r['peak_tree_mb']} "
                             f"| {r['seconds']} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--downsample", type=int, nargs="+", default=[4, 8], choices=[4, 8, 16])
    parser.add_argument("--cli-encode-max-mp", type=int, default=max(SIZES),
                        help="run `vqtok encode` only on photos up to this many megapixels")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every child (OMP_NUM_THREADS); on a shared 2-core box two threads "
                             "stall at every barrier and the times scatter by 5x")
    parser.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tiled_encode_child(*args.child)
        return
    CHILD_ENV["OMP_NUM_THREADS"] = str(args.threads)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                     "threads": args.threads, "tile": TILE, "limit_mb": LIMIT_MB,
                     "cli_encode_max_mp": args.cli_encode_max_mp,
                     "load_average_before": os.getloadavg()[0], "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for ds in args.downsample:
            model_path = work / f"model{ds}.safetensors"
            make_model(model_path, ds)
            entry = {"baseline": baseline(work, model_path), "sizes": []}
            for mp in args.sizes:
                entry["sizes"].append(measure_size(work, model_path, mp, mp <= args.cli_encode_max_mp))
                print(json.dumps(entry["sizes"][-1]), flush=True)
            results["models"][str(ds)] = entry
    results["load_average_after"] = os.getloadavg()[0]
    print(table(results))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
