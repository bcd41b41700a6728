"""LoRA layer speed: loralab's LoraLinear against PEFT's lora.Linear on the same shapes and weights.

    python benchmarks/lora_layer_forward.py            # CPU, fp32
    python benchmarks/lora_layer_forward.py --device cuda --dtype bfloat16

Both layers wrap copies of one nn.Linear and share A and B; forward and forward+backward are timed with
torch.utils.benchmark (interleaved, median of blocks). Ratios > 1 mean loralab is faster.
"""

from __future__ import annotations

import argparse
import copy
import platform

import peft
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils import benchmark

from loralab.lora.layer import LoraLinear

SHAPES = [  # (tokens, in, out, r): SmolLM2-135M q_proj, a 1B model's q_proj, an MLP up-projection
    (4 * 512, 576, 576, 8),
    (4 * 512, 2048, 2048, 16),
    (2 * 512, 2048, 8192, 16),
]


def build(tokens, d_in, d_out, r, device, dtype, dropout):
    base = nn.Linear(d_in, d_out).to(device, dtype).requires_grad_(False)
    ours = LoraLinear(copy.deepcopy(base))
    ours.add_adapter("default", r=r, scaling=2.0, dropout=dropout)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"]))
    theirs = theirs.base_model.model[0]
    with torch.no_grad():
        nn.init.normal_(ours.lora_B["default"].weight, std=0.02)
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    x = torch.randn(tokens // 512, 512, d_in, device=device, dtype=dtype, requires_grad=True)
    return ours, theirs, x


def time_it(fn, device) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=3.0).median * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    table = Table(title=f"LoRA layer, {args.device} {args.dtype}, dropout {args.dropout}: ms per call (median)")
    for column in ("tokens x in -> out, r", "fwd loralab", "fwd PEFT", "PEFT/loralab",
                   "fwd+bwd loralab", "fwd+bwd PEFT", "PEFT/loralab "):
        table.add_column(column, justify="right")
    for tokens, d_in, d_out, r in SHAPES:
        ours, theirs, x = build(tokens, d_in, d_out, r, args.device, dtype, args.dropout)
        ours.eval(), theirs.eval()  # same maths (dropout off) before timing it
        torch.testing.assert_close(ours(x), theirs(x), rtol=2e-2, atol=2e-2)
        ours.train(), theirs.train()
        with torch.no_grad():
            fwd = [time_it(lambda m=m, x=x: m(x), args.device) for m in (ours, theirs)]
        both = [time_it(lambda m=m, x=x: m(x).sum().backward(), args.device) for m in (ours, theirs)]
        table.add_row(f"{tokens} x {d_in} -> {d_out}, r={r}", f"{fwd[0]:.2f}", f"{fwd[1]:.2f}",
                      f"{fwd[1] / fwd[0]:.2f}", f"{both[0]:.2f}", f"{both[1]:.2f}", f"{both[1] / both[0]:.2f}")
    Console(width=150).print(table)
    print(f"torch {torch.__version__}, peft {peft.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
