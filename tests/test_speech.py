"""Speech quality and real rates: the delay alignment and the PESQ / STOI scorer (vqtok.speech), the token-file
kbps and speech scores of `vqtok eval` on audio, the entropy codec's fall-back to packed, and
benchmarks/speech.py end to end on a tiny untrained model."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from vqtok import speech
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.jobs.pipeline import encode_files
from vqtok.modelfile import save_model
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens.tokfile import decode_tokens, encode_tokens, encode_with_fallback, read_tokens

ROOT = Path(__file__).resolve().parents[1]
HEADER = {"fingerprint": "0123abcd", "modality": "audio", "source": "a.wav"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: object):
    from typer.testing import CliRunner

    from vqtok.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def voice(sample_audio: Path) -> torch.Tensor:
    """Two FSDD digits back to back (about 1 s of speech), (T,) at 16 kHz."""
    waves = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in sorted(sample_audio.glob("*.wav"))[:2]]
    return AF.resample(torch.cat(waves), 8000, speech.SPEECH_RATE)


# --- Alignment -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [137, -137, 0])
def test_align_recovers_a_known_delay(voice: torch.Tensor, delay: int) -> None:
    # The same length, `delay` samples late (early when negative): they overlap in len(voice) - |delay|.
    late = torch.cat([torch.zeros(delay), voice])[: len(voice)] if delay >= 0 else voice[-delay:]
    noisy = late + 0.01 * torch.randn(len(late), generator=torch.Generator().manual_seed(0))
    ref, deg, lag = speech.align(voice, noisy, speech.SPEECH_RATE)
    assert lag == delay
    assert len(ref) == len(deg) == len(voice) - abs(delay)
    assert torch.allclose(deg, ref, atol=0.05)  # the noise alone is left


def test_align_looks_no_further_than_the_window(voice: torch.Tensor) -> None:
    # 60 ms late is outside the +-50 ms window: some lag inside it is picked, never 960.
    _, _, lag = speech.align(voice, torch.cat([torch.zeros(960), voice]), speech.SPEECH_RATE)
    assert abs(lag) <= 800


# --- PESQ and STOI ---------------------------------------------------------------------------------------------


def _noisy(voice: torch.Tensor, snr_db: float) -> torch.Tensor:
    noise = torch.randn(len(voice), generator=torch.Generator().manual_seed(1))
    return voice + noise * voice.norm() / noise.norm() * 10 ** (-snr_db / 20)


def test_pesq_is_near_its_top_for_identical_signals_and_lower_with_noise(voice: torch.Tensor) -> None:
    pytest.importorskip("pesq", reason="pesq is not installed (pip install vqtok[speech])")
    same = speech.score(voice, voice)["pesq_wb"]
    delayed = speech.score(voice, torch.cat([torch.zeros(137), voice]))["pesq_wb"]
    noisy = speech.score(voice, _noisy(voice, 10.0))["pesq_wb"]
    assert same > 4.4 and delayed > 4.4  # the scorer undoes the delay before PESQ sees it
    assert noisy < same - 1.0


def test_stoi_is_near_one_for_identical_signals_and_lower_with_noise(voice: torch.Tensor) -> None:
    pytest.importorskip("pystoi", reason="pystoi is not installed (pip install vqtok[speech])")
    assert speech.score(voice, voice)["stoi"] > 0.99
    assert speech.score(voice, torch.cat([torch.zeros(137), voice]))["stoi"] > 0.99
    assert speech.score(voice, _noisy(voice, -5.0))["stoi"] < 0.9


def test_pesq_refusing_silence_is_none_not_an_error() -> None:
    pytest.importorskip("pesq", reason="pesq is not installed (pip install vqtok[speech])")
    silence = torch.zeros(speech.SPEECH_RATE)
    assert speech.speech_scores(silence, silence)["pesq_wb"] is None


@pytest.mark.parametrize("seconds", [0.02, 0.3])
def test_stoi_refusing_a_short_signal_is_none_not_a_score(voice: torch.Tensor, seconds: float) -> None:
    # pystoi returns 1e-5 with a warning below 30 frames of sound (0.3 s) and raises on a few frames (20 ms).
    pytest.importorskip("pystoi", reason="pystoi is not installed (pip install vqtok[speech])")
    short = voice[5000:5000 + int(seconds * speech.SPEECH_RATE)]
    assert speech.speech_scores(short, short)["stoi"] is None


def test_score_gives_si_snr_and_the_delay(voice: torch.Tensor) -> None:
    result = speech.score(voice, 0.5 * torch.cat([torch.zeros(16), voice]))
    assert result["delay_ms"] == pytest.approx(1.0) and result["si_snr_db"] > 60


# --- The entropy codec never writes more than the packed one ---------------------------------------------------


def test_entropy_falls_back_to_packed_when_the_table_misfits() -> None:
    codes = np.zeros((2, 400), dtype=np.int64)
    codes[1, ::2] = 5
    misfit = np.zeros((2, 64), dtype=np.int64)
    misfit[:, 63] = 10**6  # the table expects code 63; the file holds 0 and 5, each then costs ~14 bits
    strict = encode_tokens(codes, HEADER, codebook_size=64, codec="entropy", table=misfit)
    packed = encode_tokens(codes, HEADER, codebook_size=64)
    assert len(strict) > len(packed)  # what the fall-back is for
    written = encode_with_fallback(codes, HEADER, codebook_size=64, codec="entropy", table=misfit)
    assert written == packed and decode_tokens(written).header["codec"] == "packed"
    # A table that fits the codes keeps the entropy codec, and a smaller file.
    fit = np.stack([np.bincount(row, minlength=64) for row in codes])
    kept = encode_with_fallback(codes, HEADER, codebook_size=64, codec="entropy", table=fit)
    assert len(kept) < len(packed) and decode_tokens(kept, table=fit).header["codec"] == "entropy"
    np.testing.assert_array_equal(decode_tokens(kept, table=fit).codes, codes)


# --- `vqtok eval` and `vqtok encode` on an audio model ---------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, sample_audio: Path) -> Path:
    """Two FSDD digits: one 8 kHz WAV as it is, one resampled to a 16 kHz FLAC in a subfolder."""
    folder = tmp_path_factory.mktemp("speech")
    src = sorted(sample_audio.glob("*.wav"))
    shutil.copy(src[3], folder / "digit.wav")
    (folder / "sub").mkdir()
    wave = AF.resample(torch.from_numpy(sf.read(src[4], dtype="float32")[0]), 8000, 16000)
    sf.write(folder / "sub" / "talk.flac", wave.clamp(-1, 1).numpy(), 16000, subtype="PCM_16")
    return folder


def _model(path: Path, table: str) -> Path:
    """An untrained 16 kHz model, 2 stages of 64 codes, with code counts (the entropy codec's table) that fit
    its codes ("fit": counted on random noise, as training would) or misfit them ("misfit": all on one code that
    the noise never gave, so every code it does give costs about 11 bits against 6 packed)."""
    torch.manual_seed(0)
    config = ModelConfig(modality="audio", in_channels=1, channels=16, res_blocks=1, sample_rate=16000,
                         audio_strides=(2, 4, 5, 8), downsample=320,
                         quantizer=QuantizerConfig(dim=8, codebook_size=64, stages=2))
    model = Tokenizer(config).eval()
    codes = model.encode(0.1 * torch.randn(1, 1, 320 * 50))
    for s, vq in enumerate(model.quantizer.quantizers):
        counts = torch.bincount(codes[:, s].reshape(-1), minlength=64)
        if table == "misfit":
            unused = int(torch.nonzero(counts == 0)[0])
            counts = torch.zeros_like(counts)
            counts[unused] = 10**6
        vq.counts.copy_(counts)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("model") / "model.safetensors", "fit")


def test_eval_json_reports_token_file_kbps(model_path: Path, clips: Path, tmp_path: Path) -> None:
    result = invoke("eval", model_path, clips, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["kbps"] == pytest.approx(2 * 6 * 50 / 1000)
    # Byte for byte the files `vqtok encode` writes, over each file's own duration.
    for codec in ("packed", "entropy"):
        out = tmp_path / codec
        assert not encode_files(model_path, [clips], out, codec=codec, device="cpu").failed
        kbps = [8 * (out / f"{name}.vqt").stat().st_size / (sf.info(clips / name).duration * 1000)
                for name in ("digit.wav", "sub/talk.flac")]
        assert metrics[f"kbps_{codec}_file"] == pytest.approx(np.mean(kbps), rel=1e-9)
    assert metrics["kbps_entropy_file"] <= metrics["kbps_packed_file"]
    assert metrics["kbps_packed_file"] > metrics["kbps"]  # headers
    for name, key in (("pesq", "pesq_wb"), ("pystoi", "stoi")):
        installed = importlib.util.find_spec(name) is not None
        assert (key in metrics) == installed
    if "pesq_wb" in metrics or metrics.get("pesq_skipped"):
        assert 1.0 <= metrics.get("pesq_wb", 1.0) <= 4.7 and metrics["pesq_skipped"] <= 2


def test_eval_scores_stoi_over_the_files_it_accepts(model_path: Path, clips: Path, tmp_path: Path) -> None:
    pytest.importorskip("pystoi", reason="pystoi is not installed (pip install vqtok[speech])")
    alone = json.loads(invoke("eval", model_path, clips, "--json").stdout)
    mixed = tmp_path / "mixed"
    shutil.copytree(clips, mixed)
    rng = np.random.default_rng(0)
    for name, seconds in (("blip.wav", 0.02), ("short.wav", 0.3)):
        sf.write(mixed / name, 0.1 * rng.standard_normal(int(seconds * 16000)), 16000)
    result = invoke("eval", model_path, mixed, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["files"] == alone["files"] + 2 and metrics["stoi_skipped"] == 2 and alone["stoi_skipped"] == 0
    assert metrics["stoi"] == pytest.approx(alone["stoi"])


def test_eval_without_speech_packages_says_how_to_get_them(model_path: Path, clips: Path, monkeypatch) -> None:
    monkeypatch.setattr(speech, "missing_packages", lambda: ["pesq", "pystoi"])
    result = invoke("eval", model_path, clips, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert not {"pesq_wb", "stoi", "pesq_skipped", "stoi_skipped"} & set(metrics) and "kbps_packed_file" in metrics
    note = [line for line in result.stderr.splitlines() if "pip install vqtok[speech]" in line]
    assert len(note) == 1 and "PESQ and STOI" in note[0]


def test_encode_entropy_never_writes_more_than_packed(clips: Path, tmp_path: Path) -> None:
    model = _model(tmp_path / "misfit.safetensors", "misfit")
    sizes = {}
    for codec in ("packed", "entropy"):
        result = invoke("encode", model, clips, "--out", tmp_path / codec, "--codec", codec, "--json")
        assert result.exit_code == 0, result.output
        sizes[codec] = json.loads(result.stdout)["bytes"]
        assert invoke("decode", model, tmp_path / codec, "--out", tmp_path / f"{codec}-wav").exit_code == 0
    assert sizes["entropy"] == sizes["packed"]
    for name in ("digit.wav.vqt", "sub/talk.flac.vqt"):
        entropy, packed = tmp_path / "entropy" / name, tmp_path / "packed" / name
        assert entropy.read_bytes() == packed.read_bytes() and read_tokens(entropy).header["codec"] == "packed"


# --- benchmarks/speech.py --------------------------------------------------------------------------------------


def test_benchmark_end_to_end(model_path: Path, clips: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("speech_bench", ROOT / "benchmarks" / "speech.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "results"
    args = ["speech.py", str(model_path), "--data", str(clips), "--clips", "2", "--out", str(out), "--device", "cpu"]
    for bad, message in ((["--refine-stages", "two"], "--refine-stages must be comma-separated"),
                         (["--postfilter", "1.5"], "--postfilter must be between 0 and 1, got 1.5"),
                         (["--skip", "-1"], "--skip must be >= 0, got -1"),
                         (["--skip", "2"], "has no audio files after the first 2")):
        monkeypatch.setattr(sys, "argv", [*args, *bad])
        with pytest.raises(SystemExit, match=message):
            bench.main()
    assert [clip.source for clip in bench.load_clips(clips, 5, skip=1)] == ["sub/talk.flac"]
    tree = [Path(p) for p in ("a/1.flac", "a/2.flac", "a/3.flac", "b/1.flac", "c/1.flac", "c/2.flac")]
    assert [str(p) for p in bench.speaker_order(tree[::-1])] == ["a/1.flac", "b/1.flac", "c/1.flac", "a/2.flac",
                                                                  "c/2.flac", "a/3.flac"]
    monkeypatch.setattr(sys, "argv", [*args, "--refine", "2", "--refine-stages", "2,5", "--search", "3",
                                      "--search-stages", "1,9"])
    bench.main()
    result = json.loads((out / "speech.json").read_text())
    assert result["clips"] == ["digit.wav", "sub/talk.flac"] and result["refine"] == 2 and result["search"] == 3
    vqtok = [r for r in result["rows"] if r["codec"] == "vqtok"]
    assert [r["stages"] for r in vqtok] == [1, 2]
    assert all(r["kbps_entropy"] <= r["kbps"] and math.isfinite(r["si_snr_db"]) for r in vqtok)
    # Refined rows only at the model's stage counts; their files are a few header bytes larger ("refine").
    (refined,) = [r for r in result["rows"] if r["codec"] == "vqtok refined"]
    assert refined["stages"] == 2 and refined["setting"] == "2 stages, 2 steps"
    assert refined["kbps"] > vqtok[1]["kbps"]
    (searched,) = [r for r in result["rows"] if r["codec"] == "vqtok searched"]
    assert searched["stages"] == 1 and searched["setting"] == "1 stage, 2 steps, 3 candidates"
    # Every vqtok row is followed by the same decode postfiltered: same files, another sound.
    for row, after in zip(result["rows"], result["rows"][1:]):
        if row["codec"] in ("vqtok", "vqtok refined", "vqtok searched"):
            assert after["codec"] == f"{row['codec']}, postfiltered" and after["stages"] == row["stages"]
            assert after["setting"] == f"{row['setting']}, postfilter 0.3" and after["kbps"] == row["kbps"]
            assert after["si_snr_db"] != row["si_snr_db"]
    codecs = {r["codec"] for r in result["rows"]}
    assert ("Opus" in codecs) == (shutil.which("opusenc") is not None and shutil.which("opusdec") is not None)
    assert ("Codec 2" in codecs) == (shutil.which("c2enc") is not None and shutil.which("c2dec") is not None)
    for row in result["rows"]:
        if not row["codec"].startswith("vqtok"):
            assert row["kbps"] > 0.8 * row["nominal_kbps"] and abs(row["delay_ms"]) <= 50
    assert (out / "speech_spectrograms.png").stat().st_size > 1000
    assert (out / "speech.png").exists() == (speech.missing_packages() != list(speech.PACKAGES))
    assert "PESQ-wb" in capsys.readouterr().out
    other = result["other"]  # the shipped 24 kHz sample of another corpus, resampled by vqtok
    assert other["rates"] == [24000] and [(r["codec"], r["stages"]) for r in other["rows"]] == [
        (codec + postfilter, stages) for codec, stages in (("vqtok", 1), ("vqtok", 2), ("vqtok refined", 2),
                                                           ("vqtok searched", 1))
        for postfilter in ("", ", postfiltered")]
    if "pesq" not in speech.missing_packages():
        assert all(math.isfinite(r["pesq_drop"]) for r in other["rows"])


# --- benchmarks/speech_diagnosis.py ----------------------------------------------------------------------------


def test_diagnosis_end_to_end(model_path: Path, clips: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("speech_diagnosis", ROOT / "benchmarks" / "speech_diagnosis.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["speech_diagnosis.py", str(model_path), "--data", str(clips), "--clips", "2",
                                      "--out", str(out)])
    bench.main()
    result = json.loads((out / "speech_diagnosis.json").read_text())
    assert result["clips"] == ["digit.wav", "talk.flac"]
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == list(bench.HYBRIDS)
    # The hybrids' STFT machinery is transparent, and putting back the original's magnitudes under an untrained
    # model's phases gets closer to the original than the model's output alone.
    assert rows["original, STFT round trip"]["si_snr_db"] > 60
    assert rows["original magnitudes, model phases"]["si_snr_db"] > rows["model"]["si_snr_db"]
    if "pystoi" not in speech.missing_packages():
        assert rows["original, STFT round trip"]["stoi"] > 0.99
    # An untrained decoder ignores the input's level: a quarter of the input comes out 12 dB louder relative to it.
    levels = {row["gain"]: row["level_db"] for row in result["levels"]}
    assert sorted(levels) == [0.25, 1.0, 2.0]
    assert levels[0.25] - levels[1.0] > 6
    assert "where the quality goes" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["speech_diagnosis.py", str(model_path), "--data", str(clips), "--clips", "0"])
    with pytest.raises(SystemExit, match="--clips must be at least 1"):
        bench.main()
