"""The defaults `vqtok train` starts from, per modality, in one place.

Images use the dataclass defaults of vqtok.config (the quantizer combination that measured best: rotation
trick, EMA codebook, commitment 2, k-means++ init, fast dead-code restarts). Audio differs where measured:
a network small enough to train usefully on a CPU (64 channels, one residual unit per stride), batches of 8
quarter-second segments (more steps in the same time: on FSDD, 3 minutes of training reach -5.8 dB SI-SNR
with 0.25 s, -7.5 dB with 0.5 s and -9.1 dB with 1 s segments), and 8 residual stages of 1024 codes (4 kbps at
16 kHz, 50 frames/s) trained with stage dropout so the first 1, 2, 4... stages decode on their own at lower
bitrates. The audio figures in benchmarks/README.md were measured with the loss-trained, affine +
synchronized-commitment codebooks below. The reconstruction loss is the multi-scale log-mel "spectral" one: on
LibriSpeech, 1,400 steps of 8 x 0.5 s segments reached STOI 0.616 / PESQ 1.041 on test-other against 0.537 /
1.018 with the "waveform" loss (10 clips, 8 stages).
"""

from __future__ import annotations

from typing import Any

from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig

AUDIO: dict[str, Any] = {
    "batch_size": 8, "channels": 64, "res_blocks": 1, "codebook_size": 1024, "stages": 8, "stage_dropout": 0.5,
    "segment_seconds": 0.25, "codebook_update": "loss", "beta": 0.25, "affine": "learned", "sync_nu": 0.2,
    "dead_code_steps": 100, "audio_loss": "spectral",
}

# Option name (as the command line and `training_configs` name it) -> field name in its config: the quantizer's,
# the model's or the training config.
QUANTIZER_FIELDS = {"code_dim": "dim", "codebook_size": "codebook_size", "stages": "stages",
                    "stage_dropout": "stage_dropout", "estimator": "estimator", "codebook_update": "codebook_update",
                    "codebook_weight": "codebook_weight", "beta": "beta", "ema_decay": "ema_decay", "affine": "affine",
                    "affine_groups": "affine_groups", "affine_lr_mult": "affine_lr_mult", "sync_nu": "sync_nu",
                    "alternate": "alternate", "alternate_lr": "alternate_lr", "kmeans_init": "kmeans_init",
                    "dead_code_steps": "dead_code_steps", "cosine": "cosine"}
MODEL_FIELDS = {"channels": "channels", "downsample": "downsample", "res_blocks": "res_blocks",
                "res_channels": "res_channels", "scale_blocks": "scale_blocks", "audio_strides": "audio_strides", "activation": "activation",
                "audio_net": "audio_net", "synthesis_frames": "synthesis_frames"}
TRAIN_FIELDS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup", "seed": "seed",
                "checkpoint_every": "checkpoint_every", "val_fraction": "val_fraction",
                "segment_seconds": "segment_seconds", "audio_loss": "audio_loss", "adversarial_from": "adversarial_from",
                "adversarial_weight": "adversarial_weight", "feature_weight": "feature_weight",
                "disc_filters": "disc_filters", "speed_perturb": "speed_perturb", "gain_perturb_db": "gain_perturb_db",
                "single_stage": "single_stage", "precision": "precision",
                "device": "device"}


# Options that shape the model: a run that starts from a model file (`train --init`) takes all of them from it.
MODEL_OPTIONS = frozenset(QUANTIZER_FIELDS) | frozenset(MODEL_FIELDS) | {"size", "sample_rate"}


def training_configs(modality: str, **options: Any) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs for `modality` ("image" or "audio") from `train` options.

    Options are named as on the command line (code_dim, codebook_size, batch_size, ...); None or absent means
    the modality's default. Stage dropout defaults to AUDIO's for audio models with several stages, else 0.
    """
    unknown = set(options) - set(QUANTIZER_FIELDS) - set(MODEL_FIELDS) - set(TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(sorted(unknown))}")
    chosen = {k: v for k, v in options.items() if v is not None}
    if modality == "audio":
        if chosen.get("stages", AUDIO["stages"]) == 1:
            chosen.setdefault("stage_dropout", 0.0)
        chosen = {**AUDIO, **chosen}

    def pick(table: dict[str, str]) -> dict[str, Any]:
        return {field: chosen[name] for name, field in table.items() if name in chosen}

    model = ModelConfig(**pick(MODEL_FIELDS), quantizer=QuantizerConfig(**pick(QUANTIZER_FIELDS)))
    return model, TrainConfig(**pick(TRAIN_FIELDS))
