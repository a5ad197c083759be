"""vqtok.data: finding inputs, decoding odd and broken images and audio, resizing, padding, writing."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from vqtok.data import io as data
from vqtok.errors import VqtokError


def _noise_rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(VqtokError, match=match) as info:
        data.load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------------------------
# Broken images


def test_truncated_jpeg_is_an_error(tmp_path):
    buf = io.BytesIO()
    _noise_rgb(64, 64).save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _assert_one_line_error(path, "cannot read image")


def test_jpeg_with_damaged_header_is_an_error(tmp_path):
    buf = io.BytesIO()
    _noise_rgb(32, 32).save(buf, format="JPEG")
    raw = bytearray(buf.getvalue())
    raw[0:4] = bytes(b ^ 0xFF for b in raw[0:4])
    path = tmp_path / "flipped.jpg"
    path.write_bytes(bytes(raw))
    _assert_one_line_error(path, "cannot read image")


def test_zero_byte_image_is_an_error(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_one_line_error(path, r"cannot read image \(empty file\)")


def test_text_named_png_is_an_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\nsecond line\n")
    _assert_one_line_error(path, "cannot read image")


def test_oversized_image_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _noise_rgb(20, 20).save(path)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    _assert_one_line_error(path, "decompression-bomb")


# ----------------------------------------------------------------------------------------------------------------
# Odd image modes


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # really stored and decoded as 16-bit
    out = data.load_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 4)
    assert out[0, 0].tolist() == [0, 1, 128, 255]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_float_tiff_is_scaled(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(path)
    assert data.load_image(path)[0, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink mix
    out = data.load_image(path).int()
    assert out.shape == (3, 16, 16)
    mean = out.float().mean((1, 2))
    assert mean[0] > 235 and mean[1] < 20 and mean[2] < 20


def test_palette_transparency_becomes_white(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 black (transparent), index 1 blue
    im.putpixel((3, 1), 1)
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    out = data.load_image(path)
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert out[:, 1, 3].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, quality=95, exif=exif)
    out = data.load_image(path).int()
    assert out.shape == (3, 40, 20)
    assert out[0, 5, 10] > 200 and out[2, 5, 10] < 50  # the left (red) half is now on top
    assert out[2, 35, 10] > 200 and out[0, 35, 10] < 50


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    out = data.load_image(path)
    assert out.shape == (3, 6, 8)
    assert out[:, 0, 0].tolist() == [255, 0, 0]


def test_grayscale_l(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 3), 100).save(path)
    out = data.load_image(path)
    assert out.shape == (3, 3, 5) and bool((out == 100).all())


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    black = (0, 0) if mode == "LA" else (0, 0, 0, 0)
    im = Image.new(mode, (3, 1), black)
    im.putpixel((1, 0), black[:-1] + (255,))
    im.putpixel((2, 0), black[:-1] + (128,))
    path = tmp_path / f"alpha_{mode}.png"
    im.save(path)
    out = data.load_image(path)
    assert out[:, 0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert out[:, 0, 1].tolist() == [0, 0, 0]  # opaque black stays black
    assert all(abs(v - 127) <= 1 for v in out[:, 0, 2].tolist())  # half transparent -> mid grey


def test_rgb_png_is_exact(tmp_path):
    im = _noise_rgb(7, 9, seed=3)
    path = tmp_path / "rgb.png"
    im.save(path)
    out = data.load_image(path)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(np.array(im)))


# ----------------------------------------------------------------------------------------------------------------
# Writing, resizing, sizing


def test_save_image_round_trip(tmp_path):
    img = torch.rand(3, 5, 6) * 1.4 - 0.2  # values outside [0, 1] are clamped
    path = tmp_path / "out" / "x.png"
    data.save_image(path, img)
    back = data.load_image(path)
    expected = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(back, expected)
    u8 = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    data.save_image(path, u8)
    assert torch.equal(data.load_image(path), u8)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]  # no temporary left behind


def test_resize_and_crop_takes_centre(tmp_path):
    img = torch.zeros(3, 20, 60, dtype=torch.uint8)
    img[:, :, 20:40] = 200  # only the centre square is bright
    out = data.resize_and_crop(img, 10)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert bool((out[:, :, 2:-2] == 200).all())
    tall = torch.full((3, 30, 12), 50, dtype=torch.uint8)
    assert data.resize_and_crop(tall, 16).shape == (3, 16, 16)
    assert bool((data.resize_and_crop(tall, 16) == 50).all())


def test_default_image_size_on_samples(sample_images):
    _, files = data.find_inputs(sample_images)
    assert data.default_image_size(files, 4) == 28
    assert data.default_image_size(files, 8) == 24
    assert data.default_image_size(files, 4, cap=16) == 16
    assert data.default_image_size(files, 64) == 64  # never below one multiple


def test_default_image_size_uses_median_shorter_side(tmp_path):
    files = []
    for i, (w, h) in enumerate([(40, 30), (50, 60), (100, 20), (90, 90), (33, 70)]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (w, h)).save(files[-1])
    assert data.default_image_size(files, 8) == 32  # shorter sides 30 50 20 90 33 -> median 33 -> 32


def test_load_image_set_skips_and_reports_bad_files(tmp_path, sample_images):
    good = sorted(sample_images.glob("*.png"))[:3]
    for p in good:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "zz_empty.png").write_bytes(b"")
    (tmp_path / "zz_text.jpg").write_text("nope")
    _, files = data.find_inputs(tmp_path)
    advanced = []
    images, kept, skipped = data.load_image_set(files, 16, progress=advanced.append)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert [p.name for p in kept] == [p.name for p in good]
    assert [p.name for p, _ in skipped] == ["zz_empty.png", "zz_text.jpg"]
    assert all("cannot read image" in reason and "\n" not in reason for _, reason in skipped)
    assert sum(advanced) == 5
    assert torch.equal(images[1], data.resize_and_crop(data.load_image(good[1]), 16))


# ----------------------------------------------------------------------------------------------------------------
# Finding inputs


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_inputs_recursive_sorted_hidden_ignored(tmp_path):
    for rel in ["b/2.png", "a-b/3.png", "a/sub/0.png", "a/1.png", "c.PNG", ".hidden/x.png", "a/.y.png", "notes.txt"]:
        _touch(tmp_path / rel)
    kind, files = data.find_inputs(tmp_path)
    assert kind == "image"
    expected = ["a/1.png", "a/sub/0.png", "a-b/3.png", "b/2.png", "c.PNG"]  # folder by folder
    assert [p.relative_to(tmp_path).as_posix() for p in files] == expected
    name = data.relative_namer(tmp_path)
    assert [name(p) for p in files] == expected


def test_find_inputs_follows_linked_folders_once(tmp_path):
    for rel in ["elsewhere/digits/1.png", "data/own/2.png"]:
        _touch(tmp_path / rel)
    (tmp_path / "data" / "digits").symlink_to(tmp_path / "elsewhere" / "digits")
    (tmp_path / "data" / "own" / "loop").symlink_to(tmp_path / "data")  # a link back up the tree
    _, files = data.find_inputs(tmp_path / "data")
    assert [p.relative_to(tmp_path / "data").as_posix() for p in files] == ["digits/1.png", "own/2.png"]


def test_find_inputs_mixed_is_an_error(tmp_path):
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "deep" / "b.wav")
    _touch(tmp_path / "deep" / "c.FLAC")
    with pytest.raises(VqtokError, match=r"mixes images \(1\) and audio \(2\) files"):
        data.find_inputs(tmp_path)


def test_find_inputs_empty_is_an_error(tmp_path):
    _touch(tmp_path / "readme.txt")
    _touch(tmp_path / ".secret.png")
    with pytest.raises(VqtokError, match="no image or audio files in"):
        data.find_inputs(tmp_path)


def test_find_inputs_missing_path_and_wrong_file(tmp_path):
    with pytest.raises(VqtokError, match="no such file or folder"):
        data.find_inputs(tmp_path / "nowhere")
    with pytest.raises(VqtokError, match="not an image or audio file"):
        data.find_inputs(_touch(tmp_path / "x.txt"))


def test_find_inputs_files_and_folders(tmp_path, sample_audio):
    single = _touch(tmp_path / "one" / "solo.wav")
    kind, files = data.find_inputs([single, sample_audio])
    assert kind == "audio" and len(files) == 41 and files[0] == single
    name = data.relative_namer([single, sample_audio])
    assert name(single) == "solo.wav"
    assert name(files[1]) == files[1].name


# ----------------------------------------------------------------------------------------------------------------
# Padding


def test_pad_to_multiple_replicates_edges():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    y, (h, w) = data.pad_to_multiple(x, 4)
    assert y.shape == (2, 3, 8, 8) and (h, w) == (5, 7)
    assert torch.equal(y[..., :5, :7], x)
    assert torch.equal(y[..., 5:, :7], x[..., 4:5, :].expand(2, 3, 3, 7))
    assert torch.equal(y[..., :5, 7:], x[..., :, 6:7])
    assert bool((y[..., 5:, 7:] == x[..., 4:5, 6:7]).all())
    u8 = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)
    y8, size = data.pad_to_multiple(u8, 4)
    assert y8.dtype == torch.uint8 and y8.shape == (3, 8, 8) and size == (6, 6)
    same, size = data.pad_to_multiple(u8, 3)
    assert same is u8 and size == (6, 6)


def test_pad_length_zero_pads():
    x = torch.randn(2, 10)
    y, t = data.pad_length(x, 4)
    assert y.shape == (2, 12) and t == 10
    assert torch.equal(y[:, :10], x) and bool((y[:, 10:] == 0).all())


# ----------------------------------------------------------------------------------------------------------------
# Audio


def _sine(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    "suffix,fmt,subtype,tol",
    [
        (".wav", "WAV", "PCM_U8", 1 / 128),
        (".wav", "WAV", "PCM_16", 1 / 32768),
        (".wav", "WAV", "PCM_24", 1e-6),
        (".wav", "WAV", "PCM_32", 1e-6),
        (".wav", "WAV", "FLOAT", 0.0),
        (".flac", "FLAC", "PCM_16", 1 / 32768),
    ],
)
def test_lossless_audio_round_trip(tmp_path, suffix, fmt, subtype, tol):
    wave = _sine(16000, 0.25)
    path = tmp_path / f"a{suffix}"
    sf.write(path, wave, 16000, format=fmt, subtype=subtype)
    out = data.load_audio(path, 16000)
    assert out.dtype == torch.float32 and out.shape == (1, wave.size)
    assert float((out[0] - torch.from_numpy(wave)).abs().max()) <= tol
    assert data.audio_info(path) == (16000, wave.size, 1)


@pytest.mark.parametrize("suffix,fmt,subtype", [(".ogg", "OGG", "VORBIS"), (".mp3", "MP3", "MPEG_LAYER_III")])
def test_lossy_audio_round_trip(tmp_path, suffix, fmt, subtype):
    wave = _sine(16000, 0.5)
    path = tmp_path / f"a{suffix}"
    sf.write(path, wave, 16000, format=fmt, subtype=subtype)
    out = data.load_audio(path, 16000)
    assert out.shape[0] == 1 and abs(out.shape[1] - wave.size) <= 1152  # at most one MP3 frame of padding
    rms = float(out[0, 2000:6000].pow(2).mean().sqrt())
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.03
    spectrum = torch.fft.rfft(out[0, 2000:6000]).abs()
    assert abs(int(spectrum.argmax()) * 16000 / 4000 - 440) <= 8  # still a 440 Hz tone


def test_stereo_is_mixed_to_mono(tmp_path):
    n = 800
    stereo = np.stack([np.full(n, 0.5), np.full(n, -0.1)], axis=1).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 8000, subtype="FLOAT")
    mono = data.load_audio(path, 8000)
    assert mono.shape == (1, n) and torch.allclose(mono, torch.full((1, n), 0.2))
    both = data.load_audio(path, 8000, mono=False)
    assert both.shape == (2, n) and torch.allclose(both[1], torch.full((n,), -0.1))


def test_resampled_to_target_rate(tmp_path):
    path = tmp_path / "cd.wav"
    sf.write(path, _sine(44100, 1.0), 44100, subtype="FLOAT")
    out = data.load_audio(path, 16000)
    assert abs(out.shape[1] - 16000) <= 1
    expected = torch.from_numpy(_sine(16000, 1.0))
    assert float((out[0, 200:-200] - expected[200:out.shape[1] - 200]).abs().max()) < 0.02


def test_float_audio_beyond_full_scale_is_clipped(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.0, 1.5, -2.0, 0.25], dtype=np.float32), 8000, subtype="FLOAT")
    assert data.load_audio(path, 8000)[0].tolist() == [0.0, 1.0, -1.0, 0.25]


def test_zero_byte_audio_is_an_error(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(VqtokError, match=r"empty\.wav: cannot read audio \(empty file\)"):
        data.load_audio(path, 16000)


def test_header_only_audio_is_an_error(tmp_path):
    path = tmp_path / "header.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    assert path.stat().st_size > 0
    with pytest.raises(VqtokError, match=r"header\.wav: no audio samples"):
        data.load_audio(path, 16000)


def test_nan_audio_is_an_error(tmp_path):
    path = tmp_path / "nan.wav"
    wave = _sine(8000, 0.1)
    wave[10] = np.nan
    sf.write(path, wave, 8000, subtype="FLOAT")
    with pytest.raises(VqtokError, match=r"nan\.wav: audio holds NaN or infinite samples"):
        data.load_audio(path, 8000)


def test_garbage_named_wav_is_an_error(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VqtokError, match=r"garbage\.wav: cannot read audio") as info:
        data.load_audio(path, 8000)
    assert "\n" not in str(info.value)
    with pytest.raises(VqtokError, match=r"garbage\.wav: cannot read audio"):
        data.audio_info(path)


def test_save_audio_round_trip(tmp_path):
    wave = torch.from_numpy(_sine(8000, 0.2, amp=0.9))[None].repeat(2, 1)
    wave[1, :5] = 3.0  # beyond full scale: clipped
    path = tmp_path / "out" / "w.wav"
    data.save_audio(path, wave, 8000)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (8000, 2, wave.shape[1], "PCM_16")
    back = data.load_audio(path, 8000, mono=False)
    assert float((back - wave.clamp(-1, 1)).abs().max()) <= 1 / 32768 + 1e-7
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.wav"]


def test_load_audio_set_on_samples(tmp_path, sample_audio):
    files = sorted(sample_audio.glob("*.wav"))[:4]
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    advanced = []
    waves, kept, skipped = data.load_audio_set(files + [bad], 16000, progress=advanced.append)
    assert kept == files and [p for p, _ in skipped] == [bad] and sum(advanced) == 5
    for path, wave in zip(files, waves):
        rate, frames, channels = data.audio_info(path)
        assert (rate, channels) == (8000, 1)
        assert wave.dtype == torch.float32 and wave.shape[0] == 1
        assert abs(wave.shape[1] - 2 * frames) <= 1
        assert float(wave.abs().max()) <= 1.0


def test_relative_names_take_the_innermost_root_and_never_a_name_prefix(tmp_path):
    inner = tmp_path / "data" / "inner"
    name = data.relative_namer([tmp_path / "data", inner, str(tmp_path / "data2") + "/"])
    assert name(inner / "a" / "x.png") == "a/x.png"
    assert name(tmp_path / "data" / "b" / "y.png") == "b/y.png"
    assert name(tmp_path / "data2" / "z.png") == "z.png"
    assert name(tmp_path / "data22" / "w.png") == "w.png"  # outside every root: the file name alone
    assert name(inner) == "inner"


def _job_range(files: range) -> tuple[int, int]:
    return files.start, files.stop


@pytest.mark.parametrize("count,job_files,workers", [(1000, 256, 2), (300, 38, 2), (5, 1, 2), (7, 3, 0), (1, 256, 2)])
def test_worker_jobs_cover_every_file_once_in_order_with_as_many_jobs_per_worker(count, job_files, workers):
    from vqtok.data.readers import worker_jobs

    ranges = list(worker_jobs(count, job_files, workers, _job_range))
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(count))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) <= job_files and max(sizes) - min(sizes) <= 1
    if workers and len(ranges) < count:
        assert len(ranges) % workers == 0  # handed out in turn: every worker runs as many
