"""Where one loralab training step spends its time: torch.profiler over a few steps of the loop's own step
functions, on rows of the length SFT data has (alpaca: about 200 tokens).

    python benchmarks/profile_step.py --model /tmp/llama-1b --batch-size 4 --length 200

Prints the step's wall time, the GPU's busy time within it (the sum of kernel times), and the operators that cost
the most device and host time. A step whose kernels fill a small share of its wall time is bound by the host
(Python and kernel launches), not by the GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import random_row_config, random_row_step
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="loralab overrides, e.g. train.compile=true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = random_row_config(args.model, args.dtype, args.length, args.device, args.set)
    one_step, device = random_row_step(config)

    def step():
        one_step(args.batch_size, args.length)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: kernels chosen, allocator filled
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    # kernels only: operator rows repeat their kernels' time
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / args.steps / 1e3
    print(f"step: {wall * 1e3:.1f} ms wall (unprofiled), {busy:.1f} ms of GPU kernels, "
          f"{args.batch_size * args.length / wall:.0f} tokens/s")
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
