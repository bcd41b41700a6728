"""Running a model over examples in batches without gradients: shared by the tasks' evaluate functions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from loralab.data.collate import pad_batch


@contextmanager
def evaluating(model) -> Iterator[None]:
    """The model in eval mode without gradients; its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def batches(model, examples: list[dict], pad_id: int, batch_size: int, device, autocast: AbstractContextManager
            ) -> Iterator[tuple[dict, object]]:
    """Yield (batch, model output) over `examples`, in order, in eval mode; restores the previous mode."""
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(examples[start:start + batch_size], pad_id).items()}
            with autocast:
                output = model(**batch)
            yield batch, output


def scored_items(labels: torch.Tensor) -> int:
    """How many items an encoder batch's mean loss averages over: examples (one label each), or labelled tokens
    (causal LMs count their scored positions instead)."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels != -100).sum())


def loss_sum(loss: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed loss, number of scored items) from an encoder batch's mean loss, so averages weight every item
    equally (causal LMs: lm_loss.summed_causal_lm_loss)."""
    n = scored_items(labels)
    return loss.item() * n, n


def position_limit(model) -> int | None:
    """The most positions the model handles (models with learned position tables crash past it); None: unbounded."""
    return getattr(model.config, "max_position_embeddings", None)


def fit_to_positions(width: int, max_new_tokens: int, limit: int | None) -> tuple[int, int]:
    """(prompt tokens kept, new tokens) so that both fit `limit` positions: new tokens are cut to the room the
    prompt leaves, but not below a quarter of the positions (or max_new_tokens); the prompt then loses its start."""
    if limit is None or width + max_new_tokens <= limit:
        return width, max_new_tokens
    new = min(max_new_tokens, max(limit - width, limit // 4))
    return min(width, limit - new), new


def generate(model, tokenizer, prompts: list[dict], batch_size: int, max_new_tokens: int, device, autocast,
             sampling: dict | None = None, on_batch=None) -> list[str]:
    """Continuations of tokenized prompts (left-padded in batches), decoded and trimmed; greedy unless `sampling`
    gives generate() options. on_batch(n) is called after each batch of n prompts (for progress bars). Prompt
    and answer are kept within the model's positions (fit_to_positions): sample answers and label generation
    during training must not crash a run; `loralab generate` checks its prompts first."""
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
               **(sampling or {})}
    answers = []
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            batch = pad_batch(prompts[start:start + batch_size], tokenizer.pad_token_id, side="left")
            keep, room = fit_to_positions(batch["input_ids"].shape[1], options["max_new_tokens"],
                                          position_limit(model))
            batch = {k: v[:, v.shape[1] - keep:].to(device) for k, v in batch.items()}
            with autocast:
                out = model.generate(**batch, **{**options, "max_new_tokens": room})
            new = out[:, batch["input_ids"].shape[1]:]
            answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
            if on_batch:
                on_batch(len(new))
    return answers
