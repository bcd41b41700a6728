"""Peak RSS over a few full-length training steps on CPU, to see what a setting does to memory without a whole run.

    python benchmarks/step_memory.py --model /tmp/bench/base --set train.compile=true
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/step_memory.py --model /tmp/bench/base --set train.compile=true

Runs the training loop's own step functions: two short steps (compiling, where compiled), then `--steps` steps of
batch x length random tokens, printing the process's peak RSS (VmHWM) after each. With glibc's heap made to return
every block above 128 KiB at once (the second command) the peak is close to the live tensors' peak; the gap between
the two commands is what the heap keeps in freed holes.
"""

from __future__ import annotations

import argparse
import time

from common import random_row_config, random_row_step


def peak_rss_gib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="loralab overrides, e.g. train.compile=true")
    args = parser.parse_args()

    config = random_row_config(args.model, args.dtype, args.length, "cpu", args.set)
    step, _ = random_row_step(config)
    print(f"model loaded: peak RSS {peak_rss_gib():.2f} GiB")
    start = time.perf_counter()
    for length in (37, 61):
        step(args.batch_size, length)
    print(f"two short steps (compiling, where compiled): {time.perf_counter() - start:.1f} s, "
          f"peak RSS {peak_rss_gib():.2f} GiB")
    for i in range(args.steps):
        start = time.perf_counter()
        step(args.batch_size, args.length)
        print(f"{args.batch_size} x {args.length} step {i + 1}: {time.perf_counter() - start:.1f} s, "
              f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
