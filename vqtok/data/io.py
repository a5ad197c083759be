"""Find, decode, convert and write the inputs: images (Pillow) and audio (soundfile + torchaudio resampling).

Images come out as uint8 RGB tensors (3, H, W) whatever the file held (palette, alpha, 16-bit, CMYK, EXIF
rotation, animation); audio as float32 waves (C, T) in [-1, 1] at the requested sample rate. Every file the
user can get wrong raises `VqtokError` with one line that names it; the `*_set` loaders skip such files and
report them instead, so one bad file does not stop a training run.
"""

from __future__ import annotations

import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image, ImageOps

from vqtok.atomic import atomic_path
from vqtok.errors import VqtokError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

# Pillow's own guard (Image.MAX_IMAGE_PIXELS, ~89 Mpx) only warns below twice its value; a training input that
# large is a mistake or an attack either way, so refuse it outright.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Sample rates an audio file (or an audio token file) may have. 768 kHz is the highest rate recording
# hardware and formats use (DXD, "PCM768"); a header beyond it is damaged or built to make the resampler
# allocate without bound (2^31-1 Hz: tens of GB). Below 1 kHz a file holds nothing above 500 Hz, no signal these
# models are for, and resampling multiplies it into ever more model samples (a 1 Hz file of 500 samples into
# 500 s of 16 kHz audio).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000

# torchaudio's default windowed-sinc resampler (torchaudio.functional.resample): Hann window, 6 zero crossings
# on each side, low-pass roll-off at 0.99 of the lower Nyquist frequency.
LOWPASS_WIDTH = 6
ROLLOFF = 0.99
# Entries of torchaudio's resampling kernel beyond which `Resampler` keeps only the filter's nonzero taps. The
# usual rates stay far below (the largest pair among 8-192 kHz files and 8-48 kHz models, 11,025 Hz <-> 16 kHz,
# needs 291,200 entries), so they keep torchaudio's exact samples; rates that share few factors with the
# other would need up to ~10^9 (44,101 Hz -> 16 kHz: 16,000 x 44,135).
DENSE_KERNEL_LIMIT = 1 << 22
# Output samples x taps gathered at once by the sparse resampler: 12 bytes each plus 4 per channel, ~64 MB.
_GATHER_ENTRIES = 1 << 22

Progress = Callable[[int], object]


class _BadInput(Exception):
    """A file that cannot be used; the message is the reason, without the path."""


# ---------------------------------------------------------------------------------------------------------------
# Finding inputs


def _as_list(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder`, recursively, sorted by relative path. Linked folders are followed
    (a data set is often assembled from links), each real folder once, so a link back up the tree ends there."""
    # Sorted on (relative folder parts, name) built from strings, and each Path made as its folder's Path / name
    # (pathlib parses only the name): a dataset's 10^5 files cost one cheap Path each.
    found: list[tuple[tuple[str, ...], Path, str]] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        parts = () if rel == os.curdir else tuple(rel.split(os.sep))
        parent = Path(dirpath)
        found.extend((parts + (f,), parent, f) for f in filenames if not f.startswith("."))
    found.sort(key=lambda item: item[0])
    return [parent / name for _, parent, name in found]


def _kind(path: Path) -> Literal["image", "audio"] | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return None


def find_inputs(paths: Path | str | Sequence[Path | str]) -> tuple[Literal["image", "audio"], list[Path]]:
    """Files and folders -> (modality, files).

    Folders are walked recursively in sorted order; hidden files and folders (name starting with ".") and files
    with other extensions are ignored. A file named explicitly must have an image or audio extension. Raises
    `VqtokError` when a path does not exist, when nothing is found, or when images and audio are mixed.
    """
    roots = _as_list(paths)
    where = ", ".join(str(r) for r in roots) or "(no paths given)"
    images: list[Path] = []
    audio: list[Path] = []
    seen: set[Path] = set()
    for root in roots:
        if root.is_dir():
            candidates = _walk(root)
        elif root.is_file():
            if _kind(root) is None:
                raise VqtokError(
                    f"{root}: not an image or audio file (expected one of "
                    f"{' '.join(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS)})"
                )
            candidates = [root]
        else:
            raise VqtokError(f"{root}: no such file or folder")
        for path in candidates:
            kind = _kind(path)
            if kind is None or path in seen:
                continue
            seen.add(path)
            (images if kind == "image" else audio).append(path)
    if images and audio:
        raise VqtokError(
            f"{where} mixes images ({len(images)}) and audio ({len(audio)}) files; "
            "put them in separate folders and train one tokenizer on each"
        )
    if not images and not audio:
        raise VqtokError(f"no image or audio files in {where}")
    return ("image", images) if images else ("audio", audio)


def relative_namer(roots: Path | str | Sequence[Path | str]) -> Callable[[Path], str]:
    """A function giving the name under which a path found by `find_inputs(roots)` is mirrored in an output
    folder, in posix form.

    Files found in a folder keep their path relative to that folder (the innermost one when roots nest); a file
    given directly, or one outside every root, keeps just its file name. Built once for many files: it compares
    strings, about 2 us a file where pathlib takes 15.
    """
    # Innermost roots first, each as "root/" so "data" does not claim "data2/x.png". The current folder is
    # the exception: what `find_inputs` finds in it has no "./" in front (Path(".") / "a" is "a"), so it
    # claims every relative path that does not climb out of it; else a/x.png and b/x.png would both be x.png.
    folders = sorted((os.fspath(root) for root in _as_list(roots)), key=len, reverse=True)
    prefixes = [(folder, "" if folder == os.curdir else folder if folder.endswith(os.sep) else folder + os.sep)
                for folder in folders]

    def name(path: Path) -> str:
        text = os.fspath(path)
        for folder, prefix in prefixes:
            if text == folder:
                break
            if text.startswith(prefix) and (prefix or not (os.path.isabs(text)
                                                           or text.split(os.sep, 1)[0] == os.pardir)):
                return text[len(prefix):].replace(os.sep, "/")
        return os.path.basename(text)

    return name


# ---------------------------------------------------------------------------------------------------------------
# Images


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> uint8 (H, W, 3) RGB; transparency is composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.repeat(_high_depth_to_uint8(im)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return np.asarray(ImageCms.applyTransform(im, lab_to_srgb))
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))


def _high_depth_to_uint8(im: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer or float single-channel image -> uint8 (H, W), scaled rather than clipped.

    16-bit data (the I;16 modes, and mode I holding values in [0, 65535] as Pillow decodes 16-bit PNG and TIFF)
    maps 65535 to 255 by dividing by 257. Float data in [0, 1] is multiplied by 255; anything else (floats
    outside [0, 1], 32-bit integers beyond 16 bits) is stretched from its min..max to 0..255.
    """
    a = np.asarray(im).astype(np.float64)
    if a.size == 0:
        return a.astype(np.uint8)
    if not np.isfinite(a).all():
        raise _BadInput("image holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    """Decode the first frame of an image file -> uint8 (H, W, 3) RGB, EXIF orientation applied."""
    try:
        if path.stat().st_size == 0:
            raise _BadInput("cannot read image (empty file)")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise _BadInput(
                    f"image is {w}x{h} = {w * h:,} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed "
                    "(decompression-bomb guard)"
                )
            im.load()
            # In place: a plain exif_transpose returns a full copy even when there is nothing to rotate.
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb_array(im)
    except _BadInput:
        raise
    except Image.DecompressionBombError as err:
        raise _BadInput(f"image too large, refused as a possible decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise _BadInput("cannot read image (not a recognised image format)") from None
    except Exception as err:  # Pillow decoders raise many types (OSError, SyntaxError, struct.error...) on bad data
        raise _BadInput(f"cannot read image ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def load_image(path: Path | str) -> torch.Tensor:
    """Decode an image file -> uint8 tensor (3, H, W), RGB.

    Every Pillow mode is converted: alpha and palette transparency composited on white, 16-bit and float data
    scaled to 8 bits, CMYK and palettes converted, EXIF orientation applied; animated files give their first
    frame. Unreadable files raise `VqtokError("PATH: cannot read image (reason)")`.
    """
    path = Path(path)
    try:
        arr = _read_rgb(path)
    except _BadInput as err:
        raise VqtokError(f"{path}: {err}") from None
    # One copy, straight into channel-first order (the decoded array may be read-only): a 48 MP photo then
    # peaks at two image-sized buffers instead of four.
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))


def save_image(path: Path | str, image: torch.Tensor) -> None:
    """Write an image tensor (3, H, W) or (1, H, W) as PNG, atomically.

    Float input is taken as [0, 1] and clamped; uint8 is written as is.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects a (3, H, W) or (1, H, W) tensor, got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def _fit(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): the centred square of side min(H, W), resized with bicubic filtering.

    Resizing the centred square box is the same as resizing the shorter side to `size` and centre-cropping,
    without the intermediate image. Pillow's resampling widens its kernel when shrinking, so it antialiases.
    """
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC, box=box))


def resize_and_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): shorter side resized to `size` (bicubic), centre crop."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"resize_and_crop expects a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    arr = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    return torch.from_numpy(np.require(_fit(arr, size), requirements=["C", "W"])).permute(2, 0, 1).contiguous()


def _evenly_spaced(items: Sequence[Path], count: int) -> list[Path]:
    if len(items) <= count:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))
    return [items[i] for i in idx]


def default_image_size(paths: Sequence[Path], multiple: int, cap: int = 256) -> int:
    """A training size that fits the data: the median shorter side of up to 200 evenly spaced files.

    Sizes come from the file headers only. The median is capped at `cap` and rounded down to a multiple of
    `multiple` (the encoder's total downsampling), never below `multiple`. MNIST (28x28) with multiple 4 -> 28.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    sides = []
    for path in _evenly_spaced(list(paths), 200):
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable files are reported when the set is loaded; here they just do not vote
            continue
    if not sides:
        raise VqtokError(f"none of the {len(paths)} image files has a readable size")
    size = min(int(statistics.median(sides)), cap)
    return max(multiple, size // multiple * multiple)


def _chunks(items: Sequence[Path], n: int) -> Iterable[Sequence[Path]]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


def _workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


def load_image_set(
    paths: Sequence[Path], size: int, progress: Progress | None = None
) -> tuple[torch.Tensor, list[Path], list[tuple[Path, str]]]:
    """Decode, resize and centre-crop every image -> (uint8 (N, 3, size, size), kept paths, skipped).

    `skipped` lists (path, one-line reason) for files that could not be read; N = len(kept). `progress`, when
    given, is called with the number of files just finished. Decoding runs on a thread pool: Pillow releases
    the GIL while it decodes and resamples.
    """
    paths = [Path(p) for p in paths]
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    skipped: list[tuple[Path, str]] = []

    def work(chunk: Sequence[tuple[int, Path]]) -> list[tuple[Path, str]]:
        bad = []
        for i, path in chunk:
            try:
                out[i] = _fit(_read_rgb(path), size)
                ok[i] = True
            except _BadInput as err:
                bad.append((path, str(err)))
        return bad

    indexed = list(enumerate(paths))
    with ThreadPoolExecutor(_workers()) as pool:
        for chunk, bad in zip(_chunks(indexed, 64), pool.map(work, _chunks(indexed, 64))):
            skipped.extend(bad)
            if progress is not None:
                progress(len(chunk))
    kept = [p for p, good in zip(paths, ok) if good]
    images = torch.from_numpy(out[ok]).permute(0, 3, 1, 2).contiguous()
    return images, kept, skipped


# ---------------------------------------------------------------------------------------------------------------
# Padding


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(..., H, W) -> ((..., H', W'), (H, W)) with H', W' the next multiples of `multiple`.

    Pads bottom and right by repeating the edge rows and columns (replicate padding: no artificial border for
    the encoder to spend codes on); crop `[..., :H, :W]` after decoding to undo it. Works for any dtype.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    rows = torch.arange(h + ph, device=x.device).clamp_(max=h - 1)
    cols = torch.arange(w + pw, device=x.device).clamp_(max=w - 1)
    return x[..., rows, :][..., cols], (h, w)


def pad_length(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """(..., T) -> ((..., T'), T) with T' the next multiple of `multiple`, zero padded at the end."""
    t = x.shape[-1]
    pad = -t % multiple
    return (F.pad(x, (0, pad)) if pad else x), t


# ---------------------------------------------------------------------------------------------------------------
# Audio


def _check_audio_file(path: Path) -> None:
    if not path.is_file():
        raise _BadInput("no such file")
    if path.stat().st_size == 0:
        raise _BadInput("cannot read audio (empty file)")


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise _BadInput(f"sample rate {rate:,} Hz is outside the {MIN_SAMPLE_RATE:,} to {MAX_SAMPLE_RATE:,} Hz "
                        "vqtok takes")


def check_sample_rate(path: Path | str, rate: int) -> None:
    """`VqtokError` naming `path` unless `rate` is in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] Hz."""
    try:
        _check_rate(rate)
    except _BadInput as err:
        raise VqtokError(f"{path}: {err}") from None


def audio_info(path: Path | str) -> tuple[int, int, int]:
    """(sample_rate in Hz, frames, channels) from the file header, without decoding the samples; a rate outside
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] is refused."""
    path = Path(path)
    try:
        _check_audio_file(path)
        info = sf.info(str(path))
        _check_rate(int(info.samplerate))
    except _BadInput as err:
        raise VqtokError(f"{path}: {err}") from None
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad headers
        raise VqtokError(f"{path}: cannot read audio ({_one_line(err)})") from None
    return int(info.samplerate), int(info.frames), int(info.channels)


class Resampler:
    """torchaudio's default resampler (`torchaudio.functional.resample`, see LOWPASS_WIDTH) from `rate` to
    `new_rate` Hz, its filter built once for every wave it resamples: waves (..., T) float32 -> (..., ceil(T *
    new_rate / rate)).

    Output sample n is a sum over the inputs within `width` samples of its position n * rate / new_rate.
    torchaudio builds one kernel row per output phase (up = new_rate / g of them, g the rates' gcd), each as
    long as a whole input period plus the filter (down = rate / g, plus 2 * width), nearly all zeros: small
    for the usual rates, GBs when the rates share few factors (11,127 Hz -> 16 kHz: 16,000 x 11,141). Beyond
    DENSE_KERNEL_LIMIT entries the same filter is kept as its 2 * width + 1 nonzero taps per phase and applied
    by gathering, output block by output block, so memory stays in the tens of MB for any pair of rates in
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]. The taps are computed in float64, so the samples equal a float64
    resample up to float32 rounding (~1e-6; torchaudio's float32 kernel is off by up to ~1e-3 at such rates).
    """

    def __init__(self, rate: int, new_rate: int):
        self.rate, self.new_rate = rate, new_rate
        g = math.gcd(rate, new_rate)
        self.up, self.down = new_rate // g, rate // g
        self.width = math.ceil(LOWPASS_WIDTH * self.down / (min(self.up, self.down) * ROLLOFF))
        self._dense: torchaudio.transforms.Resample | None = None
        if self.up == self.down:
            return
        if self.up * (2 * self.width + self.down) <= DENSE_KERNEL_LIMIT:
            # float32 as torchaudio.functional.resample builds it for float32 waves, so the samples match it.
            self._dense = torchaudio.transforms.Resample(rate, new_rate, dtype=torch.float32)
            return
        # Phase i (outputs n = b * up + i) starts at input b * down + offsets[i] - width.
        phases = torch.arange(self.up, dtype=torch.int64)
        self._offsets = phases * self.down // self.up
        self._taps = torch.cat([self._phase_taps(phases[lo:lo + (1 << 16)]) for lo in range(0, self.up, 1 << 16)])

    def _phase_taps(self, phases: torch.Tensor) -> torch.Tensor:
        """The nonzero taps of these phases' kernel rows, (phases, 2 * width + 1) float32, as torchaudio
        computes them (its t is (input time - output time) * base, from exact integers here)."""
        base = min(self.up, self.down) * ROLLOFF
        steps = torch.arange(-self.width, self.width + 1, dtype=torch.int64)
        gap = (self._offsets[phases, None] + steps) * self.up - phases[:, None] * self.down
        t = (gap.double() * (base / (self.up * self.down))).clamp_(-LOWPASS_WIDTH, LOWPASS_WIDTH)
        window = torch.cos(t * (math.pi / LOWPASS_WIDTH / 2)) ** 2
        t *= math.pi
        sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
        return (sinc * window * (base / self.down)).float()

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if self.up == self.down:
            return wave
        if self._dense is not None:
            return self._dense(wave)
        flat = wave.reshape(-1, wave.shape[-1])
        length = -(-flat.shape[1] * self.up // self.down)
        padded = torch.nn.functional.pad(flat, (self.width, self.width + self.down))
        out = flat.new_empty(flat.shape[0], length)
        taps = self._taps.shape[1]
        block = max(1, _GATHER_ENTRIES // taps)
        for lo in range(0, length, block):
            n = torch.arange(lo, min(lo + block, length), dtype=torch.int64)
            phase = n % self.up
            first = n // self.up * self.down + self._offsets[phase]
            inputs = padded[:, first[:, None] + torch.arange(taps)]
            out[:, lo:lo + len(n)] = torch.einsum("cnt,nt->cn", inputs, self._taps[phase])
        return out.reshape(*wave.shape[:-1], length)


def _read_audio(path: Path, sample_rate: int, mono: bool) -> torch.Tensor:
    _check_audio_file(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise _BadInput(f"cannot read audio ({_one_line(err)})") from None
    _check_rate(int(rate))
    if data.shape[0] == 0:
        raise _BadInput("no audio samples (empty or header-only file)")
    if not np.isfinite(data).all():
        raise _BadInput("audio holds NaN or infinite samples")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))
    if mono and wave.shape[0] > 1:
        wave = wave.mean(0, keepdim=True)
    if rate != sample_rate:
        wave = Resampler(int(rate), int(sample_rate))(wave)
    # Float files may exceed full scale and resampling can overshoot slightly; the model sees [-1, 1].
    return wave.clamp_(-1.0, 1.0)


def load_audio(path: Path | str, sample_rate: int, mono: bool = True) -> torch.Tensor:
    """Decode an audio file (WAV 8/16/24/32-bit int or float, FLAC, OGG, MP3) -> float32 (C, T) in [-1, 1].

    C is 1 when `mono` (channels averaged), T is in samples at `sample_rate` (resampled with torchaudio's
    windowed-sinc resampler when the file's rate differs). Raises `VqtokError` naming the file when it is
    unreadable, holds no samples, or holds NaN/inf samples.
    """
    path = Path(path)
    try:
        return _read_audio(path, sample_rate, mono)
    except _BadInput as err:
        raise VqtokError(f"{path}: {err}") from None


def save_audio(path: Path | str, wave: torch.Tensor, sample_rate: int) -> None:
    """Write float (C, T) or (T,) samples, clipped to [-1, 1], as a 16-bit PCM WAV file, atomically."""
    wave = wave.detach().cpu().float()
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2:
        raise ValueError(f"save_audio expects a (C, T) or (T,) tensor, got shape {tuple(wave.shape)}")
    data = wave.nan_to_num(0.0).clamp(-1.0, 1.0).T.contiguous().numpy()
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, int(sample_rate), subtype="PCM_16", format="WAV")


def load_audio_set(
    paths: Sequence[Path], sample_rate: int, progress: Progress | None = None
) -> tuple[list[torch.Tensor], list[Path], list[tuple[Path, str]]]:
    """Decode every file to mono at `sample_rate` -> (waves, kept paths, skipped).

    Each wave is float32 (1, T) in [-1, 1]; `skipped` lists (path, one-line reason) for unreadable files.
    `progress`, when given, is called with the number of files just finished.
    """
    paths = [Path(p) for p in paths]

    def work(path: Path) -> torch.Tensor | str:
        try:
            return _read_audio(path, sample_rate, mono=True)
        except _BadInput as err:
            return str(err)

    waves: list[torch.Tensor] = []
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(_workers()) as pool:
        for path, result in zip(paths, pool.map(work, paths)):
            if isinstance(result, str):
                skipped.append((path, result))
            else:
                waves.append(result)
                kept.append(path)
            if progress is not None:
                progress(1)
    return waves, kept, skipped
