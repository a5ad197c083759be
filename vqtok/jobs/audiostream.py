"""Long audio in bounded memory: read, resample, encode, decode and write in chunks.

A `Signal` is audio that can be read by sample range, with silence outside [0, length). Four kinds chain:
`FileSignal` (a sound file read block by block with soundfile), `ResampledSignal` (another signal at a new
rate), `DecodedSignal` (the waveform of token codes) and `PostfilteredSignal` (another signal sharpened by
vqtok.postfilter); `WaveSignal` wraps a waveform already in memory.
`encode_signal` encodes a signal chunk by chunk and `write_signal` writes one to a WAV file in blocks, so memory
follows the chunk, not the file.

Chunks overlap by a margin that covers the receptive field of the stage that consumes them (the sinc
resampler's kernel, `encoder_context`, `decoder_context`, the postfilter's window and band span), and the
file's edges are treated as the whole-file computation treats them, so chunked results equal the whole-file
ones up to floating-point rounding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf
import torch

from vqtok.data import io as data
from vqtok.atomic import atomic_path
from vqtok.nets.audio import decoder_context, encoder_context
from vqtok.errors import VqtokError
from vqtok.jobs.refine import Refinement, refined_codes
from vqtok.nets.tokenizer import Tokenizer
from vqtok.postfilter import CONTEXT_FRAMES, FRAMES_PER_WINDOW, sharpened_frames, window_length

# Default chunk length in seconds for encoding, decoding and writing.
CHUNK_SECONDS = 30.0
# Frames read at once from an MP3 file (see FileSignal).
MP3_READ_AHEAD = 1 << 21


class Signal(Protocol):
    """Audio of `channels` channels and `length` samples at `rate` Hz, readable by sample range."""

    rate: int
    length: int
    channels: int

    def read(self, start: int, stop: int) -> torch.Tensor:
        """float32 (channels, stop - start); samples outside [0, length) are zeros."""
        ...


def _place(block: torch.Tensor, first: int, start: int, stop: int, length: int) -> torch.Tensor:
    """Cut [start, stop) out of `block` (whose column 0 is sample `first`), zeros outside [0, length)."""
    out = block.new_zeros(block.shape[0], stop - start)
    lo, hi = max(start, first, 0), min(stop, first + block.shape[1], length)
    if hi > lo:
        out[:, lo - start:hi - start] = block[:, lo - first:hi - first]
    return out


class WaveSignal:
    """A waveform already in memory, (channels, length) at `rate` Hz, as a Signal."""

    def __init__(self, wave: torch.Tensor, rate: int):
        self.wave, self.rate = wave, rate
        self.channels, self.length = wave.shape

    def read(self, start: int, stop: int) -> torch.Tensor:
        return _place(self.wave, 0, start, stop, self.length)


class FileSignal:
    """A sound file (WAV, FLAC, OGG, MP3) read in blocks; channels averaged to one when `mono`.

    The file is only ever read forwards (libsndfile's MP3 seeking is not sample-accurate): the frames of the
    last read are kept, so the overlapping windows of a chunked pass cost no re-reading, and a read that
    starts before them rewinds to the beginning. libsndfile's MP3 decoder also loses accuracy around the
    boundaries of partial reads (measured: 20.4 dB SNR against the source in 3,456-frame reads, 22.3 dB
    whole), so MP3 is read ahead in blocks of `MP3_READ_AHEAD` frames, which leaves one boundary every
    minute or so. Use it as a context manager (or call `close`). Reading problems raise `VqtokError` naming
    the file.
    """

    def __init__(self, path: Path | str, mono: bool = True):
        self.path = Path(path)
        self.rate, frames, self.file_channels = data.audio_info(self.path)
        if frames <= 0:
            raise VqtokError(f"{self.path}: no audio samples (empty or header-only file)")
        self.length = frames
        self.mono = mono
        self.channels = 1 if mono else self.file_channels
        try:
            self._file = sf.SoundFile(str(self.path))
        except Exception as err:  # soundfile raises LibsndfileError / RuntimeError on files it cannot open
            raise VqtokError(f"{self.path}: cannot read audio ({_one_line(err)})") from None
        self._kept = torch.zeros(self.channels, 0)  # frames [_kept_start, _next) of the file
        self._kept_start = 0
        self._next = 0
        self._read_ahead = MP3_READ_AHEAD if self.path.suffix.lower() == ".mp3" else 1

    def _pull(self, frames: int) -> torch.Tensor:
        """The next `frames` frames (fewer at the end of the file), as (channels, n)."""
        try:
            block = self._file.read(frames, dtype="float32", always_2d=True)
        except Exception as err:
            raise VqtokError(f"{self.path}: cannot read audio ({_one_line(err)})") from None
        if not np.isfinite(block).all():
            raise VqtokError(f"{self.path}: audio holds NaN or infinite samples")
        wave = torch.from_numpy(np.ascontiguousarray(block.T))
        if self.mono and wave.shape[0] > 1:
            wave = wave.mean(0, keepdim=True)
        self._next += wave.shape[1]
        return wave

    def read(self, start: int, stop: int) -> torch.Tensor:
        lo, hi = max(start, 0), min(stop, self.length)
        if hi <= lo:
            return torch.zeros(self.channels, stop - start)
        if lo < self._kept_start:
            self._file.seek(0)
            self._kept, self._kept_start, self._next = torch.zeros(self.channels, 0), 0, 0
        while self._next < lo:  # skip forward, keeping only what reaches into the window
            block = self._pull(max(self._read_ahead, min(lo - self._next, 1 << 20)))
            if block.shape[1] == 0:
                break
            self._kept, self._kept_start = block, self._next - block.shape[1]
        parts = [self._kept[:, max(0, lo - self._kept_start):]]
        if self._next < hi:
            parts.append(self._pull(max(self._read_ahead, hi - self._next)))
        self._kept = torch.cat(parts, dim=1)
        self._kept_start = self._next - self._kept.shape[1]
        return _place(self._kept, self._kept_start, start, stop, self.length)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FileSignal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def resampled_length(length: int, rate: int, new_rate: int) -> int:
    """Samples after resampling `length` samples from `rate` to `new_rate`: ceil(length * new / old), as
    torchaudio's resampler returns."""
    g = math.gcd(rate, new_rate)
    return -(-length * (new_rate // g) // (rate // g))


class ResampledSignal:
    """`source` resampled to `rate` with torchaudio's windowed-sinc resampler (`data.Resampler`, its filter
    built once for all reads), clamped to [-1, 1]; `length` (default: what resampling the whole source gives)
    cuts it shorter.

    The resampler maps every `down` = source.rate / gcd input samples to `up` = rate / gcd outputs with a
    kernel `width` samples wide, so a read is widened to whole periods plus a margin that covers the kernel:
    the samples equal those of resampling the whole source at once.
    """

    def __init__(self, source: Signal, rate: int, length: int | None = None):
        self.source = source
        self.rate = rate
        self.channels = source.channels
        self.length = resampled_length(source.length, source.rate, rate) if length is None else length
        self.resample = data.Resampler(source.rate, rate)
        self.up, self.down = self.resample.up, self.resample.down
        self.margin = self.down * (math.ceil(self.resample.width / self.down) + 1)

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.up == self.down:
            return self.source.read(start, stop).clamp_(-1.0, 1.0)
        first = start // self.up * self.up
        last = -(-stop // self.up) * self.up
        src_first = first // self.up * self.down - self.margin
        src_last = last // self.up * self.down + self.margin
        block = self.resample(self.source.read(src_first, src_last))
        skip = self.margin // self.down * self.up
        return _place(block[:, skip:].clamp_(-1.0, 1.0), first, start, stop, self.length)


def model_signal(path: Path | str, sample_rate: int, mono: bool = True) -> tuple[FileSignal, Signal]:
    """(the open file, the file as the model sees it: at `sample_rate`, in [-1, 1]). Close the file after use."""
    source = FileSignal(path, mono)
    return source, ResampledSignal(source, sample_rate)


def _chunk(model: Tokenizer, seconds: float) -> int:
    """A chunk of `seconds` at the model's rate, in whole hops (at least one)."""
    return max(1, round(seconds * model.config.sample_rate / model.hop)) * model.hop


@torch.no_grad()
def encode_signal(model: Tokenizer, signal: Signal, stages: int | None = None,
                  chunk_seconds: float = CHUNK_SECONDS, refine: Refinement = Refinement()) -> torch.Tensor:
    """Codes of a signal at the model's rate: (S, ceil(length / hop)) for one channel, (S, C, frames) for C > 1.

    The signal is zero padded to a whole number of hops, as a whole-file encode pads it. Each chunk is encoded
    with `encoder_context` samples of real neighbouring audio on each side (clipped at the file's edges), and
    only its own frames are kept. A true `refine`: the codes are chosen by analysis by synthesis
    (vqtok.jobs.refine), in its own fixed windows instead of chunks.
    """
    if refine:
        codes = refined_codes(model, signal, refine, stages)
    else:
        codes = _chunked_codes(model, signal, stages, chunk_seconds)
    return codes[:, 0] if codes.shape[1] == 1 else codes


def _chunked_codes(model: Tokenizer, signal: Signal, stages: int | None, chunk_seconds: float) -> torch.Tensor:
    """Plain codes (S, C, frames), chunk by chunk (see `encode_signal`)."""
    hop = model.hop
    device = next(model.parameters()).device
    frames = -(-signal.length // hop)
    total = frames * hop
    context = -(-encoder_context(model.encoder) // hop) * hop
    step = _chunk(model, chunk_seconds)
    pieces = []
    for start in range(0, total, step):
        stop = min(start + step, total)
        lo, hi = max(0, start - context), min(total, stop + context)
        x = signal.read(lo, hi).to(device)
        codes = model.encode(x.unsqueeze(1), stages)  # (C, S, f)
        pieces.append(codes[:, :, (start - lo) // hop:(stop - lo) // hop].cpu())
    return torch.cat(pieces, dim=2).movedim(0, 1)


class DecodedSignal:
    """The waveform of codes (S, frames) or (S, C, frames) at the model's rate, `length` samples long.

    A read decodes the frames it covers plus `decoder_context` frames on each side (clipped at the edges of
    the code sequence, as a whole decode sees them), so reads of any size give the same samples.
    """

    def __init__(self, model: Tokenizer, codes: torch.Tensor, length: int):
        self.model = model
        self.codes = codes if codes.dim() == 3 else codes.unsqueeze(1)  # (S, C, frames)
        self.rate = model.config.sample_rate
        self.channels = self.codes.shape[1]
        self.length = length
        self.context = decoder_context(model.decoder)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def read(self, start: int, stop: int) -> torch.Tensor:
        hop, frames = self.model.hop, self.codes.shape[2]
        lo = max(0, start // hop - self.context)
        hi = min(frames, -(-stop // hop) + self.context)
        if hi <= lo:
            return torch.zeros(self.channels, stop - start)
        codes = self.codes[:, :, lo:hi].movedim(1, 0).to(self.device)  # (C, S, f)
        wave = self.model.decode(codes)[:, 0].cpu()  # (C, f * hop)
        return _place(wave, lo * hop, start, stop, self.length)


class PostfilteredSignal:
    """`source` sharpened by vqtok.postfilter at `strength` (> 0).

    Its frames lie on a fixed grid (frame j starts at sample j * hop, silence outside the source), and a read
    takes every frame that touches it, so reads of any size give the samples of postfiltering the whole source.
    """

    def __init__(self, source: Signal, strength: float):
        self.source, self.strength = source, strength
        self.rate, self.length, self.channels = source.rate, source.length, source.channels
        self.window = window_length(source.rate)
        self.hop = self.window // FRAMES_PER_WINDOW

    def read(self, start: int, stop: int) -> torch.Tensor:
        first = (start - self.window) // self.hop + 1  # the first frame reaching `start`
        last = (stop - 1) // self.hop  # the last frame starting before `stop`
        lo, margin = first * self.hop, CONTEXT_FRAMES * self.hop  # the frames' neighbours set their band gains
        block = sharpened_frames(self.source.read(lo - margin, last * self.hop + self.window + margin),
                                 self.strength, self.window, self.rate)
        return _place(block, lo, start, stop, self.length)


def postfiltered(wave: torch.Tensor, rate: int, strength: float) -> torch.Tensor:
    """A waveform (C, T) at `rate` Hz through the postfilter (vqtok.postfilter) at `strength`; 0 returns it as is."""
    return PostfilteredSignal(WaveSignal(wave, rate), strength).read(0, wave.shape[-1]) if strength else wave


def decoded_signal(model: Tokenizer, codes: torch.Tensor, length: int, rate: int,
                   postfilter: float = 0.0) -> Signal:
    """The codes' waveform at `rate` Hz, `length` samples long (resampled from the model's rate when they
    differ), sharpened first at the model's rate when `postfilter` (a strength in [0, 1]) is non-zero."""
    model_length = resampled_length(length, rate, model.config.sample_rate)
    decoded: Signal = DecodedSignal(model, codes, model_length)
    if postfilter:
        decoded = PostfilteredSignal(decoded, postfilter)
    return decoded if rate == model.config.sample_rate else ResampledSignal(decoded, rate, length)


def write_signal(path: Path | str, signal: Signal, chunk_seconds: float = CHUNK_SECONDS) -> None:
    """Write a signal to a 16-bit PCM WAV file in blocks of `chunk_seconds`, atomically (temp file + rename)."""
    step = max(1, int(chunk_seconds * signal.rate))
    with atomic_path(path) as tmp, sf.SoundFile(str(tmp), "w", samplerate=signal.rate, channels=signal.channels,
                                                subtype="PCM_16", format="WAV") as out:
        for start in range(0, signal.length, step):
            block = signal.read(start, min(start + step, signal.length))
            out.write(block.nan_to_num(0.0).clamp(-1.0, 1.0).T.contiguous().numpy())
