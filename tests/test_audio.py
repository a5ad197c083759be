"""Audio: the 1-D encoder/decoder, training sets and losses, chunked encoding/decoding of long files, and the
`vqtok` commands on audio (stereo, 44.1 kHz, bad inputs, exact lengths, lower bitrates)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from vqtok.data import io as data
from vqtok.nets.audio import INPUT_GAIN, decoder_context, encoder_context
from vqtok.nets.spectral import WINDOW_HOPS, analysis, synthesis
from vqtok.data.streams import AudioSegments, read_audio_headers
from vqtok.training.audiosets import AudioTask, segment_samples
from vqtok.training.audioloss import (SPECTRAL_FLOOR, FrameEnvelopeError, FrameLogMelError, compressed_spectrum_error,
                                      log_mel_l1, mel_sizes, reconstruction_loss, spectral_scales)
from vqtok.jobs import refine
from vqtok.jobs.refine import Refinement
from vqtok.jobs.audiostream import (DecodedSignal, FileSignal, WaveSignal, decoded_signal, encode_signal,
                                    model_signal, resampled_length, write_signal)
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.evaluate import AudioEvaluator
from vqtok.modelfile import load
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training.loop import train

RATE = 16000


def audio_config(strides: tuple[int, ...] = (2, 4, 5, 8), stages: int = 4, audio_net: str = "conv",
                 synthesis_frames: int = 1) -> ModelConfig:
    return ModelConfig(modality="audio", in_channels=1, channels=32, res_blocks=1, sample_rate=RATE,
                       audio_strides=strides, downsample=math.prod(strides), audio_net=audio_net,
                       synthesis_frames=synthesis_frames, quantizer=QuantizerConfig(dim=16, codebook_size=64, stages=stages, stage_dropout=0.5))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fsdd16: Path) -> Path:
    """A tiny 16 kHz model trained briefly on 16 FSDD files (8 kHz, resampled on load); returns its run folder."""
    run = tmp_path_factory.mktemp("audio") / "run"
    tc = TrainConfig(steps=12, batch_size=4, warmup=2, checkpoint_every=6, log_every=3, device="cpu",
                     segment_seconds=0.4)
    train([fsdd16], run, audio_config(), tc, sample_rate=RATE)
    return run


def seeded(wave: torch.Tensor, audio_net: str = "conv", synthesis_frames: int = 1) -> Tokenizer:
    """An untrained model whose codebooks are frames of `wave` (1, T) encoded, stage by stage, plus noise (so
    no code sits exactly on a frame, which would leave later stages a zero residual and exact ties), so that
    its codes vary with the input the way a trained model's do."""
    torch.manual_seed(0)
    model = Tokenizer(audio_config(audio_net=audio_net, synthesis_frames=synthesis_frames)).eval()
    padded, _ = data.pad_length(wave, model.hop)
    with torch.no_grad():
        residual = model._to_vectors(model.encoder(padded[None]))
        for vq in model.quantizer.quantizers:
            picked = residual[torch.randint(len(residual), (vq.codebook.shape[0],))]
            vq.codebook.copy_(picked + 0.3 * residual.std() * torch.randn_like(picked))
            residual = residual - vq.codes()[vq.encode(residual)]
    return model


@pytest.fixture(scope="module")
def long_stereo(tmp_path_factory: pytest.TempPathFactory, sample_audio: Path) -> Path:
    """About 12 s of real speech as a 44.1 kHz stereo WAV (the two channels at different gains)."""
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(sample_audio.glob("*.wav"))[:24]]
    mono = AF.resample(torch.from_numpy(np.concatenate(clips)), 8000, 44100).numpy()
    path = tmp_path_factory.mktemp("long") / "talk.wav"
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1).clip(-1, 1), 44100, subtype="PCM_16")
    return path


# ------------------------------------------------------------------------------------------------- nets


@pytest.mark.parametrize("audio_net", ["conv", "stft"])
@pytest.mark.parametrize("strides", [(2, 4, 5, 8), (3, 5), (2, 2)])
def test_codes_are_one_frame_per_hop(strides: tuple[int, ...], audio_net: str) -> None:
    model = Tokenizer(audio_config(strides, stages=3, audio_net=audio_net)).eval()
    hop = math.prod(strides)
    x = torch.rand(2, 1, hop * 7) * 2 - 1
    out = model(x)
    assert out.z.shape == (2, 16, 7)
    assert out.indices.shape == (2, 3, 7)
    assert out.recon.shape == x.shape
    assert torch.equal(model.encode(x), out.indices)
    assert model.decode(out.indices).shape == x.shape


@pytest.mark.parametrize("activation, audio_net, synthesis_frames",
                         [("elu", "conv", 1), ("snake", "conv", 1), ("elu", "stft", 1), ("elu", "stft", 2),
                          ("elu", "stft", 4)])
def test_contexts_bound_the_receptive_fields(activation: str, audio_net: str, synthesis_frames: int) -> None:
    torch.manual_seed(0)
    config = audio_config(audio_net=audio_net, synthesis_frames=synthesis_frames)
    model = Tokenizer(dataclasses.replace(config, activation=activation))
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
    reach = decoder_context(model.decoder)
    assert mid - int(used.min()) <= reach and int(used.max()) - mid <= reach


# ------------------------------------------------------------------------------------------------- sets


def test_segments_are_cut_from_the_files(tmp_path: Path) -> None:
    long, short = np.linspace(-1, 1, 5000, dtype=np.float32), np.full(100, 0.5, dtype=np.float32)
    sf.write(tmp_path / "long.wav", long, RATE, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", short, RATE, subtype="FLOAT")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    files, skipped = read_audio_headers([tmp_path / "bad.wav", tmp_path / "long.wav", tmp_path / "short.wav"])
    assert [Path(p).name for p, _ in skipped] == ["bad.wav"] and "bad.wav" in skipped[0][1]
    segments = AudioSegments(files, RATE, 640)
    items = [(i % 2, seed) for i, seed in enumerate(range(100, 164))]
    a = torch.stack([segments[item][0] for item in items])
    b = torch.stack([segments[item][0] for item in items])
    assert a.shape == (64, 1, 640) and torch.equal(a, b)
    offsets = set()
    for row in a[:, 0]:
        if bool((row == 0.5).any()):
            # The short file sits somewhere in silence, whole.
            assert int((row == 0.5).sum()) == 100 and int((row != 0).sum()) == 100
        else:
            start = int(torch.argmin((torch.from_numpy(long) - row[0]).abs()))
            offsets.add(start)
            assert torch.allclose(row, torch.from_numpy(long[start:start + 640]))
    assert len(offsets) > 10  # offsets are drawn, not fixed


def test_segments_are_resampled_from_the_file_rate(tmp_path: Path) -> None:
    t = np.arange(8000 * 3) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "tone.wav", tone, 8000, subtype="FLOAT")
    files, _ = read_audio_headers([tmp_path / "tone.wav"])
    segment = AudioSegments(files, RATE, 1600)[(0, 7)][0][0]
    whole = AF.resample(torch.from_numpy(tone)[None], 8000, RATE)[0]
    start = int(torch.argmin(((whole[None, :-1600].unfold(1, 1600, 1)[0] - segment) ** 2).sum(1)))
    assert torch.allclose(segment, whole[start:start + 1600], atol=2e-3)


def test_speed_and_gain_perturbation_move_pitch_and_level_within_their_bounds(tmp_path: Path) -> None:
    t = np.arange(RATE * 2) / RATE
    sf.write(tmp_path / "tone.wav", (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), RATE, subtype="FLOAT")
    files, _ = read_audio_headers([tmp_path / "tone.wav"])
    plain = AudioSegments(files, RATE, 8000)
    speeds, gains = AudioSegments(files, RATE, 8000, speed_perturb=0.1), AudioSegments(files, RATE, 8000, gain_db=6)
    window = torch.hann_window(8000, dtype=torch.float64)
    peaks, levels = set(), []
    for seed in range(40):
        # Speed 1 + k/100 moves the tone to 1000 (1 + k/100) Hz: bin 1 + k/100 of 0.5 s is 2 Hz wide.
        wave = speeds[(0, seed)][0][0].double()
        hz = 2 * int(torch.fft.rfft(wave * window).abs().argmax())
        assert 900 <= hz <= 1100 and hz % 10 == 0 and float(wave.std()) == pytest.approx(0.5 / math.sqrt(2), rel=0.02)
        peaks.add(hz)
        level = float(gains[(0, seed)][0].std() / plain[(0, seed)][0].std())
        assert 10 ** (-6 / 20) - 1e-6 <= level <= 10 ** (6 / 20) + 1e-6
        assert float(gains[(0, seed)][0].abs().max()) <= 1.0
        levels.append(level)
    assert len(peaks) > 8 and min(levels) < 0.7 and max(levels) > 1.4  # drawn, not fixed


def test_perturbation_options_are_checked() -> None:
    for config, message in ((TrainConfig(speed_perturb=0.6), "speed perturbation must be 0"),
                            (TrainConfig(speed_perturb=0.004), "speed perturbation must be 0"),
                            (TrainConfig(gain_perturb_db=-1), "gain perturbation must be in")):
        with pytest.raises(VqtokError, match=message):
            config.validate()


def test_segment_length_is_whole_hops() -> None:
    assert segment_samples(TrainConfig(segment_seconds=1.0), 16000, 320) == 16000
    assert segment_samples(TrainConfig(segment_seconds=0.505), 16000, 320) == 8000
    assert segment_samples(TrainConfig(segment_seconds=0.001), 16000, 320) == 320


def test_mel_loss_sizes_scale_with_the_rate() -> None:
    assert [n for n, _ in mel_sizes(16000)] == [512, 1024, 2048]
    assert [n for n, _ in mel_sizes(8000)] == [256, 512, 1024]
    assert [n for n, _ in mel_sizes(44100)] == [1024, 2048, 4096]


def test_spectral_scales_scale_with_the_rate() -> None:
    assert spectral_scales(16000) == [(32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320)]
    assert spectral_scales(8000) == [(16, 4), (32, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]


def test_compressed_spectrum_error_sees_phase_and_level() -> None:
    torch.manual_seed(0)
    target = torch.randn(2, 1, 8000) * 0.1
    assert float(compressed_spectrum_error(target, target, 1024)) == pytest.approx(0.0, abs=1e-6)
    assert float(compressed_spectrum_error(torch.zeros_like(target), target, 1024)) == pytest.approx(1.0)
    # The same magnitudes at the opposite phase: the largest error, which a magnitude loss does not see.
    assert float(compressed_spectrum_error(-target, target, 1024)) == pytest.approx(4.0, rel=1e-4)
    delayed = torch.roll(target, 40, dims=-1)
    assert 0.5 < float(compressed_spectrum_error(delayed, target, 1024)) < 4.0


@pytest.mark.parametrize("loss", ["waveform", "spectral", "complex"])
def test_reconstruction_losses_vanish_only_on_the_target(loss: str) -> None:
    task = AudioTask.__new__(AudioTask)  # the loss needs only the rate and the choice
    task.sample_rate, task.loss = RATE, loss
    torch.manual_seed(0)
    target = torch.randn(2, 1, 4000) * 0.1
    assert float(task.reconstruction_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    noisy = float(task.reconstruction_loss(target + 0.01 * torch.randn_like(target), target))
    quiet = float(task.reconstruction_loss(0.5 * target, target))
    assert noisy > 0 and quiet > 0


@pytest.mark.parametrize("hop", [320, 15, 4])
def test_stft_synthesis_inverts_the_analysis(hop: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, hop * 11)
    spec = analysis(x, WINDOW_HOPS * hop, hop)
    assert spec.shape == (3, 11, WINDOW_HOPS * hop // 2 + 1)
    assert torch.allclose(synthesis(spec, WINDOW_HOPS * hop, hop), x, atol=1e-5)  # edges included
    # A change to one frame's spectrum moves only the samples under its window.
    moved = spec.clone()
    moved[:, 5] *= 2
    changed = (synthesis(moved, WINDOW_HOPS * hop, hop) - x).abs().amax(0) > 1e-4
    span = changed.nonzero().flatten()
    assert int(span.min()) >= 5 * hop - (WINDOW_HOPS - 1) * hop // 2 - 1
    assert int(span.max()) <= 6 * hop + (WINDOW_HOPS - 1) * hop // 2


def test_stft_nets_round_trip_in_the_config() -> None:
    config = audio_config(audio_net="stft")
    assert ModelConfig.from_json(config.to_json()).audio_net == "stft"
    assert ModelConfig.from_json(audio_config().to_json()).audio_net == "conv"
    with pytest.raises(VqtokError, match="audio net must be conv or stft"):
        dataclasses.replace(config, audio_net="wavenet").validate()
    with pytest.raises(VqtokError, match="--activation applies to the conv nets only"):
        dataclasses.replace(config, activation="snake").validate()


@pytest.mark.parametrize("synthesis_frames", [1, 2])
def test_stft_decoder_can_synthesise_a_full_scale_tone(synthesis_frames: int) -> None:
    decoder = Tokenizer(audio_config(audio_net="stft", synthesis_frames=synthesis_frames)).decoder
    hop, n_fft = decoder.hop, decoder.n_fft
    # A 0.95-amplitude tone whose period divides the synthesis hop: every frame has the same spectrum, so a
    # decoder whose head outputs that spectrum (weights 0, bias = log magnitude and phase) must return the tone.
    t = torch.arange(hop * 40, dtype=torch.float64)
    tone = (0.95 * torch.sin(2 * math.pi * 5 * t / hop + 0.3)).float()
    spec = analysis(tone[None] * INPUT_GAIN, n_fft, hop)[0, 20]
    with torch.no_grad():
        decoder.head.weight.zero_()
        decoder.head.bias.copy_(torch.cat([spec.abs().clamp(min=1e-6).log(), spec.angle()]).repeat(synthesis_frames))
        wave = decoder(torch.zeros(1, 16, 40 // synthesis_frames))[0, 0]
    inner = slice(2 * 320, len(wave) - 2 * 320)
    assert torch.allclose(wave[inner], tone[: len(wave)][inner], atol=1e-3)


def test_synthesis_frames_split_each_code_frame_into_finer_stft_frames() -> None:
    config = audio_config(audio_net="stft", synthesis_frames=4)
    assert ModelConfig.from_json(config.to_json()).synthesis_frames == 4
    assert ModelConfig.from_json(audio_config(audio_net="stft").to_json()).synthesis_frames == 1
    coarse, fine = Tokenizer(audio_config(audio_net="stft")).decoder, Tokenizer(config).decoder
    assert (coarse.hop, coarse.n_fft, fine.hop, fine.n_fft) == (320, 1280, 80, 320)
    # The same width: four spectra of 161 bins against one of 641.
    assert fine.head.out_features == 4 * (320 + 2) and coarse.head.out_features == 1280 + 2
    z = torch.zeros(1, 16, 6)
    bins = 320 // 2 + 1
    with torch.no_grad():
        fine.head.weight.zero_()
        # Log magnitude 0 and phase pi k in bin k of every spectrum: each synthesis frame is an impulse at its
        # window's centre, so the output repeats every fine hop (80 samples), not every code hop.
        fine.head.bias.copy_(torch.cat([torch.zeros(bins), math.pi * torch.arange(bins)]).repeat(4))
        wave = fine(z)[0, 0]
    assert wave.shape == (6 * 320,)
    inner = wave[320:-320]
    assert torch.allclose(inner, inner.roll(80), atol=1e-5) and not torch.allclose(inner, inner.roll(40), atol=1e-3)
    with pytest.raises(VqtokError, match="divide the hop"):
        dataclasses.replace(config, synthesis_frames=3).validate()
    with pytest.raises(VqtokError, match="stft audio nets only"):
        dataclasses.replace(audio_config(), synthesis_frames=2).validate()


def test_snake_learns_its_frequency_and_round_trips_in_the_config() -> None:
    config = dataclasses.replace(audio_config(), activation="snake")
    assert ModelConfig.from_json(config.to_json()).activation == "snake"
    model = Tokenizer(config)
    alphas = [name for name, _ in model.named_parameters() if name.endswith("alpha")]
    assert alphas and all(name.startswith(("encoder", "decoder")) for name in alphas)
    model(torch.randn(1, 1, 640) * 0.1).recon.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in alphas)
    with pytest.raises(VqtokError, match="activation"):
        dataclasses.replace(audio_config(), activation="relu").validate()


def test_training_run_reports_audio_figures(trained: Path) -> None:
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in lines if m["split"] == "val"][-1]
    for key in ("si_snr", "mel_distance", "kbps", "usage", "usage_stage_1", "usage_stage_4", "perplexity_stage_2"):
        assert key in val, key
    assert val["kbps"] == pytest.approx(4 * 6 * 50 / 1000)
    assert math.isfinite(val["si_snr"]) and val["mel_distance"] > 0
    assert (trained / "previews" / "step_0000012.png").stat().st_size > 1000
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


@pytest.mark.parametrize("audio_net", ["conv", "stft"])
def test_chunked_encode_matches_whole_file(long_stereo: Path, audio_net: str) -> None:
    wave = data.load_audio(long_stereo, RATE)
    model = seeded(wave, audio_net)
    whole_wave, _ = data.pad_length(wave, model.hop)
    whole = model.encode(whole_wave[None])[0]
    assert len(torch.unique(whole[0])) >= 20, "the test model should use many codes"
    file, signal = model_signal(long_stereo, RATE)
    with file:
        assert signal.length == whole_wave.shape[1] - (-signal.length % model.hop)
        chunked = encode_signal(model, signal, chunk_seconds=0.7)
        fewer = encode_signal(model, signal, stages=2, chunk_seconds=1.3)
    assert chunked.shape == whole.shape
    assert float((chunked == whole).float().mean()) >= 0.999
    assert float((fewer == whole[:2]).float().mean()) >= 0.999


@pytest.mark.parametrize("audio_net, synthesis_frames", [("conv", 1), ("stft", 1), ("stft", 2)])
def test_chunked_decode_matches_whole_decode(long_stereo: Path, audio_net: str, synthesis_frames: int) -> None:
    model = seeded(data.load_audio(long_stereo, RATE)[:, :RATE], audio_net, synthesis_frames)
    codes = torch.randint(0, 64, (4, 90))
    whole = model.decode(codes[None])[0]
    length = 90 * 320 - 123
    signal = DecodedSignal(model, codes, length)
    pieces = torch.cat([signal.read(a, min(a + 1111, length)) for a in range(0, length, 1111)], dim=1)
    assert torch.allclose(pieces, whole[:, :length], atol=1e-5)
    assert torch.equal(signal.read(length - 10, length + 10)[:, 10:], torch.zeros(1, 10))


def test_decoded_file_has_the_original_rate_and_length(long_stereo: Path, tmp_path: Path) -> None:
    model = seeded(data.load_audio(long_stereo, RATE)[:, :RATE])
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


# ------------------------------------------------------------------------------------------------- CLI


def invoke(*args: object):
    from typer.testing import CliRunner

    from vqtok.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, sample_audio: Path, long_stereo: Path) -> Path:
    """A folder of speech: 8 kHz mono WAV and MP3, a 44.1 kHz stereo WAV (nested), a 22.05 kHz FLAC and a
    16 kHz OGG Vorbis."""
    folder = tmp_path_factory.mktemp("clips")
    (folder / "nested").mkdir()
    src = sorted(sample_audio.glob("*.wav"))
    shutil.copy(src[0], folder / "digit.wav")
    audio, _ = sf.read(long_stereo, frames=44100 * 2 + 37)
    sf.write(folder / "nested" / "stereo.wav", audio, 44100, subtype="PCM_16")
    wave = AF.resample(torch.from_numpy(sf.read(src[1], dtype="float32")[0]), 8000, 22050).numpy()
    sf.write(folder / "other.flac", wave.clip(-1, 1), 22050, subtype="PCM_16")
    digit = sf.read(src[2], dtype="float32")[0]
    sf.write(folder / "talk.mp3", digit, 8000, format="MP3", subtype="MPEG_LAYER_III")
    wave = AF.resample(torch.from_numpy(digit), 8000, 16000).numpy()
    sf.write(folder / "voice.ogg", wave.clip(-1, 1), 16000, format="OGG", subtype="VORBIS")
    return folder


def test_round_trip_keeps_rate_and_length(trained: Path, clips: Path, tmp_path: Path) -> None:
    model = trained / "model.safetensors"
    tokens, recon = tmp_path / "tokens", tmp_path / "recon"
    result = invoke("encode", model, clips, "--out", tokens, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["written"] == 5
    header = read_header(tokens / "nested" / "stereo.wav.vqt")
    assert header["sample_rate"] == RATE and header["original_sample_rate"] == 44100
    assert header["original_length"] == 44100 * 2 + 37 and header["channels"] == 2 and header["stages"] == 4
    result = invoke("decode", model, tokens, "--out", recon, "--json")
    assert result.exit_code == 0, result.output
    for source in clips.rglob("*.*"):
        rel = source.relative_to(clips)
        original, decoded = sf.info(source), sf.info(recon / rel.with_suffix(".wav"))
        name, rate = rel.as_posix(), original.samplerate
        assert (decoded.samplerate, decoded.frames, decoded.channels) == (rate, original.frames, 1), name


def read_header(path: Path) -> dict:
    from vqtok.tokens.tokfile import read_tokens

    return read_tokens(path).header


def test_fewer_stages_and_kept_channels(trained: Path, clips: Path, tmp_path: Path) -> None:
    from vqtok.tokens.tokfile import read_tokens

    model = trained / "model.safetensors"
    stereo = clips / "nested" / "stereo.wav"
    assert invoke("encode", model, stereo, "--out", tmp_path / "all").exit_code == 0
    assert invoke("encode", model, stereo, "--out", tmp_path / "two", "--stages", "2").exit_code == 0
    assert invoke("encode", model, stereo, "--out", tmp_path / "keep", "--channels", "keep",
                  "--chunk-seconds", "0.5").exit_code == 0
    full = read_tokens(tmp_path / "all" / "stereo.wav.vqt")
    two = read_tokens(tmp_path / "two" / "stereo.wav.vqt")
    keep = read_tokens(tmp_path / "keep" / "stereo.wav.vqt")
    frames = -(-resampled_length(44100 * 2 + 37, 44100, RATE) // 320)
    assert full.codes.shape == (4, frames) and two.codes.shape == (2, frames)
    assert np.array_equal(two.codes, full.codes[:2])
    assert (tmp_path / "two" / "stereo.wav.vqt").stat().st_size < (tmp_path / "all" / "stereo.wav.vqt").stat().st_size
    assert keep.codes.shape == (4, 2, frames) and keep.header["channel_mode"] == "keep"
    for folder, channels in (("two", 1), ("keep", 2)):
        result = invoke("decode", model, tmp_path / folder, "--out", tmp_path / f"{folder}-wav")
        assert result.exit_code == 0, result.output
        info = sf.info(tmp_path / f"{folder}-wav" / "stereo.wav")
        assert (info.samplerate, info.frames, info.channels) == (44100, 44100 * 2 + 37, channels)
    assert invoke("encode", model, stereo, "--out", tmp_path / "x", "--stages", "5").exit_code == 1
    # Entropy coding with the model's table: a two-stage file is coded with the table's first two rows.
    entropy = invoke("encode", model, stereo, "--out", tmp_path / "e", "--stages", "2", "--codec", "entropy")
    assert entropy.exit_code == 0, entropy.output
    assert invoke("decode", model, tmp_path / "e", "--out", tmp_path / "e-wav").exit_code == 0
    assert sf.info(tmp_path / "e-wav" / "stereo.wav").frames == 44100 * 2 + 37
    inspect = invoke("inspect", tmp_path / "e", "--model", model, "--json")
    assert inspect.exit_code == 0 and len(json.loads(inspect.stdout)["stages"]) == 2


def test_eval_reports_audio_figures(trained: Path, clips: Path, tmp_path: Path) -> None:
    model = trained / "model.safetensors"
    results = {}
    for stages in (1, 4):
        result = invoke("eval", model, clips, "--stages", stages, "--json", "--plot", tmp_path / f"s{stages}.png")
        assert result.exit_code == 0, result.output
        results[stages] = json.loads(result.stdout)
        assert (tmp_path / f"s{stages}.png").stat().st_size > 1000
    assert results[1]["kbps"] == pytest.approx(6 * 50 / 1000) and results[4]["kbps"] == pytest.approx(4 * 6 * 50 / 1000)
    assert results[4]["files"] == 5 and math.isfinite(results[4]["si_snr"]) and results[4]["mel_distance"] > 0
    assert 0 < results[4]["usage_stage_4"] <= 1
    inspect = invoke("inspect", model, "--data", clips, "--json")
    assert inspect.exit_code == 0, inspect.output
    assert len(json.loads(inspect.stdout)["stages"]) == 4


def bad_audio(folder: Path) -> dict[str, str]:
    """Broken audio files -> a phrase of the error each must give."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "junk.flac").write_bytes(b"definitely not flac " * 20)
    (folder / "noise.mp3").write_bytes(bytes(range(256)) * 4)
    sf.write(folder / "header-only.wav", np.zeros((0, 1), np.float32), 16000)
    sf.write(folder / "nan.wav", np.array([0.1, np.nan, 0.2] * 1000, np.float32), 16000, subtype="FLOAT")
    return {"empty.wav": "empty file", "junk.flac": "cannot read audio", "noise.mp3": "cannot read audio",
            "header-only.wav": "no audio samples", "nan.wav": "NaN"}


def test_bad_audio_is_one_line_or_skipped(trained: Path, clips: Path, tmp_path: Path) -> None:
    model = trained / "model.safetensors"
    cases = bad_audio(tmp_path / "bad")
    for name, phrase in cases.items():
        path = tmp_path / "bad" / name
        result = invoke("eval", model, path)
        assert result.exit_code == 1, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert any(name in line and phrase in line for line in lines), (name, result.stderr)
        assert len([line for line in lines if line.startswith("error:")]) == 1
        encoded = invoke("encode", model, path, "--out", tmp_path / "t")
        assert encoded.exit_code == 1 and name in encoded.stderr and phrase in encoded.stderr, (name, encoded.stderr)
    mixed = tmp_path / "mixed"
    shutil.copytree(clips, mixed)
    shutil.copytree(tmp_path / "bad", mixed / "bad")
    result = invoke("encode", model, mixed, "--out", tmp_path / "some", "--json")
    assert result.exit_code == 1, result.output  # the good clips are encoded all the same
    report = json.loads(result.stdout)
    assert report["written"] == 5 and len(report["failed"]) == len(cases)
    assert all(name in result.stderr for name in cases)


def test_folder_mixing_images_and_audio_is_an_error(trained: Path, clips: Path, sample_images: Path,
                                                    tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(clips, mixed)
    shutil.copy(next(sample_images.glob("*.png")), mixed / "picture.png")
    for args in (("train", mixed, "--out", tmp_path / "run"),
                 ("encode", trained / "model.safetensors", mixed, "--out", tmp_path / "t")):
        result = invoke(*args)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "mixes images" in lines[0], result.stderr


def test_train_command_picks_audio_defaults(clips: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("train", clips, "--out", run, "--steps", "2", "--warmup", "1", "--channels", "16",
                    "--segment-seconds", "0.2", "--checkpoint-every", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "run.json").read_text())
    model, quantizer = info["model"], info["model"]["quantizer"]
    # Two files at 8 kHz, one each at 16, 22.05 and 44.1 kHz.
    assert model["modality"] == "audio" and model["sample_rate"] == 8000 and model["downsample"] == 320
    assert (quantizer["stages"], quantizer["codebook_size"], quantizer["stage_dropout"]) == (8, 1024, 0.5)
    assert info["train"]["batch_size"] == 8 and info["train"]["segment_seconds"] == 0.2
    forced = invoke("train", clips, "--out", tmp_path / "r2", "--steps", "1", "--warmup", "1", "--channels", "16",
                    "--sample-rate", "16000", "--stages", "1", "--segment-seconds", "0.2", "--device", "cpu")
    assert forced.exit_code == 0, forced.output
    info = json.loads((tmp_path / "r2" / "run.json").read_text())
    assert info["model"]["sample_rate"] == 16000 and info["model"]["quantizer"]["stage_dropout"] == 0.0


def test_stft_nets_train_encode_and_decode_from_the_command_line(clips: Path, tmp_path: Path) -> None:
    run, tokens, recon = tmp_path / "run", tmp_path / "tokens", tmp_path / "recon"
    result = invoke("train", clips, "--out", run, "--steps", "2", "--warmup", "1", "--channels", "16",
                    "--res-blocks", "2", "--audio-net", "stft", "--synthesis-frames", "2", "--audio-loss", "complex",
                    "--sample-rate", "16000",
                    "--segment-seconds", "0.2", "--checkpoint-every", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    model = run / "model.safetensors"
    assert (load(model).config.audio_net, load(model).config.synthesis_frames) == ("stft", 2)
    assert invoke("encode", model, clips / "nested", "--out", tokens).exit_code == 0
    assert invoke("decode", model, tokens, "--out", recon).exit_code == 0
    info = sf.info(str(recon / "stereo.wav"))
    assert (info.samplerate, info.frames) == (44100, 44100 * 2 + 37)
    bad = invoke("train", clips, "--out", tmp_path / "bad", "--audio-net", "wavenet", "--device", "cpu")
    assert bad.exit_code == 2 and "wavenet" in bad.output and not (tmp_path / "bad").exists()
    odd = invoke("train", clips, "--out", tmp_path / "odd", "--audio-net", "stft", "--synthesis-frames", "3",
                 "--device", "cpu")
    assert odd.exit_code == 1 and "divide the hop (320 samples)" in odd.output and not (tmp_path / "odd").exists()


# ------------------------------------------------------------------------------------------------- refine


def recon_loss(model: Tokenizer, codes: torch.Tensor, wave: torch.Tensor) -> float:
    """The refinement loss of decoding codes (S, frames) against wave (1, T)."""
    with torch.no_grad():
        recon = model.decode(codes[None])[:, :, :wave.shape[1]]
    return float(reconstruction_loss(recon, wave[None], RATE, refine.LOSS))


@pytest.mark.parametrize("audio_net", ["conv", "stft"])
def test_refining_lowers_the_loss_of_what_the_codes_decode_to(long_stereo: Path, audio_net: str) -> None:
    wave = data.load_audio(long_stereo, RATE)[:, :2 * RATE]
    model = seeded(wave, audio_net)
    signal = WaveSignal(wave, RATE)
    plain = encode_signal(model, signal)
    refined = encode_signal(model, signal, refine=Refinement(20))
    assert refined.shape == plain.shape and bool((refined != plain).any())
    assert recon_loss(model, refined, wave) < recon_loss(model, plain, wave)
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_refining_no_steps_is_a_plain_encode_and_windows_tile_the_signal(long_stereo: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    wave = data.load_audio(long_stereo, RATE)[:, :3 * RATE + 123]
    model = seeded(wave, "stft")
    signal = WaveSignal(wave, RATE)
    plain = encode_signal(model, signal)
    assert float((encode_signal(model, signal, refine=Refinement()) == plain).float().mean()) == 1.0
    monkeypatch.setattr(refine, "WINDOW_FRAMES", 40)  # 151 frames: four windows, the last one short
    unrefined = refine.refined_codes(model, signal, Refinement())[:, 0]
    assert unrefined.shape == plain.shape and float((unrefined == plain).float().mean()) >= 0.999
    refined = encode_signal(model, signal, refine=Refinement(5))
    assert refined.shape == plain.shape
    assert recon_loss(model, refined, wave) < recon_loss(model, plain, wave)


def test_log_mel_error_per_frame_sums_to_the_mean_and_stays_local(long_stereo: Path) -> None:
    target = data.load_audio(long_stereo, RATE)[:1, :RATE][None]  # (1, 1, T)
    hop = 320
    noisy = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    per_frame = FrameLogMelError(target, RATE, hop)(noisy)
    assert per_frame.shape == (1, RATE // hop) and bool((per_frame > 0).all())
    whole = log_mel_l1(noisy, target, RATE, spectral_scales(RATE), SPECTRAL_FLOOR)
    assert float(per_frame.mean()) == pytest.approx(float(whole), rel=0.05)
    # Spoil frames 20-21 only: the error grows there and stays put a window (2048 samples) away from them.
    spoiled = noisy.clone()
    spoiled[..., 20 * hop:22 * hop] = 0.0
    both = FrameLogMelError(target, RATE, hop)(torch.cat([noisy, spoiled]))
    grown = both[1] - both[0]
    assert float(grown[20:22].min()) > 0.1 * float(both[0, 20:22].mean())
    far = [f for f in range(len(grown)) if abs(f - 21) > 2048 // hop + 2]
    assert float(grown[far].abs().max()) < 1e-5


def test_log_mel_error_with_a_range_ignores_what_lies_far_below_the_target_peak() -> None:
    hop = 320
    t = torch.arange(RATE) / RATE
    target = (0.5 * torch.sin(2 * math.pi * 440 * t))[None, None]  # (1, 1, T): one loud tone
    # A hiss 80 dB below the tone, over the second half only: audible to the absolute floor, not within 40 dB.
    hiss = 5e-5 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    hiss[..., :RATE // 2] = 0.0
    whole = FrameLogMelError(target, RATE, hop)(target + hiss)
    ranged = FrameLogMelError(target, RATE, hop, range_db=40.0)(target + hiss)
    late = slice(RATE // hop // 2 + 8, None)  # frames well inside the hiss
    assert float(whole[0, late].mean()) > 0.05
    assert float(ranged[0, late].mean()) < 0.01 * float(whole[0, late].mean())
    # Within the range it still sees errors: the tone at half its level.
    halved = FrameLogMelError(target, RATE, hop, range_db=40.0)(0.5 * target)
    assert float(halved[0, late].mean()) > 20 * float(ranged[0, late].mean())


def test_envelope_error_is_relative_to_the_target_energy_and_stays_local() -> None:
    hop, frames = 320, RATE // 320

    def noise(*levels: float) -> torch.Tensor:
        """(1, 1, RATE): white noise in equal parts at these levels."""
        wave = 0.3 * torch.randn(1, 1, RATE, generator=torch.Generator().manual_seed(0))
        for part, level in zip(wave.chunk(len(levels), dim=-1), levels):
            part *= level
        return wave

    target = noise(1.0, 0.3)  # the second half 10 dB quieter
    error = FrameEnvelopeError(target, RATE, hop)
    assert float(error(target).abs().max()) < 1e-6
    # Half the level costs about (1 - 0.5)^2 = 0.25 a frame, loud or quiet: each band is judged against its
    # own energy. 60 dB down, below the floor, it hardly counts.
    halved = error(0.5 * target)[0]
    for part in (halved[4:frames // 2 - 16], halved[frames // 2 + 16:-4]):
        assert float(part.mean()) == pytest.approx(0.25, rel=0.2)
    faint = noise(1.0, 1e-3)
    assert float(FrameEnvelopeError(faint, RATE, hop)(0.5 * faint)[0, frames // 2 + 16:-4].mean()) < 0.01
    # Spoiling frames 20-21 raises the error there and leaves frames a window (512 samples) away alone.
    spoiled = target.clone()
    spoiled[..., 20 * hop:22 * hop] = 0.0
    grown = error(spoiled)[0]
    assert float(grown[20:22].min()) > 0.1
    far = [f for f in range(frames) if abs(f - 21) > 512 // hop + 2]
    assert float(grown[far].abs().max()) < 1e-6
    # At 6 kHz the bands past 3 kHz are dropped.
    assert len(FrameEnvelopeError(target[..., :6000], 6000, 120).bands) < 15 == len(error.bands)


def test_code_search_lowers_the_log_mel_error_and_one_candidate_is_a_plain_encode(long_stereo: Path) -> None:
    wave = data.load_audio(long_stereo, RATE)[:1, :2 * RATE]
    model = seeded(wave, "stft")
    signal = WaveSignal(wave, RATE)

    def error(codes: torch.Tensor) -> float:
        with torch.no_grad():
            recon = model.decode(codes[None])[:, :, :wave.shape[1]]
        return float(log_mel_l1(recon, wave[None], RATE, spectral_scales(RATE), SPECTRAL_FLOOR))

    plain = encode_signal(model, signal)
    assert float((encode_signal(model, signal, refine=Refinement(search=1)) == plain).float().mean()) >= 0.999
    searched = encode_signal(model, signal, refine=Refinement(search=4))
    assert searched.shape == plain.shape and bool((searched != plain).any())
    assert error(searched) < error(plain)
    # Each stage's code is one of the 4 nearest to what the earlier stages left (as searched) of the latent.
    with torch.no_grad():
        z = model._to_vectors(model.encoder(torch.nn.functional.pad(wave, (0, -wave.shape[1] % 320))[None]))
        residual = model.quantizer.quantizers[0].prepare_input(z)
        for stage, vq in enumerate(model.quantizer.quantizers):
            book = vq.codes()
            kept = (residual - book[searched[stage]]).norm(dim=1, keepdim=True)
            rank = (torch.cdist(residual, book) < kept - 1e-5).sum(1)  # codes nearer than the one kept
            assert int(rank.max()) < 4
            residual = residual - book[searched[stage]]
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_refined_codes_repeat_and_ignore_the_chunk_length(long_stereo: Path) -> None:
    file, signal = model_signal(long_stereo, RATE)
    model = seeded(data.load_audio(long_stereo, RATE)[:, :RATE], "stft")
    with file:
        for how in (Refinement(2), Refinement(1, search=3)):
            first = encode_signal(model, signal, refine=how, chunk_seconds=0.7)
            again = encode_signal(model, signal, refine=how, chunk_seconds=30.0)
            assert torch.equal(first, again)


def test_encode_and_eval_refine_from_the_command_line(trained: Path, clips: Path, sample_images: Path,
                                                      tmp_path: Path) -> None:
    model = trained / "model.safetensors"
    result = invoke("encode", model, clips / "nested", "--out", tmp_path / "tokens", "--refine", "2", "--json")
    assert result.exit_code == 0, result.output
    token_file = tmp_path / "tokens" / "stereo.wav.vqt"
    assert read_header(token_file)["refine"] == 2 and "search" not in read_header(token_file)
    searched = invoke("encode", model, clips / "nested", "--out", tmp_path / "searched", "--search", "2")
    assert searched.exit_code == 0, searched.output
    assert read_header(tmp_path / "searched" / "stereo.wav.vqt")["search"] == 2
    assert invoke("decode", model, tmp_path / "tokens", "--out", tmp_path / "wav").exit_code == 0
    assert sf.info(tmp_path / "wav" / "stereo.wav").frames == 44100 * 2 + 37
    # eval --refine measures the token files encode --refine writes, header included.
    scored = invoke("eval", model, clips / "nested", "--refine", "2", "--json")
    assert scored.exit_code == 0, scored.output
    seconds = (44100 * 2 + 37) / 44100
    assert json.loads(scored.stdout)["kbps_packed_file"] * seconds * 1000 / 8 == pytest.approx(
        token_file.stat().st_size)
    assert json.loads(scored.stdout)["refine_steps"] == 2 and "search" not in json.loads(scored.stdout)
    for command in ("encode", "eval"):
        out = ["--out", tmp_path / "x"] if command == "encode" else []
        for flag in ("--refine", "--search"):
            negative = invoke(command, model, clips, *out, flag, "-1")
            assert negative.exit_code == 1 and f"{flag} must be >= 0, got -1" in negative.output
            images = invoke(command, "mnist", sample_images, *out, flag, "3")
            assert images.exit_code == 1 and f"{flag} is for audio models; mnist is an image model" in images.output
    assert not (tmp_path / "x").exists()
