"""SwiGLU MLP blocks (Llama, Mistral, Qwen2/3, SmolLM, ...) that keep less for the backward pass.

    down_proj(silu(gate_proj(x)) * up_proj(x))

Autograd keeps gate, silu(gate) and up for this product: three tensors of the MLP's width per token, the largest
activations of the model. SiluMul keeps gate and up and recomputes silu(gate) in the backward pass (one cheap
elementwise pass), so a third of the MLP's activations are never stored. The outputs are bit-identical.
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

# the forwards this replaces, as transformers writes them (compared as syntax trees); other MLPs are left alone
SWIGLU_FORWARDS = {
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj",
    "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
}


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def is_swiglu(module: nn.Module) -> bool:
    """A module whose forward is exactly the SwiGLU expression above, with a SiLU activation."""
    return (type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and has_swiglu_forward(type(module)))


@functools.cache
def has_swiglu_forward(cls: type) -> bool:
    """Read once per class: the model's layers share it."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(function, ast.FunctionDef) or [a.arg for a in function.args.args] != ["self", "x"]:
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "\n".join(ast.unparse(s) for s in body) in SWIGLU_FORWARDS


def fuse_swiglu(model: nn.Module) -> int:
    """Give every SwiGLU MLP of `model` the lean forward; returns how many were changed."""
    fused = 0
    for module in model.modules():
        if is_swiglu(module):
            module.forward = types.MethodType(swiglu_forward, module)
            fused += 1
    return fused
