"""Training on several processes with torch.distributed, as started by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process; `start` reads them,
joins the process group (nccl when the run is on CUDA, gloo on CPU) and gives each process its device. Outside
torchrun (no WORLD_SIZE, or 1) everything here is a no-op, so one code path serves both.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vqtok.device import pick_device


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank among `world` processes, and the device it trains on."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory; the others only train."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (the same dict on every rank)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._wire())
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def gather(self, items: list[Any]) -> list[Any]:
        """The concatenation of every rank's list, in rank order (small lists of plain values only)."""
        if self.world == 1:
            return items
        parts: list[list[Any]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """`module` in DistributedDataParallel (its gradients averaged over the processes in backward) when
        there are several processes, else `module` itself.

        Buffers are not synchronised: every module trained here keeps its own buffers identical on every rank
        (the quantizer by its upkeep, see vqtok.quantize.upkeep; the discriminator's are constant windows), so
        DDP must not overwrite them with rank 0's.
        """
        if self.world == 1:
            return module
        return DistributedDataParallel(module, find_unused_parameters=find_unused_parameters, **_NO_BUFFER_SYNC)

    def _wire(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo takes CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers; older releases know only the first.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def start(device_name: str) -> Processes:
    """Join the torchrun process group when there is one, and pick this process's device.

    With CUDA each process takes cuda:LOCAL_RANK; an explicit --device cpu (or no GPU) uses gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world <= 1:
        return Processes(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device, owns)
