"""Speech diagnosis: which part of a vqtok audio model's output costs its PESQ and STOI, and whether the level
of what it decodes follows the level of what went in.

    python benchmarks/speech_diagnosis.py models/speech/model.safetensors
    python benchmarks/speech_diagnosis.py MODEL --clips 6 --out /tmp/diagnosis

Clips: the first --clips files under --data (default: LibriSpeech test-other, as benchmarks/speech.py), decoded
by the model (all its stages) at its own rate. Hybrids of output and original are built at 16 kHz on one STFT
(WINDOW-sample Hann window, hop WINDOW / 4): magnitudes and phases taken bin by bin from one or the other,
then an inverse STFT. Each row is scored by `vqtok.speech.score`, as in benchmarks/speech.py, averaged over
clips:

- original, STFT round trip: the hybrids' machinery alone, which must be transparent;
- model: the output as decoded;
- original magnitudes, model phases; model magnitudes, original phases;
- original magnitudes below F Hz (F in SPLIT_HZ), the model's above, model phases;
- original envelope, model phases: the original's magnitudes averaged over ENVELOPE_BINS bins (the spectral
  envelope kept, the voice's harmonics blurred).

Level: 10 log10 of the output's energy over the input's, per clip, with the input scaled by each of GAINS
(clamped to [-1, 1]) before encoding; 0 dB is a codec that keeps the level.

Prints both tables and writes speech_diagnosis.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok import speech  # noqa: E402
from vqtok.data import io as data  # noqa: E402
from vqtok.errors import VqtokError  # noqa: E402
from vqtok.modelfile import load  # noqa: E402
from vqtok.nets.tokenizer import Tokenizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "librispeech" / "test-other"
RESULTS = ROOT / "benchmarks" / "results"
WINDOW = 512
SPLIT_HZ = (1000, 2000, 4000)
ENVELOPE_BINS = 9
GAINS = (0.25, 1.0, 2.0)
SCORES = ("pesq_wb", "stoi", "si_snr_db")

# A hybrid: (original spectrum, model output spectrum), both (bins, frames) complex -> the spectrum to score.
Hybrid = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a vqtok audio model (model.safetensors)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of speech (default: LibriSpeech test-other)")
    p.add_argument("--clips", type=int, default=6, help="use the first N files, sorted by path (default 6)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for speech_diagnosis.json")
    return p.parse_args()


def _polar(magnitude: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`magnitude` under the phases of `like` (same shapes)."""
    return torch.polar(magnitude, like.angle())


def _low_band_original(split_hz: int) -> Hybrid:
    def hybrid(orig: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        bins = round(split_hz / (speech.SPEECH_RATE / 2) * (orig.shape[0] - 1))
        magnitude = model.abs().clone()
        magnitude[:bins] = orig.abs()[:bins]
        return _polar(magnitude, model)
    return hybrid


def _envelope(orig: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    smooth = F.avg_pool1d(orig.abs().T[:, None], ENVELOPE_BINS, 1, ENVELOPE_BINS // 2, count_include_pad=False)
    return _polar(smooth[:, 0].T, model)


HYBRIDS: dict[str, Hybrid] = {
    "original, STFT round trip": lambda orig, model: orig,
    "model": lambda orig, model: model,
    "original magnitudes, model phases": lambda orig, model: _polar(orig.abs(), model),
    "model magnitudes, original phases": lambda orig, model: _polar(model.abs(), orig),
    **{f"original magnitudes below {hz} Hz": _low_band_original(hz) for hz in SPLIT_HZ},
    "original envelope, model phases": _envelope,
}


def decode(model: Tokenizer, wave: torch.Tensor) -> torch.Tensor:
    """(1, T) at the model's rate -> the model's output (1, T), all stages, clamped to [-1, 1]."""
    padded, length = data.pad_length(wave, model.hop)
    with torch.no_grad():
        return model(padded[None]).recon[0, :, :length].clamp(-1.0, 1.0)


def hybrid_scores(original: torch.Tensor, output: torch.Tensor) -> dict[str, dict]:
    """Scores of every HYBRIDS row for one clip: original and output (T,) at 16 kHz."""
    window = torch.hann_window(WINDOW)

    def stft(x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x, WINDOW, WINDOW // 4, window=window, return_complex=True)

    orig, model = stft(original), stft(output)
    return {name: speech.score(original, torch.istft(make(orig, model), WINDOW, WINDOW // 4, window=window,
                                                    length=len(original)))
            for name, make in HYBRIDS.items()}


def level_db(model: Tokenizer, wave: torch.Tensor, gain: float) -> float:
    """Output over input energy in dB for `wave` (1, T) scaled by `gain`."""
    scaled = (wave * gain).clamp(-1.0, 1.0)
    return float(10 * torch.log10(decode(model, scaled).pow(2).sum() / scaled.pow(2).sum().clamp(min=1e-12)))


def diagnose(model: Tokenizer, paths: list[Path]) -> dict:
    """Mean scores per hybrid and mean level per gain over the clips at `paths`."""
    rate = model.config.sample_rate
    per_row: dict[str, list[dict]] = {name: [] for name in HYBRIDS}
    levels: dict[float, list[float]] = {gain: [] for gain in GAINS}
    for path in paths:
        wave = data.load_audio(path, rate)
        output = decode(model, wave)
        for name, scores in hybrid_scores(speech.at_speech_rate(wave, rate),
                                          speech.at_speech_rate(output, rate)).items():
            per_row[name].append(scores)
        for gain in GAINS:
            levels[gain].append(level_db(model, wave, gain))
    rows = []
    for name, scores in per_row.items():
        row = {"row": name}
        for key in SCORES:
            values = [s[key] for s in scores if s.get(key) is not None]
            if values:
                row[key] = float(np.mean(values))
        rows.append(row)
    return {"rows": rows, "levels": [{"gain": gain, "level_db": float(np.mean(values))}
                                     for gain, values in levels.items()]}


def print_tables(result: dict) -> None:
    console = Console()
    table = Table(title="where the quality goes")
    table.add_column("row")
    for label in ("PESQ-wb", "STOI", "SI-SNR dB"):
        table.add_column(label, justify="right")
    for row in result["rows"]:
        table.add_row(row["row"], *(f"{row[key]:.3f}" if key in row else "-" for key in SCORES))
    console.print(table)
    levels = Table(title="level: output over input energy")
    levels.add_column("input gain", justify="right")
    levels.add_column("dB", justify="right")
    for row in result["levels"]:
        levels.add_row(f"{row['gain']:g}", f"{row['level_db']:+.2f}")
    console.print(levels)


def main() -> None:
    args = parse_args()
    if args.clips < 1:
        raise SystemExit("error: --clips must be at least 1")
    if not args.data.is_dir():
        print(f"skipped: {args.data} is absent (LibriSpeech test-other is ../shared/data/librispeech/test-other)",
              file=sys.stderr)
        return
    try:
        model = load(args.model).eval()
        modality, paths = data.find_inputs([args.data])
    except VqtokError as err:
        raise SystemExit(f"error: {err}") from None
    if model.config.modality != "audio" or modality != "audio":
        raise SystemExit(f"error: {args.model} and {args.data} must both be audio")
    for name in speech.missing_packages():
        print(f"{name} not installed: no {speech.PACKAGES[name]} column ({speech.INSTALL_HINT})", file=sys.stderr)
    paths = sorted(paths)[:args.clips]
    result = {"model": str(args.model), "data": str(args.data), "clips": [p.name for p in paths],
              "window": WINDOW, **diagnose(model, paths)}
    print_tables(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speech_diagnosis.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
