"""batch_size: auto. The memory planner picks the largest micro-batch that fits the budget, and gradient
accumulation keeps train.global_batch examples per optimizer step."""

from __future__ import annotations

import dataclasses
import math

import torch
from rich.console import Console

from loralab.config import RunConfig
from loralab.errors import LoralabError
from loralab.estimate import largest_batch_size, memory_budget
from loralab.train.distributed import SINGLE_PROCESS, World, min_over_ranks
from loralab.train.report import human_bytes


def with_planned_batch(config: RunConfig, console: Console, device: torch.device | None = None,
                       world: World = SINGLE_PROCESS) -> RunConfig:
    """batch_size: auto -> the largest micro-batch the memory planner fits in the budget (at most this process's
    share of global_batch), and the gradient accumulation that keeps global_batch examples per step. Several
    processes take the smallest of their plans: they must step alike."""
    t = config.train
    processes = world.size
    share = math.ceil(t.global_batch / processes)  # this process's examples per optimizer step
    budget = memory_budget(t.memory_budget, str(device or t.device), "train.memory_budget")
    usable = budget.usable(t.gradient_checkpointing)
    best = largest_batch_size(config, usable, limit=share)
    (smallest,) = min_over_ranks(world, [best.batch_size if best else 0], device)
    batch = int(smallest)
    if not batch:
        raise LoralabError(f"even one example of {config.data.max_length} tokens needs more than the memory budget "
                           f"allows ({human_bytes(max(usable, 0))} of {human_bytes(budget.total)} for tensors"
                           f"{' on one of the processes' if processes > 1 and best else ''})",
                           field="train.memory_budget",
                           fix=("" if t.gradient_checkpointing else "train.gradient_checkpointing=true, ") +
                           "a lower data.max_length, a bf16 model.dtype, or a larger budget")
    accum = math.ceil(share / batch)
    console.print(f"batch size auto: {batch} x {accum} accumulation steps"
                  f"{f' x {processes} processes' if processes > 1 else ''} (the planner fits {best.batch_size}: "
                  f"{human_bytes(best.total)} in tensors, of a {human_bytes(budget.total)} budget)")
    return dataclasses.replace(config, train=dataclasses.replace(t, batch_size=batch, grad_accum=accum))
