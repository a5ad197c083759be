"""Audio tokenizers on real speech: quality at several bitrates, and a 60-minute file in bounded memory.

    python benchmarks/audio.py                      # both data sets (in parallel), then the long-file test
    python benchmarks/audio.py --minutes 2          # a shorter training budget
    python benchmarks/audio.py --reuse              # keep models already trained under runs/bench-audio
    python benchmarks/audio.py --parts long --reuse # only the long-file test (other results are kept)

Data sets (../shared/data): LibriSpeech (train on train-clean-100, 16 kHz, evaluate on test-other) and FSDD
(8 kHz; train on recordings with index >= 5, test on 0-4). Each model is vqtok's audio default (strides
2, 4, 5, 8, channels 64, one residual unit per stride, 8 stages of 1024 codes of dimension 64, stage
dropout 0.5), trained with batch 8 of 0.25 s segments for a wall-clock budget (`--minutes`: the step count is
set from the measured speed of a few calibration steps), one thread per data set. Every model is scored on
the whole test files with the first 1, 2, 4 and all stages: SI-SNR (dB), log-mel distance, kbps
(stages x log2 K x frame rate) and code usage per stage.

Long files: one 60-minute FLAC made from LibriSpeech clips back to back is encoded and decoded with the `vqtok`
command in a child process; its peak RSS (getrusage of the child) must stay under 2 GB and the decoded WAV must
have the input's length and rate. Chunked and one-piece encodes are compared on the first 60 s.

Prints tables and writes benchmarks/results/audio.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok.data import io as data
from vqtok.data.streams import BatchPlan  # noqa: E402
from vqtok.training.audiosets import AudioTask  # noqa: E402
from vqtok.jobs.audiostream import encode_signal, model_signal  # noqa: E402
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig  # noqa: E402
from vqtok.evaluate import AudioEvaluator  # noqa: E402
from vqtok.modelfile import load  # noqa: E402
from vqtok.nets.tokenizer import Tokenizer  # noqa: E402
from vqtok.training.loop import model_param_groups, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "bench-audio"  # /runs/ is git-ignored
RESULTS = ROOT / "benchmarks" / "results" / "audio.json"
LONG_MINUTES = 60
BATCH = 8
SEGMENT_SECONDS = 0.25
RSS_LIMIT_MB = 2048


def fsdd_split() -> tuple[list[Path], list[Path]]:
    files = sorted((DATA / "fsdd" / "recordings").glob("*.wav"))
    index = lambda p: int(p.stem.split("_")[2])  # noqa: E731  {digit}_{speaker}_{index}.wav
    return [p for p in files if index(p) >= 5], [p for p in files if index(p) < 5]


def librispeech_split() -> tuple[list[Path], list[Path]]:
    root = DATA / "librispeech"
    return sorted((root / "train-clean-100").rglob("*.flac")), sorted((root / "test-other").rglob("*.flac"))


DATASETS = {"librispeech": (16000, librispeech_split), "fsdd": (8000, fsdd_split)}


def model_config(rate: int) -> ModelConfig:
    return ModelConfig(modality="audio", in_channels=1, channels=64, res_blocks=1, sample_rate=rate,
                       audio_strides=(2, 4, 5, 8), downsample=320,
                       quantizer=QuantizerConfig(dim=64, codebook_size=1024, stages=8, stage_dropout=0.5))


def calibrate(config: ModelConfig, files: list[Path], batch: int, steps: int = 10) -> float:
    """Training steps per second of this model on this machine (forward, loss, backward, AdamW step)."""
    task = AudioTask(files[:32], config, TrainConfig(segment_seconds=SEGMENT_SECONDS))
    plan = iter(BatchPlan(len(task.train_data), batch, 0, 0, steps + 1, weights=task.weights))
    model = Tokenizer(config)
    optimizer = torch.optim.AdamW(model_param_groups(model, 1e-3), lr=1e-3)
    for i in range(steps + 1):
        if i == 1:
            begin = time.perf_counter()
        x = torch.stack([task.train_data[item][0] for item in next(plan)])
        out = model(x)
        loss = task.reconstruction_loss(out.recon, x) + sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - begin)


def run_dataset(name: str, minutes: float, reuse: bool) -> dict[str, Any]:
    """Train (or reuse) the model for one data set and score it at 1, 2, 4 and all stages."""
    torch.set_num_threads(1)
    rate, split = DATASETS[name]
    train_files, test_files = split()
    config = model_config(rate)
    run = OUT / name
    model_path = run / "model.safetensors"
    info: dict[str, Any] = {"sample_rate": rate, "train_files": len(train_files), "test_files": len(test_files)}
    if not (reuse and model_path.exists()):
        if run.exists():
            import shutil

            shutil.rmtree(run)
        speed = calibrate(config, train_files, BATCH)
        steps = max(50, int(speed * minutes * 60 * 0.9))
        tc = TrainConfig(steps=steps, batch_size=BATCH, warmup=min(200, steps // 10), segment_seconds=SEGMENT_SECONDS,
                         checkpoint_every=max(steps // 4, 1), log_every=50, device="cpu", max_val=32)
        result = train(train_files, run, config, tc)
        info.update(steps=steps, train_seconds=result.seconds, steps_per_second=result.steps_per_second)
    else:
        info.update(json.loads((run / "bench.json").read_text())["training"])
    training = {k: info[k] for k in ("steps", "train_seconds", "steps_per_second")}
    (run / "bench.json").write_text(json.dumps({"training": training}))
    model = load(model_path)
    waves, kept, skipped = data.load_audio_set(test_files, rate)
    rows = []
    for stages in (1, 2, 4, config.quantizer.stages):
        evaluator = AudioEvaluator(model, stages)
        begin = time.perf_counter()
        for wave in waves:
            evaluator.add(wave)
        result = evaluator.result()
        rows.append({
            "stages": stages,
            "si_snr_db": result["si_snr"],
            "mel_distance": result["mel_distance"],
            "kbps": result["kbps"],
            "usage_per_stage": [result[f"usage_stage_{s + 1}"] for s in range(stages)],
            "perplexity_per_stage": [result[f"perplexity_stage_{s + 1}"] for s in range(stages)],
            "eval_seconds": time.perf_counter() - begin,
            "test_seconds_of_audio": result["audio_seconds"],
        })
    info["rows"] = rows
    info["skipped"] = len(skipped)
    return info


def _measured(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` under a helper interpreter that reports its own child's peak RSS (KiB on Linux) in MB."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
             "sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    seconds, rss = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss)


def long_file_test(model_path: Path) -> dict[str, Any]:
    """Encode and decode a 60-minute file with the CLI, bounded memory; chunked vs one-piece agreement."""
    torch.set_num_threads(1)
    work = OUT / "long"
    work.mkdir(parents=True, exist_ok=True)
    rate = 16000
    long_path = work / "hour.flac"
    need = LONG_MINUTES * 60 * rate
    if not long_path.exists() or sf.info(str(long_path)).frames != need:
        clips = sorted((DATA / "librispeech" / "train-clean-100").rglob("*.flac"))
        clips += sorted((DATA / "librispeech" / "test-other").rglob("*.flac"))
        written = 0
        with sf.SoundFile(str(long_path), "w", samplerate=rate, channels=1, subtype="PCM_16", format="FLAC") as out:
            for clip in clips:
                audio, clip_rate = sf.read(str(clip), dtype="int16")
                assert clip_rate == rate
                take = audio[: need - written]
                out.write(take)
                written += len(take)
                if written >= need:
                    break
        if written < need:
            raise RuntimeError(f"only {written / rate:.0f} s of LibriSpeech found; need {need / rate:.0f} s")
    vqtok = [sys.executable, "-m", "vqtok"]
    tokens, recon = work / "tokens", work / "recon"
    enc_s, enc_rss = _measured([*vqtok, "encode", str(model_path), str(long_path), "--out", str(tokens), "--force",
                                "--device", "cpu"])
    dec_s, dec_rss = _measured([*vqtok, "decode", str(model_path), str(tokens), "--out", str(recon), "--force",
                                "--device", "cpu"])
    out_info = sf.info(str(recon / "hour.wav"))

    # Chunked against one piece on the first 60 s (one piece fits in memory there).
    minute = work / "minute.wav"
    audio, _ = sf.read(str(long_path), frames=60 * rate, dtype="int16")
    sf.write(str(minute), audio, rate, subtype="PCM_16")
    model = load(model_path)
    whole_wave, _ = data.pad_length(data.load_audio(minute, rate), model.hop)
    whole = model.encode(whole_wave[None])[0]
    file, signal = model_signal(minute, rate)
    with file:
        agreement = {}
        for seconds in (30.0, 5.0, 1.0):
            chunked = encode_signal(model, signal, chunk_seconds=seconds)
            agreement[str(seconds)] = float((chunked == whole).float().mean())
    return {
        "minutes": LONG_MINUTES,
        "input_bytes": long_path.stat().st_size,
        "token_bytes": (tokens / "hour.flac.vqt").stat().st_size,
        "encode_seconds": enc_s, "encode_peak_rss_mb": enc_rss,
        "decode_seconds": dec_s, "decode_peak_rss_mb": dec_rss,
        "rss_limit_mb": RSS_LIMIT_MB,
        "decoded_frames": out_info.frames, "decoded_rate": out_info.samplerate,
        "length_exact": out_info.frames == need and out_info.samplerate == rate,
        "chunked_vs_whole_agreement_60s": agreement,
    }


def print_tables(results: dict[str, Any]) -> None:
    for name, info in results["datasets"].items():
        print(f"\n{name}: {info['sample_rate']} Hz, {info['train_files']} train / {info['test_files']} test files, "
              f"{info['steps']} steps in {info['train_seconds'] / 60:.1f} min ({info['steps_per_second']:.2f} steps/s)")
        print("| stages | kbps | SI-SNR dB | mel distance | usage per stage (%) |")
        print("|---:|---:|---:|---:|---|")
        for row in info["rows"]:
            usage = " ".join(f"{100 * u:.0f}" for u in row["usage_per_stage"])
            print(f"| {row['stages']} | {row['kbps']:.2f} | {row['si_snr_db']:.2f} | {row['mel_distance']:.3f} "
                  f"| {usage} |")
    long = results.get("long")
    if long:
        print(f"\n{long['minutes']}-minute file: encode {long['encode_seconds']:.0f} s, peak RSS "
              f"{long['encode_peak_rss_mb']:.0f} MB; decode {long['decode_seconds']:.0f} s, peak RSS "
              f"{long['decode_peak_rss_mb']:.0f} MB (limit {long['rss_limit_mb']} MB); decoded length exact: "
              f"{long['length_exact']}; chunked vs one-piece codes on 60 s: {long['chunked_vs_whole_agreement_60s']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="Training budget per data set (wall clock).")
    parser.add_argument("--reuse", action="store_true", help="Reuse models trained by an earlier run.")
    parser.add_argument("--datasets", default="librispeech,fsdd")
    parser.add_argument("--parts", default="datasets,long",
                        help="datasets (train and score), long (the 60-minute file); results of parts not run are "
                             "kept from the existing JSON.")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "datasets" in parts:
        names = [n for n in args.datasets.split(",") if n]
        results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_job": 1,
                              "minutes_per_dataset": args.minutes}
        with ProcessPoolExecutor(len(names)) as pool:
            jobs = {n: pool.submit(run_dataset, n, args.minutes, args.reuse) for n in names}
            results["datasets"] = {**results.get("datasets", {}), **{n: job.result() for n, job in jobs.items()}}
    if "long" in parts:
        results["long"] = long_file_test(OUT / "librispeech" / "model.safetensors")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)


if __name__ == "__main__":
    main()
