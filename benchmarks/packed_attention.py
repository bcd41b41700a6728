"""One attention layer, forward and backward, over a packed row: SDPA under the block mask (what transformers' SDPA
attention runs for packed rows, and what loralab ran before), against loralab's packed attention (one example at a
time on CPU; one variable-length flash-kernel call on a GPU in half precision).

    python benchmarks/packed_attention.py                                   # Llama-1B's heads, one row of 2,048
    python benchmarks/packed_attention.py --heads 9 --kv-heads 3 --rows 4 --lengths 200 180 132   # SmolLM2, CPU

The row holds the examples given (default: ten alpaca-like lengths filling 2,048 tokens), each with positions
restarting at 0. Prints the median time of each over the timed calls, and the largest difference of the outputs
from the masked SDPA's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from loralab.fast import causal_attention

ALPACA_LIKE = [200, 180, 132, 350, 90, 240, 160, 300, 210, 186]  # 2,048 tokens


def block_mask(lengths: list[int], rows: int, device) -> torch.Tensor:
    """(rows, 1, length, length) boolean: causal within each example, nothing across them."""
    example = torch.cat([torch.full((n,), index) for index, n in enumerate(lengths)]).to(device)
    length = len(example)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return ((example[:, None] == example[None, :]) & causal).expand(rows, 1, length, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=ALPACA_LIKE, help="the examples of each row")
    parser.add_argument("--calls", type=int, default=20, help="timed calls, after 3 of warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    length = sum(args.lengths)
    starts = torch.tensor([0] + args.lengths * args.rows, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    torch.manual_seed(0)
    # laid out as transformers passes them: (rows, length, heads, dim) transposed
    query = torch.randn(args.rows, length, args.heads, args.head_dim, device=device, dtype=dtype).transpose(1, 2)
    key, value = (torch.randn(args.rows, length, args.kv_heads, args.head_dim, device=device, dtype=dtype)
                  .transpose(1, 2) for _ in range(2))
    grad_out = torch.randn(args.rows, length, args.heads, args.head_dim, device=device, dtype=dtype)
    mask = block_mask(args.lengths, args.rows, device)
    scale = args.head_dim ** -0.5

    def masked(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)

    ways = {"SDPA under the block mask": masked}
    if device.type == "cpu":
        ways["one example at a time (loralab, CPU)"] = lambda q, k, v: causal_attention.packed_causal_attention(
            q, k, v, starts, scale)[0]
    elif causal_attention.varlen_fits(query):
        ways["flash kernel, variable length (loralab, GPU)"] = lambda q, k, v: causal_attention.varlen_causal_attention(
            q, k, v, starts, max(args.lengths), scale)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    table = Table(title=f"{args.rows} x {length} tokens ({len(args.lengths)} examples a row), {args.heads} heads "
                        f"({args.kv_heads} key-value) of {args.head_dim}, {args.dtype}, {device.type}")
    for column in ("attention", "forward + backward, median ms", "x masked SDPA", "max |output - masked|"):
        table.add_column(column)
    reference, baseline = None, None
    for name, attention in ways.items():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        times = []
        for call in range(3 + args.calls):
            sync()
            start = time.perf_counter()
            out = attention(q, k, v)
            out.backward(grad_out)
            sync()
            if call >= 3:
                times.append(time.perf_counter() - start)
        median = statistics.median(times) * 1e3
        out = out.detach().float()
        reference = out if reference is None else reference
        baseline = median if baseline is None else baseline
        table.add_row(name, f"{median:.2f}", f"{baseline / median:.2f}x", f"{(out - reference).abs().max():.2e}")
    Console().print(table)


if __name__ == "__main__":
    main()
