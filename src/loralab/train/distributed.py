"""Training on several processes with PyTorch's own engine: torchrun starts the processes and sets RANK /
WORLD_SIZE. `distributed: ddp` (DistributedDataParallel) keeps a whole model on every device and averages
gradients; `distributed: fsdp` (FSDP2, fully_shard) splits the frozen base weights across the devices and gathers
one transformer block at a time, for models that do not fit on one device. One process is the plain path.

    torchrun --nproc-per-node 2 -m loralab train run.yaml      # or: loralab train run.yaml --nproc 2
    torchrun --nnodes 2 --node-rank 0 --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m loralab train run.yaml
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loralab.models import transformer_blocks


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
    return _reduce(world, values, device, dist.ReduceOp.SUM)


def min_over_ranks(world: World, values: list[float], device: torch.device) -> list[float]:
    return _reduce(world, values, device, dist.ReduceOp.MIN)


def _reduce(world: World, values: list[float], device: torch.device, op) -> list[float]:
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device if world.backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def gather_objects(world: World, obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def shard(batch: list[int], world: World) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    size, extra = divmod(len(batch), world.size)
    start = world.rank * size + min(world.rank, extra)
    return batch[start:start + size + (world.rank < extra)]


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_frozen_base(loss_module: nn.Module, model: nn.Module, device: torch.device, world: World) -> list:
    """FSDP2 over the frozen base: each transformer block (the model's `_no_split_modules`) is its own shard
    group, the root (embeddings, final norm, head) another. The trainable weights (LoRA, modules_to_save) are
    a few MB: they stay whole on every process, their gradients averaged by average_gradients once per step,
    so the optimizer, checkpoints and adapter files are those of one process. Returns the trainable parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.to(device)  # fully_shard moves what it manages; ignored parameters move here
    mesh = init_device_mesh(device.type, (world.size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=set(trainable))
    fully_shard(loss_module, mesh=mesh, ignored_params=set(trainable))
    # FSDP initialises lazily at the root's first forward; evaluation calls the model directly, which would make
    # each block its own root. One tiny forward through the root first.
    with torch.no_grad():
        ids = torch.tensor([[0, 0]], device=device)
        loss_module(input_ids=ids, **({"labels": ids} if loss_module.causal else {}))  # no loss needed otherwise
    return trainable


def average_gradients(params: list, world: World) -> None:
    """Mean of the replicated trainable weights' gradients over the processes, in one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if world.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


@contextlib.contextmanager
def whole_root(loss_module: nn.Module):
    """Under FSDP, gathers the root's weights (embeddings, head) so the model can be called directly (evaluation,
    generation) while its blocks keep gathering themselves. Every process must enter it together."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(loss_module, FSDPModule):
        yield
        return
    loss_module.unshard()
    try:
        yield
    finally:
        loss_module.reshard()
