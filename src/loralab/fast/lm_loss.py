"""The causal-LM training loss without full-vocabulary logits.

A model's own forward computes logits for every position of every row (batch x length x vocabulary floats, then
an fp32 copy, log-softmax and its gradient: about 1.6 GB for 4 x 512 tokens and a 49k vocabulary) although the
loss reads only the answer tokens. Here the decoder runs alone, the hidden states of the scored positions are
gathered, and the output projection plus cross-entropy run over chunks of them. Each chunk's gradient is computed
in the forward pass (softmax minus one-hot), so logits are never stored and never recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.data.collate import pack_batch, to_device
from loralab.data.templates import IGNORE_INDEX
from loralab.errors import LoralabError
from loralab.fast.frozen_linear import linear
from loralab.tasks.evaluation import evaluating

# model types whose logits are exactly output_embeddings(base_model(...).last_hidden_state): no soft-capping,
# logit scaling or auxiliary losses (those keep the model's own forward)
PLAIN_LM_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "bloom", "gpt_neox", "phi3", "gemma", "olmo2",
                 "starcoder2", "falcon", "stablelm", "smollm3"}
CHUNK_ELEMENTS = 2**24  # logits floats per chunk (64 MB in fp32)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight.T, target_i), chunked over rows; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, n, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = linear(h, w).float()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            # one exp pass, in place: softmax for the gradient, its normaliser for the loss
            grad = logits.sub_(top).exp_()
            norm = grad.sum(dim=-1, keepdim=True)
            total += (top.squeeze(1) + norm.log().squeeze(1) - target_logit).sum()
            # d(mean CE)/d(logits) = (softmax - onehot) / n
            grad.div_(norm * n)
            grad[torch.arange(len(t), device=t.device), t] -= 1 / n
            grad_hidden[start:start + rows] = linear(grad.to(w.dtype), w.t())
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        weight_grad = None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), weight_grad, None


def supports_chunked_loss(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (getattr(model.config, "model_type", None) in PLAIN_LM_HEAD and type(head) is nn.Linear
            and head.bias is None and model.base_model is not model)


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over the labelled tokens (labels != -100), as the model's own
    loss computes it; chunked (see above) for the model types that allow it."""
    if not supports_chunked_loss(model):
        batch = {k: v for k, v in batch.items() if k != "scored"}
        return model(**batch, use_cache=False).loss  # a cache would turn off the packed-sequence masking
    labels = batch["labels"]
    # training batches carry their scored positions, found on the host: finding them here, on a GPU, would make
    # the host wait for the forward pass before it could queue the loss and the backward pass
    scored = batch["scored"] if "scored" in batch else scored_positions(labels)
    hidden = decoder_states(model, batch)
    if scored.numel() == 0:
        return hidden.sum() * 0.0  # nothing to learn in this batch; keeps the graph (DDP expects gradients)
    return LinearCrossEntropy.apply(hidden.flatten(0, 1).index_select(0, scored),
                                    model.get_output_embeddings().weight, labels.flatten().index_select(0, scored + 1))


@torch.no_grad()
def summed_causal_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(the cross-entropy summed over the labelled tokens, their number), without gradients: evaluation's loss.
    Chunked as in training where the model allows, so that evaluating never holds full-vocabulary logits either:
    SmolLM2's 40 held-out alpaca examples in batches of 32 took the process to 7.1 GiB through the model's own
    loss (three times a training step's peak), and take it to 1.5 GiB chunked (1.1 GiB in padding-free rows)."""
    labels = batch["labels"]
    scored = scored_positions(labels)
    if not supports_chunked_loss(model):
        return model(**batch, use_cache=False).loss.float() * len(scored), len(scored)
    hidden = decoder_states(model, batch).flatten(0, 1).index_select(0, scored)
    targets = labels.flatten().index_select(0, scored + 1)
    weight = model.get_output_embeddings().weight.to(hidden.dtype)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(scored), rows):
        logits = linear(hidden[start:start + rows], weight).float()
        total += F.cross_entropy(logits, targets[start:start + rows], reduction="sum")
    return total, len(scored)


def decoder_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """The last hidden states of the decoder alone (no output head), for the batch less its labels."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "scored")}
    return model.base_model(**inputs, use_cache=False).last_hidden_state


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is scored (its label is not -100), as indices into the rows laid end to end
    (labels.flatten()); a row's last position predicts nothing."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts.flatten().nonzero().squeeze(1)


class TrainingLoss(nn.Module):
    """forward(**batch) -> the training loss of the wrapped model: the module that trains (and that DDP wraps)."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, **batch) -> torch.Tensor:
        return causal_lm_loss(self.model, batch) if self.causal else self.model(**batch).loss


def check_packing(model: nn.Module, device, autocast, field: str = "data.packing") -> None:
    """Packing needs attention that restarts where position ids restart (transformers' masking does this for
    most current decoders, given no attention_mask; loralab's attention and transformers' flash attention read the
    examples' bounds the batch carries). Checked once: two short random sequences run apart and packed in one row
    must give the same logits."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = (torch.randint(vocab, (n,), generator=generator).tolist() for n in (5, 7))
    with evaluating(model), autocast:
        def logits(**batch):
            return model(**to_device(batch, device), use_cache=False).logits.float()
        apart = torch.cat([logits(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None])
                           for ids in (a, b)], dim=1)
        # the two as one sequence: what attention across the examples gives
        across = logits(input_ids=torch.tensor([a + b]), position_ids=torch.arange(len(a + b))[None])
        # the row as training packs it (the examples' bounds included), less the labels
        row = pack_batch([[{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}]], pad_id=0)
        del row["labels"]
        try:
            packed = logits(**row)
        except TypeError as error:  # code of the model's own, without transformers' keyword arguments
            if "keyword argument" not in str(error):
                raise
            raise LoralabError(f"{type(model).__name__} does not take the arguments of packed rows ({error})",
                               field=field, fix=f"{field}=false (padded batches)") from error
    # The first example comes first in every row, so causal attention gives it the same logits each way: what
    # differs there is rounding (kernels pick other tilings for another length; 2% of the largest logit for
    # SmolLM2 in bf16 with SDPA on CPU). The second example must agree as closely, or sit far nearer its logits
    # apart than attention across the examples puts it: rounding can spare the first example alone (Llama-1B
    # shapes in bf16 on an H100: the first identical, the second 1.3% of the largest logit away through torch's
    # variable-length flash kernel, 5.9 when attending across).
    packed_gap, across_gap = (apart - packed).abs(), (apart - across).abs()
    rounding = max(packed_gap[:, :5].max(), across_gap[:, :5].max())
    moved, crossing = packed_gap[:, 5:].max(), across_gap[:, 5:].max()
    if moved > 4 * rounding + 1e-2 * apart.abs().max() + 1e-3 and moved > 0.1 * crossing:
        raise LoralabError(f"{type(model).__name__} lets packed examples attend to each other (its attention "
                           f"does not restart with the position ids: a packed example's logits moved by "
                           f"{moved:.3g}, attending across examples moves them by {crossing:.3g})",
                           field=field, fix=f"{field}=false (padded batches)")
