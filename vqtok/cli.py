"""The `vqtok` command line: each command parses its options, calls one library function and shows the result.

Exit codes: 0 success, 1 a user error (one line on stderr, the traceback only with --verbose), 2 bad usage.
Progress goes to stderr so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from vqtok.allocator import keep_freed_memory
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.defaults import AUDIO, MODEL_OPTIONS
from vqtok.errors import VqtokError

if TYPE_CHECKING:  # the commands import torch-backed modules only when they run
    from vqtok.training.loop import TrainResult

app = typer.Typer(
    help="Train VQ-VAE tokenizers on folders of images or audio, turn files into token files and back, "
    "and report how the codebook is used.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_state = {"verbose": False}

_Q = QuantizerConfig()
_M = ModelConfig()
_T = TrainConfig()


class Estimator(str, Enum):
    ste = "ste"
    rotation = "rotation"


class CodebookUpdate(str, Enum):
    loss = "loss"
    ema = "ema"


class AudioLoss(str, Enum):
    waveform = "waveform"
    spectral = "spectral"
    complex = "complex"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Activation(str, Enum):
    elu = "elu"
    snake = "snake"


class AudioNet(str, Enum):
    conv = "conv"
    stft = "stft"


class Affine(str, Enum):
    off = "off"
    learned = "learned"
    stats = "stats"


class ChannelMode(str, Enum):
    mono = "mono"
    keep = "keep"


class Codec(str, Enum):
    packed = "packed"
    entropy = "entropy"


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["verbose"] = verbose


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a VqtokError into one line on stderr and exit code 1."""
    try:
        yield
    except VqtokError as e:
        if _state["verbose"]:
            raise
        err.print(f"[red]error:[/red] {e}", soft_wrap=True, markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def _parse_strides(text: str) -> tuple[int, ...]:
    try:
        strides = tuple(int(part) for part in text.split(","))
    except ValueError:
        strides = ()
    if not strides or any(s < 1 for s in strides):
        raise VqtokError(f"--strides must be positive integers separated by commas, got {text!r}")
    return strides


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _report_failures(failed: list[tuple[str, str]]) -> None:
    for _path, reason in failed:
        err.print(f"[yellow]skipped:[/yellow] {reason}", soft_wrap=True)
    if failed:
        err.print(f"[yellow]{len(failed)} file(s) skipped[/yellow]")


def _exit_if_skipped(failed: list[tuple[str, str]]) -> None:
    """Exit code 1 once everything else is done and reported, so scripts notice skipped inputs."""
    if failed:
        raise typer.Exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=False,
    )


DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout instead of tables.")]
RefineOpt = Annotated[int, typer.Option(help="Audio: refine the codes N steps by analysis by synthesis (choose them for what the decoder makes of them): better sound at the same bitrate, slower encoding (shipped speech model, 50 steps: about a second per second of audio on two CPU cores) (0: plain nearest-code encode).")]
PostfilterOpt = Annotated[float, typer.Option(help="Audio: sharpen the decoded sound's spectrum at this strength, 0 to 1 (a decoder-side postfilter, as speech codecs use; costs no bits): shipped speech model, 0.3: PESQ-wb +0.03 to +0.10 on refined or searched codes, STOI at most -0.007 (0: the decoder's output as it is).")]
SearchOpt = Annotated[int, typer.Option(help="Audio: choose each stage's codes among its K nearest by how the decoded sound matches the input, frame by frame (a codebook search, as CELP speech codecs do; after --refine when both are given): better sound at the same bitrate, slow (shipped speech model, 32: about 4 seconds per second of audio and stage on two CPU cores) (0: no search).")]


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[list[Path], typer.Argument(help="Folders or files of images (or audio) to train on.")],
    run_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory: checkpoints, metrics, previews, model.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = _T.steps,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Items per step, over all processes under torchrun (default: {_T.batch_size} images, {AUDIO['batch_size']} audio segments).")] = None,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warm-up, then cosine decay).")] = _T.lr,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = _T.warmup,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and batches (recorded in run.json).")] = _T.seed,
    size: Annotated[Optional[int], typer.Option(help="Image training crop side in pixels (default: fits the data).")] = None,
    downsample: Annotated[int, typer.Option(help="Image downsampling factor per side: 4, 8 or 16.")] = _M.downsample,
    sample_rate: Annotated[Optional[int], typer.Option(help="Audio model rate in Hz; files are resampled to it (default: the most common rate of the files).")] = None,
    strides: Annotated[str, typer.Option(help="Audio encoder strides; their product is the hop (2,4,5,8: 320 samples, 50 frames/s at 16 kHz).")] = ",".join(map(str, _M.audio_strides)),
    segment_seconds: Annotated[float, typer.Option(help="Audio training crop length in seconds.")] = AUDIO["segment_seconds"],
    activation: Annotated[Activation, typer.Option(help="Audio nets' nonlinearity: elu (SEANet) or snake (DAC).")] = Activation(_M.activation),
    audio_net: Annotated[AudioNet, typer.Option(help="Audio nets: conv (SEANet convolutions at the sample rate, as EnCodec) or stft (ConvNeXt blocks at the code rate around an STFT, as Vocos; --channels is their width, --res-blocks their number).")] = AudioNet(_M.audio_net),
    synthesis_frames: Annotated[int, typer.Option(help="--audio-net stft: inverse-STFT frames the decoder predicts per code frame (1, 2, 4...: dividing the hop); more resolve onsets and pitch changes finer, at the same width.")] = _M.synthesis_frames,
    audio_loss: Annotated[Optional[AudioLoss], typer.Option(help=f"Audio reconstruction loss: waveform (squared error + light log-mel), spectral (multi-scale log-mel L1, as DAC) or complex (spectral + compressed complex spectra, which rewards the phase) (default: {AUDIO['audio_loss']}).")] = None,
    adversarial_from: Annotated[int, typer.Option(help="Audio: after this many plain steps, also train a multi-scale STFT discriminator (EnCodec) and add its adversarial and feature-matching losses; 0 = off. Steps before it cost nothing extra.")] = _T.adversarial_from,
    adversarial_weight: Annotated[float, typer.Option(help="Weight of the adversarial (hinge) loss once --adversarial-from is reached (DAC's 1, against the spectral loss's mel weight 15).")] = _T.adversarial_weight,
    feature_weight: Annotated[float, typer.Option(help="Weight of the discriminator feature-matching loss once --adversarial-from is reached (DAC's 2).")] = _T.feature_weight,
    disc_filters: Annotated[int, typer.Option(help="Width of every discriminator layer (EnCodec's 32); an adversarial step's CPU cost grows with it (8: about a fifth of 32's).")] = _T.disc_filters,
    speed_perturb: Annotated[float, typer.Option(help="Audio augmentation: play each training segment at a random speed within 1 +- this (0.1: 0.9 to 1.1x; pitch and formants move with it, so the model hears more voices); 0 = off.")] = _T.speed_perturb,
    gain_perturb_db: Annotated[float, typer.Option(help="Audio augmentation: scale each training segment by a random gain within +- this many dB (never clipping); 0 = off.")] = _T.gain_perturb_db,
    single_stage: Annotated[float, typer.Option(help="Share of steps (0 to 1) that quantize with the first residual stage alone, on top of stage dropout: weights training toward the lowest bitrate (encode --stages 1); also in a fine-tune (--init).")] = _T.single_stage,
    channels: Annotated[Optional[int], typer.Option(help=f"Hidden channels of the encoder/decoder (default: {_M.channels} images, {AUDIO['channels']} audio).")] = None,
    res_blocks: Annotated[Optional[int], typer.Option(help=f"Residual blocks on each side (audio: per stride) (default: {_M.res_blocks} images, {AUDIO['res_blocks']} audio).")] = None,
    res_channels: Annotated[int, typer.Option(help="Hidden width inside each image residual block.")] = _M.res_channels,
    scale_blocks: Annotated[int, typer.Option(help="Images: residual blocks at each resolution between the pixels and the code grid, on each side (0 = one strided convolution per factor of 2).")] = _M.scale_blocks,
    code_dim: Annotated[int, typer.Option(help="Code vector dimension D.")] = _Q.dim,
    codebook_size: Annotated[Optional[int], typer.Option(help=f"Codes per codebook K (default: {_Q.codebook_size} images, {AUDIO['codebook_size']} audio).")] = None,
    stages: Annotated[Optional[int], typer.Option(help=f"Residual quantizer stages (codebooks) (default: {_Q.stages} images, {AUDIO['stages']} audio).")] = None,
    stage_dropout: Annotated[Optional[float], typer.Option(help=f"Probability that a training step uses only a random prefix of the stages, so one model serves several bitrates (encode --stages N) (default: {AUDIO['stage_dropout']} for audio with several stages, else 0).")] = None,
    estimator: Annotated[Estimator, typer.Option(help="Gradient estimator: ste (VQ-VAE) or rotation (Fifty et al. 2024).")] = Estimator(_Q.estimator),
    codebook_update: Annotated[Optional[CodebookUpdate], typer.Option(help=f"Codebook learning: loss (codebook loss) or ema (default: {_Q.codebook_update} images, {AUDIO['codebook_update']} audio).")] = None,
    codebook_weight: Annotated[float, typer.Option(help="Weight of the codebook loss ||sg(z) - q||^2.")] = _Q.codebook_weight,
    beta: Annotated[Optional[float], typer.Option(help=f"Weight of the commitment loss ||z - sg(q)||^2 (default: {_Q.beta} images, {AUDIO['beta']} audio).")] = None,
    ema_decay: Annotated[float, typer.Option(help="Decay of the EMA codebook statistics.")] = _Q.ema_decay,
    affine: Annotated[Optional[Affine], typer.Option(help=f"Affine codebook re-parameterization (Huh et al. 2023): off, learned or stats (default: {_Q.affine} images, {AUDIO['affine']} audio).")] = None,
    affine_groups: Annotated[int, typer.Option(help="Code groups with their own affine parameters.")] = _Q.affine_groups,
    affine_lr_mult: Annotated[float, typer.Option(help="Learning-rate multiplier of the affine parameters.")] = _Q.affine_lr_mult,
    sync_nu: Annotated[Optional[float], typer.Option(help=f"Synchronized commitment weight nu, 0 = off (default: {_Q.sync_nu} images, {AUDIO['sync_nu']} audio).")] = None,
    alternate: Annotated[bool, typer.Option(help="Alternating optimization: an inner codebook step before each encoder update.")] = _Q.alternate,
    alternate_lr: Annotated[float, typer.Option(help="Learning rate of the inner codebook optimizer.")] = _Q.alternate_lr,
    kmeans_init: Annotated[bool, typer.Option(help="k-means++ codebook initialisation from the first batch.")] = _Q.kmeans_init,
    dead_code_steps: Annotated[Optional[int], typer.Option(help=f"Re-seed codes unused for this many steps, 0 = never (default: {_Q.dead_code_steps} images, {AUDIO['dead_code_steps']} audio).")] = None,
    cosine: Annotated[bool, typer.Option(help="Cosine codebook: l2-normalised codes and inputs.")] = _Q.cosine,
    precision: Annotated[Precision, typer.Option(help="bf16: run the encoder and decoder under bfloat16 autocast (weights, quantizer and losses stay float32), ~1.7x faster on CPUs with AVX512-BF16 or AMX and on recent GPUs.")] = Precision(_T.precision),
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints, validations and previews.")] = _T.checkpoint_every,
    val_fraction: Annotated[float, typer.Option(help="Share of the files held out for validation.")] = _T.val_fraction,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest readable checkpoint (from step 0 if it stopped before its first), with the options it started with: other values of model or training options are refused.")] = False,
    init: Annotated[Optional[str], typer.Option(help="Fine-tune: start from this model file or shipped model name (its architecture, quantizer, rate and weights; model options are refused with it). E.g. add an adversarial stage to a trained audio model, or adapt one to new data.")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Worker processes reading training files, per process (0: read in the training process; default: half the CPU cores, shared among torchrun processes, 1 to 8).")] = None,
    device: DeviceOpt = _T.device,
    json_out: JsonOpt = False,
) -> None:
    """Train a tokenizer on a folder of images or audio; writes OUT/model.safetensors and the run's checkpoints.
    Under torchrun (`torchrun --nproc_per_node N -m vqtok train ...`) the processes share each batch."""
    from vqtok.data.io import find_inputs
    from vqtok.defaults import training_configs
    from vqtok.training.loop import check_resume_options, train as run_training

    with _user_errors():
        if init is not None:
            _refuse_model_options(ctx)
        options: dict[str, Any] = dict(
            steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
            downsample=downsample, audio_strides=_parse_strides(strides), segment_seconds=segment_seconds,
            audio_loss=audio_loss.value if audio_loss else None, adversarial_from=adversarial_from,
            adversarial_weight=adversarial_weight, feature_weight=feature_weight,
            disc_filters=disc_filters, speed_perturb=speed_perturb, gain_perturb_db=gain_perturb_db,
            single_stage=single_stage, activation=activation.value, audio_net=audio_net.value,
            synthesis_frames=synthesis_frames,
            channels=channels, res_blocks=res_blocks, res_channels=res_channels, scale_blocks=scale_blocks,
            code_dim=code_dim,
            codebook_size=codebook_size, stages=stages, stage_dropout=stage_dropout, estimator=estimator.value,
            codebook_update=codebook_update.value if codebook_update else None, codebook_weight=codebook_weight,
            beta=beta, ema_decay=ema_decay, affine=affine.value if affine else None, affine_groups=affine_groups,
            affine_lr_mult=affine_lr_mult, sync_nu=sync_nu, alternate=alternate, alternate_lr=alternate_lr,
            kmeans_init=kmeans_init, dead_code_steps=dead_code_steps, cosine=cosine,
            checkpoint_every=checkpoint_every, val_fraction=val_fraction, precision=precision.value, device=device)
        model_config, train_config = training_configs(find_inputs(data)[0], **options)
        if resume:
            # Options typed on the command line, named as `options` names them (--strides: audio_strides).
            typed = {"audio_strides" if p == "strides" else p for p in ctx.params
                     if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"}
            check_resume_options(run_dir, {k: v for k, v in {**options, "size": size, "sample_rate": sample_rate,
                                                              "init": init}.items() if k in typed})
    progress, on_progress = _training_progress(steps)
    try:
        with _user_errors():
            result = run_training(data, run_dir, model_config, train_config, size=size, sample_rate=sample_rate,
                                  resume=resume, init=init, num_workers=num_workers, on_progress=on_progress,
                                  on_status=lambda msg: err.log(msg))
    finally:
        progress.stop()
    if result.rank == 0:  # under torchrun, rank 0 speaks for the run
        _report_training(result, json_out)


def _refuse_model_options(ctx: typer.Context) -> None:
    """With --init the model's shape comes from the starting model: refuse model options given with it."""
    named = {"strides": "audio_strides"}
    # Compared by name: typer vendors its own copy of click's ParameterSource.
    given = [p for p in ctx.params if named.get(p, p) in MODEL_OPTIONS
             and getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"]
    if given:
        flags = ", ".join("--" + p.replace("_", "-") for p in given)
        raise VqtokError(f"--init takes the model's shape from the starting model; drop {flags}")


def _report_training(result: TrainResult, json_out: bool) -> None:
    """The end of `vqtok train`: skipped files, the final validation figures (a table or --json), the model's
    path and speed; exit 1 when files were skipped."""
    _report_failures(result.skipped)
    if json_out:
        _print_json({"model": str(result.model_path), "steps": result.steps, "seconds": result.seconds,
                     "steps_per_second": result.steps_per_second, "train_files": result.train_files,
                     "val_files": result.val_files, "skipped": len(result.skipped),
                     "failed": [{"file": f, "error": e} for f, e in result.skipped], "validation": result.final})
    else:
        _print_metrics(f"validation ({result.val_files} files)", result.final)
        out.print(f"model: {result.model_path}  ({result.steps_per_second:.1f} steps/s, {result.seconds:.0f} s)")
    _exit_if_skipped(result.skipped)


def _training_progress(steps: int) -> tuple[Progress, Any]:
    """A progress bar for training and the callback that feeds it; the bar appears with the first logged step,
    so an early error prints alone."""
    progress = _progress()
    task = progress.add_task("training", total=steps, info="", start=False)

    def on_progress(step: int, total: int, m: dict[str, float]) -> None:
        if not progress.live.is_started:
            progress.start()
            progress.start_task(task)
        info = f"loss {m['loss']:.4f}"
        if "psnr" in m:
            info += f"  psnr {m['psnr']:.2f} dB"
        if "si_snr" in m:
            info += f"  si-snr {m['si_snr']:.2f} dB"
        info += f"  usage {100 * m.get('usage', 0):.1f}%"
        progress.update(task, completed=step, total=total, info=info)

    return progress, on_progress


@app.command()
def encode(
    model: Annotated[Path, typer.Argument(help="A model.safetensors written by `vqtok train` (or its run folder), or a shipped model's name (`vqtok models`).")],
    inputs: Annotated[list[Path], typer.Argument(help="Files or folders to encode (walked recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .vqt files; mirrors the input tree.")],
    force: Annotated[bool, typer.Option(help="Re-encode files whose token file already exists.")] = False,
    batch_size: Annotated[int, typer.Option(help="Files a worker takes at a time (on a CPU at least 256, fewer for a short list). The model's batches are sized by image shape, so the codes never depend on this.")] = 32,
    codec: Annotated[Codec, typer.Option(help="Token payload: packed (ceil(log2 K) bits/code) or entropy (model table).")] = Codec.packed,
    shard: Annotated[bool, typer.Option(help="Write one memory-mappable token shard (OUT/shard.*) for training on tokens, instead of .vqt files.")] = False,
    stages: Annotated[Optional[int], typer.Option(help="Keep only the first N residual stages: a lower bitrate (default: all).")] = None,
    channels: Annotated[ChannelMode, typer.Option(help="Audio: mono mixes the channels down; keep tokenizes each channel.")] = ChannelMode.mono,
    chunk_seconds: Annotated[Optional[float], typer.Option(help="Audio: seconds encoded at a time; memory follows the chunk, not the file (default: 30).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Worker processes; on a CPU each reads, encodes and writes its share of the files (audio: a file at a time), on a GPU they decode images while the model runs; 0: all in the main process (default: on a CPU one per core, up to 16; else half the cores, 1 to 8).")] = None,
    part: Annotated[Optional[str], typer.Option(help="Encode only part I of N of the file list (e.g. 2/3: the second of three contiguous slices), to share a data set among machines; under torchrun each process takes its share automatically. A part's shard is OUT/shard-0000I-of-0000N.*.")] = None,
    refine: RefineOpt = 0,
    search: SearchOpt = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Turn files into .vqt token files (one per input), or into one token shard with --shard. Rerun after a crash:
    files (or part shards) already written are skipped."""
    from vqtok.jobs.encoding import parse_part
    from vqtok.jobs.pipeline import encode_files
    from vqtok.jobs.refine import Refinement

    with _user_errors(), _file_progress("encoding") as on_file:
        report = encode_files(model, inputs, out, force=force, batch_size=batch_size, device=device,
                              codec=codec.value, stages=stages, shard=shard, channels=channels.value,
                              chunk_seconds=chunk_seconds, num_workers=num_workers,
                              part=parse_part(part) if part is not None else None,
                              refine=Refinement(refine, search), on_file=on_file)
    _finish_run(report, "encoded", json_out)


@app.command()
def decode(
    model: Annotated[Path, typer.Argument(help="The model.safetensors (its run folder, or shipped model's name) the tokens were made with.")],
    tokens: Annotated[list[Path], typer.Argument(help=".vqt files or folders of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the decoded PNG (images) or WAV (audio) files; mirrors the token tree.")],
    force: Annotated[bool, typer.Option(help="Overwrite outputs that already exist.")] = False,
    postfilter: PostfilterOpt = 0.0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Turn .vqt token files back into images at their original size, or WAV files at their original sample rate
    and length."""
    from vqtok.jobs.pipeline import decode_files

    with _user_errors(), _file_progress("decoding") as on_file:
        report = decode_files(model, tokens, out, force=force, device=device, postfilter=postfilter,
                              on_file=on_file)
    _finish_run(report, "decoded", json_out)


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        # Counts (files, images, dead codes) in full; measures to 4 significant digits.
        table.add_row(key, f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1e4 else f"{value:.4g}")
    out.print(table)


@contextlib.contextmanager
def _file_progress(what: str) -> Iterator[Any]:
    """A files-done counter on stderr, fed by the pipeline's per-file callback."""
    progress = Progress(TextColumn(f"[bold]{what}"), TextColumn("{task.completed} files"), TimeElapsedColumn(),
                        console=err, transient=True)
    task = progress.add_task(what, total=None)
    with progress:
        yield lambda _path, _outcome: progress.advance(task)


def _finish_run(report: Any, verb: str, json_out: bool) -> None:
    _report_failures(report.failed)
    if json_out:
        _print_json(report.to_dict())
    else:
        out.print(f"{verb} {len(report.written)} file(s), {len(report.existing)} already done, "
                  f"{len(report.failed)} failed, {report.tokens} tokens in {report.seconds:.1f} s")
    _exit_if_skipped(report.failed)


@app.command()
def inspect(
    sources: Annotated[list[Path], typer.Argument(help="Token files and folders, or with --data one model (a model.safetensors, its run folder, or a shipped model's name).", metavar="SOURCE...")],
    data: Annotated[Optional[list[Path]], typer.Option(help="Encode these files/folders with the model SOURCE and count its codes.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="With token files: the model (file or shipped name), needed to read files written with --codec entropy.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a usage histogram PNG (stage 1) here.")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many of the most used codes to list.")] = 10,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Codebook usage, dead codes, perplexity and entropy (bits/token) of token files or of a model on data."""
    from vqtok import plots, zoo
    from vqtok.jobs import report as rep

    if data and len(sources) > 1:
        raise typer.BadParameter(f"with --data, give one model, not {len(sources)} sources", param_hint="SOURCE...")
    with _user_errors():
        if plot:
            plots.check_destination(plot)
        if data:
            result = rep.inspect_model(sources[0], data, device=device, top=top)
        elif len(sources) == 1 and zoo.means_a_model(sources[0]):
            raise VqtokError(f"{sources[0]} is a model: pass --data FOLDER to measure it on files")
        else:
            table = None
            if model is not None:
                from vqtok.modelfile import load
                from vqtok.jobs.pipeline import code_table

                table = code_table(load(model))
            result = rep.inspect_tokens(sources, table=table, top=top)
        if plot:
            rep.write_usage_plot(result, plot)
    _report_failures(result.failed)
    if json_out:
        _print_json(result.to_dict())
    else:
        _print_usage_table(result, plot)
    _exit_if_skipped(result.failed)


def _print_usage_table(result: Any, plot: Optional[Path]) -> None:
    bits = result.to_dict()["bits_per_code"]
    table = Table(title=f"codebook usage: {result.source} ({result.files} files, {result.tokens} tokens)")
    for name in ("stage", "tokens", "used", "usage", "dead", "perplexity", "entropy bits/token", "log2 K"):
        table.add_column(name, justify="right")
    for i, u in enumerate(result.stages, start=1):
        table.add_row(str(i), str(u.tokens), f"{u.used}/{u.codebook_size}", f"{100 * u.usage:.1f}%", str(u.dead),
                      f"{u.perplexity:.1f}", f"{u.entropy_bits:.2f}", f"{u.max_entropy_bits:.2f}")
    out.print(table)
    top_codes = result.stages[0].top
    if top_codes:
        out.print("most used codes (stage 1): " + ", ".join(f"{c} ({100 * share:.1f}%)" for c, _n, share in top_codes))
    if result.file_bytes:
        out.print(f"token files: {8 * result.file_bytes / max(result.tokens, 1):.2f} bits/token on disk, headers "
                  f"included ({bits} bits/code packed)")
    if plot:
        out.print(f"usage histogram: {plot}")


@app.command(name="eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="A model.safetensors (or its run folder), or a shipped model's name (`vqtok models`).")],
    data: Annotated[list[Path], typer.Argument(help="Held-out files or folders.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Files per forward pass.")] = 32,
    stages: Annotated[Optional[int], typer.Option(help="Score with the first N residual stages only (a lower bitrate) (default: all).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the first file(s): reconstructions (images) or log-mel spectrograms (audio).")] = None,
    refine: RefineOpt = 0,
    search: SearchOpt = 0,
    postfilter: PostfilterOpt = 0.0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Reconstruction quality (PSNR, SSIM, MS-SSIM, MSE for images; SI-SNR, log-mel distance and, with
    `pip install vqtok\\[speech]`, PESQ wide-band and STOI for audio) and codebook figures of a model over a folder,
    with the rate of the codes alone (bits_per_pixel, kbps) and of the token files `vqtok encode` would write
    (bpp_packed_file and bpp_entropy_file for images, kbps_packed_file and kbps_entropy_file for audio)."""
    from vqtok import plots
    from vqtok.jobs.refine import Refinement
    from vqtok.jobs.report import evaluate_model

    with _user_errors():
        if plot:
            plots.check_destination(plot)
        result = evaluate_model(model, data, device=device, batch_size=batch_size, stages=stages, plot=plot,
                                refine=Refinement(refine, search), postfilter=postfilter)
    for note in result.notes:
        err.print(note, markup=False, soft_wrap=True)
    _report_failures(result.failed)
    if json_out:
        _print_json(result.to_dict())
    else:
        _print_metrics(f"eval: {', '.join(str(d) for d in data)}", result.metrics)
        if plot:
            out.print(f"plot: {plot}")
    _exit_if_skipped(result.failed)


@app.command(name="models")
def list_models(json_out: JsonOpt = False) -> None:
    """The shipped tokenizers, each usable by name as the MODEL of encode, decode, eval and inspect: what it is
    for, the rate of its token files and its quality on held-out data per stage count (from its card,
    models/NAME/README.md), and its size (--json adds the parameter count)."""
    from vqtok import zoo

    with _user_errors():
        rows = zoo.listing()
    if json_out:
        _print_json(rows)
    else:
        _print_models_table(rows)


def _print_models_table(rows: list[dict[str, Any]]) -> None:
    from vqtok import zoo

    table = Table(title=f"shipped models ({zoo.models_dir()})")
    for name in ("name", "modality", "for", "stages", "file rate", "quality", "size"):
        table.add_column(name, justify="right" if name in ("stages", "size") else "left")
    for row in rows:
        first = [row["name"], row["modality"], row["description"]]
        size = f"{row['file_bytes'] / 1e6:.1f} MB"
        for figures in row["figures"]:
            packed, entropy = (zoo.show(k, figures[k]) for k in zoo.RATES[row["modality"]])
            quality = ", ".join(zoo.phrase(k, figures[k]) for k in zoo.QUALITY[row["modality"]] if k in figures)
            table.add_row(*first, str(figures["stages"]), f"{packed} / {entropy} {row['unit']}", quality, size)
            first, size = ["", "", ""], ""  # a model's further stage counts go on lines of their own
    out.print(table if rows else f"no shipped models in {zoo.models_dir()}")
    if rows:
        out.print("file rate: token files packed / entropy-coded, on each model's held-out data; "
                  f"the cards: {zoo.models_dir()}/NAME/README.md")


def main() -> None:
    """Console-script entry point."""
    keep_freed_memory()
    app()
