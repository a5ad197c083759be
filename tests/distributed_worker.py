"""Trains a tiny tokenizer with `vqtok.training.loop.train` and saves this process's final model state as
RESULT/rank<R>.safetensors: run under torchrun to compare ranks, or alone for the one-process reference.

    python tests/distributed_worker.py DATA RUN RESULT STEPS BATCH WORKERS [ADVERSARIAL_FROM]

DATA is a folder of images, or of audio; with ADVERSARIAL_FROM (audio) the adversarial stage is on after that
many steps and the rank's file holds its discriminator's state too, under "disc.".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vqtok.data.io import find_inputs
from vqtok.defaults import training_configs
from vqtok.training.loop import train

# The options the CLI tests pass to `vqtok train`, so a worker run and a CLI run build the same model.
TINY = dict(channels=32, code_dim=16, codebook_size=32, warmup=5, checkpoint_every=10, device="cpu")


def main(data: str, run: str, result: str, steps: str, batch: str, workers: str, adversarial_from: str = "0") -> None:
    torch.set_num_threads(1)
    modality = find_inputs([Path(data)])[0]
    model_config, train_config = training_configs(modality, steps=int(steps), batch_size=int(batch),
                                                  adversarial_from=int(adversarial_from), **TINY)
    train_config.log_every = 2
    out = train([Path(data)], Path(run), model_config, train_config, num_workers=int(workers))
    state = {k: v.detach().cpu().contiguous() for k, v in out.model.state_dict().items()}
    if out.discriminator is not None:
        state |= {f"disc.{k}": v.detach().cpu().contiguous() for k, v in out.discriminator.state_dict().items()}
    save_file(state, str(Path(result) / f"rank{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
