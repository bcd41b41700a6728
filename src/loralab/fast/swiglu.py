"""SwiGLU MLP blocks (Llama, Mistral, Qwen2/3, SmolLM, ...) that keep less for the backward pass.

    down_proj(silu(gate_proj(x)) * up_proj(x))

Autograd keeps gate, silu(gate) and up for this product: three tensors of the MLP's width per token, the largest
activations of the model. SiluMul keeps gate and up and recomputes silu(gate) in the backward pass (one cheap
elementwise pass), so a third of the MLP's activations are never stored. The outputs are bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.fast.forward_source import forward_body, replace_forwards

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
    if torch.compiler.is_compiling():  # plain ops, as in LoraLinear.forward: the partitioner decides what is kept
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def is_swiglu(module: nn.Module) -> bool:
    """A module whose forward is exactly the SwiGLU expression above, with a SiLU activation."""
    return (type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and forward_body(type(module), ("self", "x")) in SWIGLU_FORWARDS)


def fuse_swiglu(model: nn.Module) -> int:
    """Give every SwiGLU MLP of `model` the lean forward; returns how many were changed."""
    return replace_forwards(model, is_swiglu, swiglu_forward)
