"""Quantizer quality on one backbone, one data set and one step budget: which combination of the three papers'
techniques reconstructs best and keeps the codebook alive.

    python benchmarks/quality.py --dataset mnist            # 7x7 grid, K=512
    python benchmarks/quality.py --dataset cifar10          # 8x8 grid, K=1024
    python benchmarks/quality.py --dataset mnist --rows ste,best --steps 3000
    python benchmarks/quality.py --dataset cifar10 --rows best,peer-best,best@peer-time --seed 1

Every row trains the same encoder/decoder (vqtok's image stacks, downsample 4, D=64) with AdamW, warm-up and cosine
decay at batch 128, from the same seed, and is scored on the held-out split: MSE and PSNR on [0, 1] pixels, code
usage (% of K used on the test set), perplexity, relative quantization error ||z - q||^2 / ||z||^2 and training
steps/s. The `peer-*` rows put vector-quantize-pytorch's `VectorQuantize` (pip install vector-quantize-pytorch;
a benchmark extra, never a vqtok dependency) in the quantizer's place. `best@peer-time` (not in the default
rows) trains vqtok's default for the wall time `peer-best` took, for comparison at equal time rather than equal
steps. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqtok.data import io as data
from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig  # noqa: E402
from vqtok.evaluate import ImageEvaluator  # noqa: E402
from vqtok.nets.tokenizer import Tokenizer  # noqa: E402
from vqtok.training.loop import learning_rate, model_param_groups  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    # name: (train folder, test folder, codebook size, test files used)
    "mnist": ("mnist/train", "mnist/test", 512, None),
    "cifar10": ("cifar10/train", "cifar10/test", 1024, 1000),
}
# The VQ-VAE paper's quantizer: straight-through, codebook loss, beta 0.25, random init, no upkeep.
PLAIN = dict(estimator="ste", codebook_update="loss", beta=0.25, affine="off", sync_nu=0.0, alternate=False,
             kmeans_init=False, dead_code_steps=0)
ROWS: dict[str, dict[str, Any]] = {
    "ste": PLAIN,
    "ste+ema": {**PLAIN, "codebook_update": "ema"},
    "rotation": {**PLAIN, "estimator": "rotation"},
    "affine+sync+alternate": {**PLAIN, "affine": "learned", "sync_nu": 0.2, "alternate": True},
    "rotation+affine+sync": {**PLAIN, "estimator": "rotation", "affine": "learned", "sync_nu": 0.2},
    # vqtok's defaults, the winning combination: rotation trick, EMA codebook (decay 0.99), commitment weight 2,
    # k-means++ init, restart of codes unused for 2 steps.
    "best": {},
    "best+affine+sync": {"affine": "learned", "sync_nu": 0.2},
    "peer-default": {"peer": {}},
    "peer-best": {"peer": {"kmeans_init": True, "threshold_ema_dead_code": 2, "decay": 0.99}},
    # vqtok's default trained for as long as the peer's best row took (more steps: vqtok's steps are faster).
    "best@peer-time": {"match_time_of": "peer-best"},
}
DEFAULT_ROWS = [name for name in ROWS if name != "best@peer-time"]
# Row keys that are not quantizer settings.
HARNESS_KEYS = ("peer", "match_time_of")


class PeerOutput(NamedTuple):
    z_q: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor]


class PeerQuantizer(nn.Module):
    """vector-quantize-pytorch's VectorQuantize behind the interface vqtok's Tokenizer calls."""

    def __init__(self, config: QuantizerConfig, **options: Any):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(dim=config.dim, codebook_size=config.codebook_size, **options)
        self.codebook_size = config.codebook_size
        self.window: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, stages: int | None = None) -> PeerOutput:
        z_q, idx, commit = self.vq(z.unsqueeze(0))
        idx = idx.reshape(-1)
        if self.training:
            self.window = (self.window + [idx.detach()])[-100:]
        return PeerOutput(z_q.squeeze(0), idx.unsqueeze(1), {"commitment": commit.sum()})

    @torch.no_grad()
    def encode(self, z: torch.Tensor, stages: int | None = None) -> torch.Tensor:
        return self.vq(z.unsqueeze(0))[1].reshape(-1, 1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.vq.get_codes_from_indices(indices[:, 0])

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def usage_stats(self) -> dict[str, float]:
        if not self.window:
            return {"usage": 0.0}
        used = torch.cat(self.window).unique().numel()
        return {"usage": used / self.codebook_size}


def build_model(row: dict[str, Any], codebook_size: int, size: int) -> Tokenizer:
    quantizer = QuantizerConfig(dim=64, codebook_size=codebook_size,
                                **{k: v for k, v in row.items() if k not in HARNESS_KEYS})
    model = Tokenizer(ModelConfig(image_size=size, quantizer=quantizer))
    if "peer" in row:
        model.quantizer = PeerQuantizer(quantizer, **row["peer"])
    return model


def run_row(name: str, train_images: torch.Tensor, test_images: torch.Tensor, codebook_size: int,
            config: TrainConfig) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model = build_model(ROWS[name], codebook_size, train_images.shape[-1])
    optimizer = torch.optim.AdamW(model_param_groups(model, config.lr), lr=config.lr,
                                  weight_decay=config.weight_decay)
    sampler = torch.Generator().manual_seed(config.seed)
    model.train()
    begin = time.perf_counter()
    for step in range(config.steps):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        idx = torch.randint(train_images.shape[0], (config.batch_size,), generator=sampler)
        x = train_images[idx].float().div_(255.0)
        out = model(x)
        loss = nn.functional.mse_loss(out.recon, x) * 4.0 + sum(out.losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - begin
    model.eval()
    evaluator = ImageEvaluator(model)
    with torch.no_grad():
        for start in range(0, test_images.shape[0], 500):
            evaluator.add(test_images[start:start + 500].float().div_(255.0))
    m = evaluator.result()
    return {"row": name, "mse": m["mse"], "psnr": m["psnr"], "ssim": m["ssim"], "usage_pct": 100 * m["usage"],
            "perplexity": m["perplexity"], "quant_error": m["quant_error"], "steps_per_s": config.steps / seconds,
            "steps": config.steps, "train_seconds": seconds, "config": {k: v for k, v in ROWS[name].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a quantizer setting in every vqtok row, e.g. --set beta=1.0")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"skipped: the real data folder {DATA} is absent")
    train_dir, test_dir, codebook_size, n_test = DATASETS[args.dataset]
    size = 28 if args.dataset == "mnist" else 32
    _, train_paths = data.find_inputs(DATA / train_dir)
    _, test_paths = data.find_inputs(DATA / test_dir)
    train_images = data.load_image_set(train_paths, size)[0]
    test_images = data.load_image_set(test_paths[:n_test] if n_test else test_paths, size)[0]
    for item in args.set:
        key, value = item.split("=", 1)
        for row in ROWS.values():
            if "peer" not in row:
                row[key] = json.loads(value)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    results = []
    header = f"{'row':24} {'steps':>6} {'MSE':>9} {'PSNR dB':>8} {'SSIM':>6} {'usage %':>8} {'perplexity':>10} {'q.err':>7} {'steps/s':>8}"
    print(f"{args.dataset}: {len(train_images)} train / {len(test_images)} test images, K={codebook_size}, "
          f"{args.steps} steps x batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(header)
    done: dict[str, dict[str, Any]] = {}
    for name in args.rows.split(","):
        row_config = config
        if "match_time_of" in ROWS[name]:
            ref, own = ROWS[name]["match_time_of"], "best"
            if ref not in done or own not in done:
                sys.exit(f"row {name} needs rows {ref} and {own} earlier in --rows")
            steps = round(config.steps * done[ref]["train_seconds"] / done[own]["train_seconds"])
            row_config = dataclasses.replace(config, steps=steps)
        r = run_row(name, train_images, test_images, codebook_size, row_config)
        done[name] = r
        results.append(r)
        print(f"{r['row']:24} {r['steps']:6d} {r['mse']:9.5f} {r['psnr']:8.2f} {r['ssim']:6.3f} {r['usage_pct']:8.1f} "
              f"{r['perplexity']:10.1f} {r['quant_error']:7.3f} {r['steps_per_s']:8.1f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": args.dataset, "steps": args.steps, "batch_size": args.batch_size,
               "codebook_size": codebook_size, "train_images": len(train_images), "test_images": len(test_images),
               "rows": results}
    (args.out / f"quality_{args.dataset}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
