"""Analysis by synthesis: audio codes chosen for what the decoder makes of them.

A plain encode quantizes the encoder's output z to its nearest codes, blind to the decoder. Refining treats z as
free parameters instead: `steps` Adam steps on the "complex" reconstruction loss (vqtok.training.audioloss:
waveform error, multi-scale log-mel L1, compressed complex spectra) of decode(quantize(z)) against the input,
the quantizer's straight-through gradient carrying the loss back to z; then z is quantized as a plain encode
quantizes it. This is how classic speech codecs (CELP) pick their codes. The decoder and the token format stay
as they are: refined token files decode anywhere a plain one does, at the same bitrate. On the shipped speech
model, 50 steps raise PESQ-wb on LibriSpeech test-other by 0.17-0.31 at 2-8 stages (0.05 at one stage, whose
codes are too coarse for the gradient to steer far) (benchmarks/README.md, Speech); an encode then costs about a
second per second of audio on two CPU cores.

Code search (`Refinement.search` = K > 0) then chooses the codes themselves, stage by stage, the way CELP
codecs search their codebooks: each frame tries the K codes nearest to what the earlier stages left of z and
keeps the one whose decoded output errs least around that frame (`searched_codes`): a log-mel error that ignores
what lies 40 dB below the loudest bin, plus a STOI-like error of third-octave band envelopes. It reaches what the
gradient cannot at one stage: on the shipped speech model, 10 LibriSpeech test-other clips, one stage, PESQ-wb /
STOI 1.184 / 0.767 plain, 1.213 / 0.759 refined 50 steps, 1.347 / 0.831 refined then searched (32 candidates;
1.312 / 0.816 with the plain log-mel error). It costs K decodes of a window per frame class and sweep, per stage.

A signal is refined in windows of WINDOW_FRAMES code frames at fixed positions (frames k * WINDOW_FRAMES
onwards), each optimised with the decoder's context in frames as a margin on both sides, then dropped (the
decoder sees zeros past a window's edges, which the margin keeps away from the frames kept). So a frame's codes
do not depend on how the file was chunked for reading, and memory follows the window, not the file. The steps
are deterministic: a rerun on the same machine and thread count writes the same token files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vqtok.errors import VqtokError
from vqtok.nets.audio import decoder_context, encoder_context
from vqtok.nets.tokenizer import Tokenizer
from vqtok.training.audioloss import FrameEnvelopeError, FrameLogMelError, reconstruction_loss

if TYPE_CHECKING:
    from vqtok.jobs.audiostream import Signal

# Code frames refined together: 10 s at 50 frames a second. Longer windows cost proportionally more memory
# (activations of every step's backward pass), not more time per second of audio.
WINDOW_FRAMES = 500
# Adam's first step size, relative to the root mean square of the window's encoder output (0.85 for the shipped
# speech model's latents); it decays to 0 along a half cosine over the steps, so any step count ends on small
# steps. Measured with that model at 4 stages on 6 LibriSpeech test-other clips (PESQ-wb / STOI): constant
# 0.035, 50 steps 1.664 / 0.873, 25 steps 1.650 / 0.870; cosine from 0.07, 25 steps 1.667 / 0.869, 50 steps
# 1.689 / 0.874.
STEP_SIZE = 0.07
# The loss refinement minimises (vqtok.training.audioloss): it rewards magnitudes and phase.
LOSS = "complex"
# Code search: a frame's code is judged by the log-mel error of the frames within SEARCH_REACH of it, so frames
# 2 * SEARCH_REACH + 1 apart are tried in the same decode; SEARCH_SWEEPS passes over all frames (the second
# revisits each frame with its neighbours' new codes). Measured on the shipped speech model at one stage, 10
# LibriSpeech test-other clips (PESQ-wb / STOI): plain 1.184 / 0.767; 8 candidates 1.267 / 0.813; 32
# candidates 1.301 / 0.818; 32 with reach 6 and three sweeps 1.294 / 0.817 (nearly three times the time); 32
# with the waveform error added 1.280 / 0.792.
SEARCH_REACH = 3
SEARCH_SWEEPS = 2
# The search's error: the log-mel error with its floor SEARCH_RANGE_DB below the window's loudest bin, plus
# SEARCH_ENVELOPE_WEIGHT times the STOI-like band envelope error (`FrameEnvelopeError`). Measured on the shipped
# speech model at one stage, refined 50 steps and 32 candidates, 10 LibriSpeech test-other clips (PESQ-wb /
# STOI, then with `--postfilter 0.3`, sharpening only): log-mel error alone 1.312 / 0.816, 1.406 / 0.810;
# floors 30, 40 and 50 dB down 1.357 / 0.817, 1.346 / 0.818, 1.338 / 0.818, postfiltered 1.446 / 0.813, 1.450 /
# 0.813, 1.422 / 0.813; 40 dB with the envelope error at weights 0.15, 0.3, 1 and 3: 1.347 / 0.831, 1.342 /
# 0.833, 1.317 / 0.832, 1.303 / 0.832, postfiltered 1.439 / 0.828, 1.431 / 0.830, 1.410 / 0.829, 1.380 / 0.828.
# Weighting frames by loudness instead (1.316 / 0.812) or adding compressed-magnitude errors (1.334 / 0.817)
# did less.
SEARCH_RANGE_DB = 40.0
SEARCH_ENVELOPE_WEIGHT = 0.15
# Candidate outputs decoded in one batch: bounds memory (a batch of 10 s windows), not the result.
SEARCH_BATCH = 8


@dataclass(frozen=True)
class Refinement:
    """How an audio encode chooses codes beyond the nearest ones: `steps` gradient steps on the latents
    (`refine_latents`), then with `search` > 0 a search among that many candidate codes a stage
    (`searched_codes`). Both 0 (false): a plain encode."""

    steps: int = 0
    search: int = 0

    def __bool__(self) -> bool:
        return bool(self.steps or self.search)

    def header_fields(self) -> dict[str, int]:
        """What a token file records of it: "refine" (the steps) and "search" (the candidates), each when > 0."""
        return {name: value for name, value in (("refine", self.steps), ("search", self.search)) if value}

    def check(self, modality: str, model_path: str | Path) -> None:
        """Both counts must be >= 0, and > 0 only for an audio model."""
        for flag, value in (("--refine", self.steps), ("--search", self.search)):
            if value < 0:
                raise VqtokError(f"{flag} must be >= 0, got {value}")
            if value and modality != "audio":
                raise VqtokError(f"{flag} is for audio models; {model_path} is an {modality} model")


def refine_latents(model: Tokenizer, z: torch.Tensor, target: torch.Tensor, steps: int,
                   stages: int | None = None) -> torch.Tensor:
    """Encoder output z (C, D, f) of a span of f code frames and the input on that span, target (C, 1, f * hop)
    -> z after `steps` Adam steps (step size STEP_SIZE x RMS(z), decaying along a half cosine) on the loss of
    decode(quantize(z)) against target (same shape as z). Only z changes: the model's parameters get no gradient
    and the quantizer runs in eval mode (no statistics kept)."""
    rate = model.config.sample_rate
    lr = STEP_SIZE * float(z.float().pow(2).mean().sqrt().clamp(min=1e-6))
    z = z.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            quantized = model.quantizer(model._to_vectors(z), stages).z_q
            recon = model.decoder(model._from_vectors(quantized, z))
            (z.grad,) = torch.autograd.grad(reconstruction_loss(recon, target, rate, LOSS), z)
            optimizer.step()
    return z.detach()


@torch.no_grad()
def searched_codes(model: Tokenizer, z: torch.Tensor, target: torch.Tensor, candidates: int,
                   stages: int | None = None) -> torch.Tensor:
    """Codes for latents z (C, D, f) of a span and its input target (C, 1, f * hop), chosen by what the decoder
    makes of them -> (C * f, S), rows in `model._to_vectors` order, as `quantizer.encode` returns them.

    Stage by stage: a frame's candidates are the `candidates` codes nearest to what the earlier (already
    chosen) stages left of z; starting from the nearest, each frame in turn keeps the candidate whose decoded
    output, through this stage, has the least error (log-mel within SEARCH_RANGE_DB of the peak, plus the
    band envelope error at SEARCH_ENVELOPE_WEIGHT) summed over the frames within SEARCH_REACH of it. Frames
    2 * SEARCH_REACH + 1 apart change together, each in its own batch row.
    """
    hop, rate = model.hop, model.config.sample_rate
    used = len(model.quantizer.quantizers) if stages is None else stages
    width = 2 * SEARCH_REACH + 1
    reach = torch.ones(1, 1, width, device=z.device)
    per_channel = []
    for zc, xc in zip(z.split(1), target.split(1)):
        log_mel_error = FrameLogMelError(xc, rate, hop, SEARCH_RANGE_DB)
        envelope_error = FrameEnvelopeError(xc, rate, hop)
        residual = model.quantizer.quantizers[0].prepare_input(model._to_vectors(zc).float())  # (f, D)
        frames = residual.shape[0]
        chosen: list[torch.Tensor] = []
        for vq in list(model.quantizer.quantizers)[:used]:
            book = vq.codes()
            options = torch.cdist(residual, book).topk(min(candidates, len(book)), largest=False).indices  # (f, K)
            current = options[:, 0].clone()
            for _ in range(SEARCH_SWEEPS):
                for first in range(width):
                    moved = torch.arange(first, frames, width, device=z.device)
                    if len(moved) == 0:
                        continue
                    base = torch.stack(chosen + [current])  # (s, f)
                    # Row 0: the codes as they are; row 1 + j: candidate j at the moved frames.
                    trials = torch.cat([current[moved].unsqueeze(0), options[moved].T])  # (1 + K, n)
                    errors = []
                    for rows in trials.split(SEARCH_BATCH):
                        batch = base.expand(len(rows), -1, -1).clone()
                        batch[:, -1, moved] = rows
                        decoded = model.decode(batch)
                        errors.append(log_mel_error(decoded) + SEARCH_ENVELOPE_WEIGHT * envelope_error(decoded))
                    error = torch.nn.functional.conv1d(torch.cat(errors).unsqueeze(1), reach,
                                                       padding=SEARCH_REACH)[:, 0, moved]  # (1 + K, n)
                    current[moved] = trials.gather(0, error.argmin(0, keepdim=True))[0]
            chosen.append(current)
            residual = residual - book[current]
        per_channel.append(torch.stack(chosen, 1))  # (f, S)
    return torch.cat(per_channel)


@torch.no_grad()
def refined_codes(model: Tokenizer, signal: Signal, refine: Refinement, stages: int | None = None) -> torch.Tensor:
    """Codes of a signal at the model's rate, chosen as `refine` says: (S, C, frames), frames = ceil(length /
    hop), the signal zero padded to whole hops as a plain encode pads it."""
    was_training = model.training
    model.eval()
    try:
        return _refined_windows(model, signal, refine, stages)
    finally:
        model.train(was_training)


def _refined_windows(model: Tokenizer, signal: Signal, refine: Refinement, stages: int | None) -> torch.Tensor:
    hop = model.hop
    device = next(model.parameters()).device
    frames = -(-signal.length // hop)
    total = frames * hop
    context = -(-encoder_context(model.encoder) // hop) * hop
    margin = decoder_context(model.decoder)
    pieces = []
    for first in range(0, frames, WINDOW_FRAMES):
        last = min(first + WINDOW_FRAMES, frames)
        lo, hi = max(0, first - margin), min(frames, last + margin)  # the frames optimised
        read_lo, read_hi = max(0, lo * hop - context), min(total, hi * hop + context)
        x = signal.read(read_lo, read_hi).to(device).unsqueeze(1)  # (C, 1, n)
        offset = (lo * hop - read_lo) // hop
        z = model.encoder(x)[:, :, offset:offset + hi - lo]
        target = x[:, :, lo * hop - read_lo:hi * hop - read_lo]
        if refine.steps:
            z = refine_latents(model, z, target, refine.steps, stages)
        if refine.search:
            codes = searched_codes(model, z, target, refine.search, stages)  # (C * f, S)
        else:
            codes = model.quantizer.encode(model._to_vectors(z), stages)  # (C * f, S), as a plain encode finds them
        codes = codes.reshape(z.shape[0], hi - lo, -1).movedim(-1, 0)  # (S, C, f)
        pieces.append(codes[:, :, first - lo:last - lo].cpu())
    return torch.cat(pieces, dim=2)
