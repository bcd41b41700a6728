"""How many device operators one optimizer step issues, loralab against HF PEFT + transformers Trainer.

    python benchmarks/step_operators.py --model /tmp/bench/base --dtype fp32          # on a CPU
    python benchmarks/step_operators.py --model /tmp/llama-1b --dtype bf16            # on a GPU: its launches

A training step of a small model on a fast GPU is bound by how many kernels the host launches, not by the GPU
(BENCHMARKS.md, GPU section). Each operator that reaches a device kernel costs one launch or more, so counting them
tells, on any machine, how much host work a step asks for. Counted: every operator below autograd except views and
bare allocations, over the third step of random rows of batch x length tokens (all of them labelled), on each side's
own code: loralab's train_step + optimizer_step, and the peer's real `Trainer.train()`, counted between its
on_step_begin and on_step_end callbacks. Counts depend on the device: on CUDA, RMSNorm and AdamW are fused kernels
(one operator each), on a CPU they are not.
"""

from __future__ import annotations

import argparse
import collections

import torch
from common import random_row_config, random_row_step, train_peer_on_random_rows
from torch.utils._python_dispatch import TorchDispatchMode

NOT_KERNELS = {torch.ops.aten.detach.default, torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
               torch.ops.aten._unsafe_view.default, torch.ops.aten._local_scalar_dense.default,
               torch.ops.aten.empty_like.default}
COUNTED_STEP = 3  # the first steps create optimizer states and warm up caches


class CountOperators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in NOT_KERNELS:
            self.counts[func.name().removeprefix("aten::")] += 1
        return func(*args, **(kwargs or {}))


def count_loralab(args) -> collections.Counter:
    config = random_row_config(args.model, args.dtype, args.length, args.device, dropout=args.dropout)
    step, _ = random_row_step(config)
    for _ in range(COUNTED_STEP - 1):
        step(args.batch_size, args.length)
    with CountOperators() as counter:
        step(args.batch_size, args.length)
    return counter.counts


def count_peer(args) -> collections.Counter:
    from transformers import TrainerCallback

    counter = CountOperators()

    class CountOneStep(TrainerCallback):
        def on_step_begin(self, training_args, state, control, **kwargs):
            if state.global_step == COUNTED_STEP - 1:
                counter.__enter__()

        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step == COUNTED_STEP:
                counter.__exit__(None, None, None)

    train_peer_on_random_rows(args.model, args.dtype, args.batch_size, args.length, COUNTED_STEP, args.device,
                              CountOneStep(), dropout=args.dropout)
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a plain model folder (e.g. /tmp/bench/base)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    sides = {"loralab": count_loralab(args), "PEFT + Trainer": count_peer(args)}
    names = sorted(set().union(*sides.values()), key=lambda n: -max(c[n] for c in sides.values()))
    print(f"device operators in one optimizer step ({args.batch_size} x {args.length} tokens, {args.dtype}, "
          f"{args.device}):")
    print(f"{'':48}" + "".join(f"{side:>16}" for side in sides))
    print(f"{'total':48}" + "".join(f"{sum(c.values()):>16}" for c in sides.values()))
    for name in names[:args.top]:
        print(f"{name:48}" + "".join(f"{c[name]:>16}" for c in sides.values()))


if __name__ == "__main__":
    main()
