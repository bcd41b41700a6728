"""One optimizer step: forward and backward over its micro-batches on every process, then the update."""

from __future__ import annotations

import contextlib

import torch

from loralab.data.collate import pack_batch, pad_batch, to_device
from loralab.fast.lm_loss import scored_positions
from loralab.tasks.evaluation import scored_items
from loralab.train.distributed import SINGLE_PROCESS, World, sum_over_ranks


def train_step(loss_module, micro: list[list[list[dict]]], pad_id: int, device, autocast, scaler,
               world: World = SINGLE_PROCESS, causal: bool = False) -> tuple[float, int]:
    """Forward and backward over the micro-batches (lists of rows of examples) of one optimizer step, on every
    process; returns (this process's share of the step's mean loss, its non-pad tokens).

    The step's loss is the mean over every scored item (token, or example) of the global batch, as one process
    with the whole batch computes it: each micro-batch's mean is weighted by its share of the items, counted
    over all micro-batches and processes (data-parallel averaging divides by the process count, hence the
    factor)."""
    batches = [pack_batch(rows, pad_id) if any(len(row) > 1 for row in rows) else
               pad_batch([row[0] for row in rows], pad_id) for rows in micro]
    if causal:
        # right padding under causal attention: real tokens never see the pads after them, so the padding mask
        # changes nothing they compute. Without it, attention takes its causal path (skipping the masked half:
        # causal_attention.py on CPU, the flash kernels on GPU; grouped-query heads not repeated) and keeps no mask
        # per layer for the backward pass.
        for batch in batches:
            batch.pop("attention_mask", None)
            batch["scored"] = scored_positions(batch["labels"])  # on the CPU too (see causal_lm_loss)
    # counted on the CPU: no device sync
    counts = [len(b["scored"]) if causal else scored_items(b["labels"]) for b in batches]
    (total,) = sum_over_ranks(world, [float(sum(counts))], device)
    batches = [to_device(b, device) for b in batches]
    losses = []
    for i, (batch, count) in enumerate(zip(batches, counts, strict=True)):
        # under DDP, gradients are all-reduced only on the step's last micro-batch
        sync = i == len(batches) - 1 or not hasattr(loss_module, "no_sync")
        with autocast, (contextlib.nullcontext() if sync else loss_module.no_sync()):
            loss = loss_module(**batch) * (count * world.size / max(total, 1.0))
            # backward even for a NaN/inf loss: every process must take part in DDP's all-reduce, and the step's
            # loss is then not finite, so the caller drops the step and its gradients. Looking at the loss here
            # would also make the host wait for a GPU's forward pass before it could queue the backward.
            scaler.scale(loss).backward()
        losses.append(loss.detach())
    loss_value = torch.stack(losses).sum().item()  # the step's one wait for the device
    tokens = sum(len(e["input_ids"]) for rows in micro for row in rows for e in row)
    return loss_value, tokens


def optimizer_step(optimizer, scheduler, scaler, max_grad_norm: float | None) -> None:
    if max_grad_norm:
        scaler.unscale_(optimizer)
        # the optimizer's own list of what trains: finding it in the model walks every module, about 5 ms a step
        # of host time for a 16-layer model (it bounds small steps on a GPU)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
