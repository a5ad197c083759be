"""Encode and decode facing inputs and outputs that do not fit: token files whose codes the model cannot decode,
several inputs with one output, outputs left by another model or other options, absurd sample rates, a
damaged model file, outputs that cannot be written; and what a run reports."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
import torchaudio.functional as AF
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.data import io as data
from vqtok.errors import VqtokError
from vqtok.jobs.audiostream import ResampledSignal, WaveSignal
from vqtok.jobs.pipeline import decode_files, encode_files
from vqtok.modelfile import load, save_model
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens.shards import TokenDataset
from vqtok.tokens.tokfile import FORMAT_KEYS, read_tokens, write_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
IMAGE_CONFIG = ModelConfig(channels=8, res_channels=8, res_blocks=1,
                           quantizer=QuantizerConfig(dim=4, codebook_size=32, stages=2))


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _image_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path = folder / f"image{seed}.safetensors"
    save_model(Tokenizer(IMAGE_CONFIG), path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained image model: 2 stages of 32 codes, 28x28 digits to 7x7 codes."""
    return _image_model(tmp_path_factory.mktemp("model"), 0)


def _digits(sample_images: Path, folder: Path, names: list[str]) -> Path:
    """Copies of different MNIST digits under `names` (a .jpg is re-encoded as JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in zip(names, sorted(sample_images.glob("*.png"))):
        Image.open(src).convert("RGB").save(folder / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    return folder


def _encode(model: Path, inputs: list[Path], out: Path, **options) -> object:
    return encode_files(model, inputs, out, **{"device": "cpu", "num_workers": 0, **options})


def _reasons(report) -> list[str]:
    return [reason for _file, reason in report.failed]


# --- decode: codes that do not fit the model ---------------------------------------------------------------


def test_decode_reports_token_files_the_model_cannot_decode_and_decodes_the_rest(
        model_path: Path, sample_images: Path, tmp_path: Path) -> None:
    _encode(model_path, [_digits(sample_images, tmp_path / "in", ["a.png"])], tmp_path / "tok")
    good = read_tokens(tmp_path / "tok" / "a.png.vqt")
    header = {k: v for k, v in good.header.items() if k not in FORMAT_KEYS}
    write_tokens(tmp_path / "tok" / "stages.vqt", np.zeros((3, 7, 7), np.int64), header, codebook_size=32)
    write_tokens(tmp_path / "tok" / "big.vqt", np.full((1, 7, 7), 5000), header, codebook_size=8192)
    write_tokens(tmp_path / "tok" / "audio.vqt", good.codes, {**header, "modality": "audio"}, codebook_size=32)

    result = invoke("decode", model_path, tmp_path / "tok", "--out", tmp_path / "rec", "--device", "cpu", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["written"] == 1 and (tmp_path / "rec" / "a.png").is_file()
    errors = {Path(f["file"]).name: f["error"] for f in report["failed"]}
    assert "3 stages of codes, the model has 2" in errors["stages.vqt"]
    assert "codebook of 8192, the model's has 32" in errors["big.vqt"]
    assert "holds audio codes" in errors["audio.vqt"]
    assert all(error.startswith(str(tmp_path / "tok")) and "\n" not in error for error in errors.values())


# --- several inputs, one output --------------------------------------------------------------------------


def test_decode_never_lets_one_token_file_overwrite_another_s_output(model_path: Path, sample_images: Path,
                                                                      tmp_path: Path) -> None:
    _encode(model_path, [_digits(sample_images, tmp_path / "in", ["a.png", "a.jpg", "a.PNG"])], tmp_path / "tok")
    tok, rec = tmp_path / "tok", tmp_path / "rec"
    first = decode_files(model_path, [tok], rec, device="cpu")
    assert [Path(w).name for w in first.written] == ["a.png"]
    decoded = (rec / "a.png").read_bytes()
    # In sorted order a.PNG.vqt comes first and keeps a.png; the others name it and are not written.
    assert [Path(f).name for f, _ in first.failed] == ["a.jpg.vqt", "a.png.vqt"]
    assert all(f"{tok / 'a.PNG.vqt'}'s" in reason for reason in _reasons(first))
    again = decode_files(model_path, [tok], rec, device="cpu")
    assert len(again.existing) == 1 and len(again.failed) == 2
    forced = decode_files(model_path, [tok], rec, device="cpu", force=True)
    assert len(forced.written) == 1 and len(forced.failed) == 2 and (rec / "a.png").read_bytes() == decoded


def test_encode_reports_inputs_of_different_folders_with_one_output_name(model_path: Path, sample_images: Path,
                                                                         tmp_path: Path) -> None:
    a = _digits(sample_images, tmp_path / "a", ["x.png"])
    b = _digits(sample_images, tmp_path / "b", ["y.png", "x.png"])
    report = _encode(model_path, [a, b], tmp_path / "tok")
    assert len(report.written) == 2 and _reasons(report) == [
        f"{b / 'x.png'}: not written: its output {tmp_path / 'tok' / 'x.png.vqt'} is {a / 'x.png'}'s"]
    x = data.load_image(a / "x.png").float().div(255).unsqueeze(0)
    assert np.array_equal(read_tokens(tmp_path / "tok" / "x.png.vqt").codes, load(model_path).encode(x)[0].numpy())
    # Rerun: the first is done, the second still clashes, with or without --force.
    assert len(_encode(model_path, [a, b], tmp_path / "tok").failed) == 1
    assert len(_encode(model_path, [a, b], tmp_path / "tok", force=True).failed) == 1
    # Files named directly, and a shard: the same.
    files = _encode(model_path, [a / "x.png", b / "x.png"], tmp_path / "files")
    assert len(files.written) == 1 and len(files.failed) == 1
    shard = _encode(model_path, [a, b], tmp_path / "shard", shard=True)
    assert len(shard.written) == 2 and len(shard.failed) == 1
    assert sorted(TokenDataset(tmp_path / "shard").meta(i)["name"] for i in range(2)) == ["x.png", "y.png"]


def test_encode_of_the_current_folder_keeps_subfolders_apart(model_path: Path, sample_images: Path,
                                                             tmp_path: Path, monkeypatch) -> None:
    _digits(sample_images, tmp_path / "a", ["x.png"])
    _digits(sample_images, tmp_path / "b", ["x.png"])
    monkeypatch.chdir(tmp_path)
    report = _encode(model_path, [Path(".")], tmp_path / "tok")
    assert not report.failed and sorted(Path(w).relative_to(tmp_path / "tok").as_posix() for w in report.written) \
        == ["a/x.png.vqt", "b/x.png.vqt"]


# --- existing outputs of another run ---------------------------------------------------------------------


def test_existing_token_files_of_another_model_or_options_are_not_done(model_path: Path, sample_images: Path,
                                                                       tmp_path: Path) -> None:
    images, out = _digits(sample_images, tmp_path / "in", ["a.png", "b.png"]), tmp_path / "tok"
    other = _image_model(tmp_path, 1)
    _encode(model_path, [images], out)
    before = (out / "a.png.vqt").read_bytes()
    report = _encode(other, [images], out)
    assert not report.written and not report.existing and len(report.failed) == 2
    assert f"{out / 'a.png.vqt'}: written by model {load(model_path).fingerprint()}, not {other}" in _reasons(report)[0]
    assert _reasons(report)[0].endswith("--force to overwrite") and (out / "a.png.vqt").read_bytes() == before
    assert "written with stages 2, this run gives 1" in _reasons(_encode(model_path, [images], out, stages=1))[0]
    # An entropy run writes a file packed where that is smaller, so a packed file is its output too.
    assert len(_encode(model_path, [images], out, codec="entropy").existing) == 2
    assert len(_encode(model_path, [images], out).existing) == 2
    assert len(_encode(other, [images], out, force=True).written) == 2


# --- sample rates ----------------------------------------------------------------------------------------


def _wav_claiming(src: Path, target: Path, rate: int) -> Path:
    raw = bytearray(src.read_bytes())
    struct.pack_into("<I", raw, 24, rate)  # the fmt chunk's sample rate
    target.write_bytes(bytes(raw))
    return target


@pytest.mark.parametrize("rate", [999, 800_000])
def test_audio_at_an_absurd_rate_is_reported_and_the_rest_encoded(audio_model: Path, sample_audio: Path,
                                                                  tmp_path: Path, rate: int) -> None:
    src = sorted(sample_audio.glob("*.wav"))
    (tmp_path / "in").mkdir()
    shutil.copy(src[0], tmp_path / "in" / "good.wav")
    _wav_claiming(src[1], tmp_path / "in" / "bad.wav", rate)
    report = _encode(audio_model, [tmp_path / "in"], tmp_path / "tok", num_workers=2)
    assert [Path(w).name for w in report.written] == ["good.wav.vqt"]
    assert _reasons(report) == [f"{tmp_path / 'in' / 'bad.wav'}: sample rate {rate:,} Hz is outside the "
                                f"1,000 to 768,000 Hz vqtok takes"]
    with pytest.raises(VqtokError, match="bad.wav: sample rate"):
        data.load_audio(tmp_path / "in" / "bad.wav", 8000)


def test_decode_refuses_a_token_file_claiming_an_absurd_rate(audio_model: Path, sample_audio: Path,
                                                             tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(sorted(sample_audio.glob("*.wav"))[0], tmp_path / "in" / "good.wav")
    _encode(audio_model, [tmp_path / "in"], tmp_path / "tok")
    tokens = read_tokens(tmp_path / "tok" / "good.wav.vqt")
    header = {k: v for k, v in tokens.header.items() if k not in FORMAT_KEYS}
    rate = 800_000  # one frame of 8 samples at 8 kHz is 800 samples at this rate
    write_tokens(tmp_path / "tok" / "fast.vqt", tokens.codes[:, :1],
                 {**header, "original_sample_rate": rate, "original_length": 8 * rate // 8000}, codebook_size=16)
    report = decode_files(audio_model, [tmp_path / "tok"], tmp_path / "rec", device="cpu")
    assert [Path(w).name for w in report.written] == ["good.wav"]
    assert _reasons(report) == [f"{tmp_path / 'tok' / 'fast.vqt'}: sample rate 800,000 Hz is outside the "
                                f"1,000 to 768,000 Hz vqtok takes"]


@pytest.mark.parametrize("rates", [(1009, 1601), (1601, 1009), (1000, 8000), (7919, 3)])
def test_resampler_keeping_only_the_nonzero_taps_gives_torchaudio_s_filter(monkeypatch, rates) -> None:
    monkeypatch.setattr(data, "DENSE_KERNEL_LIMIT", 0)
    rate, new_rate = rates
    wave = torch.randn(2, 3001, generator=torch.Generator().manual_seed(0))
    sparse = data.Resampler(rate, new_rate)(wave)
    assert sparse.dtype == torch.float32 and sparse.shape == (2, math.ceil(3001 * new_rate / rate))
    torch.testing.assert_close(sparse.double(), AF.resample(wave.double(), rate, new_rate), rtol=0, atol=1e-5)


@pytest.fixture
def kernels(monkeypatch) -> list[tuple[int, int]]:
    """The (rate, new rate) of every resampling kernel torchaudio builds; asking for a huge one fails the test."""
    built: list[tuple[int, int]] = []
    real = torchaudio.functional.functional._get_sinc_resample_kernel

    def spy(orig_freq, new_freq, gcd, *args, **kwargs):
        # Refused before it is built: the kernel for 11,127 Hz -> 16 kHz alone takes GBs.
        if (orig_freq // gcd) * (new_freq // gcd) > 1 << 20:
            pytest.fail(f"torchaudio asked for a kernel of {new_freq // gcd} x {orig_freq // gcd}+ entries")
        built.append((orig_freq, new_freq))
        return real(orig_freq, new_freq, gcd, *args, **kwargs)

    monkeypatch.setattr(torchaudio.functional.functional, "_get_sinc_resample_kernel", spy)
    monkeypatch.setattr(torchaudio.transforms._transforms, "_get_sinc_resample_kernel", spy)
    return built


@pytest.mark.parametrize("rate", [8000, 44100, 11127, 44101])
def test_a_resampled_signal_builds_one_small_kernel_for_all_its_reads(kernels, rate: int) -> None:
    signal = ResampledSignal(WaveSignal(torch.randn(1, 3 * rate, generator=torch.Generator().manual_seed(0)), rate),
                             16000)
    whole = signal.read(0, signal.length)
    pieces = torch.cat([signal.read(lo, min(lo + 7000, signal.length)) for lo in range(0, signal.length, 7000)], 1)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)  # equal up to rounding, as any chunked read
    assert len(kernels) <= 1


# --- model files -----------------------------------------------------------------------------------------


def test_a_model_file_with_flipped_bytes_is_refused(model_path: Path, tmp_path: Path) -> None:
    raw = bytearray(model_path.read_bytes())
    for i in range(len(raw) - 600, len(raw) - 500):  # in the last tensor's bytes
        raw[i] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(VqtokError, match=r"flipped.safetensors is corrupt: its weights do not match its fingerprint$"):
        load(tmp_path / "flipped.safetensors")


def test_the_same_model_and_metadata_always_make_the_same_bytes(model_path: Path, tmp_path: Path) -> None:
    model = load(model_path)
    orders = [{"b": "1", "a": "2", "c": "3"}, {"a": "2", "c": "3", "b": "1"}, {"c": "3", "b": "1", "a": "2"}]
    blobs = []
    for i, extra in enumerate(orders):
        save_model(model, tmp_path / f"{i}.safetensors", extra)
        blobs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    assert load(tmp_path / "0.safetensors").fingerprint() == model.fingerprint()


# --- outputs that cannot be written ----------------------------------------------------------------------


def test_decode_reports_outputs_it_cannot_write(model_path: Path, sample_images: Path, tmp_path: Path) -> None:
    _encode(model_path, [_digits(sample_images, tmp_path / "in", ["a.png", "b.png"])], tmp_path / "tok")
    (tmp_path / "file").write_text("x")
    result = invoke("decode", model_path, tmp_path / "tok", "--out", tmp_path / "file", "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'file' / 'a.png'}: cannot write the decoded file (Not a directory)" in result.output
    (tmp_path / "rec" / "a.png").mkdir(parents=True)
    for force in (False, True):
        report = decode_files(model_path, [tmp_path / "tok"], tmp_path / "rec", device="cpu", force=force)
        assert _reasons(report) == [f"{tmp_path / 'rec' / 'a.png'}: cannot write the decoded file (Is a directory)"]
        assert (tmp_path / "rec" / "b.png").is_file() and not report.existing


# --- counts ------------------------------------------------------------------------------------------------


def test_a_shard_run_counts_the_inputs_it_encoded(model_path: Path, sample_images: Path, tmp_path: Path) -> None:
    images = _digits(sample_images, tmp_path / "in", [f"{i}.png" for i in range(5)])
    result = invoke("encode", model_path, images, "--out", tmp_path / "shard", "--shard", "--device", "cpu")
    assert result.exit_code == 0 and "encoded 5 file(s), 0 already done" in result.output
    part = _encode(model_path, [images], tmp_path / "parts", shard=True, part=(1, 2))
    again = _encode(model_path, [images], tmp_path / "parts", shard=True, part=(1, 2))
    assert (len(part.written), len(again.written), len(again.existing)) == (2, 0, 2)
