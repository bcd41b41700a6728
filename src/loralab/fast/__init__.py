"""The speed techniques of training, each in its own module, turned on by one call: `apply`.

| technique | module | applies when |
|---|---|---|
| fused SwiGLU (keeps 2 tensors for the backward pass, not 4) | swiglu | LLaMA-style MLPs |
| RMSNorm through torch's rms_norm (fused on CUDA) | rms_norm | LLaMA-style norms |
| frozen products through oneDNN | frozen_linear | fp32 on an AMD CPU |
| chunked causal attention (10/16 of the scores) | causal_attention | causal tasks with SDPA attention |
| per-block torch.compile | compiled | train.compile=true |
| C-heap trims inside a step | heap | eager training on the CPU |
| chunked cross-entropy (never all the logits) | lm_loss | causal LMs with a plain output head |
| expandable CUDA segments | cuda_allocator | CUDA runs, unless the user set the allocator |

Importing these modules defines loralab's torch operators (torch.ops.loralab.*) and nothing else: no files are
read, no environment variables set, nothing registered with transformers until `apply` is called.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.fast.causal_attention import use_chunked_attention
from loralab.fast.compiled import compile_model
from loralab.fast.frozen_linear import use_onednn_for_frozen_linears
from loralab.fast.heap import trim_inside_steps
from loralab.fast.lm_loss import supports_chunked_loss
from loralab.fast.rms_norm import fuse_rms_norm
from loralab.fast.swiglu import fuse_swiglu
from loralab.tasks import get_task


def apply(model: nn.Module, config, device: torch.device, tracing: bool = False) -> list[str]:
    """Turn on every technique that applies to `model` trained under `config` (a RunConfig) on `device`; returns
    what was turned on, for the report. tracing: the memory planner's fake-tensor model, which takes only the
    techniques that change what a step keeps in memory (the others need real tensors and change speed alone)."""
    on = []
    if fuse_swiglu(model):
        on.append("fused SwiGLU")
    if fuse_rms_norm(model):
        on.append("fused RMSNorm")
    causal = get_task(config.task).CAUSAL
    if causal and supports_chunked_loss(model):
        on.append("chunked cross-entropy")
    if tracing:
        return on
    if device.type == "cpu" and use_onednn_for_frozen_linears(model):
        on.append("oneDNN frozen products")
    if causal and use_chunked_attention(model):
        on.append("chunked causal attention")
    if config.train.compile:
        compile_model(model)
        on.append("per-block torch.compile")
    elif device.type == "cpu" and trim_inside_steps(model, backward=bool(config.train.gradient_checkpointing)):
        on.append("heap trims inside steps")
    return on
