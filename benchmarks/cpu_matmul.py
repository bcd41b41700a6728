"""The rate of fp32 matrix products on this CPU: torch's linear (MKL on x86) against oneDNN's linear operator,
which loralab uses for products with frozen weights on AMD CPUs (fast/frozen_linear.py), at a model's shapes.

    python benchmarks/cpu_matmul.py                       # SmolLM2-135M's shapes, 800 tokens (4 alpaca examples)
    python benchmarks/cpu_matmul.py --hidden 2048 --intermediate 8192 --kv 512 --vocab 128256 --tokens 800
    python benchmarks/cpu_matmul.py --lengths             # steps of changing length: oneDNN's kernel cache

Each row is one product of a training step: forward (tokens x in) @ (in x out), and the backward pass's input
gradient (tokens x out) @ (out x in), which loralab takes through a transposed view of the same weight.

--lengths runs 60 steps of a random length each (300-1,500 tokens), every step 30 layers of the four body
products both ways, in a fresh process per setting of oneDNN's kernel cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY),
and prints the time and the resident memory left after returning the heap's free pages, as loralab's loop does.
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


def changing_lengths(args) -> None:
    """One setting of --lengths, in this process: prints seconds and MiB."""
    import ctypes
    import random

    onednn = torch.ops.mkldnn._linear_pointwise
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    weights = [torch.randn(o, i) / i**0.5 for i, o in [(args.hidden, args.hidden), (args.hidden, args.kv),
                                                       (args.hidden, args.intermediate),
                                                       (args.intermediate, args.hidden)]]
    random.seed(0)
    start = time.perf_counter()
    for step in range(60):
        tokens = random.randint(300, 1500)
        inputs = {n: torch.randn(tokens, n) for n in {w.shape[0] for w in weights} | {w.shape[1] for w in weights}}
        for _layer in range(30):
            for w in weights:
                onednn(inputs[w.shape[1]], w, None, "none", [], "")
                onednn(inputs[w.shape[0]], w.t(), None, "none", [], "")
        if step % 5 == 4:
            trim(0)
    seconds = time.perf_counter() - start
    trim(0)
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * 4096 / 2**20
    print(f"{seconds:.1f} {resident:.0f}")


def kernel_cache(args) -> None:
    import os
    import subprocess
    import sys

    table = Table(title="60 steps of changing length, 30 layers each, oneDNN's products (fresh process each)")
    for column in ("kernels kept (ONEDNN_PRIMITIVE_CACHE_CAPACITY)", "seconds", "resident MiB after trim"):
        table.add_column(column, justify="right")
    for capacity in ("1024 (oneDNN's default)", "64 (loralab's)", "16", "0"):
        env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity.split()[0]}
        out = subprocess.run([sys.executable, __file__, "--one-setting", *sys.argv[1:]], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        table.add_row(capacity, *out)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="width of the key and value projections")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--lengths", action="store_true", help="steps of changing length (see above)")
    parser.add_argument("--one-setting", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_setting:
        return changing_lengths(args)
    if args.lengths:
        return kernel_cache(args)
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
