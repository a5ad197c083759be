"""In-memory training and validation sets: how batches are drawn, which reconstruction loss applies, and
how a held-out set is scored and previewed. One class per modality behind one small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from vqtok.data import io as data
from vqtok import plots, stats
from vqtok.config import ModelConfig, TrainConfig
from vqtok.errors import VqtokError
from vqtok.evaluate import ImageEvaluator
from vqtok.nets.tokenizer import Tokenizer

PREVIEW_ITEMS = 8


class TrainingSet(Protocol):
    """The interface `train.train` relies on."""

    def __len__(self) -> int: ...

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A random batch (B, C, *spatial) of float inputs."""
        ...

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def batch_metrics(self, recon: torch.Tensor, target: torch.Tensor) -> dict[str, float]: ...

    def evaluate(self, model: Tokenizer, batch_size: int, device: torch.device) -> dict[str, float]: ...

    def preview(self, model: Tokenizer, path: Path, device: torch.device) -> None: ...


class ImageSet:
    """Images decoded once, resized and centre-cropped to the training size, kept as uint8 (N, 3, S, S)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        return self.images[idx].float().div_(255.0)

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # MSE on the [-1, 1] scale the encoder sees: 4x the [0, 1] MSE, which keeps the quantizer's
        # loss weights (beta = 0.25) in the balance the VQ-VAE paper tuned them for.
        return F.mse_loss(recon, target) * 4.0

    def batch_metrics(self, recon: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"psnr": float(stats.psnr(recon.clamp(0, 1), target).clamp(max=100.0).mean())}

    def evaluate(self, model: Tokenizer, batch_size: int, device: torch.device) -> dict[str, float]:
        evaluator = ImageEvaluator(model)
        for start in range(0, len(self), batch_size):
            evaluator.add(self.images[start:start + batch_size].to(device).float().div_(255.0))
        return evaluator.result()

    def preview(self, model: Tokenizer, path: Path, device: torch.device) -> None:
        x = self.images[:PREVIEW_ITEMS].to(device).float().div_(255.0)
        with torch.no_grad():
            recon = model(x).recon.clamp(0, 1)
        plots.reconstruction_grid(x.cpu(), recon.cpu(), path)


def split_indices(n: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """A seeded split of n files into (train, val); val gets val_fraction of them, at least 1, at most max_val,
    and none when there are fewer than 4 files (then validation reuses a few training files)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = 0 if n < 4 or config.val_fraction == 0 else min(config.max_val, max(1, round(n * config.val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def build_training_sets(
    paths: list[Path], model_config: ModelConfig, train_config: TrainConfig
) -> tuple[TrainingSet, TrainingSet, list[tuple[Path, str]]]:
    """Decode every file once and split into training and validation sets; returns the skipped files too."""
    if model_config.modality != "image":
        from vqtok.training.audiosets import build_audio_sets

        return build_audio_sets(paths, model_config, train_config)
    images, kept, skipped = data.load_image_set(paths, model_config.image_size)
    if len(kept) == 0:
        raise VqtokError(f"none of the {len(paths)} image files could be read (first: {skipped[0][0]}: {skipped[0][1]})")
    train_idx, val_idx = split_indices(len(kept), train_config)
    val = images[val_idx] if val_idx else images[train_idx[:PREVIEW_ITEMS]]
    return ImageSet(images[train_idx]), ImageSet(val), skipped
