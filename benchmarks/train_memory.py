"""Peak memory of `vqtok train` on 300 against 3,000 photos: streaming keeps it independent of the file count.

    python benchmarks/train_memory.py [--steps 40]

The 300 photos are BSDS500 train + val (481x321 JPEG); the 3,000 are the same files linked ten times under
other names, so the two runs differ only in how many files they read. Each run trains 256x256 crops with
DataLoader workers (the default count). Prints a table and writes benchmarks/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "bsds500"
RESULTS = ROOT / "benchmarks" / "results" / "train_memory.json"


def photo_folder(root: Path, copies: int) -> Path:
    """A folder of the BSDS500 train + val photos, each linked `copies` times."""
    folder = root / f"photos_x{copies}"
    folder.mkdir()
    for i in range(copies):
        for src in sorted(PHOTOS.glob("*/*.jpg")):
            (folder / f"{i}_{src.parent.name}_{src.name}").symlink_to(src)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not PHOTOS.is_dir():
        sys.exit(f"skipped: {PHOTOS} is absent (the BSDS500 photos of ../shared/data)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for copies in (1, 10):
            folder = photo_folder(Path(tmp), copies)
            files = len(list(folder.iterdir()))
            command = [sys.executable, "-m", "vqtok", "train", str(folder), "--out", str(Path(tmp) / f"run{copies}"),
                       "--size", "256", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--checkpoint-every", str(args.steps // 2), "--device", "cpu", "--json"]
            result = measure(command, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if result.returncode != 0:
                sys.exit(f"vqtok train failed on {files} files:\n{result.output[-2000:]}")
            rows.append({"files": files, "peak_rss_tree_mb": result.peak_tree_mb,
                         "peak_rss_main_mb": result.peak_main_mb, "seconds": result.seconds})
    print("| photos | peak memory, all processes (PSS, MB) | peak RSS, main process (MB) | wall s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['files']:,} | {r['peak_rss_tree_mb']:.0f} | {r['peak_rss_main_mb']:.0f} | {r['seconds']:.0f} |")
    diff = rows[1]["peak_rss_tree_mb"] - rows[0]["peak_rss_tree_mb"]
    print(f"\n3,000 photos - 300 photos: {diff:+.0f} MB (goal: within 100 MB)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "rows": rows,
                                   "difference_mb": diff}, indent=2) + "\n")


if __name__ == "__main__":
    main()
