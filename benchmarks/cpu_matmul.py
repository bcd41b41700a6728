"""The rate of fp32 matrix products on this CPU: torch's linear (MKL on x86) against oneDNN's linear operator,
which loralab uses for products with frozen weights on AMD CPUs (train/frozen_linear.py), at a model's shapes.

    python benchmarks/cpu_matmul.py                       # SmolLM2-135M's shapes, 800 tokens (4 alpaca examples)
    python benchmarks/cpu_matmul.py --hidden 2048 --intermediate 8192 --kv 512 --vocab 128256 --tokens 800

Each row is one product of a training step: forward (tokens x in) @ (in x out), and the backward pass's input
gradient (tokens x out) @ (out x in), which loralab takes through a transposed view of the same weight.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table


def rate(product, flops: float, repeats: int) -> float:
    for _ in range(3):
        product()
    start = time.perf_counter()
    for _ in range(repeats):
        product()
    return flops * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="width of the key and value projections")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    onednn = torch.ops.mkldnn._linear_pointwise
    shapes = [("q, o", args.hidden, args.hidden), ("k, v", args.hidden, args.kv),
              ("gate, up", args.hidden, args.intermediate), ("down", args.intermediate, args.hidden),
              ("output head (half the tokens scored)", args.hidden, args.vocab)]
    table = Table(title=f"fp32 products, {args.tokens} tokens, GFLOP/s (torch {torch.__version__}, "
                        f"{torch.get_num_threads()} threads, {platform.machine()})")
    for column in ("product", "pass", "torch linear", "oneDNN", "ratio"):
        table.add_column(column, justify="left" if column in ("product", "pass") else "right")
    for name, inputs, outputs in shapes:
        tokens = args.tokens // 2 if "head" in name else args.tokens
        weight = torch.randn(outputs, inputs) / inputs**0.5
        flops = 2 * tokens * inputs * outputs
        for direction, x, w in (("forward", torch.randn(tokens, inputs), weight),
                                ("input gradient", torch.randn(tokens, outputs), weight.t())):
            ours = rate(lambda x=x, w=w: onednn(x, w, None, "none", [], ""), flops, args.repeats)
            theirs = rate(lambda x=x, w=w: F.linear(x, w), flops, args.repeats)
            table.add_row(name, direction, f"{theirs:.0f}", f"{ours:.0f}", f"{ours / theirs:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
