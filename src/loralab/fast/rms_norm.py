"""RMSNorm layers (Llama, Mistral, Qwen2/3, SmolLM, ...) as torch's one rms_norm operator.

    weight * (x / sqrt(mean(x^2) + eps))      computed in fp32, returned in x's dtype

transformers writes this as six operations (upcast, square, mean, add, rsqrt, two products), each its own kernel
forward and more backward; two norms a layer make them a large share of the ~2,000 kernel launches of a small
model's training step, which on a GPU is bound by launching, not computing. torch's `rms_norm` is one operator
(one fused kernel each way on CUDA). In a bf16 model it also keeps x itself for the backward pass, where the
upcast keeps an fp32 copy of it. The result equals transformers' in fp32 up to float rounding; in bf16 it is
rounded once, not twice (within one bf16 step; tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.fast.forward_source import forward_body, replace_forwards

# the forward this replaces, as transformers writes it (compared as a syntax tree); other norms are left alone
RMS_NORM_FORWARD = """input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
variance = hidden_states.pow(2).mean(-1, keepdim=True)
hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
return self.weight * hidden_states.to(input_dtype)"""


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # e.g. an fp32 norm kept in a bf16 model: promote as before
        return type(self).forward(self, hidden_states)
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def is_rms_norm(module: nn.Module) -> bool:
    """A module with a 1-d weight whose forward is exactly transformers' RMSNorm code above."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
            and forward_body(type(module), ("self", "hidden_states")) == RMS_NORM_FORWARD)


def fuse_rms_norm(model: nn.Module) -> int:
    """Give every RMSNorm of `model` the one-operator forward; returns how many were changed."""
    return replace_forwards(model, is_rms_norm, rms_norm_forward)
