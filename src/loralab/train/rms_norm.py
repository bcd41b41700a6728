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

import ast
import functools
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import nn

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


@functools.cache
def has_rms_norm_forward(cls: type) -> bool:
    """Read once per class: the model's layers share it."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(function, ast.FunctionDef) or [a.arg for a in function.args.args] != ["self", "hidden_states"]:
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "\n".join(ast.unparse(s) for s in body) == RMS_NORM_FORWARD


def is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "variance_epsilon")
            and has_rms_norm_forward(type(module)))


def fuse_rms_norm(model: nn.Module) -> int:
    """Give every RMSNorm of `model` the one-operator forward; returns how many were changed."""
    fused = 0
    for module in model.modules():
        if is_rms_norm(module):
            module.forward = types.MethodType(rms_norm_forward, module)
            fused += 1
    return fused
