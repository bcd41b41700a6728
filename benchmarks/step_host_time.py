"""The host's share of a training step: loralab (eager, compiled per block) against HF PEFT +
transformers Trainer, on a model so narrow that its kernels cost next to nothing.

    python benchmarks/step_host_time.py                    # Llama-1B's depth (16 blocks), widths of 16
    python benchmarks/step_host_time.py --layers 32        # Llama-8B's depth
    python benchmarks/step_host_time.py --base /tmp/llama-1b --dtype bf16 --batch-size 1 --length 2048
                                                           # a real model's widths: the whole step, not the host's share

A small model's step on a fast GPU is bound by the host: Python, operator dispatch, compiled code's guards and
wrappers, kernel launches (BENCHMARKS.md, GPU section). Shrinking every width to 16 (2 heads of 8, MLP 32, 1,000
words) while keeping the depth leaves a step whose time is that host work alone, on any machine. Rows are 15
tokens, under the length where loralab's CPU attention splits queries into chunks, so both sides run one
attention call per layer, as on a GPU. Each setting runs in its own fresh process (compiled code is
process-wide): loralab's train_step + optimizer_step, and the peer's real `Trainer.train()` timed between its
step callbacks (its batch is already collated then; loralab's time includes collating). Reported: the median
of the timed steps after warm-up (compiling included in the warm-up), and the peer's time over each setting's.
On a GPU one more setting runs: the compiled blocks with torch's CUDA graphs (`TORCHINDUCTOR_CUDAGRAPHS=1`).
With --base, the same settings time a real model folder's steps (kernels included) and report each one's peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import peak_bytes, random_row_config, random_row_step, run_side, train_peer_on_random_rows
from rich.console import Console
from rich.table import Table

SETTINGS = {"PEFT + Trainer": None, "loralab": [],
            "loralab train.compile=true, CUDA graphs": ["train.compile=true"],
            "loralab train.compile=true": ["train.compile=true"]}
# torch's own switch: inductor records each compiled graph (forward and backward) as a CUDA graph and replays it,
# one launch for all its kernels; GPU only (fixed shapes here, so one recording)
SETTING_ENV = {"loralab train.compile=true, CUDA graphs": {"TORCHINDUCTOR_CUDAGRAPHS": "1"}}
WARMUP = 5


def narrow_llama(folder: Path, layers: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def time_loralab(args, overrides: list[str]) -> list[float]:
    config = random_row_config(args.model, args.dtype, args.length, args.device, overrides)
    step, device = random_row_step(config)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for _ in range(WARMUP + args.steps):
        start = time.perf_counter()
        step(args.batch_size, args.length)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds[WARMUP:]


def time_peer(args) -> list[float]:
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    seconds = []

    class TimeSteps(TrainerCallback):
        def on_step_begin(self, training_args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, training_args, state, control, **kwargs):
            sync()
            seconds.append(time.perf_counter() - self.start)

    train_peer_on_random_rows(args.model, args.dtype, args.batch_size, args.length, WARMUP + args.steps, args.device,
                              TimeSteps())
    return seconds[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40, help="timed steps, after warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", help="a model folder to time instead of the narrow one (its real widths)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # set for the sides
    parser.add_argument("--side", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        overrides = SETTINGS[args.side]
        seconds = time_peer(args) if overrides is None else time_loralab(args, overrides)
        print(json.dumps({"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
                          "peak_gib": peak_bytes(args.device) / 2**30}))
        return

    with tempfile.TemporaryDirectory() as folder:
        if not args.base:
            narrow_llama(Path(folder), args.layers)
        argv = [*sys.argv[1:], "--model", args.base or folder]
        results = {}
        for name in SETTINGS:
            if args.device == "cuda" or name not in SETTING_ENV:
                results[name] = run_side(__file__, name, argv, SETTING_ENV.get(name))
                print(name, json.dumps(results[name]), flush=True)  # kept if a later setting runs out of time
    peer = results["PEFT + Trainer"]["median_ms"]
    shape = f"{args.base}, {args.dtype}" if args.base else f"{args.layers} blocks of width 16"
    table = Table(title=f"{'time' if args.base else 'host time'} of one optimizer step: {shape}, {args.batch_size} x "
                        f"{args.length} tokens, {args.device} ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    for column in ("setting", "median ms", "min ms", "peer / this", "peak GiB"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for name, result in results.items():
        table.add_row(name, f"{result['median_ms']:.1f}", f"{result['min_ms']:.1f}",
                      f"{peer / result['median_ms']:.2f}x", f"{result['peak_gib']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
