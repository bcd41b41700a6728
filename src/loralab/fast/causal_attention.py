"""Causal self-attention on CPU that skips the masked half: queries split into chunks, each against its prefix.

SDPA's CPU flash kernel walks keys in blocks of up to 512, so at the lengths SFT trains on (a few hundred tokens)
a causal row costs as much as a full one: the upper triangle is computed and then masked. With the queries in
four chunks, chunk c attends keys [0, end_c) only (the first chunk causally, the others under a small mask that
covers their diagonal block), and 10/16 of the scores are computed. Forward plus backward of SmolLM2's attention
(9 query and 3 key-value heads of 64) on 2 CPU cores, 4 rows: 161 -> 114 ms a layer at 512 tokens, 41 -> 33 ms
at 256, 12 -> 11 ms at 128. The result equals one SDPA call up to float rounding (tested). On GPUs the flash
kernels skip masked blocks themselves, so they keep plain SDPA.

The chunks run torch's CPU flash kernel directly (its forward returns the softmax's log-normaliser, which its
backward takes), as custom operators, forward and backward: torch.compile sees one opaque call each way.

Packed rows (`data.packing`: several examples a row, positions restarting at each) get the same treatment one
example at a time, in one operator for all of them: the mask transformers builds for them makes SDPA compute the
whole square of the row and then hide all but the examples' own triangles (4 rows of 512 tokens holding 3
examples, SmolLM2's heads: 165 -> 117 ms a layer, forward and backward). On a GPU in half precision, packed rows
go to torch's flash kernel in its variable-length form, all examples in one call. Both take the examples' bounds
from the batch, as inputs, so compiled blocks run them too.

It is installed as an attention implementation of transformers' own (AttentionInterface) and falls back to
transformers' SDPA function for everything else: other masks (padding), key-value caches, dropout.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "loralab_sdpa"
CHUNKS = 4
# shortest rows chunked: below 128 tokens the extra calls cost more than they save (about 2 ms a layer at 16-64
# tokens); compiled blocks chunk from 16, as a second graph for short rows costs more compiling than that
SHORTEST, SHORTEST_COMPILED = 128, 16
flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
flash_varlen = torch.ops.aten._flash_attention_forward  # CUDA; autograd gives it its backward kernel


def query_chunks(query: torch.Tensor):
    """(start, end, mask) per chunk; mask None for the first (plain causal), else an additive mask that hides
    keys after each query: query i of the chunk (position start + i) sees keys 0 .. start + i. Rows shorter than
    SHORTEST are one chunk."""
    length = query.shape[2]
    chunks = CHUNKS if length >= SHORTEST else 1
    step = (length + chunks - 1) // chunks
    positions = torch.arange(length, device=query.device)
    for chunk in range(chunks):
        start, end = chunk * step, (chunk + 1) * step if chunk < chunks - 1 else length
        if chunk == 0:
            yield start, end, None
        else:
            hidden = positions[start:end, None] < positions[None, :end]
            yield start, end, torch.zeros(hidden.shape, dtype=query.dtype, device=query.device).masked_fill_(
                hidden, float("-inf"))


def causal_forward(query, key, value, scale: float, out: torch.Tensor, logsumexp: torch.Tensor) -> None:
    """Causal attention of (batch, heads, length, dim) queries over keys and values of the same length (grouped
    heads as they are), chunk by chunk into out (batch, length, heads, dim), the layout the output projection
    reads, and the softmax's log-normaliser (batch, heads, length), which the backward pass takes."""
    for start, end, mask in query_chunks(query):
        chunk_out, chunk_lse = flash(query[:, :, start:end], key[:, :, :end], value[:, :, :end], 0.0,
                                     mask is None, attn_mask=mask, scale=scale)
        out[:, start:end] = chunk_out.transpose(1, 2)
        logsumexp[:, :, start:end] = chunk_lse


def causal_backward(grad_out, query, key, value, out, logsumexp, scale: float,
                    grad_query: torch.Tensor, grad_key: torch.Tensor, grad_value: torch.Tensor) -> None:
    """The gradients of causal_forward into grad_query, grad_key and grad_value (laid out as query, key, value;
    the key's and value's zeroed: the chunks add into them), computed in fp32 whatever the inputs' dtype."""
    if query.dtype != torch.float32:
        # torch's CPU flash backward in bf16 costs about 2.5 ms a call even for a chunk of 40 queries, where fp32
        # takes 0.35: SmolLM2's padding-free bf16 step of 4 examples spent 1.13 s in it, 0.18 s in fp32
        grad_out, query, key, value, out = (t.float() for t in (grad_out, query, key, value, out))
    for start, end, mask in query_chunks(query):
        dq, dk, dv = flash_backward(grad_out[:, start:end].transpose(1, 2), query[:, :, start:end],
                                    key[:, :, :end], value[:, :, :end], out[:, start:end].transpose(1, 2),
                                    logsumexp[:, :, start:end], 0.0, mask is None, attn_mask=mask, scale=scale)
        grad_query[:, :, start:end] = dq
        grad_key[:, :, :end] += dk
        grad_value[:, :, :end] += dv


# Operators for torch.compile: traced as plain SDPA calls on slices, inductor (torch 2.13, dynamic shapes) fixed
# the stride of one slice in the backward graph from the first length it saw and failed at the next length; and
# packed rows' examples are data, which would stop a graph at every step.
@torch.library.custom_op("loralab::chunked_causal_attention", mutates_args=())
def chunked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax(q k^T * scale) v of whole rows: (batch, heads, length, dim) queries, (batch, kv heads,
    length, dim) keys and values. Returns the output (batch, length, heads, dim) and the log-normaliser."""
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, length, heads, value.shape[-1])
    logsumexp = query.new_empty(batch, heads, length, dtype=torch.float32)
    causal_forward(query, key, value, scale, out, logsumexp)
    return out, logsumexp


@chunked_causal_attention.register_fake
def _(query, key, value, scale):
    batch, heads, length, _ = query.shape
    return (query.new_empty(batch, length, heads, value.shape[-1]),
            query.new_empty(batch, heads, length, dtype=torch.float32))


@torch.library.custom_op("loralab::chunked_causal_attention_backward", mutates_args=())
def chunked_causal_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                      value: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
                                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the operator above for query, key and value."""
    grads = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
    causal_backward(grad_out, query, key, value, out, logsumexp, scale, *grads)
    return grads


@chunked_causal_attention_backward.register_fake
def _(grad_out, query, key, value, out, logsumexp, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def save_for_backward(ctx, inputs, output):
    query, key, value, ctx.scale = inputs
    ctx.save_for_backward(query, key, value, *output)


def backward(ctx, grad_out, _grad_logsumexp):
    return *chunked_causal_attention_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.scale), None


chunked_causal_attention.register_autograd(backward, setup_context=save_for_backward)


def end_to_end(tensor: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, dim) as transformers passes it -> (batch * length, heads, dim); a view when the
    tensor is, as usual, a transposed (batch, length, heads, dim) one."""
    batch, heads, length, dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch * length, heads, dim)


def examples_of(tensor: torch.Tensor, spans: list[tuple[int, int]]):
    """Each example (start, end) of the rows laid end to end, as a (1, heads, length, dim) view."""
    for start, end in spans:
        yield tensor[start:end].transpose(0, 1)[None]


@torch.library.custom_op("loralab::packed_causal_attention", mutates_args=())
def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (several examples a row): each example attends causally to itself alone, chunked as above
    when long. Queries, keys and values as for the operator above; cu_seqlens: where each example (and each
    row's padding) begins in the rows laid end to end, plus their total, as the varlen flash kernels take it.
    Returns the output (batch, length, heads, dim) and the log-normaliser (heads, batch * length)."""
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, length, heads, value.shape[-1])
    logsumexp = query.new_empty(heads, batch * length, dtype=torch.float32)
    spans = list(pairwise(cu_seqlens.tolist()))
    for q, k, v, o, lse in zip(*(examples_of(end_to_end(t), spans) for t in (query, key, value)),
                               examples_of(out.flatten(0, 1), spans), examples_of(logsumexp.T, spans), strict=True):
        causal_forward(q, k, v, scale, o.transpose(1, 2), lse)
    return out, logsumexp


@packed_causal_attention.register_fake
def _(query, key, value, cu_seqlens, scale):
    batch, heads, length, _ = query.shape
    return (query.new_empty(batch, length, heads, value.shape[-1]),
            query.new_empty(heads, batch * length, dtype=torch.float32))


@torch.library.custom_op("loralab::packed_causal_attention_backward", mutates_args=())
def packed_causal_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
                                     cu_seqlens: torch.Tensor,
                                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the operator above for query, key and value, laid out as transformers passes them."""
    grads = [t.new_zeros(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2)
             for t in (query, key, value)]
    spans = list(pairwise(cu_seqlens.tolist()))
    for g, q, k, v, o, lse, dq, dk, dv in zip(
            *(examples_of(t, spans) for t in (grad_out.flatten(0, 1), end_to_end(query), end_to_end(key),
                                              end_to_end(value), out.flatten(0, 1), logsumexp.T)),
            *(examples_of(end_to_end(t), spans) for t in grads), strict=True):
        causal_backward(g.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, scale, dq, dk, dv)
    return tuple(grads)


@packed_causal_attention_backward.register_fake
def _(grad_out, query, key, value, out, logsumexp, cu_seqlens, scale):
    return tuple(t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2)
                 for t in (query, key, value))


def save_packed_for_backward(ctx, inputs, output):
    query, key, value, cu_seqlens, ctx.scale = inputs
    ctx.save_for_backward(query, key, value, *output, cu_seqlens)


def packed_backward(ctx, grad_out, _grad_logsumexp):
    return *packed_causal_attention_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.scale), None, None


packed_causal_attention.register_autograd(packed_backward, setup_context=save_packed_for_backward)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of whole rows, (batch, length, heads, dim) out: chunked from SHORTEST tokens on."""
    shortest = SHORTEST_COMPILED if torch.compiler.is_compiling() else SHORTEST
    if query.shape[2] >= shortest:
        return chunked_causal_attention(query, key, value, scale)[0]
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def varlen_causal_attention(query, key, value, cu_seqlens: torch.Tensor, longest: int, scale: float) -> torch.Tensor:
    """Packed rows on a GPU, in one call of torch's flash-attention kernel over every example of every row (its
    variable-length form: grouped-query heads as they are, no mask, only the examples' own triangles computed).
    Without it, SDPA takes the block mask transformers builds from the positions and its memory-efficient kernel
    computes the rows' whole squares."""
    out = flash_varlen(end_to_end(query), end_to_end(key), end_to_end(value), cu_seqlens, cu_seqlens,
                       longest, longest, 0.0, True, False, scale=scale)[0]
    return out.view(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])


@torch.compiler.assume_constant_result  # compiled graphs call it once, as a constant, instead of tracing it
def flash_kernel_runs_on(device: torch.device) -> bool:
    """torch's flash kernel: built in (CUDA, not ROCm here), switched on, an Ampere or newer GPU."""
    return (device.type == "cuda" and torch.version.cuda is not None and torch.backends.cuda.flash_sdp_enabled()
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def varlen_fits(query: torch.Tensor) -> bool:
    return (query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and flash_kernel_runs_on(query.device))


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: chunked for unmasked causal self-attention on CPU, one example
    at a time for packed rows (CPU, and GPUs with torch's flash kernel); transformers' SDPA otherwise.

    Packed rows are told by the arguments transformers defines for them (`cu_seq_lens_q`, `max_length_q`: where
    the examples begin in the rows laid end to end, and the longest), which loralab's packed batches carry and
    every layer receives. They come from the host, so no layer waits for the device to find the examples, and
    compiled blocks take them as inputs."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    length = query.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    ours = (causal and dropout == 0.0 and key.shape[2] == length and query.shape[-1] == value.shape[-1]
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and (window is None or window >= length))
    cpu = query.device.type == "cpu"
    examples = kwargs.get("cu_seq_lens_q")
    if ours and examples is not None:
        if cpu:
            return packed_causal_attention(query, key, value, examples, scale)[0], None
        if varlen_fits(query) and kwargs.get("max_length_q") is not None:
            return varlen_causal_attention(query, key, value, examples, kwargs["max_length_q"], scale), None
    elif ours and cpu and attention_mask is None:
        return causal_attention(query, key, value, scale), None
    # otherwise, packed rows take the mask transformers makes from their restarting positions
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def use_chunked_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to the function above; True if it was switched. The
    choice is not written to a saved config.json (transformers keeps it out), so saved models name plain SDPA."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks as SDPA: none where causal suffices
    model.set_attn_implementation(NAME)
    return True

