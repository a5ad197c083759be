"""Fuzz the .vqt reader: mutated and random files must decode or raise TokenFileError, fast and small.

Valid seed files (both codecs, per-file and model tables, image and audio grids, 1-4 stages, K from 2 to
2^20) are mutated (bit flips, byte inserts/deletes/overwrites, truncation, forged header fields), about
half of them with the CRC recomputed so the checks behind the checksum are reached too; some inputs are
random bytes. Every read runs under a per-file CPU-time alarm (so a loaded machine does not fail it) and is
traced with tracemalloc, which slows reads several times; the times reported include that overhead.

    python benchmarks/fuzz_tokens.py [--count 100000] [--seed 0]

Prints a table and writes benchmarks/results/fuzz_tokens.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import struct
import sys
import time
import tracemalloc
import traceback
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqtok.errors import TokenFileError  # noqa: E402
from vqtok.tokens.tokfile import MAGIC, decode_tokens, encode_tokens, header_bytes, parse_header  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz_tokens.json"
TIME_LIMIT_S = 2.0
PEAK_LIMIT_BYTES = 64 << 20
HEADER = {"fingerprint": "fuzz0001", "modality": "image", "source": "seed"}
MUTATIONS = ("flip", "flips", "insert", "delete", "overwrite", "truncate", "header", "random", "random_magic")


class _Hang(Exception):
    """Raised by the alarm when one read uses more than TIME_LIMIT_S of CPU time."""


def _alarm(signum, frame):
    raise _Hang()


def make_seeds(rng: np.random.Generator) -> list[tuple[bytes, np.ndarray | None]]:
    """Valid files to mutate: (bytes, model table or None)."""
    seeds = []
    for k in (2, 3, 16, 256, 257, 512, 65536, 2**20):
        for stages, grid in ((1, (7, 7)), (2, (4, 6)), (4, (1, 40)), (1, (33,)), (3, (0, 5))):
            codes = np.minimum(rng.geometric(0.2, size=(stages, *grid)) - 1, k - 1)
            seeds.append((encode_tokens(codes, HEADER, codebook_size=k, codec="packed"), None))
            seeds.append((encode_tokens(codes, HEADER, codebook_size=k, codec="entropy"), None))
            table = rng.integers(0, 20, size=(stages, k))
            seeds.append((encode_tokens(codes, HEADER, codebook_size=k, codec="entropy", table=table), table))
    return seeds


def _forge_header(data: bytes, rng: np.random.Generator) -> bytes:
    """Replace one header field with a hostile value, keeping the framing consistent."""
    (head_len,) = struct.unpack_from("<I", data, 6)
    header = parse_header(data[10 : 10 + head_len])
    key = str(rng.choice(["grid", "stages", "codebook_size", "codec", "precision", "table", "table_crc", "version"]))
    hostile = [10**12, -1, 0, 2**64, [10**6, 10**6], [], "x", None, 1.5, True, {"a": 1}, [3] * 50, 24, 12]
    if key == "version":
        prefix = bytes([int(rng.integers(0, 4)), int(rng.integers(0, 256))])
        return data[:4] + prefix + data[6:]
    header[key] = hostile[int(rng.integers(len(hostile)))]
    head = header_bytes(header)
    return data[:6] + struct.pack("<I", len(head)) + head + data[10 + head_len :]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """(mutation name, mutated bytes)."""
    kind = str(rng.choice(MUTATIONS))
    buf = bytearray(data)
    pos = int(rng.integers(len(buf)))
    if kind == "flip":
        buf[pos] ^= 1 << int(rng.integers(8))
    elif kind == "flips":
        for p in rng.integers(len(buf), size=int(rng.integers(2, 9))):
            buf[int(p)] ^= 1 << int(rng.integers(8))
    elif kind == "insert":
        buf[pos:pos] = rng.bytes(int(rng.integers(1, 17)))
    elif kind == "delete":
        del buf[pos : pos + int(rng.integers(1, 17))]
    elif kind == "overwrite":
        chunk = rng.bytes(int(rng.integers(1, 9)))
        buf[pos : pos + len(chunk)] = chunk
    elif kind == "truncate":
        del buf[pos:]
    elif kind == "header":
        buf = bytearray(_forge_header(data, rng))
    elif kind == "random":
        return kind, rng.bytes(int(rng.integers(0, 300)))
    else:
        return kind, MAGIC + bytes([1, 0]) + rng.bytes(int(rng.integers(0, 300)))
    # Half the mutants get a valid CRC, so the checks behind the checksum see them too.
    if rng.random() < 0.5 and len(buf) >= 4:
        buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
        kind += "+crc"
    return kind, bytes(buf)


def run(count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    seeds = make_seeds(rng)
    outcomes: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    decoded_by_kind: Counter[str] = Counter()
    failures: list[str] = []
    max_time, max_cpu, total_time, max_peak = 0.0, 0.0, 0.0, 0
    signal.signal(signal.SIGPROF, _alarm)
    tracemalloc.start()
    try:
        for i in range(count):
            data, table = seeds[int(rng.integers(len(seeds)))]
            kind, mutated = mutate(data, rng)
            by_kind[kind] += 1
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            signal.setitimer(signal.ITIMER_PROF, TIME_LIMIT_S)
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                decode_tokens(mutated, table=table, source=f"fuzz{i}.vqt")
                outcome = "decoded"
                decoded_by_kind[kind] += 1
            except TokenFileError:
                outcome = "TokenFileError"
            except _Hang:
                outcome = "timeout"
                failures.append(f"case {i} ({kind}): over {TIME_LIMIT_S} s of CPU time")
            except Exception:  # the point of the benchmark: anything else is a reader bug
                outcome = "other exception"
                failures.append(f"case {i} ({kind}): {traceback.format_exc(limit=3)}")
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            elapsed = time.perf_counter() - start
            max_cpu = max(max_cpu, time.process_time() - start_cpu)
            peak = tracemalloc.get_traced_memory()[1] - base
            outcomes[outcome] += 1
            max_time = max(max_time, elapsed)
            total_time += elapsed
            max_peak = max(max_peak, peak)
    finally:
        tracemalloc.stop()
    return {
        "count": count,
        "seed": seed,
        "seed_files": len(seeds),
        "outcomes": dict(outcomes),
        "other_exceptions": outcomes["other exception"],
        "timeouts": outcomes["timeout"],
        "mutations": dict(sorted(by_kind.items())),
        "decoded_by_mutation": dict(sorted(decoded_by_kind.items())),
        "max_time_per_file_ms": round(max_time * 1e3, 3),
        "max_cpu_time_per_file_ms": round(max_cpu * 1e3, 3),
        "mean_time_per_file_ms": round(total_time / max(count, 1) * 1e3, 4),
        "max_peak_alloc_mb": round(max_peak / 2**20, 3),
        "limits": {"cpu_time_per_file_s": TIME_LIMIT_S, "peak_alloc_mb": PEAK_LIMIT_BYTES / 2**20},
        "passed": not failures and max_peak < PEAK_LIMIT_BYTES,
        "failures": failures[:20],
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="files to read (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results path")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.count, args.seed)
    result["wall_s"] = round(time.perf_counter() - start, 1)

    rows = [
        ("files read", result["count"]),
        ("decoded", result["outcomes"].get("decoded", 0)),
        ("TokenFileError", result["outcomes"].get("TokenFileError", 0)),
        ("other exceptions", result["other_exceptions"]),
        ("timeouts", result["timeouts"]),
        ("max wall time per file (ms)", result["max_time_per_file_ms"]),
        ("max CPU time per file (ms)", result["max_cpu_time_per_file_ms"]),
        ("mean time per file (ms)", result["mean_time_per_file_ms"]),
        ("max peak allocation (MB)", result["max_peak_alloc_mb"]),
        ("wall time (s)", result["wall_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"{'result':<{width}}  {'PASS' if result['passed'] else 'FAIL'}")
    for failure in result["failures"][:5]:
        print(failure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
