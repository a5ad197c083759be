"""Speech: a vqtok audio model against Opus and Codec 2 on the same clips (LibriSpeech test-other by default).

    python benchmarks/speech.py runs/speech/model.safetensors
    python benchmarks/speech.py runs/speech/model.safetensors --clips 10 --out /tmp/speech
    python benchmarks/speech.py models/speech/model.safetensors --refine 0     # no refined rows: a minute or two

Clips: --clips audio files under --data taken in turn from each folder (a speaker, in LibriSpeech): the first
file of every folder, then the second, and so on (sorted by path), after the first --skip in that order; mono,
at 16 kHz (resampled when a file is not). On test-other's 10 speakers the default 30 clips are 3 of each.
Each row's rate is that of its real files, 8 * bytes / the clip's duration, averaged over clips:

- vqtok, for every stage count 1..S: `AudioEvaluator` builds in memory the `.vqt` file `vqtok encode` would
  write (`--codec packed`, and `--codec entropy` with the model's code table: `kbps_entropy`); the nominal rate
  is stages x log2 K x frames/s. The model sees the clip at its own rate; its output is resampled to 16 kHz.
- vqtok refined ("vqtok refined"), for the stage counts of --refine-stages: the same with the codes refined
  --refine steps by analysis by synthesis, as `vqtok encode --refine N` writes them (vqtok.jobs.refine);
  --refine 0 leaves these rows out. They take most of the run: about 1.3 s per second of audio and stage count
  at 50 steps on two CPU cores.
- vqtok searched ("vqtok searched"), for the stage counts of --search-stages: refined as above, then each
  stage's codes chosen among its --search nearest by the decoded output's error (log-mel and band
  envelopes, vqtok.jobs.refine), as `vqtok encode --refine N --search K` writes them; --search 0 leaves these
  rows out. About 4 s per second of audio and stage at 32 candidates on two CPU cores.
- postfiltered (", postfiltered" after each vqtok codec, unless --postfilter 0): every vqtok row's decode again,
  through the decoder-side postfilter at strength --postfilter (vqtok.postfilter), as `vqtok decode
  --postfilter S` writes it. The token files, and so the rates, are those of the row above it.
- Opus: `opusenc --hard-cbr --framesize 20 --bitrate B` (B = OPUS_KBPS) on a 16-bit 16 kHz WAV, then
  `opusdec --rate 16000`; the rate counts the whole .opus file, Ogg pages and OpusHead / OpusTags included.
- Codec 2: `c2enc MODE` (each of CODEC2_MODES, 450 to 3200 bit/s) on 16-bit 8 kHz raw samples (resampled from
  16 kHz), `c2dec`, then back to 16 kHz; the rate counts the .c2 file, its mode header included.

Every decoded clip is scored by one function, `vqtok.speech.score`: at 16 kHz, the codec's delay undone (the lag
of largest cross-correlation within +-50 ms; both signals shifted and trimmed to their overlap), then PESQ
wide-band (MOS-LQO; a clip PESQ refuses is skipped and counted), STOI and SI-SNR, averaged over clips. A missing
tool (opusenc / opusdec, c2enc / c2dec) or package (pesq, pystoi) is reported in one line and its rows or
columns are left out.

Generalisation: the same vqtok rows on --other (default samples/heldout/speech-24k: six FSDD speakers, a corpus
and speakers the model never heard, stored at 24 kHz so vqtok resamples on load), beside the test-other rows
with the PESQ difference.

Prints the tables and writes, under --out, speech.json, speech.png (PESQ and STOI against kbps) and
speech_spectrograms.png (the first clip: original, Opus at 6 kbps, vqtok at the stage count nearest that rate).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchaudio.functional as AF
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok import plots, speech  # noqa: E402
from vqtok.data import io as data  # noqa: E402
from vqtok.device import pick_device  # noqa: E402
from vqtok.errors import VqtokError  # noqa: E402
from vqtok.evaluate import AudioEvaluator  # noqa: E402
from vqtok.jobs.audiostream import postfiltered  # noqa: E402
from vqtok.jobs.pipeline import audio_header, code_table  # noqa: E402
from vqtok.jobs.refine import Refinement  # noqa: E402
from vqtok.modelfile import load  # noqa: E402
from vqtok.postfilter import SPEECH_STRENGTH  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "librispeech" / "test-other"
DEFAULT_OTHER = ROOT / "samples" / "heldout" / "speech-24k"
RESULTS = ROOT / "benchmarks" / "results"
RATE = speech.SPEECH_RATE
OPUS_KBPS = (6, 8, 12)
# Every narrow-band mode of Codec 2 1.x, named as c2enc takes them, with its bit rate in kbps.
CODEC2_MODES = {"450": 0.45, "700C": 0.7, "1200": 1.2, "1300": 1.3, "1400": 1.4, "1600": 1.6, "2400": 2.4,
                "3200": 3.2}
CODEC2_RATE = 8000
# The Opus setting in the spectrogram picture.
PICTURE_KBPS = 6
# Each codec's command-line tools, and where Debian has them.
TOOLS = {"Opus": (("opusenc", "opusdec"), "apt install opus-tools"),
         "Codec 2": (("c2enc", "c2dec"), "apt install codec2")}
# Scores averaged into a row, in table order.
SCORES = ("pesq_wb", "stoi", "si_snr_db", "delay_ms")

# A round trip: (the clip (T,) at 16 kHz, a scratch folder) -> (bytes of the encoded file, decoded (T',) at 16 kHz).
RoundTrip = Callable[[torch.Tensor, Path], tuple[int, torch.Tensor]]


@dataclass
class Clip:
    path: Path
    source: str  # the name `vqtok encode DATA` records: the path relative to the data folder
    wave: torch.Tensor  # (T,) float32 at RATE
    seconds: float  # of the file as stored


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a vqtok audio model (model.safetensors)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of speech (default: LibriSpeech test-other)")
    p.add_argument("--clips", type=int, default=30,
                   help="use N files, taken in turn from each folder (speaker) (default 30)")
    p.add_argument("--skip", type=int, default=0, help="pass over the first N files in that order (default 0)")
    p.add_argument("--other", type=Path, default=DEFAULT_OTHER,
                   help="speech of another corpus and rate for the generalisation rows (default: %(default)s)")
    p.add_argument("--refine", type=int, default=50, help="refinement steps of the refined rows; 0: none (default 50)")
    p.add_argument("--refine-stages", default="1,2,3,4,5,8",
                   help="stage counts of the refined rows, comma-separated (default: %(default)s)")
    p.add_argument("--search", type=int, default=32,
                   help="candidates a stage of the searched rows (after --refine steps); 0: none (default 32)")
    p.add_argument("--search-stages", default="1,2",
                   help="stage counts of the searched rows, comma-separated (default: %(default)s)")
    p.add_argument("--postfilter", type=float, default=SPEECH_STRENGTH,
                   help="strength of the postfiltered vqtok rows (as `vqtok decode --postfilter`); 0: none "
                        "(default %(default)s)")
    p.add_argument("--device", default="auto", help="device for the model (auto, cpu, cuda, ...)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for speech.json and the two PNGs")
    return p.parse_args()


def speaker_order(paths: list[Path]) -> list[Path]:
    """`paths` taken in turn from each folder (sorted by path): every folder's first file, then every folder's
    second... So the first N files spread over all speakers, not the first few speakers' whole folders."""
    folders: dict[Path, list[Path]] = {}
    for path in sorted(paths):
        folders.setdefault(path.parent, []).append(path)
    depth = max((len(files) for files in folders.values()), default=0)
    return [files[i] for i in range(depth) for files in folders.values() if i < len(files)]


def load_clips(folder: Path, count: int, skip: int = 0) -> list[Clip]:
    """`count` audio files under `folder` in `speaker_order`, after the first `skip`, at RATE."""
    modality, paths = data.find_inputs([folder])
    if modality != "audio":
        raise SystemExit(f"error: {folder} holds images, not audio")
    clips = []
    for path in speaker_order(paths)[skip:skip + count]:
        rate, frames, _ = data.audio_info(path)
        clips.append(Clip(path, data.relative_namer([folder])(path), data.load_audio(path, RATE)[0],
                          frames / rate))
    return clips


def mean_scores(scores: list[dict]) -> dict:
    """Means over clips of each score present, PESQ and STOI over the clips each accepted, with `pesq_skipped`
    and `stoi_skipped` beside them."""
    out: dict = {}
    for key in SCORES:
        values = [s[key] for s in scores if s.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
    for key, skipped in (("pesq_wb", "pesq_skipped"), ("stoi", "stoi_skipped")):
        if any(key in s for s in scores):
            out[skipped] = sum(s[key] is None for s in scores)
    return out


def vqtok_rows(model_path: Path, clips: list[Clip], device: str, refine: Refinement = Refinement(),
               stage_counts: list[int] | None = None,
               postfilter: float = 0.0) -> tuple[dict, list[dict], list[torch.Tensor]]:
    """The model's description, one row per stage count (`stage_counts`, default 1..S: file kbps packed and
    entropy-coded, nominal kbps, mean scores), and each row's decoded first clip at RATE. Codes chosen as
    `refine` says; rows named by `row_codec`. A non-zero `postfilter`: each row is followed by one scoring the
    same decode through the postfilter at that strength, as `vqtok decode --postfilter` writes it."""
    dev = pick_device(device)
    model = load(model_path, dev)
    if model.config.modality != "audio":
        raise SystemExit(f"error: {model_path} is an {model.config.modality} model, not an audio one")
    q, rate = model.config.quantizer, model.config.sample_rate
    info = {"path": str(model_path), "sample_rate": rate, "hop": model.hop, "stages": q.stages,
            "codebook_size": q.codebook_size, "fingerprint": model.fingerprint()}
    table = code_table(model)
    # Each clip as the model sees it, and the header fields `vqtok encode DATA` would record for it.
    inputs = [(data.load_audio(clip.path, rate).to(dev),
               {**audio_header(rate, data.audio_info(clip.path), mono=True, refine=refine), "source": clip.source})
              for clip in clips]
    rows, firsts = [], []
    for stages in stage_counts or range(1, q.stages + 1):
        evaluator = AudioEvaluator(model, stages, table, refine=refine)
        decoded = [evaluator.add(wave, fields) for wave, fields in inputs]  # (1, T) each, at the model's rate
        result = evaluator.result()
        setting = (f"{stages} stage{'s' * (stages > 1)}" + (f", {refine.steps} steps" if refine.steps else "")
                   + (f", {refine.search} candidates" if refine.search else ""))
        row = {"codec": row_codec(refine), "setting": setting, "stages": stages, "nominal_kbps": result["kbps"],
               "kbps": result["kbps_packed_file"], "kbps_entropy": result["kbps_entropy_file"]}
        versions = [(row, decoded)]
        if postfilter:
            versions.append(({**row, "codec": f"{row['codec']}, postfiltered",
                              "setting": f"{setting}, postfilter {postfilter:g}"},
                             [postfiltered(wave, rate, postfilter).clamp(-1.0, 1.0) for wave in decoded]))
        for version, waves in versions:
            waves = [speech.at_speech_rate(wave, rate) for wave in waves]
            scores = [speech.score(clip.wave, wave) for clip, wave in zip(clips, waves)]
            rows.append({**version, **mean_scores(scores)})
            firsts.append(waves[0])
    return info, rows, firsts


def row_codec(refine: Refinement) -> str:
    """The codec column of vqtok rows: "vqtok", "vqtok refined" (gradient steps only) or "vqtok searched"."""
    return "vqtok searched" if refine.search else "vqtok refined" if refine.steps else "vqtok"


def codec_row(codec: str, setting: str, nominal_kbps: float, clips: list[Clip], round_trip: RoundTrip,
              work: Path) -> tuple[dict, torch.Tensor]:
    """Run every clip through `round_trip` and score it: the row, and the decoded first clip."""
    coded = [round_trip(clip.wave, work) for clip in clips]
    kbps = [8.0 * size / clip.seconds / 1000.0 for clip, (size, _) in zip(clips, coded)]
    scores = [speech.score(clip.wave, decoded) for clip, (_, decoded) in zip(clips, coded)]
    return {"codec": codec, "setting": setting, "nominal_kbps": nominal_kbps, "kbps": float(np.mean(kbps)),
            **mean_scores(scores)}, coded[0][1]


def run_tool(*cmd: str) -> None:
    """Run a codec tool; its own message (stderr) goes into the error when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")


def opus_round_trip(kbps: int) -> RoundTrip:
    def round_trip(wave: torch.Tensor, work: Path) -> tuple[int, torch.Tensor]:
        source, coded, decoded = work / "in.wav", work / "out.opus", work / "out.wav"
        data.save_audio(source, wave, RATE)
        run_tool("opusenc", "--quiet", "--hard-cbr", "--framesize", "20", "--bitrate", str(kbps), str(source),
                 str(coded))
        run_tool("opusdec", "--quiet", "--rate", str(RATE), str(coded), str(decoded))
        return coded.stat().st_size, data.load_audio(decoded, RATE)[0]

    return round_trip


def codec2_round_trip(mode: str) -> RoundTrip:
    def round_trip(wave: torch.Tensor, work: Path) -> tuple[int, torch.Tensor]:
        source, coded, decoded = work / "in.raw", work / "out.c2", work / "out.raw"
        narrow = AF.resample(wave, RATE, CODEC2_RATE).clamp(-1.0, 1.0)
        source.write_bytes((narrow * 32767).round().to(torch.int16).numpy().astype("<i2").tobytes())
        # The .c2 suffix makes c2enc write, and c2dec read, a header naming the mode.
        run_tool("c2enc", mode, str(source), str(coded))
        run_tool("c2dec", mode, str(coded), str(decoded))
        samples = np.frombuffer(decoded.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
        return coded.stat().st_size, AF.resample(torch.from_numpy(samples), CODEC2_RATE, RATE)

    return round_trip


CODECS = {"Opus": [(f"{kbps} kbps", kbps, opus_round_trip(kbps)) for kbps in OPUS_KBPS],
          "Codec 2": [(f"mode {mode}", kbps, codec2_round_trip(mode)) for mode, kbps in CODEC2_MODES.items()]}


def codec_rows(clips: list[Clip], work: Path) -> tuple[list[dict], list[torch.Tensor]]:
    """The Opus and Codec 2 rows (see CODECS) and each one's decoded first clip; a codec whose tools are missing
    is reported in one line per tool and left out, and so is a setting whose tool fails."""
    rows, firsts = [], []
    for codec, settings in CODECS.items():
        tools, install = TOOLS[codec]
        missing = [tool for tool in tools if shutil.which(tool) is None]
        for tool in missing:
            print(f"{tool} not found: no {codec} rows (Debian: {install})", file=sys.stderr)
        if missing:
            continue
        for setting, nominal, round_trip in settings:
            try:
                row, first = codec_row(codec, setting, nominal, clips, round_trip, work)
            except RuntimeError as err:
                print(f"{codec} {setting} left out: {err}", file=sys.stderr)
                continue
            rows.append(row)
            firsts.append(first)
    return rows, firsts


def undo_delay(reference: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """`decoded` (T',) moved onto the time base of `reference` (T,) by the lag `speech.align` finds."""
    _, _, lag = speech.align(reference, decoded, RATE)
    return decoded[lag:] if lag >= 0 else torch.nn.functional.pad(decoded, (-lag, 0))


def spectrograms(clip: Clip, rows: list[dict], firsts: list[torch.Tensor], path: Path) -> dict:
    """The first clip's log-mel spectrograms: the original, Opus at PICTURE_KBPS (when it ran) and vqtok at the
    stage count whose entropy-coded rate is nearest Opus's file rate (or PICTURE_KBPS). Returns what it shows."""
    opus = next((i for i, r in enumerate(rows) if r["codec"] == "Opus" and r["nominal_kbps"] == PICTURE_KBPS), None)
    target = PICTURE_KBPS if opus is None else rows[opus]["kbps"]
    ours = next(codec for codec in ("vqtok refined, postfiltered", "vqtok refined", "vqtok")
                if codec == "vqtok" or any(r["codec"] == codec for r in rows))
    vq = min((i for i, r in enumerate(rows) if r["codec"] == ours),
             key=lambda i: abs(rows[i]["kbps_entropy"] - target))
    panels = [(f"original {clip.source}", clip.wave)]
    if opus is not None:
        panels.append((f"Opus {PICTURE_KBPS} kbps ({rows[opus]['kbps']:.2f} kbps file)",
                       undo_delay(clip.wave, firsts[opus])))
    panels.append((f"{ours} {rows[vq]['setting']} ({rows[vq]['kbps_entropy']:.2f} kbps entropy-coded file)",
                   undo_delay(clip.wave, firsts[vq])))
    plots.spectrogram_panels(panels, RATE, path, title="the first clip (rates: means over all clips)")
    return {"clip": clip.source, "panels": [label for label, _ in panels]}


def rate_charts(rows: list[dict], path: Path, title: str) -> bool:
    """PESQ and STOI against file kbps, one curve per codec (vqtok packed, then every vqtok codec entropy-coded:
    plain, refined, searched, each postfiltered too when measured). Returns False, drawing nothing, when
    neither score was measured."""
    ours = list(dict.fromkeys(r["codec"] for r in rows if r["codec"].startswith("vqtok")))
    series = {"vqtok packed": ("vqtok", "kbps"), **{f"{codec}, entropy": (codec, "kbps_entropy") for codec in ours},
              "Opus": ("Opus", "kbps"), "Codec 2": ("Codec 2", "kbps")}
    charts = {label: {name: [(r[x], r[key]) for r in rows if r["codec"] == codec and key in r]
                      for name, (codec, x) in series.items()}
              for key, label in (("pesq_wb", "PESQ-wb (MOS-LQO)"), ("stoi", "STOI"))}
    if not any(points for curves in charts.values() for points in curves.values()):
        return False
    plots.rate_distortion_charts(charts, path, title=title, x_label="kbps (whole files)")
    return True


def generalisation_rows(model_path: Path, folder: Path, rows: list[dict], device: str,
                        more: list[tuple[Refinement, list[int]]] = (), postfilter: float = 0.0) -> dict | None:
    """vqtok at every stage count on the files of `folder` (scored as the main rows, postfiltered rows too when
    `postfilter` is non-zero), and for each (refinement, stage counts) of `more` with its codes so chosen, each
    row with `pesq_drop`: its PESQ below
    the same codec and stage count's on the main clips. Printed as a table; None (and one line) when the folder
    is absent."""
    if not folder.is_dir():
        print(f"{folder} is absent: no generalisation rows", file=sys.stderr)
        return None
    clips = load_clips(folder, len(data.find_inputs([folder])[1]))
    main = {(r["codec"], r["stages"]): r for r in rows if r["codec"].startswith("vqtok")}
    _, other, _ = vqtok_rows(model_path, clips, device, postfilter=postfilter)
    for refine, stage_counts in more:
        other += vqtok_rows(model_path, clips, device, refine, stage_counts, postfilter)[1]
    for row in other:
        ours = main[row["codec"], row["stages"]]
        if row.get("pesq_wb") is not None and ours.get("pesq_wb") is not None:
            row["pesq_drop"] = ours["pesq_wb"] - row["pesq_wb"]
    rates = sorted({data.audio_info(clip.path)[0] for clip in clips})
    print_table(other, f"{folder.name}: {len(clips)} files at {', '.join(map(str, rates))} Hz, scored at 16 kHz",
                extra=[("PESQ below main", "pesq_drop", ".3f", "right")])
    return {"data": str(folder), "clips": [clip.source for clip in clips], "rates": rates, "rows": other}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "-"


def print_table(rows: list[dict], title: str, extra: list[tuple[str, str, str, str]] = ()) -> None:
    table = Table(title=title)
    columns = [("codec", "codec", "", "left"), ("setting", "setting", "", "left"),
               ("nominal kbps", "nominal_kbps", ".2f", "right"), ("kbps (file)", "kbps", ".2f", "right"),
               ("kbps (entropy)", "kbps_entropy", ".2f", "right"), ("PESQ-wb", "pesq_wb", ".3f", "right"),
               ("STOI", "stoi", ".3f", "right"), ("SI-SNR dB", "si_snr_db", ".2f", "right"),
               ("delay ms", "delay_ms", ".2f", "right"), ("PESQ skipped", "pesq_skipped", "d", "right"),
               *extra]
    for name, _, _, justify in columns:
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for _, key, fmt, _ in columns))
    # Piped or captured output gets room for every column instead of rich's default 80.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def stage_list(text: str, flag: str) -> list[int]:
    """Comma-separated stage counts -> sorted unique ints (filtered by the model's stages later)."""
    try:
        return sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise SystemExit(f"error: {flag} must be comma-separated stage counts, got {text!r}") from None


def main() -> None:
    args = parse_args()
    if args.clips < 1:
        raise SystemExit("error: --clips must be at least 1")
    if args.skip < 0:
        raise SystemExit(f"error: --skip must be >= 0, got {args.skip}")
    if args.refine < 0 or args.search < 0:
        raise SystemExit("error: --refine and --search must be >= 0")
    if not 0.0 <= args.postfilter <= 1.0:
        raise SystemExit(f"error: --postfilter must be between 0 and 1, got {args.postfilter:g}")
    refine_stages, search_stages = stage_list(args.refine_stages, "--refine-stages"), stage_list(
        args.search_stages, "--search-stages")
    if not args.data.is_dir():
        print(f"skipped: {args.data} is absent (LibriSpeech test-other is ../shared/data/librispeech/test-other)",
              file=sys.stderr)
        return
    try:
        clips = load_clips(args.data, args.clips, args.skip)
    except VqtokError as err:
        raise SystemExit(f"error: {err}") from None
    if not clips:
        raise SystemExit(f"error: {args.data} has no audio files after the first {args.skip}")
    seconds = sum(clip.seconds for clip in clips)
    print(f"{len(clips)} clips, {seconds:.1f} s, from {args.data}", file=sys.stderr)
    for name in speech.missing_packages():
        print(f"{name} not installed: no {speech.PACKAGES[name]} column ({speech.INSTALL_HINT})", file=sys.stderr)
    info, rows, firsts = vqtok_rows(args.model, clips, args.device, postfilter=args.postfilter)
    # The chosen-code rows, at the stage counts the model has: refined, then searched.
    chosen_codes = []
    if args.refine:
        chosen_codes.append((Refinement(args.refine), refine_stages))
    if args.search:
        chosen_codes.append((Refinement(args.refine, args.search), search_stages))
    chosen_codes = [(how, [n for n in counts if 1 <= n <= info["stages"]]) for how, counts in chosen_codes]
    for how, counts in chosen_codes:
        _, chosen, chosen_firsts = vqtok_rows(args.model, clips, args.device, how, counts, args.postfilter)
        rows, firsts = rows + chosen, firsts + chosen_firsts
    with tempfile.TemporaryDirectory() as work:
        more, more_firsts = codec_rows(clips, Path(work))
    rows, firsts = rows + more, firsts + more_firsts
    title = f"{args.data.name}: {len(clips)} clips, {seconds:.0f} s, scored at 16 kHz"
    print_table(rows, title)
    other = generalisation_rows(args.model, args.other, rows, args.device, chosen_codes, args.postfilter)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"data": str(args.data), "skip": args.skip, "clips": [clip.source for clip in clips], "seconds": seconds,
              "model": info, "refine": args.refine, "search": args.search, "postfilter": args.postfilter,
              "packages": {name: _version(name) for name in speech.PACKAGES},
              "tools": {tool: shutil.which(tool) for tools, _ in TOOLS.values() for tool in tools}, "rows": rows,
              "other": other, "spectrograms": spectrograms(clips[0], rows, firsts, args.out / "speech_spectrograms.png")}
    written = ["speech.json", "speech_spectrograms.png"]
    if rate_charts(rows, args.out / "speech.png", title):
        written.append("speech.png")
    else:
        print("no PESQ or STOI measured: no speech.png", file=sys.stderr)
    (args.out / "speech.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {', '.join(str(args.out / name) for name in written)}", file=sys.stderr)


if __name__ == "__main__":
    main()
