"""Speech quality at 16 kHz: PESQ wide-band (ITU-T P.862.2, package `pesq`) and STOI (Taal et al. 2011, package
`pystoi`), both optional (`pip install vqtok[speech]`), the alignment of a decoded signal with its reference,
and `score`, which puts any codec's output through both.

Without a package its score is simply left out; `missing_packages` says which are absent.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch

from vqtok import stats
from vqtok.data.io import Resampler

# PESQ wide-band is defined at 16 kHz only; STOI resamples to 10 kHz by itself.
SPEECH_RATE = 16000
# A codec delays its output by a few milliseconds (lookahead, filters): +-50 ms covers that with room to spare.
MAX_LAG_SECONDS = 0.05
# STOI's analysis bands: 15 third-octave bands, the lowest centred on 150 Hz (Taal et al. 2011).
STOI_BANDS = 15
STOI_LOW_HZ = 150.0
# The optional packages and the score each gives.
PACKAGES = {"pesq": "PESQ", "pystoi": "STOI"}
INSTALL_HINT = "pip install vqtok[speech]"


def missing_packages() -> list[str]:
    """The speech-quality packages (PACKAGES) that cannot be imported."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def missing_note() -> str | None:
    """One line saying which speech scores are left out and how to get them, or None when none is."""
    missing = missing_packages()
    if not missing:
        return None
    scores = " and ".join(PACKAGES[name] for name in missing)
    return f"{scores} not measured ({', '.join(missing)} not installed): `{INSTALL_HINT}` adds them"


def stoi_bands(n_fft: int, rate: int, device: torch.device | None = None) -> torch.Tensor:
    """Which bins of an `n_fft`-point spectrum at `rate` Hz fall in each of STOI's third-octave bands: (bands,
    n_fft // 2 + 1), 1.0 or 0.0, each bin in at most one band; bands holding no bin (past the Nyquist
    frequency) are dropped."""
    bins = torch.fft.rfftfreq(n_fft, 1 / rate, device=device)
    centres = STOI_LOW_HZ * 2 ** (torch.arange(STOI_BANDS, device=device) / 3)
    bands = ((bins >= centres[:, None] * 2 ** (-1 / 6)) & (bins < centres[:, None] * 2 ** (1 / 6))).float()
    return bands[bands.sum(1) > 0]


def at_speech_rate(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """A mono wave (T,) or (1, T) at `rate` Hz -> float32 (T',) at SPEECH_RATE (torchaudio's windowed-sinc
    resampler when the rates differ, `data.io.Resampler`), on the CPU."""
    wave = wave.detach().reshape(-1).float().cpu()
    return wave if rate == SPEECH_RATE else Resampler(rate, SPEECH_RATE)(wave)


def align(reference: torch.Tensor, degraded: torch.Tensor, rate: int,
          max_lag_seconds: float = MAX_LAG_SECONDS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Undo a codec's delay: (reference, degraded) (T,) and (T',) at `rate` -> both cut to their overlap once
    `degraded` is shifted by the lag of largest cross-correlation within +-max_lag_seconds, and that lag in
    samples (positive: `degraded` runs late, degraded[t + lag] matches reference[t])."""
    ref, deg = reference.reshape(-1), degraded.reshape(-1)
    limit = min(round(max_lag_seconds * rate), len(ref) - 1, len(deg) - 1)
    lag = best_lag(ref, deg, limit) if limit > 0 else 0
    ref, deg = (ref, deg[lag:]) if lag >= 0 else (ref[-lag:], deg)
    length = min(len(ref), len(deg))
    return ref[:length], deg[:length], lag


def best_lag(reference: torch.Tensor, degraded: torch.Tensor, limit: int) -> int:
    """The lag k in [-limit, limit] that maximises sum_t reference[t] * degraded[t + k], for (T,) and (T',).
    Every lag's correlation comes from one FFT product, so a long file costs milliseconds."""
    ref, deg = reference.double(), degraded.double()
    n = 1 << (len(ref) + len(deg) - 1).bit_length()  # no circular wrap-around within the lags looked at
    corr = torch.fft.irfft(torch.fft.rfft(ref, n).conj() * torch.fft.rfft(deg, n), n)  # corr[k mod n]
    window = torch.cat([corr[n - limit:], corr[: limit + 1]])  # lags -limit .. limit
    return int(torch.argmax(window)) - limit


def speech_scores(reference: torch.Tensor, degraded: torch.Tensor) -> dict[str, float | None]:
    """PESQ wide-band (MOS-LQO, 1.04-4.64) and STOI (0-1) of `degraded` against `reference`, both (T,) at
    SPEECH_RATE and of one length: {"pesq_wb": ..., "stoi": ...}, each only when its package is installed.

    A score is None when its measure refuses the signal, which the caller skips: PESQ finds no speech or less
    than 1/4 s; STOI finds fewer than 30 of its 25.6 ms frames (about 0.4 s) above its silence threshold.
    """
    ref = reference.reshape(-1).double().numpy()
    deg = degraded.reshape(-1).double().numpy()
    missing = missing_packages()
    out: dict[str, float | None] = {}
    if "pesq" not in missing:
        import pesq

        # pesq divides both signals by their peak: a silent pair gives 0/0 before it raises NoUtterancesError.
        with np.errstate(invalid="ignore", divide="ignore"):
            try:
                out["pesq_wb"] = float(pesq.pesq(SPEECH_RATE, ref, deg, "wb"))
            except pesq.PesqError:
                out["pesq_wb"] = None
    if "pystoi" not in missing:
        import pystoi

        out["stoi"] = _stoi(pystoi, ref, deg)
    return out


def _stoi(pystoi, ref: np.ndarray, deg: np.ndarray) -> float | None:
    """pystoi.stoi at SPEECH_RATE, or None where it refuses: too few frames after its silence removal, where it
    warns and returns 1e-5 (a value that would pass for a score), or none at all, where it raises."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Not enough STFT frames")
        try:
            return float(pystoi.stoi(ref, deg, SPEECH_RATE, extended=False))
        except (UserWarning, RuntimeWarning, ValueError):  # numpy's AxisError is a ValueError
            return None


def score(reference: torch.Tensor, decoded: torch.Tensor) -> dict[str, float | None]:
    """How well `decoded` reproduces `reference`, both mono (T,) and (T',) at SPEECH_RATE, whatever codec made
    it: its delay undone first (`align`), then `speech_scores` (pesq_wb, stoi) plus "si_snr_db"
    (`stats.si_snr`) and the delay found, "delay_ms" (positive: decoded runs late)."""
    ref, deg, lag = align(reference.float(), decoded.float(), SPEECH_RATE)
    out = speech_scores(ref, deg)
    out["si_snr_db"] = float(stats.si_snr(deg[None], ref[None])[0])
    out["delay_ms"] = 1000.0 * lag / SPEECH_RATE
    return out
