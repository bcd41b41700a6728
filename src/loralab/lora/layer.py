"""The LoRA layer: a frozen linear map plus trainable low-rank updates, one per named adapter.

    y = W0·x + b + sum over active adapters of  scaling · B·A·dropout(x),   scaling = alpha / r

A (r x in) starts random and B (out x r) starts at zero, so a freshly wrapped layer computes exactly W0·x + b.
Wraps torch.nn.Linear, transformers' Conv1D (GPT-2), whose weight is stored transposed (in x out), and
bitsandbytes' Linear4bit and Linear8bitLt (QLoRA: the frozen base stays quantised; see loralab.quantize).
Attribute names (base_layer, lora_A, lora_B) follow PEFT so that state-dict keys match its adapter files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.errors import LoralabError
from loralab.quantize import is_quantized_linear, quantized_linear_types

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_types() -> tuple[type, ...]:
    """The layers LoRA can wrap: torch's and transformers' float ones, and bitsandbytes' once it is in use."""
    return LINEAR_TYPES + quantized_linear_types()


def init_kaiming_uniform(weight: torch.Tensor) -> None:
    # the default init of nn.Linear, as PEFT uses for A
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_gaussian(weight: torch.Tensor, r: int) -> None:
    # the LoRA paper's init for A
    nn.init.normal_(weight, std=1 / r)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A dropout keep-mask (True with probability 1 - p) and the matching scale 1 / (1 - p).

    Each element takes 16 random bits, sliced from 64-bit random words: a quarter of the generator calls of
    `rand(shape) >= p`, about 3x faster on a CPU, where the mask costs several percent of a LoRA step. p is
    resolved to a multiple of 2^-16 (0.1 drops with probability 0.100006), and the scale matches it exactly."""
    n = math.prod(shape)
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    dropped = round(p * 65536)  # of the 65536 values an int16 takes, this many (the lowest) drop the element
    keep = words.view(torch.int16)[:n].view(shape) >= dropped - 32768
    return keep, 65536 / (65536 - dropped)


class DroppedDown(torch.autograd.Function):
    """hidden = (x * keep) @ Aᵀ, keeping for the backward pass only x and a one-byte mask.

    nn.Dropout followed by a linear layer keeps the dropped copy of x (4 bytes an element, for A's gradient) and
    its float mask (4 more). Here the copy is recomputed from x, which q_proj and v_proj share, so a layer with
    two adapted projections keeps x once and two bool masks: 6 bytes an element instead of 16. Dropout's 1 / (1 - p)
    is left to the caller, which folds it into the scaling of B's product (no operator of its own either way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, keep, a)
        return F.linear(x * keep, a)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        x, keep, a = ctx.saved_tensors
        grad_hidden = grad_hidden.to(x.dtype)  # under autocast the output may be in a lower precision
        grad_x = (grad_hidden @ a) * keep if ctx.needs_input_grad[0] else None
        grad_a = None
        if ctx.needs_input_grad[2]:
            grad_a = grad_hidden.reshape(-1, a.shape[0]).T @ (x * keep).reshape(-1, a.shape[1])
        return grad_x, None, grad_a


def dropped_down(x: torch.Tensor, a: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(x * keep) @ Aᵀ with keep_mask's fast mask, and the scale 1 / (1 - p) that makes it dropout(x) @ Aᵀ.
    Compiled blocks take the same ops without the autograd.Function: their partitioner picks what to keep
    (fast/compiled.py), and AOTAutograd's cache cannot store a graph that holds one, so every run would trace and
    compile its blocks afresh."""
    keep, scale = keep_mask(x.shape, p, x.device)
    if torch.compiler.is_compiling():
        return F.linear(x * keep, a), scale
    return DroppedDown.apply(x, keep, a), scale


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D or a bitsandbytes linear layer."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


class LoraLinear(nn.Module):
    """A linear layer with any number of named LoRA adapters.

    Example:
        layer = LoraLinear(nn.Linear(64, 64))
        layer.add_adapter("default", r=8, scaling=2.0)
        y = layer(torch.randn(4, 64))   # equals the base layer's output until B is trained
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.row_adapters: list[str | None] | None = None  # set by inject.row_adapters
        self.disabled = False
        self.train(base_layer.training)  # wrapping a model in eval mode keeps it in eval mode

    # models read their layers' weight/bias directly (T5 checks `wo.weight.dtype`); answer with the base layer's
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming") -> None:
        weight = self.base_layer.weight
        # A and B are kept in fp32 even on a bf16/fp16 base (as PEFT does): Adam updates of ~1e-4 would round away
        # in bf16's 8-bit mantissa. The forward casts them to the input's dtype, so compute stays at base speed.
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        # no dropout kernel at all when p = 0
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # a model in eval mode gets an adapter in eval mode
        self.scaling[name] = scaling
        if init == "gaussian":
            init_gaussian(self.lora_A[name].weight, r)
        else:
            init_kaiming_uniform(self.lora_A[name].weight)
        nn.init.zeros_(self.lora_B[name].weight)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B·A in the layout of the base weight, computed in fp32."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.transposed else delta

    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' updates into the base weight, so inference costs nothing extra."""
        if is_quantized_linear(self.base_layer):
            # rounding W + B·A back to 4 or 8 bits would lose most of B·A
            raise LoralabError("an adapter cannot be merged into quantised weights in place",
                               fix="loralab merge writes base + adapter as dequantised float weights")
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in names if names is not None else self.active_adapters:
                if name in self.merged_adapters or name not in self.lora_A:
                    continue
                weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates again; restores the base weight up to dtype rounding."""
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)
        if self.row_adapters is not None:
            return self.add_per_row(x, result)
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            a = self.lora_A[name].weight.to(x.dtype)
            b = self.lora_B[name].weight.to(x.dtype)
            dropout = self.lora_dropout[name]
            if isinstance(dropout, nn.Dropout) and dropout.training and torch.is_grad_enabled():
                hidden, kept_scale = dropped_down(x, a, dropout.p)
            else:
                hidden, kept_scale = F.linear(dropout(x), a), 1.0
            alpha = self.scaling[name] * kept_scale
            if result.dtype == b.dtype:
                # one GEMM that also scales and accumulates: result + alpha·(hidden @ Bᵀ)
                flat = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]),
                                   b.T, alpha=alpha)
                result = flat.view(result.shape)
            else:
                result = result + (F.linear(hidden, b) * alpha).to(result.dtype)
        return result

    def add_per_row(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each batch row takes its own adapter (`row_adapters[row]`, None: the base alone), as S-LoRA and Punica
        serve many adapters in one batch: the rows of each adapter go through its two products together."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(self.row_adapters):
            if name is not None and name in self.lora_A:
                rows.setdefault(name, []).append(row)
        for name, index in rows.items():
            index = torch.tensor(index, device=x.device)
            a = self.lora_A[name].weight.to(x.dtype)
            b = self.lora_B[name].weight.to(x.dtype)
            update = F.linear(F.linear(x.index_select(0, index), a), b) * self.scaling[name]
            result = result.index_add(0, index, update.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        ranks = {name: a.out_features for name, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active_adapters}"
