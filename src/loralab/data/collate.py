"""Batching: pad lists of token ids to the longest in the batch (right side for training, left for generation),
or lay several examples end to end in each row (packed rows of max_length tokens, or a padding-free micro-batch
in one row) so that no compute goes to padding."""

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


def packed_rows(lengths: list[int], capacity: int, generator: torch.Generator) -> list[list[int]]:
    """A random grouping of examples into rows of at most `capacity` tokens: shuffle, then place each example in
    the first row with room for it, 512 examples at a time (so each placement looks through a few dozen rows, not
    all of them), then shuffle the rows. Rows come out ~full: for alpaca 98.6% at 2,048 tokens, as with the longest
    examples placed first, and 96.1% against 98.9% at 512. Taken in random order, each row holds a random mix of
    lengths, and another one each epoch. Placed longest first (first-fit decreasing), rows were sorted mixes, the
    same ones every epoch for small data sets, and the held-out loss came out higher, as with length-grouped
    batches (BENCHMARKS.md)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    rows: list[list[int]] = []
    for start in range(0, len(order), 512):
        chunk_rows: list[list[int]] = []
        room: list[int] = []
        for i in order[start:start + 512]:
            slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if slot is None:
                chunk_rows.append([])
                room.append(capacity)
                slot = len(room) - 1
            chunk_rows[slot].append(i)
            room[slot] -= lengths[i]
        rows += chunk_rows
    return [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]


def pack_batch(rows: list[list[dict]], pad_id: int) -> dict:
    """Rows of several examples each, concatenated. position_ids restart at 0 for every example, which is how
    transformers' attention masking tells the examples apart (no attention across them); with no attention_mask
    given. Each example's first label is ignored, so no example is scored on a token predicted from the one before.
    Right padding gets its own positions and is never scored.

    The batch also carries the arguments transformers defines for packed rows, which its variable-length
    attention (and loralab's) reads: `cu_seq_lens_q`/`_k`, where each example and each row's padding begins in
    the rows laid end to end, plus the total (int32), and `max_length_q`/`_k`, the longest of them."""
    flat = []
    for row in rows:
        ids, labels, positions = [], [], []
        for e in row:
            ids += e["input_ids"]
            labels += [IGNORE_INDEX] + e["labels"][1:]
            positions += list(range(len(e["input_ids"])))
        flat.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    longest = max(len(r["input_ids"]) for r in flat)
    lengths = []
    for row, r in zip(rows, flat, strict=True):
        n = longest - len(r["input_ids"])
        r["input_ids"] += [pad_id] * n
        r["labels"] += [IGNORE_INDEX] * n
        r["position_ids"] += list(range(n))
        lengths += [len(e["input_ids"]) for e in row] + ([n] if n else [])
    batch = {key: torch.tensor([r[key] for r in flat]) for key in ("input_ids", "labels", "position_ids")}
    starts = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {**batch, "cu_seq_lens_q": starts, "cu_seq_lens_k": starts,
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on the device; its other values (pack_batch's lengths) as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
