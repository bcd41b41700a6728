"""Where one loralab training step spends its time: torch.profiler over a few steps of the loop's own step
functions, on rows of the length SFT data has (alpaca: about 200 tokens).

    python benchmarks/profile_step.py --model /tmp/llama-1b --batch-size 4 --length 200
    python benchmarks/profile_step.py --model /tmp/llama-1b --length 2048 --batch-size 1 \
        --data data/alpaca/alpaca_en_demo.json --set data.packing=true   # real examples, batched as training does

Prints the step's wall time, the GPU's busy time within it (the sum of kernel times), and the operators that cost
the most device and host time. With --data, the steps take the file's examples in the micro-batches `loralab
train` makes of them (packed rows with data.packing=true; their lengths vary from step to step), and every step
of the first pass is timed alone as well. A step whose kernels fill a small share of its wall time is bound by the host
(Python and kernel launches), not by the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import loop_step, random_row_config, random_row_step
from rich.console import Console
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=4, help="rows a step (with --data: train.batch_size)")
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="loralab overrides, e.g. train.compile=true")
    parser.add_argument("--data", help="an sft data file whose examples the steps train on (default: random rows "
                        "of --batch-size x --length tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    overrides = [*([f"data.train={args.data}", f"train.batch_size={args.batch_size}"] if args.data else []),
                 *args.set]
    config = random_row_config(args.model, args.dtype, args.length, args.device, overrides)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.data:
        step, tokens_per_step = data_steps(config, sync)
    else:
        one_step, _ = random_row_step(config)

        def step():
            one_step(args.batch_size, args.length)

        def tokens_per_step():
            return args.batch_size * args.length
    for _ in range(3):  # warm-up: kernels chosen, allocator filled
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    # kernels only: operator rows repeat their kernels' time
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / args.steps / 1e3
    print(f"step: {wall * 1e3:.1f} ms wall (unprofiled), {busy:.1f} ms of GPU kernels, "
          f"{tokens_per_step() / wall:.0f} tokens/s")
    if args.device == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def data_steps(config, sync):
    """step() over the data file's micro-batches, in the first pass's order (then again); tokens_per_step(): the
    mean real tokens of the steps taken. Times each step of the first pass alone (synchronized) and prints them."""
    from loralab.data.records import read_records
    from loralab.models import load_tokenizer
    from loralab.tasks import sft
    from loralab.train.sampling import micro_batches, resolve_padding_free

    records = read_records(config.data.train, config.data.columns, limit=config.data.limit)
    data = sft.prepare(config, load_tokenizer(config.model), records, [])
    one_step, model, device = loop_step(config)
    # padding-free or padded batches, as `loralab train` decides for this model
    config = resolve_padding_free(config, model, device, contextlib.nullcontext(), Console(stderr=True))
    batches = micro_batches(data, config, 0)
    taken = {"steps": 0, "tokens": 0}

    def step():
        rows = batches[taken["steps"] % len(batches)]
        one_step([[[data.train[i] for i in row] for row in rows]])
        taken["steps"] += 1
        taken["tokens"] += sum(len(data.train[i]["input_ids"]) for row in rows for i in row)

    seconds = []
    for _ in batches:
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    ms = sorted(s * 1e3 for s in seconds[3:])
    print(f"{len(batches)} steps of the first pass, each timed alone: first three "
          f"{', '.join(f'{s * 1e3:.1f}' for s in seconds[:3])} ms, then median {ms[len(ms) // 2]:.1f}, "
          f"mean {sum(ms) / len(ms):.1f}, max {ms[-1]:.1f} ms; {taken['tokens'] / len(batches):.0f} tokens a step")
    taken.update(steps=0, tokens=0)
    return step, lambda: taken["tokens"] / max(taken["steps"], 1)


if __name__ == "__main__":
    main()
