"""How compact `.vqt` token files are, and how fast the codecs run, on the tokens of real test images.

For each data set (MNIST test, all 1,000 files, 7x7 grids at K=512; CIFAR-10 test, the first 1,000 files in
sorted order, 8x8 grids at K=1024) the test images are tokenized by a trained model, then every file's codes
are written with each codec, in memory, with the header `vqtok encode` writes (fingerprint, modality,
original_size, source):

- `packed`: ceil(log2 K) bits per code;
- `entropy` with the model table: range coding over the model's training code counts (the file stores a
  checksum);
- `entropy` with a per-file table: range coding over the file's own code counts, stored in the payload;
- for comparison, constriction's range coder and ANS coder (pip install constriction; a benchmark extra) on
  the same model table, payload only: what the library's coders would cost in place of vqtok's own.

Each row gives payload-only and whole-file bits per token (whole file = 18 fixed bytes + JSON header +
payload), the fixed bytes per file and the codec's encode / decode speed in tokens per second (best of
--repeats passes over all files, header and CRC included). For reference: the order-0 entropy of the test
tokens, the cross-entropy of the tokens against the model table (normalised exactly as the coder uses it: the
ideal for the model-table coder) and uint16 codes (16 bits per token, the way DAC stores its codes). The
"one stream" rows code all test tokens of a data set as a single file, which shows what the coders reach
once the per-file costs are spread over many tokens.

    python benchmarks/tokens.py                                  # trains small models into runs/bench-tokens
    python benchmarks/tokens.py --model-mnist M.safetensors --model-cifar C.safetensors

Without --model-*, a model missing from the cache folder is trained there with `vqtok train` (800 steps,
64 channels, batch 64, one CPU thread; K=512 for MNIST, K=1024 for CIFAR-10). Results go to
benchmarks/results/tokens.json (written atomically).
"""

from __future__ import annotations


import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok.data import io as data
from vqtok.atomic import write_bytes_atomic  # noqa: E402
from vqtok.modelfile import load  # noqa: E402
from vqtok.jobs.pipeline import image_batches  # noqa: E402
from vqtok.tokens.tokfile import (  # noqa: E402
    FIXED_OVERHEAD_BYTES,
    bits_per_code,
    decode_tokens,
    encode_tokens,
    entropy_precision,
    normalize_table,
)
from timing import best_seconds  # noqa: E402  (benchmarks/timing.py; the script folder is on sys.path)

DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "runs" / "bench-tokens"
RESULTS = Path(__file__).resolve().parent / "results" / "tokens.json"
DATASETS = {
    # name: (train folder, test folder, codebook size, test files used (None: all))
    "mnist": ("mnist/train", "mnist/test", 512, None),
    "cifar10": ("cifar10/train", "cifar10/test", 1024, 1000),
}
# (row name, codec, table kind): "model" passes the model's counts, "file" stores the file's own counts.
CODINGS = [
    ("packed", "packed", None),
    ("entropy, model table", "entropy", "model"),
    ("entropy, per-file table", "entropy", "file"),
]
# Models trained here are small (64 channels, batch 64) so that training fits a busy 2-core CPU.
TRAIN_OPTIONS = ("--channels", "64", "--batch-size", "64")
# DAC (descript-audio-codec) keeps its codes as a uint16 array.
UINT16_BITS = 16


def model_path(name: str, given: Path | None, cache: Path, data_root: Path, steps: int, threads: int) -> Path:
    """The model for data set `name`: `given`, or cache/<name>/model.safetensors, trained there with
    `vqtok train` on `threads` CPU threads when missing (an interrupted run in the cache is resumed)."""
    if given is not None:
        return given
    out = cache / name
    path = out / "model.safetensors"
    if path.exists():
        return path
    train_dir, _, k, _ = DATASETS[name]
    cmd = [sys.executable, "-m", "vqtok", "train", str(data_root / train_dir), "--out", str(out),
           "--steps", str(steps), "--codebook-size", str(k), *TRAIN_OPTIONS]
    if (out / "run.json").exists():
        cmd.append("--resume")
    print(f"training {name}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return path


def tokenize(model_file: Path, test_dir: Path, limit: int | None, batch_size: int = 64) -> dict[str, Any]:
    """Encode the test images: {"items": [(codes (S, H, W) int64, header dict)], "table": (S, K) model counts,
    "codebook_size", "seconds"}. Headers hold what `vqtok encode <model> <test_dir>` writes besides the format
    fields."""
    model = load(model_file, "cpu")
    _, paths = data.find_inputs([test_dir])
    paths = paths[:limit] if limit is not None else paths
    fingerprint = model.fingerprint()
    items: list[tuple[np.ndarray, dict[str, Any]] | None] = [None] * len(paths)
    order = {path: i for i, path in enumerate(paths)}

    def failed(path: Path, reason: str) -> None:
        raise SystemExit(f"{path}: {reason}")

    begin = time.perf_counter()
    with torch.no_grad():
        for batch_items, batch in image_batches(paths, model.hop, batch_size, failed):
            codes = model.encode(batch.float().div_(255.0)).numpy()
            for (path, size), c in zip(batch_items, codes):
                header = {"fingerprint": fingerprint, "modality": model.config.modality,
                          "original_size": list(size), "source": data.relative_namer([test_dir])(path)}
                items[order[path]] = (c.astype(np.int64), header)
    seconds = time.perf_counter() - begin
    # One table per stage (the model's code counts): what this benchmark measures the coder against; the
    # context tables `vqtok train` also fits are measured in the rate-distortion section.
    return {"items": items, "table": model.code_frequencies(), "codebook_size": model.config.quantizer.codebook_size,
            "seconds": seconds}


def file_parts(blob: bytes) -> tuple[int, int]:
    """(header bytes (compressed JSON), payload bytes) of an encoded token file."""
    head_len = int.from_bytes(blob[6:10], "little")
    return head_len, len(blob) - FIXED_OVERHEAD_BYTES - head_len


def stored_table_bytes(codes: np.ndarray) -> int:
    """Bytes of the per-file counts that open an entropy payload with "table": "file", for codes (S, *grid):
    per stage a varint count of distinct codes, then a varint gap and a varint count for each one
    (docs/FORMAT.md)."""
    total = 0
    for row in codes.reshape(codes.shape[0], -1):
        syms, counts = np.unique(row, return_counts=True)
        gaps = np.diff(syms, prepend=-1) - 1
        total += varint_len(len(syms)) + sum(varint_len(int(v)) for v in (*gaps, *counts))
    return total


def varint_len(value: int) -> int:
    """Bytes of `value` as an unsigned LEB128 varint."""
    return max(1, math.ceil(value.bit_length() / 7))


def measure(items: list[tuple[np.ndarray, dict[str, Any]]], k: int, table: np.ndarray,
            repeats: int) -> list[dict[str, Any]]:
    """One row per coding in CODINGS: byte counts and speed over `items` (each item one token file)."""
    rows = []
    tokens = sum(codes.size for codes, _ in items)
    for name, codec, kind in CODINGS:
        use = table if kind == "model" else None
        blobs = [encode_tokens(codes, header, codebook_size=k, codec=codec, table=use) for codes, header in items]
        for blob, (codes, _) in zip(blobs, items):
            if not np.array_equal(decode_tokens(blob, table=use).codes, codes):
                raise AssertionError(f"{name}: decoded codes differ from the encoded ones")
        heads, payloads = zip(*(file_parts(b) for b in blobs))
        def encode_all(codec: str = codec, use: np.ndarray | None = use) -> None:
            for codes, header in items:
                encode_tokens(codes, header, codebook_size=k, codec=codec, table=use)

        def decode_all(blobs: list[bytes] = blobs, use: np.ndarray | None = use) -> None:
            for blob in blobs:
                decode_tokens(blob, table=use)

        enc = best_seconds(encode_all, repeats)
        dec = best_seconds(decode_all, repeats)
        row = {
            "coding": name, "files": len(items), "tokens": tokens,
            "payload_bytes": sum(payloads), "header_bytes": sum(heads),
            "file_bytes": sum(len(b) for b in blobs),
            "payload_bits_per_token": 8 * sum(payloads) / tokens,
            "file_bits_per_token": 8 * sum(len(b) for b in blobs) / tokens,
            "fixed_bytes_per_file": FIXED_OVERHEAD_BYTES + sum(heads) / len(items),
            "encode_tokens_per_s": tokens / enc, "decode_tokens_per_s": tokens / dec,
        }
        if kind == "file":
            table_bytes = [stored_table_bytes(codes) for codes, _ in items]
            if any(p < t for p, t in zip(payloads, table_bytes)):
                raise AssertionError("per-file table sizes do not match the payloads")
            row["stored_table_bytes"] = sum(table_bytes)
            row["stored_table_bits_per_token"] = 8 * sum(table_bytes) / tokens
        rows.append(row)
    return rows


def constriction_rows(items: list[tuple[np.ndarray, dict[str, Any]]], k: int, table: np.ndarray,
                      repeats: int) -> list[dict[str, Any]]:
    """constriction's queue (range) and stack (ANS) coders on the normalised model table, one stream per file:
    payload bytes (its streams are whole 32-bit words) and speed. An empty list if constriction is absent."""
    try:
        import constriction
    except ImportError:
        return []
    precision = entropy_precision(k)
    probs = normalize_table(table, precision)[0] / 2.0**precision
    model = constriction.stream.model.Categorical(probs, perfect=False)
    rows_in = [codes.reshape(-1).astype(np.int32) for codes, _ in items]
    tokens = sum(len(r) for r in rows_in)
    coders = {
        "constriction range coder, model table": (
            constriction.stream.queue.RangeEncoder,
            lambda enc, r: enc.encode(r, model),
            lambda words, n: constriction.stream.queue.RangeDecoder(words).decode(model, n)),
        "constriction ANS coder, model table": (
            constriction.stream.stack.AnsCoder,
            lambda enc, r: enc.encode_reverse(r, model),
            lambda words, n: constriction.stream.stack.AnsCoder(words).decode(model, n)),
    }
    out = []
    for name, (make, put, get) in coders.items():
        def encode_all() -> list[np.ndarray]:
            streams = []
            for r in rows_in:
                enc = make()
                put(enc, r)
                streams.append(enc.get_compressed())
            return streams

        streams = encode_all()
        if not all(np.array_equal(get(w, len(r)), r) for w, r in zip(streams, rows_in)):
            raise AssertionError(f"{name}: decoded codes differ from the encoded ones")
        enc = best_seconds(encode_all, repeats)
        dec = best_seconds(lambda: [get(w, len(r)) for w, r in zip(streams, rows_in)], repeats)
        payload = sum(4 * len(w) for w in streams)
        out.append({"coding": name, "files": len(items), "tokens": tokens, "payload_bytes": payload,
                    "payload_bits_per_token": 8 * payload / tokens,
                    "encode_tokens_per_s": tokens / enc, "decode_tokens_per_s": tokens / dec})
    return out


def entropies(codes: np.ndarray, per_file: list[np.ndarray], k: int, table: np.ndarray) -> dict[str, float]:
    """Reference figures in bits per token for single-stage codes (N,) in [0, K):

    order0: empirical entropy of the pooled codes; per_file_order0: mean over files of each file's own
    empirical entropy (what a per-file table could reach if storing it were free); cross_entropy: -mean log2 p
    with p the model table as the coder normalises it (the model-table coder's ideal); cross_entropy_raw: the
    same against the raw training counts.
    """
    def h0(x: np.ndarray) -> float:
        p = np.bincount(x, minlength=k) / len(x)
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    precision = entropy_precision(k)
    freqs = normalize_table(table, precision)[0].astype(np.float64)
    raw = table[0].astype(np.float64)
    return {
        "order0": h0(codes),
        "per_file_order0": float(np.mean([h0(f) for f in per_file])),
        "cross_entropy": float(-np.log2(freqs[codes] / 2.0**precision).mean()),
        "cross_entropy_raw": float(-np.log2(raw[codes] / raw.sum()).mean()),
        "codes_used": int(np.count_nonzero(np.bincount(codes, minlength=k))),
    }


def run_dataset(name: str, model_file: Path, data_root: Path, repeats: int) -> dict[str, Any]:
    """Tokenize one test split and measure every coding, per file and as one stream."""
    _, test_dir, _, limit = DATASETS[name]
    tok = tokenize(model_file, data_root / test_dir, limit)
    items, k, table = tok["items"], tok["codebook_size"], tok["table"]
    if table.shape[0] != 1:
        raise SystemExit(f"{model_file}: this benchmark expects a single-stage model, got {table.shape[0]} stages")
    per_file = [codes.reshape(-1) for codes, _ in items]
    pooled = np.concatenate(per_file)
    header = {key: items[0][1][key] for key in ("fingerprint", "modality")}
    stream = [(pooled.reshape(1, -1), {**header, "source": test_dir})]
    ref = entropies(pooled, per_file, k, table)
    result = {
        "model": str(model_file), "test": test_dir, "files": len(items), "codebook_size": k,
        "grid": list(items[0][0].shape[1:]), "tokens": int(pooled.size),
        "packed_bits": bits_per_code(k), "entropy_precision": entropy_precision(k),
        "tokenize_seconds": tok["seconds"], "reference": ref,
        "per_file": measure(items, k, table, repeats),
        "per_file_constriction": constriction_rows(items, k, table, repeats),
        "one_stream": measure(stream, k, table, repeats),
    }
    for row in result["per_file"] + result["one_stream"] + result["per_file_constriction"]:
        if "model table" in row["coding"]:
            row["ratio_to_cross_entropy"] = row["payload_bits_per_token"] / ref["cross_entropy"]
            # Bytes per file above the ideal: the coder's flush, and rounding to whole bytes.
            ideal_bytes = row["tokens"] * ref["cross_entropy"] / 8
            row["excess_bytes_per_file"] = (row["payload_bytes"] - ideal_bytes) / row["files"]
    return result


def goals(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's goals: packed payload is exactly ceil(n*ceil(log2 K)/8) bytes per file (<= ceil(log2 K)
    bits per token plus under one byte of padding); entropy with the model table within 3% of the
    cross-entropy, per file and as one stream."""
    n = math.prod(result["grid"])
    packed = result["per_file"][0]
    want = result["files"] * math.ceil(n * result["packed_bits"] / 8)
    model_rows = {part: next(r for r in result[part] if r["coding"] == "entropy, model table")
                  for part in ("per_file", "one_stream")}
    return {
        "packed_payload_exact": packed["payload_bytes"] == want,
        "entropy_model_within_3pct_per_file": model_rows["per_file"]["ratio_to_cross_entropy"] <= 1.03,
        "entropy_model_within_3pct_one_stream": model_rows["one_stream"]["ratio_to_cross_entropy"] <= 1.03,
    }


def table_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table: one block of rows per data set."""
    lines = ["| data set | coding | payload bits/token | file bits/token | fixed bytes/file | "
             "payload / cross-entropy | encode tokens/s | decode tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        ref = res["reference"]
        label = f"{name} {res['grid'][0]}x{res['grid'][1]} K={res['codebook_size']}"
        lines.append(f"| {label} | uint16 codes (DAC) | {UINT16_BITS:.2f} | | | "
                     f"{UINT16_BITS / ref['cross_entropy']:.2f} | | |")
        for part in ("per_file", "per_file_constriction", "one_stream"):
            for row in res[part]:
                coding = row["coding"]
                if part == "one_stream":
                    # One file for the whole split: its "per-file" table is the split's table, stored once.
                    coding = coding.replace("per-file table", "stored table") + " (one stream)"
                whole = (f"{row['file_bits_per_token']:.2f} | {row['fixed_bytes_per_file']:.0f}"
                         if "file_bits_per_token" in row else " | ")
                lines.append(
                    f"| {label} | {coding} | {row['payload_bits_per_token']:.2f} | {whole} | "
                    f"{row['payload_bits_per_token'] / ref['cross_entropy']:.3f} | "
                    f"{row['encode_tokens_per_s']:,.0f} | {row['decode_tokens_per_s']:,.0f} |")
        lines.append(f"| {label} | cross-entropy vs model table | {ref['cross_entropy']:.2f} | | | 1.000 | | |")
        lines.append(f"| {label} | order-0 entropy of the test tokens | {ref['order0']:.2f} | | | "
                     f"{ref['order0'] / ref['cross_entropy']:.3f} | | |")
        lines.append(f"| {label} | mean per-file order-0 entropy | {ref['per_file_order0']:.2f} | | | | | |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-mnist", type=Path, help="MNIST model (default: train one into --cache)")
    parser.add_argument("--model-cifar", type=Path, help="CIFAR-10 model (default: train one into --cache)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding mnist/ and cifar10/")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where missing models are trained")
    parser.add_argument("--steps", type=int, default=800, help="training steps for missing models")
    # On a 2-core box shared with other jobs, one thread trained 5x faster than two (OpenMP barriers stall).
    parser.add_argument("--train-threads", type=int, default=1, help="CPU threads for training missing models")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per codec (best is kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    given = {"mnist": args.model_mnist, "cifar10": args.model_cifar}
    results = {}
    for name in args.datasets:
        path = model_path(name, given[name], args.cache, args.data, args.steps, args.train_threads)
        results[name] = run_dataset(name, path, args.data, args.repeats)
        results[name]["goals"] = goals(results[name])

    lines = table_lines(results)
    print("\n".join(lines))
    for name, res in results.items():
        print(f"{name}: goals {res['goals']}; JSON header {res['per_file'][0]['header_bytes'] / res['files']:.0f} "
              f"bytes/file (packed); stored per-file table "
              f"{res['per_file'][2]['stored_table_bits_per_token']:.2f} bits/token")
    print(f"(best of {args.repeats}; torch {torch.__version__}, numpy {np.__version__}, {platform.machine()})")
    report = {
        "command": " ".join(["python", "benchmarks/tokens.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                    "platform": platform.platform()},
        "fixed_overhead_bytes": FIXED_OVERHEAD_BYTES, "uint16_bits_per_token": UINT16_BITS,
        "datasets": results, "table": lines,
    }
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
