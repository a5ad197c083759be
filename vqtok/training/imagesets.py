"""Image training: random crops streamed from the files, the reconstruction loss, and validation on a fixed,
seeded set of crops of the held-out files."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from vqtok import plots, stats
from vqtok.config import ModelConfig, TrainConfig
from vqtok.data.streams import ImageCrops, Item, fixed_items, split_files
from vqtok.evaluate import ImageEvaluator
from vqtok.nets.tokenizer import Tokenizer

PREVIEW_ITEMS = 8


class ImageTask:
    """Training and validation crops of side `model_config.image_size` from `paths` (split by the seed)."""

    modality = "image"

    def __init__(self, paths: list[Path], model_config: ModelConfig, train_config: TrainConfig):
        train_idx, val_idx = split_files(len(paths), train_config.seed, train_config.val_fraction,
                                         train_config.max_val)
        size = model_config.image_size
        self.train_data = ImageCrops([paths[i] for i in train_idx], size)
        self.val_data = ImageCrops([paths[i] for i in (val_idx or train_idx[:PREVIEW_ITEMS])], size)
        self.val_items: list[Item] = fixed_items(range(len(self.val_data)), train_config.seed)
        self.weights: torch.Tensor | None = None  # epochs over the files, each once per epoch
        self.skipped: list[tuple[str, str]] = []

    @staticmethod
    def prepare(batch: torch.Tensor) -> torch.Tensor:
        """uint8 crops (B, 3, S, S) -> float in [0, 1], what the model takes."""
        return batch.float().div_(255.0)

    @staticmethod
    def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # MSE on the [-1, 1] scale the encoder sees: 4x the [0, 1] MSE, which keeps the quantizer's
        # loss weights in the balance the VQ-VAE paper tuned them for.
        return F.mse_loss(recon, target) * 4.0

    @staticmethod
    def batch_metrics(recon: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"psnr": float(stats.psnr(recon.clamp(0, 1), target).clamp(max=100.0).mean())}

    def evaluate(self, model: Tokenizer, batches: Iterable[torch.Tensor], device: torch.device) -> dict[str, float]:
        """Figures over every validation batch (float inputs already prepared)."""
        evaluator = ImageEvaluator(model)
        for x in batches:
            evaluator.add(x.to(device))
        return evaluator.result()

    def preview(self, model: Tokenizer, path: Path, device: torch.device) -> None:
        """The first validation crops above their reconstructions, as one PNG."""
        items = self.val_items[:PREVIEW_ITEMS]
        x = self.prepare(torch.stack([self.val_data[item][0] for item in items])).to(device)
        with torch.no_grad():
            recon = model(x).recon.clamp(0, 1)
        plots.reconstruction_grid(x.cpu(), recon.cpu(), path)
