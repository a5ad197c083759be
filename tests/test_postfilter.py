"""The decoder-side postfilter (vqtok.postfilter): what it does to a spectrum, reads of any size equal to the
whole signal's, its place in decoding and scoring, and `vqtok decode / eval --postfilter`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from vqtok.config import ModelConfig, QuantizerConfig
from vqtok.errors import VqtokError
from vqtok.evaluate import AudioEvaluator
from vqtok.jobs.audiostream import PostfilteredSignal, WaveSignal, decoded_signal, postfiltered, resampled_length
from vqtok.nets.tokenizer import Tokenizer
from vqtok.postfilter import BAND_MIN_POWER, BAND_PULL, MIN_GAIN, band_correction, check_strength, window_length
from vqtok.speech import stoi_bands

RATE = 16000
F0 = 200.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def voiced(seconds: float, snr_db: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A buzz of 20 harmonics of F0 (amplitude 1/k) plus white noise at `snr_db`: (clean, noisy), (1, T) each."""
    t = torch.arange(round(seconds * RATE)) / RATE
    clean = sum(torch.sin(2 * math.pi * k * F0 * t) / k for k in range(1, 21))
    clean = 0.3 * clean / clean.abs().max()
    noise = torch.randn(len(t), generator=torch.Generator().manual_seed(seed))
    noise *= clean.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)
    return clean[None], (clean + noise)[None]


def harmonic_to_rest_db(wave: torch.Tensor) -> float:
    """Energy within 10 Hz of a harmonic of F0 over the energy elsewhere, in dB, of the middle second."""
    middle = wave[0, RATE // 2: RATE // 2 + RATE]
    power = torch.fft.rfft(middle * torch.hann_window(RATE)).abs().square()
    freqs = torch.arange(len(power)).float()  # 1 Hz bins
    near = ((freqs + F0 / 2) % F0 - F0 / 2).abs() <= 10
    return float(10 * torch.log10(power[near].sum() / power[~near].sum()))


def test_window_is_about_128_ms_in_a_power_of_two() -> None:
    assert [window_length(rate) for rate in (8000, 16000, 24000, 44100)] == [1024, 2048, 4096, 4096]


def test_sharpening_lifts_harmonics_over_noise_at_the_same_loudness() -> None:
    _, noisy = voiced(2.0, snr_db=10)
    out = postfiltered(noisy, RATE, 0.3)
    assert out.shape == noisy.shape
    assert harmonic_to_rest_db(out) > harmonic_to_rest_db(noisy) + 3
    assert float(out.square().sum() / noisy.square().sum()) == pytest.approx(1.0, abs=0.1)
    # Stronger sharpening, more contrast.
    assert harmonic_to_rest_db(postfiltered(noisy, RATE, 0.6)) > harmonic_to_rest_db(out)


def band_energy_ratio(out: torch.Tensor, wave: torch.Tensor, low_hz: int, high_hz: int) -> float:
    """Energy of `out` over that of `wave` between the two frequencies, in their middle second."""
    def energy(x: torch.Tensor) -> float:
        power = torch.fft.rfft(x[0, RATE // 2: RATE // 2 + RATE] * torch.hann_window(RATE)).abs().square()
        return float(power[low_hz:high_hz].sum())  # 1 Hz bins

    return energy(out) / energy(wave)


def test_stoi_bands_lose_at_most_7_db_while_higher_bins_are_cut_to_the_minimum_gain() -> None:
    # Five loud harmonics up to 1 kHz over noise 30 dB down: sharpening cuts the noise everywhere else, but
    # within STOI's bands (up to 4.3 kHz) a band's energy falls by BAND_MIN_POWER at most.
    t = torch.arange(2 * RATE) / RATE
    buzz = sum(torch.sin(2 * math.pi * k * F0 * t) / k for k in range(1, 6))
    buzz = 0.3 * buzz / buzz.abs().max()
    noise = torch.randn(len(t), generator=torch.Generator().manual_seed(0))
    wave = (buzz + noise * buzz.pow(2).mean().sqrt() * 10 ** (-30 / 20))[None]
    out = postfiltered(wave, RATE, 0.3)
    assert band_energy_ratio(out, wave, 2500, 3500) == pytest.approx(BAND_MIN_POWER, rel=0.02)
    assert band_energy_ratio(out, wave, 5000, 7000) == pytest.approx(MIN_GAIN**2, rel=0.02)
    assert band_energy_ratio(out, wave, 150, 1100) == pytest.approx(1.0, abs=0.02)


def test_band_energy_changes_are_pulled_towards_their_neighbourhood() -> None:
    # Nine flat frames whose sharpening gain halves one band's amplitude in odd frames (energy x 0.25): a
    # middle odd frame's change is pulled BAND_PULL of the way (in dB) to the mean over 7 frames, 4 x 1 and
    # 3 x 0.25 (energy-weighted, and the frames' energies are equal); other bands and bins are untouched.
    window = 2048
    bands = stoi_bands(window, RATE)
    band = bands[10].bool()
    power = torch.ones(1, 9, window // 2 + 1, dtype=torch.float64)
    gain = torch.ones_like(power)
    gain[:, 1::2, band] = 0.5
    factor = band_correction(power, gain, window, RATE)
    change = 0.25
    slow = (4 * 1.0 + 3 * change) / 7
    expected = math.sqrt(change * (slow / change) ** BAND_PULL / change)
    torch.testing.assert_close(factor[0, 3, band], torch.full((int(band.sum()),), expected, dtype=torch.float64))
    torch.testing.assert_close(factor[0, 3, ~band], torch.ones(int((~band).sum()), dtype=torch.float64))
    # An even frame (no change of its own) is pulled down towards the odd frames around it.
    assert float(factor[0, 4, band][0]) < 1.0
    # A band cut deeper than BAND_MIN_POWER is held there.
    gain[:, :, band] = 0.1
    torch.testing.assert_close(band_correction(power, gain, window, RATE)[0, :, band],
                               torch.full((9, int(band.sum())), math.sqrt(BAND_MIN_POWER / 0.01), dtype=torch.float64))


def test_no_strength_is_the_input_and_level_only_scales_the_output() -> None:
    _, noisy = voiced(1.0, snr_db=5)
    assert postfiltered(noisy, RATE, 0.0) is noisy
    torch.testing.assert_close(postfiltered(0.1 * noisy, RATE, 0.3), 0.1 * postfiltered(noisy, RATE, 0.3),
                               atol=1e-6, rtol=1e-4)
    silence = torch.zeros(1, RATE)
    assert torch.equal(postfiltered(silence, RATE, 0.3), silence)
    # Near silence (band energies of denormal size) stays finite.
    assert torch.isfinite(postfiltered(1e-22 * noisy, RATE, 0.3)).all()


@pytest.mark.parametrize("step", [777, 5000])
def test_reads_of_any_size_equal_the_whole_signal(step: int) -> None:
    _, noisy = voiced(1.3, snr_db=5)
    stereo = torch.cat([noisy, -0.5 * noisy.roll(333)])
    length = stereo.shape[1]
    signal = PostfilteredSignal(WaveSignal(stereo, RATE), 0.3)
    whole = signal.read(0, length)
    pieces = torch.cat([signal.read(a, min(a + step, length)) for a in range(0, length, step)], dim=1)
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=0)
    # Each channel on its own, and silence outside the signal.
    torch.testing.assert_close(whole[1:], postfiltered(stereo[1:], RATE, 0.3), atol=1e-6, rtol=0)
    edges = signal.read(-50, length + 50)
    assert torch.equal(edges[:, :50], torch.zeros(2, 50)) and torch.equal(edges[:, -50:], torch.zeros(2, 50))


def tiny_model() -> Tokenizer:
    torch.manual_seed(0)
    config = ModelConfig(modality="audio", in_channels=1, channels=16, res_blocks=1, sample_rate=RATE,
                         audio_strides=(4, 8), downsample=32,
                         quantizer=QuantizerConfig(dim=8, codebook_size=32, stages=2))
    return Tokenizer(config).eval()


def test_decoding_postfilters_at_the_model_rate_then_resamples() -> None:
    model = tiny_model()
    codes = torch.randint(0, 32, (2, 200), generator=torch.Generator().manual_seed(1))
    length = resampled_length(200 * 32, RATE, 22050) - 11
    got = decoded_signal(model, codes, length, 22050, postfilter=0.3).read(0, length)
    with torch.no_grad():
        wave = model.decode(codes[None])[0, :, :resampled_length(length, 22050, RATE)]
    expect = AF.resample(postfiltered(wave, RATE, 0.3), RATE, 22050)[:, :length].clamp(-1, 1)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_evaluator_scores_the_postfiltered_reconstruction() -> None:
    model = tiny_model()
    _, noisy = voiced(0.5, snr_db=20)
    plain = AudioEvaluator(model).add(noisy)
    sharpened = AudioEvaluator(model, postfilter=0.3)
    torch.testing.assert_close(sharpened.add(noisy), postfiltered(plain, RATE, 0.3).clamp(-1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strength, message", [(-0.1, "between 0 and 1, got -0.1"), (1.5, "between 0 and 1, got 1.5")])
def test_strength_outside_zero_to_one_is_refused(strength: float, message: str) -> None:
    with pytest.raises(VqtokError, match=message):
        check_strength(strength, "audio", "m")
    check_strength(0.0, "image", "m")
    with pytest.raises(VqtokError, match="--postfilter is for audio models; m is an image model"):
        check_strength(0.3, "image", "m")


# ------------------------------------------------------------------------------------------------- CLI


def invoke(*args: object):
    from typer.testing import CliRunner

    from vqtok.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_decode_and_eval_postfilter_from_the_command_line(sample_audio: Path, sample_images: Path,
                                                          tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    source = sorted(sample_audio.glob("*.wav"))[0]
    (clips / source.name).write_bytes(source.read_bytes())
    tokens = tmp_path / "tokens"
    assert invoke("encode", "speech", clips, "--out", tokens, "--stages", "2").exit_code == 0
    for name, extra in (("plain", []), ("sharp", ["--postfilter", "0.3"]), ("again", ["--postfilter", "0.3"])):
        result = invoke("decode", "speech", tokens, "--out", tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
    plain, sharp = (tmp_path / "plain" / source.name, tmp_path / "sharp" / source.name)
    assert (sf.info(sharp).samplerate, sf.info(sharp).frames) == (sf.info(source).samplerate, sf.info(source).frames)
    assert plain.read_bytes() != sharp.read_bytes()
    assert sharp.read_bytes() == (tmp_path / "again" / source.name).read_bytes()
    scored = {}
    for name, extra in (("plain", []), ("sharp", ["--postfilter", "0.3"])):
        result = invoke("eval", "speech", clips, "--stages", "2", "--json", *extra)
        assert result.exit_code == 0, result.output
        scored[name] = json.loads(result.stdout)
    assert scored["plain"]["kbps_packed_file"] == scored["sharp"]["kbps_packed_file"]
    assert scored["plain"]["mel_distance"] != scored["sharp"]["mel_distance"]
    assert scored["sharp"]["postfilter"] == 0.3 and "postfilter" not in scored["plain"]
    # Bad strengths and image models: one line, exit 1, nothing written.
    for command, args in (("decode", [tokens, "--out", tmp_path / "x"]), ("eval", [clips])):
        bad = invoke(command, "speech", *args, "--postfilter", "2")
        assert bad.exit_code == 1 and "--postfilter must be between 0 and 1, got 2" in bad.output
    images = invoke("eval", "mnist", sample_images, "--postfilter", "0.3")
    assert images.exit_code == 1 and "--postfilter is for audio models; mnist is an image model" in images.output
    assert not (tmp_path / "x").exists()
