"""The run's report: what was trained, how fast, how much memory, and how well, as report.json and report.md."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from loralab.files import write_text_atomically

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """CUDA: the allocator's peak; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak process RSS"


def size_on_disk(path: Path, gguf_file: str | None = None) -> int | None:
    """Bytes of weight files in a folder (just the named file for GGUF); None when it is not a local folder."""
    if not path.is_dir():
        return None
    if gguf_file:
        return (path / gguf_file).stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):  # powers of 1024, named so (budgets are given as 24GiB)
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def write_report(run_dir: Path, report: dict) -> None:
    write_text_atomically(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(run_dir / "report.md", render_markdown(report))


def render_markdown(r: dict) -> str:
    lines = [f"# Run {r['name']}", "",
             f"- task: {r['task']}, method: {r['method']}, model: `{r['model']}`",
             f"- {r['parameters']}",
             f"- output: `{r['output']}` {human_bytes(r['output_bytes'])}; base model on disk "
             f"{human_bytes(r['base_model_bytes'])}",
             f"- data: {r['data']['train_examples']} training / {r['data']['validation_examples']} validation "
             f"examples; truncated to max_length: {r['data'].get('truncated', 0)}; left out (no trainable token): "
             f"{r['data'].get('without_trainable_tokens', 0)}"]
    counts = r["data"].get("label_counts")
    if counts:
        total = sum(counts.values()) or 1
        line = "- labels in training: " + ", ".join(f"{k} {v:,} ({v / total:.1%})" for k, v in counts.items())
        if r["data"].get("majority_baseline_accuracy") is not None:
            line += (f"; always answering the most frequent ({r['data']['majority_label']}) scores accuracy "
                     f"{r['data']['majority_baseline_accuracy']:.4f} on validation")
        lines.append(line)
    if r.get("speedups"):
        lines.append(f"- speed techniques on: {', '.join(r['speedups'])}")
    if r.get("fresh_modules"):
        lines.append(f"- initialised fresh (missing from the checkpoint) and trained in full: "
                     f"{', '.join(r['fresh_modules'])}")
    lines += [f"- time: {r['total_seconds']:.1f} s in optimizer steps; per epoch (evaluation included): "
              f"{', '.join(f'{t:.1f} s' for t in r['epoch_seconds'])}",
              f"- speed: {r['tokens_per_second']:.0f} tokens/s (non-padding tokens), {r['steps']} optimizer steps",
              f"- peak memory: {human_bytes(r['peak_memory_bytes'])} ({r['peak_memory_kind']})",
              f"- device: {r['device']}, dtype: {r['dtype']}"
              + (f"; frozen base quantised: {r['base_quantization']}" if r.get("base_quantization") else "")]
    if r.get("best"):
        b = r["best"]
        lines.append(f"- best {b['metric']}: {b['value']:.4f} at step {b['step']} (epoch {b['epoch']:.2f}); "
                     f"the saved output holds these weights")
    evals = r.get("evaluations", [])
    if evals:
        names = list(evals[-1]["metrics"])
        lines += ["", "## Evaluations", "", "| step | epoch | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for e in evals:
            lines.append(f"| {e['step']} | {e['epoch']:.2f} | "
                         + " | ".join(f"{e['metrics'].get(n, float('nan')):.4f}" for n in names) + " |")
    if r.get("sample_answers"):
        lines += ["", "## Validation prompts answered before and after training", ""]
        for i, pair in enumerate(r["sample_answers"], 1):
            lines += [f"{i}. before: {pair['before']!r}", f"   after: {pair['after']!r}"]
    return "\n".join(lines) + "\n"
