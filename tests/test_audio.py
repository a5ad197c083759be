"""Audio: the 1-D encoder/decoder, training sets and losses, chunked encoding/decoding of long files, and the
`vqtok` commands on audio (stereo, 44.1 kHz, bad inputs, exact lengths, lower bitrates)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from vqtok import data
from vqtok.audionets import decoder_context, encoder_context
from vqtok.audiosets import AudioEvaluator, AudioSet, mel_sizes, segment_samples
from vqtok.audiostream import (DecodedSignal, FileSignal, decoded_signal, encode_signal, model_signal,
                               resampled_length, write_signal)
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.modelfile import load
from vqtok.nets import Tokenizer
from vqtok.train import train

RATE = 16000


def audio_config(strides: tuple[int, ...] = (2, 4, 5, 8), stages: int = 4) -> ModelConfig:
    return ModelConfig(modality="audio", in_channels=1, channels=32, res_blocks=1, sample_rate=RATE,
                       audio_strides=strides, downsample=math.prod(strides),
                       quantizer=QuantizerConfig(dim=16, codebook_size=64, stages=stages, stage_dropout=0.5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_audio: Path) -> Path:
    """A tiny 16 kHz model trained briefly on the FSDD sample (8 kHz files, resampled on load)."""
    run = tmp_path_factory.mktemp("audio") / "run"
    tc = TrainConfig(steps=24, batch_size=4, warmup=4, checkpoint_every=12, log_every=6, device="cpu",
                     segment_seconds=0.5)
    train([sample_audio], run, audio_config(), tc)
    return run


@pytest.fixture(scope="module")
def long_stereo(tmp_path_factory: pytest.TempPathFactory, sample_audio: Path) -> Path:
    """About 12 s of real speech as a 44.1 kHz stereo WAV (the two channels at different gains)."""
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(sample_audio.glob("*.wav"))[:24]]
    mono = AF.resample(torch.from_numpy(np.concatenate(clips)), 8000, 44100).numpy()
    path = tmp_path_factory.mktemp("long") / "talk.wav"
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1).clip(-1, 1), 44100, subtype="PCM_16")
    return path


# ------------------------------------------------------------------------------------------------- nets


@pytest.mark.parametrize("strides", [(2, 4, 5, 8), (3, 5), (2, 2)])
def test_codes_are_one_frame_per_hop(strides: tuple[int, ...]) -> None:
    model = Tokenizer(audio_config(strides, stages=3)).eval()
    hop = math.prod(strides)
    x = torch.rand(2, 1, hop * 7) * 2 - 1
    out = model(x)
    assert out.z.shape == (2, 16, 7)
    assert out.indices.shape == (2, 3, 7)
    assert out.recon.shape == x.shape
    assert torch.equal(model.encode(x), out.indices)
    assert model.decode(out.indices).shape == x.shape


def test_contexts_bound_the_receptive_fields() -> None:
    torch.manual_seed(0)
    model = Tokenizer(audio_config())
    hop, frames, mid = 320, 40, 20
    x = torch.zeros(1, 1, hop * frames, requires_grad=True)
    model.encoder(x)[0, :, mid].sum().backward()
    reach = (x.grad[0, 0] != 0).nonzero().flatten()
    assert reach.numel() > 0
    context = encoder_context(model.encoder)
    assert mid * hop - int(reach.min()) <= context and int(reach.max()) - mid * hop <= context
    z = torch.zeros(1, 16, frames, requires_grad=True)
    model.decoder(z)[0, 0, mid * hop].backward()
    used = (z.grad[0].abs().sum(0) != 0).nonzero().flatten()
    assert used.numel() > 0
    assert mid - int(used.min()) <= decoder_context(model.decoder) and int(used.max()) - mid <= decoder_context(model.decoder)


# ------------------------------------------------------------------------------------------------- sets


def test_segments_are_cut_from_the_files() -> None:
    long, short = torch.linspace(-1, 1, 5000)[None], torch.full((1, 100), 0.5)
    audio = AudioSet([long, short], RATE, 320, 640)
    a = audio.sample(64, torch.Generator().manual_seed(1))
    b = audio.sample(64, torch.Generator().manual_seed(1))
    assert a.shape == (64, 1, 640) and torch.equal(a, b)
    for row in a[:, 0]:
        if bool((row == 0.5).any()):
            # The short file sits somewhere in silence, whole.
            assert int((row == 0.5).sum()) == 100 and int((row != 0).sum()) == 100
        else:
            start = int(torch.argmin((long[0] - row[0]).abs()))
            assert torch.allclose(row, long[0, start:start + 640])


def test_segment_length_is_whole_hops() -> None:
    assert segment_samples(TrainConfig(segment_seconds=1.0), 16000, 320) == 16000
    assert segment_samples(TrainConfig(segment_seconds=0.505), 16000, 320) == 8000
    assert segment_samples(TrainConfig(segment_seconds=0.001), 16000, 320) == 320


def test_mel_loss_sizes_scale_with_the_rate() -> None:
    assert [n for n, _ in mel_sizes(16000)] == [512, 1024, 2048]
    assert [n for n, _ in mel_sizes(8000)] == [256, 512, 1024]
    assert [n for n, _ in mel_sizes(44100)] == [1024, 2048, 4096]


def test_training_run_reports_audio_figures(trained: Path) -> None:
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in lines if m["split"] == "val"][-1]
    for key in ("si_snr", "mel_distance", "kbps", "usage", "usage_stage_1", "usage_stage_4", "perplexity_stage_2"):
        assert key in val, key
    assert val["kbps"] == pytest.approx(4 * 6 * 50 / 1000)
    assert math.isfinite(val["si_snr"]) and val["mel_distance"] > 0
    assert (trained / "previews" / "step_0000024.png").stat().st_size > 1000
    info = json.loads((trained / "run.json").read_text())
    assert info["model"]["modality"] == "audio" and info["model"]["downsample"] == 320


def test_fewer_stages_is_fewer_bits(trained: Path, sample_audio: Path) -> None:
    model = load(trained / "model.safetensors")
    waves, _, _ = data.load_audio_set(sorted(sample_audio.glob("*.wav"))[:4], RATE)
    results = {}
    for stages in (1, 4):
        evaluator = AudioEvaluator(model, stages)
        for wave in waves:
            evaluator.add(wave)
        results[stages] = evaluator.result()
    assert results[1]["kbps"] * 4 == pytest.approx(results[4]["kbps"])
    assert "usage_stage_1" in results[1] and "usage_stage_2" not in results[1]


# ------------------------------------------------------------------------------------------------- streams


def test_chunked_encode_matches_whole_file(trained: Path, long_stereo: Path) -> None:
    model = load(trained / "model.safetensors")
    whole_wave, _ = data.pad_length(data.load_audio(long_stereo, RATE), model.hop)
    whole = model.encode(whole_wave[None])[0]
    assert len(torch.unique(whole[0])) >= 4, "the test model should use several codes"
    file, signal = model_signal(long_stereo, RATE)
    with file:
        assert signal.length == whole_wave.shape[1] - (-signal.length % model.hop)
        chunked = encode_signal(model, signal, chunk_seconds=0.7)
        fewer = encode_signal(model, signal, stages=2, chunk_seconds=1.3)
    assert chunked.shape == whole.shape
    assert float((chunked == whole).float().mean()) >= 0.999
    assert float((fewer == whole[:2]).float().mean()) >= 0.999


def test_chunked_decode_matches_whole_decode(trained: Path) -> None:
    model = load(trained / "model.safetensors")
    codes = torch.randint(0, 64, (4, 90))
    whole = model.decode(codes[None])[0]
    length = 90 * 320 - 123
    signal = DecodedSignal(model, codes, length)
    pieces = torch.cat([signal.read(a, min(a + 1111, length)) for a in range(0, length, 1111)], dim=1)
    assert torch.allclose(pieces, whole[:, :length], atol=1e-5)
    assert torch.equal(signal.read(length - 10, length + 10)[:, 10:], torch.zeros(1, 10))


def test_decoded_file_has_the_original_rate_and_length(trained: Path, tmp_path: Path) -> None:
    model = load(trained / "model.safetensors")
    codes = torch.randint(0, 64, (4, 30))
    length = resampled_length(30 * 320, RATE, 44100) - 77
    out = tmp_path / "out.wav"
    write_signal(out, decoded_signal(model, codes, length, 44100), chunk_seconds=0.1)
    info = sf.info(out)
    assert (info.samplerate, info.frames, info.channels) == (44100, length, 1)
    expect = AF.resample(model.decode(codes[None])[0, :, :resampled_length(length, 44100, RATE)], RATE, 44100)
    got = torch.from_numpy(sf.read(out, dtype="float32")[0])
    assert torch.allclose(got, expect[0, :length].clamp(-1, 1), atol=2 / 32768)


def test_file_signal_keeps_channels_or_mixes(long_stereo: Path) -> None:
    with FileSignal(long_stereo, mono=False) as stereo, FileSignal(long_stereo) as mono:
        both = stereo.read(-5, 1000)
        assert both.shape == (2, 1005) and torch.equal(both[:, :5], torch.zeros(2, 5))
        assert torch.allclose(both[1], 0.5 * both[0], atol=1 / 32768)
        assert torch.allclose(mono.read(0, 1000)[0], both[:, 5:].mean(0))


def test_unreadable_audio_is_one_line_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.flac"
    junk.write_bytes(b"not audio at all" * 10)
    for path in (empty, junk):
        with pytest.raises(VqtokError, match=str(path.name)) as info:
            FileSignal(path)
        assert "\n" not in str(info.value)
