"""Products with frozen weights on an AMD CPU through oneDNN instead of MKL.

torch sends fp32 matrix products on an x86 CPU to MKL's sgemm. On AMD CPUs MKL runs a generic code path: on the
2-core Zen 5 host of BENCHMARKS.md it reaches about 200 GFLOP/s at SmolLM2's shapes, where oneDNN (built into
torch; it picks its kernels by the instructions a CPU has) reaches 410-500 (`benchmarks/cpu_matmul.py`). About
70% of an eager LoRA step on a CPU is products with frozen weights: the forward pass's and, in the backward pass,
the input gradients. Here they run through oneDNN's linear operator (the one torch.compile's CPU backend uses
for linear layers), as one custom operator, so compiled blocks take it too. Results equal torch's up to fp32
rounding (tested).

Trainable weights (their gradients), other dtypes (torch already sends bf16 to oneDNN), autocast, other devices
and other CPUs keep torch's linear: on Intel CPUs MKL is tuned, and no Intel host has been measured.
"""

from __future__ import annotations

import functools
import os
import platform
import types

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def amd_cpu() -> bool:
    """An x86 CPU made by AMD (Linux names the vendor in /proc/cpuinfo, Windows in platform.processor())."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in info)
    except OSError:
        return "AuthenticAMD" in platform.processor()


@functools.cache
def onednn_linear():
    """oneDNN's linear operator where it is the faster one (an AMD CPU, oneDNN built in), else None. Asked on
    first use, not at import."""
    if amd_cpu() and torch.backends.mkldnn.is_available():
        return getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return None


@torch.library.custom_op("loralab::frozen_linear", mutates_args=())
def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN, for fp32 on the CPU; weight (out, in) may be a transposed view.
    Differentiable in x only: weight and bias must be frozen."""
    return onednn_linear()(x, weight, bias, "none", [], "")


@frozen_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _save_weight(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])  # the input's gradient needs the weight alone, as torch's linear keeps it


def _input_gradient(ctx, grad):
    (weight,) = ctx.saved_tensors
    return frozen_linear(grad, weight.t(), None), None, None


frozen_linear.register_autograd(_input_gradient, setup_context=_save_weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN where that is faster and changes nothing else (see the module's docstring)."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not weight.requires_grad and (bias is None or not bias.requires_grad)
            and not torch.is_autocast_enabled("cpu") and x.numel() > 0 and onednn_linear() is not None):
        return frozen_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_onednn_for_frozen_linears(model: nn.Module) -> int:
    """Give every nn.Linear of `model` the forward above (it decides per call, so a layer that trains, or moves
    to a GPU, keeps torch's linear); returns how many. Nothing changes where oneDNN's operator is missing."""
    if onednn_linear() is None:
        return 0
    # oneDNN keeps the kernel it builds for each product shape, up to 1,024 of them, about 0.45 MiB each. Rows
    # change length from step to step, so a long run fills the cache; a step uses 8-16 shapes, which every layer
    # shares, and keeping 64 is as fast (benchmarks/cpu_matmul.py --lengths). oneDNN reads this when it first
    # builds a kernel; a user's value stands.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.forward = types.MethodType(linear_forward, layer)
    return len(layers)
