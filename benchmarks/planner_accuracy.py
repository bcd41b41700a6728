"""The memory planner (`loralab estimate`) against the peak of real training steps, on the device you have.

    python benchmarks/random_base.py llama-1b /tmp/llama-1b
    python benchmarks/planner_accuracy.py --model /tmp/llama-1b --batch-size 4 --max-length 2048 --checkpointing 0 1 2

For each setting, a fresh process loads the model as `loralab train` does and runs a few optimizer steps of the
training loop's own step functions on full rows (batch x max_length random tokens, every position scored: the
planner's worst case). Measured: torch.cuda.max_memory_allocated over the whole process (load included) on a GPU,
the process's peak RSS on CPU (which also holds the interpreter and libraries, roughly 0.4 GiB, that the planner
leaves out). The planner's figure comes from config.json alone, on fake tensors.

On CPU the peak RSS also holds what glibc's heap keeps of freed memory, so each setting runs a second time with
every allocation above 128 KiB served by mmap (MALLOC_MMAP_THRESHOLD_=131072: a free goes straight back to the
system). Its steps' rise above the resident memory before them (after a warm-up step, the heap trimmed) is what
the steps hold at once, the planner's `step_peak` (gradients, activations, temporaries, the loss's buffers).

With `--budget 2GiB` it checks `train.batch_size: auto` instead: each setting plans its batch for that budget as
`loralab train` does, then trains on full rows of it, with the memory as users have it (glibc's heap as it is; on
a GPU the allocator's reserved memory plus the CUDA context), and reports the peak against the budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch
from common import peak_bytes, random_row_step, run_side
from rich.console import Console
from rich.table import Table


def run_config(args, checkpointing: int) -> dict:
    return {"task": "sft", "model": {"path": args.model, "dtype": args.dtype, "quantize": args.quantize},
            "lora": {"r": args.r, "alpha": 2 * args.r, "dropout": args.dropout, "target_modules": args.targets},
            "data": {"train": "unused.json", "max_length": args.max_length},  # rows are made up here
            "train": {"batch_size": "auto" if args.budget else args.batch_size, "device": args.device,
                      "global_batch": 1024, "memory_budget": args.budget,
                      "gradient_checkpointing": checkpointing if checkpointing > 1 else bool(checkpointing)}}


def measure_fit(args, checkpointing: int) -> dict:
    """The batch `train` plans for the budget, trained on full rows: the whole process's peak."""
    from loralab.config import load_config
    from loralab.errors import LoralabError
    from loralab.estimate import memory_budget
    from loralab.fast.cuda_allocator import use_expandable_segments
    from loralab.train.batch_plan import with_planned_batch

    if args.device == "cuda":
        use_expandable_segments()  # as `train` runs
    config = load_config(None, base=run_config(args, checkpointing))
    held = memory_budget(args.budget, args.device).held  # what the planner leaves out, held before it plans
    try:
        config = with_planned_batch(config, Console(stderr=True))
    except LoralabError:  # not even one row fits
        return {"batch": 0, "peak_bytes": 0, "held": held}
    device = torch.device(args.device)
    outside = 0  # on a GPU: the CUDA context and other processes, held on the device outside torch's count
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        outside = total - free - torch.cuda.memory_reserved(device)
    step, _ = random_row_step(config)
    for _ in range(args.steps):
        step(config.train.batch_size, args.max_length)
    if device.type != "cuda":
        return {"batch": config.train.batch_size, "peak_bytes": peak_bytes("cpu"), "held": held}
    return {"batch": config.train.batch_size, "peak_bytes": torch.cuda.max_memory_reserved(device) + outside,
            "held": held, "allocated": torch.cuda.max_memory_allocated(device), "outside": outside}


def measure(args, checkpointing: int) -> dict:
    """A few steps of the training loop's step functions on full rows; the process's peak memory."""
    from loralab.config import load_config

    step, device = random_row_step(load_config(None, base=run_config(args, checkpointing)))
    if device.type == "cuda":
        for _ in range(args.steps):
            step(args.batch_size, args.max_length)
        return {"peak_bytes": peak_bytes(device.type)}
    from loralab.estimate import resident_bytes
    from loralab.fast.heap import release_free_heap

    step(args.batch_size, args.max_length)  # warm-up: optimizer states, kernels, the weights' pages read in
    release_free_heap()
    before = resident_bytes()
    load_and_warm_up = peak_bytes("cpu")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # restart the peak-RSS count (ru_maxrss reads the same counter)
    for _ in range(args.steps):
        step(args.batch_size, args.max_length)
    steps_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": max(load_and_warm_up, steps_peak), "step_bytes": steps_peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder (config.json and weights)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--checkpointing", type=int, nargs="+", default=[0, 1],
                        help="settings to measure: 0 none, 1 every layer, N every N-th layer")
    parser.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default="none",
                        help="the frozen base in 4 or 8 bits (bitsandbytes)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", help="check batch_size auto: the batch planned for this budget, e.g. 2GiB")
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)  # measure one checkpointing setting
    args = parser.parse_args()
    if args.side is not None:
        print(json.dumps((measure_fit if args.budget else measure)(args, args.side)))
        return
    if args.budget:
        fit_table(args)
        return

    from loralab.config import load_config
    from loralab.estimate import estimate_memory

    argv = sys.argv[1:]
    table = Table(title=f"planner vs measured: {args.model}, {args.dtype}, batch {args.batch_size} x "
                        f"{args.max_length} tokens, LoRA r={args.r} on {', '.join(args.targets)}, {args.device} "
                        f"({'CUDA max allocated' if args.device == 'cuda' else 'peak RSS, with the interpreter'})")
    columns = ["gradient checkpointing", "planner GiB", "measured GiB", "planner / measured"]
    if args.device == "cpu":
        columns += ["planned step GiB", "step holds GiB (frees returned)", "planned / held"]
    for column in columns:
        table.add_column(column, justify="right")
    results = []
    for every in args.checkpointing:
        (predicted,) = estimate_memory(load_config(None, base=run_config(args, every)), [args.batch_size])
        measured = run_side(__file__, str(every), argv)["peak_bytes"]
        result = {"checkpointing": every, "predicted": predicted.total, "measured": measured}
        row = [{0: "none", 1: "every layer"}.get(every, f"every {every} layers"),
               f"{predicted.total / 2**30:.2f}", f"{measured / 2**30:.2f}", f"{predicted.total / measured:.2f}"]
        if args.device == "cpu":
            held = run_side(__file__, str(every), argv, env={"MALLOC_MMAP_THRESHOLD_": "131072"})["step_bytes"]
            result.update(predicted_step=predicted.step_peak, step_held=held)
            row += [f"{predicted.step_peak / 2**30:.2f}", f"{held / 2**30:.2f}", f"{predicted.step_peak / held:.2f}"]
        results.append(result)
        table.add_row(*row)
    Console().print(table)
    print(json.dumps(results))


def fit_table(args) -> None:
    from loralab.config import load_config
    from loralab.estimate import estimate_memory, parse_bytes

    budget = parse_bytes(args.budget)
    table = Table(title=f"batch_size auto within {args.budget}: {args.model}, {args.dtype}, rows of "
                        f"{args.max_length} tokens, LoRA r={args.r} on {', '.join(args.targets)}, {args.device} "
                        f"({'reserved + CUDA context' if args.device == 'cuda' else 'peak RSS of the process'})")
    for column in ("checkpointing", "batch", "planner GiB", "held GiB", "peak GiB", "(peak-held)/planner",
                   "peak/budget"):
        table.add_column(column, justify="right")
    results = []
    for every in args.checkpointing:
        measured = run_side(__file__, str(every), sys.argv[1:])
        name = {0: "none", 1: "every layer"}.get(every, f"every {every} layers")
        if not measured["batch"]:
            table.add_row(name, "none fits", *[""] * 5)
            continue
        settings = run_config(args, every)
        settings["train"]["batch_size"] = measured["batch"]
        (planned,) = estimate_memory(load_config(None, base=settings), [measured["batch"]])
        peak, held = measured["peak_bytes"], measured["held"]
        results.append({"checkpointing": every, "batch": measured["batch"], "predicted": planned.total,
                        "held": held, "peak": peak, "budget": budget,
                        **{key: measured[key] for key in ("allocated", "outside") if key in measured}})
        table.add_row(name, str(measured["batch"]),
                      f"{planned.total / 2**30:.2f}", f"{held / 2**30:.2f}", f"{peak / 2**30:.2f}",
                      f"{(peak - held) / planned.total:.2f}", f"{peak / budget:.2f}")
    Console(width=120).print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
