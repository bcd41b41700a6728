"""How an epoch's examples become micro-batches: shuffled, grouped by length or packed, split between processes,
and padded or laid end to end in one row (padding-free)."""

from __future__ import annotations

import dataclasses

import torch
from rich.console import Console

from loralab.config import RunConfig
from loralab.data.collate import length_grouped_order, packed_rows
from loralab.errors import LoralabError
from loralab.fast.causal_attention import NAME as LORALAB_ATTENTION
from loralab.fast.causal_attention import flash_kernel_runs_on
from loralab.fast.lm_loss import check_packing
from loralab.models import compute_dtype
from loralab.tasks import TaskData, get_task
from loralab.train.distributed import SINGLE_PROCESS, World, shard


def micro_batches(data: TaskData, config: RunConfig, epoch: int, world: World = SINGLE_PROCESS
                  ) -> list[list[list[int]]]:
    """This process's micro-batches for an epoch, each a list of rows of example indices (one example per row, or
    several when packing). The same global order on every process (batch_size x processes rows per global
    micro-batch), each taking its own part, so N processes follow one process with N times the batch."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    size = config.train.batch_size * world.size
    lengths = [len(e["input_ids"]) for e in data.train]
    flat = config.data.padding_free is True and not config.data.packing
    if config.data.packing:
        rows = packed_rows(lengths, config.data.max_length, generator)
    elif config.train.group_by_length and not flat:
        rows = [[i] for i in length_grouped_order(lengths, size, generator)]
    else:
        rows = [[i] for i in torch.randperm(len(lengths), generator=generator).tolist()]
    batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    mine = [shard(b, world) for b in batches if len(b) >= world.size]
    # padding-free: this process's examples of the micro-batch as one row
    return [[[i for row in rows for i in row]] for rows in mine] if flat else mine


def resolve_padding_free(config: RunConfig, model, device, autocast, console: Console) -> RunConfig:
    """data.padding_free as the run will use it, True or False. auto means padding-free batches for causal tasks
    whose model keeps the examples of a row apart (check_packing), where attention takes each example alone:
    loralab's on the CPU and on GPUs with torch's flash kernel in half precision, and transformers' flash
    attention. Elsewhere (fp32 on a GPU, older GPUs, eager attention) the row would go through a block mask that
    computes its whole square: 32 examples a row cost 32 times a padded batch's attention, so auto pads there.
    Asked for outright, a model that cannot keep examples apart is an error. Packed rows have no padding to
    free."""
    d = config.data
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    ours_per_example = device.type == "cpu" or (
        flash_kernel_runs_on(device) and compute_dtype(config.model, device) in (torch.float16, torch.bfloat16))
    attention_per_example = (attention.startswith("flash_attention")
                             or (attention == LORALAB_ATTENTION and ours_per_example))
    wanted = d.padding_free is True or (d.padding_free == "auto" and get_task(config.task).CAUSAL
                                        and attention_per_example)
    use = wanted and not d.packing
    if use:
        try:
            check_packing(model, device, autocast, field="data.padding_free")
        except LoralabError as error:
            if d.padding_free is True:
                raise
            console.print(f"batches are padded: {error.message}")
            use = False
    return dataclasses.replace(config, data=dataclasses.replace(d, padding_free=use))
