"""Data-parallel training on PyTorch's own engine: torchrun starts the processes and sets RANK / WORLD_SIZE,
DistributedDataParallel averages gradients. One process is the plain single-device path.

    torchrun --nproc-per-node 2 -m loralab train run.yaml      # or: loralab train run.yaml --nproc 2
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m loralab train run.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = World()


def init_world(device: str) -> World:
    """The process group torchrun describes in the environment, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE_PROCESS
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(dist.get_rank(), size, local_rank, backend)


def device_of(world: World, device: torch.device) -> torch.device:
    return torch.device("cuda", world.local_rank) if world.size > 1 and device.type == "cuda" else device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def sum_over_ranks(world: World, values: list[float], device: torch.device) -> list[float]:
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device if world.backend == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard(batch: list[int], world: World) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    size, extra = divmod(len(batch), world.size)
    start = world.rank * size + min(world.rank, extra)
    return batch[start:start + size + (world.rank < extra)]


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
