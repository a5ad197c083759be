"""The figures behind `vqtok inspect` and `vqtok eval`.

inspect: how a codebook is used (usage, dead codes, perplexity, entropy in bits/token against log2 K, the most
used codes), measured from token files or by encoding a data folder with a model. eval: reconstruction quality
(PSNR, SSIM, MS-SSIM, MSE for images; SI-SNR, log-mel distance and, with the optional packages, PESQ and STOI
for audio) plus the same codebook figures, quantization error and the rate: bits per pixel (images) or kbps
(audio), of the codes and of the token files with either codec, over a folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vqtok.data import io as data
from vqtok import plots, speech, stats
from vqtok.device import pick_device
from vqtok.errors import TokenFileError, VqtokError
from vqtok.evaluate import AudioEvaluator, ImageEvaluator
from vqtok.nets.tokenizer import Tokenizer
from vqtok.tokens.shards import DESCRIPTOR_SUFFIX, Shard
from vqtok.tokens.tokfile import CodeTable
from vqtok.jobs.pipeline import (audio_header, code_table, find_token_files, image_batches,
                                 load_for_inputs, read_tokens_for_model)
from vqtok.jobs.refine import Refinement
from vqtok.postfilter import check_strength

# Images drawn by `eval --plot` (inputs above, reconstructions below).
PLOT_ITEMS = 8


@dataclass
class InspectReport:
    """Codebook usage per stage over a set of tokens; `top`: how many of each stage's most used codes to list."""

    source: str
    files: int
    codebook_size: int
    counts: np.ndarray  # (S, K) int64
    file_bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    top: int = 10

    @property
    def stages(self) -> list[stats.CodeUsage]:
        return [stats.code_usage(c, top_k=self.top) for c in self.counts]

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "files": self.files,
            "tokens": self.tokens,
            "codebook_size": self.codebook_size,
            "bits_per_code": math.ceil(math.log2(self.codebook_size)),
            "stages": [u.to_dict() for u in self.stages],
            "failed": [{"file": f, "error": e} for f, e in self.failed],
        }
        if self.file_bytes:
            out["file_bits_per_token"] = 8.0 * self.file_bytes / max(self.tokens, 1)
        return out


def inspect_tokens(inputs: Sequence[Path], table: CodeTable | None = None, top: int = 10) -> InspectReport:
    """Count codes over every .vqt file under `inputs` and every token shard (`vqtok encode --shard`: a
    `*.shard.json` given, or in a folder given). All must share one model (fingerprint); files with fewer stages
    than others (`vqtok encode --stages N`) count toward their own stages only. A file whose codebook size
    differs from the first one's is reported and skipped. `table`: the model's code-frequency table, needed only
    for files entropy-coded with it. `top`: most used codes listed per stage."""
    report = InspectReport(source=", ".join(str(p) for p in inputs), files=0, codebook_size=0,
                           counts=np.zeros((0, 0), np.int64), top=top)
    counter = _CodeCounter(report)
    descriptors = [d for p in inputs for d in _shard_descriptors(Path(p))]
    for descriptor in descriptors:
        try:
            shard = Shard(descriptor)
        except TokenFileError as err:
            report.failed.append((str(descriptor), str(err)))
            continue
        if counter.admits(descriptor, shard.fingerprint, shard.codebook_size):
            counter.add_shard(shard)
    plain = [Path(p) for p in inputs if not Path(p).name.endswith(DESCRIPTOR_SUFFIX)]
    try:
        token_files = find_token_files(plain) if plain else []
    except VqtokError:
        if not descriptors:
            raise
        token_files = []  # a folder of shards alone
    for path, _root in token_files:
        try:
            tokens = read_tokens_for_model(path, table)
        except TokenFileError as err:
            report.failed.append((str(path), str(err)))
            continue
        header = tokens.header
        if counter.admits(path, header["fingerprint"], int(header["codebook_size"])):
            counter.add(tokens.codes.reshape(tokens.codes.shape[0], -1))
            report.files += 1
            report.file_bytes += path.stat().st_size
    if counter.counts is None:
        raise VqtokError(f"none of the token files under {report.source} could be read "
                         f"(first: {report.failed[0][1]})")
    report.counts = counter.counts
    return report


def _shard_descriptors(path: Path) -> list[Path]:
    """The token shard descriptors `path` names: itself when it is one, those directly in it when a folder."""
    if path.name.endswith(DESCRIPTOR_SUFFIX):
        return [path]
    return sorted(path.glob(f"*{DESCRIPTOR_SUFFIX}")) if path.is_dir() else []


class _CodeCounter:
    """Code counts per stage (S, K) over token files and shards of one model, the first one read fixing the
    model (fingerprint) and K; the rows grow with the most stages seen."""

    def __init__(self, report: InspectReport):
        self.report = report
        self.counts: np.ndarray | None = None
        self.fingerprint: str | None = None

    def admits(self, path: Path, fingerprint: str | None, codebook_size: int) -> bool:
        """Whether codes from `path` can be counted here: VqtokError for another model's, False (reported in
        `report.failed`) for an inconsistent codebook size."""
        if self.counts is None:
            self.fingerprint, self.report.codebook_size = fingerprint, codebook_size
            self.counts = np.zeros((0, codebook_size), np.int64)
        elif fingerprint != self.fingerprint:
            raise VqtokError(f"{path}: written by model {fingerprint}, but earlier files by {self.fingerprint}; "
                             "inspect one model's tokens at a time")
        elif codebook_size != self.report.codebook_size:
            self.report.failed.append((str(path), f"{path}: codebook size {codebook_size}, but earlier files of "
                                                  f"model {self.fingerprint} have {self.report.codebook_size} "
                                                  "(the header is inconsistent)"))
            return False
        return True

    def add(self, codes: np.ndarray) -> None:
        """Count codes (S, n), row s being stage s."""
        assert self.counts is not None
        k = self.report.codebook_size
        if codes.shape[0] > self.counts.shape[0]:
            self.counts = np.concatenate([self.counts, np.zeros((codes.shape[0] - self.counts.shape[0], k), np.int64)])
        for s, row in enumerate(codes):
            self.counts[s] += np.bincount(row, minlength=k)

    def add_shard(self, shard: Shard) -> None:
        """Count every item of a shard (each item's codes are (S, *grid) in C order, one stage after another)
        and add its four files' bytes."""
        stages = shard.stages
        for lo, hi in zip(shard.index[:-1], shard.index[1:]):
            self.add(np.asarray(shard.codes[lo:hi]).astype(np.int64).reshape(stages, -1))
        base = str(shard.descriptor)[: -len(DESCRIPTOR_SUFFIX)]
        self.report.files += len(shard)
        self.report.file_bytes += sum(Path(base + suffix).stat().st_size
                                      for suffix in (".codes.npy", ".index.npy", ".items.jsonl", DESCRIPTOR_SUFFIX))


def inspect_model(model_path: Path, inputs: Sequence[Path], *, device: str = "auto",
                  batch_size: int = 32, top: int = 10) -> InspectReport:
    """Encode the files under `inputs` with the model (nothing written) and count its codes; `top`: most used
    codes listed per stage."""
    result = evaluate_model(model_path, inputs, device=device, batch_size=batch_size, score_speech=False)
    files = result.metrics["images"] if "images" in result.metrics else result.metrics["files"]
    return InspectReport(source=", ".join(str(p) for p in inputs), files=int(files),
                         codebook_size=result.counts.shape[1], counts=result.counts, failed=result.failed, top=top)


@dataclass
class EvalReport:
    metrics: dict[str, float]
    counts: np.ndarray  # (S, K)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, for the reader (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics, "failed": [{"file": f, "error": e} for f, e in self.failed]}


def evaluate_model(model_path: Path, inputs: Sequence[Path], *, device: str = "auto", batch_size: int = 32,
                   stages: int | None = None, plot: Path | None = None, score_speech: bool = True,
                   refine: Refinement = Refinement(), postfilter: float = 0.0) -> EvalReport:
    """Images: PSNR / SSIM / MS-SSIM / MSE per image at its original size, usage, perplexity, quantization
    error, bits per pixel of the codes and of the token files `vqtok encode` would write with either codec
    (see ImageEvaluator). Audio: SI-SNR and log-mel distance per file (at the model's rate), PESQ wide-band
    and STOI at 16 kHz when their packages are installed, kbps of the codes and of the token files with either
    codec, usage and perplexity per stage (see AudioEvaluator). Both score the first `stages` residual stages
    only when given (a lower bitrate).
    `plot`: a PNG of the first file(s): inputs above reconstructions (images) or the two log-mel spectrograms
    (audio). `score_speech=False` leaves PESQ and STOI out (for callers that only count codes). A true `refine`
    (audio): score codes chosen as `vqtok encode --refine / --search` chooses them; a non-zero `postfilter`
    (audio): score what `vqtok decode --postfilter` writes."""
    dev = pick_device(device)
    model, modality, paths = load_for_inputs(model_path, inputs, dev, stages)
    refine.check(modality, model_path)
    check_strength(postfilter, modality, model_path)
    failed: list[tuple[str, str]] = []
    if modality == "audio":
        return _evaluate_audio(model, paths, inputs, dev, stages, plot, failed, score_speech, refine, postfilter)
    evaluator = ImageEvaluator(model, stages, code_table(model))
    source = data.relative_namer(inputs)
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    for items, batch in image_batches(paths, model.hop, batch_size, lambda p, why: failed.append((str(p), why))):
        # The names `vqtok encode` would put in the token file headers, so measured file sizes are exact.
        sources = [source(path) for path, _ in items]
        # Every image in a batch shares its padded shape but not always its original size: score each
        # image's own region so padding never counts.
        sizes = {size for _, size in items}
        x = batch.to(dev).float().div_(255.0)
        if len(sizes) == 1:
            recon = evaluator.add(x, sizes.pop(), sources)
        else:
            recon = torch.cat([evaluator.add(x[i:i + 1], size, sources[i:i + 1])
                               for i, (_, size) in enumerate(items)])
        if first is None:
            first = (x[:PLOT_ITEMS].cpu(), recon[:PLOT_ITEMS].cpu())
    if evaluator.images == 0:
        raise VqtokError(f"none of the {len(paths)} files could be read (first: {failed[0][1]})")
    if plot is not None and first is not None:
        plots.reconstruction_grid(first[0], first[1], plot)
    metrics = {**evaluator.result(), "stages": float(evaluator.stages)}
    return EvalReport(metrics=metrics, counts=evaluator.counts.numpy(), failed=failed)


def _evaluate_audio(model: Tokenizer, paths: list[Path], inputs: Sequence[Path], dev: torch.device,
                    stages: int | None, plot: Path | None, failed: list[tuple[str, str]],
                    score_speech: bool, refine: Refinement, postfilter: float) -> EvalReport:
    """Each file whole, mono at the model's rate (see AudioEvaluator); its token file sizes are measured with
    the header `vqtok encode` would write for it (mono)."""
    evaluator = AudioEvaluator(model, stages, code_table(model), score_speech, refine, postfilter)
    source = data.relative_namer(inputs)
    rate = model.config.sample_rate
    for path in paths:
        try:
            wave = data.load_audio(path, rate).to(dev)
            fields = {**audio_header(rate, data.audio_info(path), mono=True, refine=refine),
                      "source": source(path)}
        except VqtokError as err:
            failed.append((str(path), str(err)))
            continue
        recon = evaluator.add(wave, fields)
        if plot is not None and evaluator.files == 1:
            plots.spectrogram_comparison(wave[0].cpu(), recon[0].cpu(), rate, plot,
                                         title=f"{path.name}, {evaluator.stages} stages, {evaluator.kbps():.2f} kbps")
    if evaluator.files == 0:
        raise VqtokError(f"none of the {len(paths)} files could be read (first: {failed[0][1]})")
    note = speech.missing_note() if score_speech else None
    return EvalReport(metrics=evaluator.result(), counts=evaluator.counts.numpy(), failed=failed,
                      notes=[] if note is None else [note])


def write_usage_plot(report: InspectReport, path: Path) -> None:
    """The first stage's usage histogram (sorted per-code counts) as a PNG."""
    plots.usage_histogram(torch.from_numpy(report.counts[0]), path, title=f"code usage: {report.source}")
