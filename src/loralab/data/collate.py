"""Batching: pad lists of token ids to the longest in the batch (right side for training, left for generation)."""

from __future__ import annotations

import torch

from loralab.data.templates import IGNORE_INDEX


def pad_batch(examples: list[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids padded with pad_id, labels with -100 (ignored by the loss), other id lists with 0;
    an integer `labels` (classification) is stacked. attention_mask marks the real tokens."""
    longest = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if not isinstance(values[0], list):
            batch[key] = torch.tensor(values)
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        rows = [[fill] * (longest - len(v)) + v if side == "left" else v + [fill] * (longest - len(v))
                for v in values]
        batch[key] = torch.tensor(rows)
    lengths = [len(e["input_ids"]) for e in examples]
    batch["attention_mask"] = torch.tensor([[0] * (longest - n) + [1] * n if side == "left" else
                                            [1] * n + [0] * (longest - n) for n in lengths])
    return batch


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A random order in which each run of batch_size examples has similar lengths, so little is padded:
    shuffle, sort within chunks of 50 batches by length, then shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * 50
    grouped = []
    for start in range(0, len(order), chunk):
        grouped += sorted(order[start:start + chunk], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]
