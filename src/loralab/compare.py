"""`loralab compare RUN_DIR...`: the table seed 000 builds by hand (full fine-tuning vs LoRA at several ranks:
size, time per epoch, memory, best metric and when it came) plus plots, from the runs' own reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from loralab.errors import LoralabError
from loralab.train.report import human_bytes

COLUMNS = ["variant", "method", "r", "alpha", "target_modules", "trainable_params", "adapter_size", "epoch_seconds",
           "total_seconds", "tokens_per_second", "peak_memory", "best_metric", "best_value", "best_epoch"]


def read_run(run_dir: Path) -> dict:
    report_file, config_file = run_dir / "report.json", run_dir / "config.yaml"
    if not report_file.is_file() or not config_file.is_file():
        raise LoralabError("not a finished loralab run (no report.json / config.yaml)", file=str(run_dir),
                           fix="point at runs/<name> folders of finished runs")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    losses = []
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        losses = [(e["step"], e["loss"]) for e in map(json.loads, metrics_file.open(encoding="utf-8")) if "loss" in e]
    return {"dir": run_dir, "report": report, "config": config, "losses": losses}


def summary_row(run: dict) -> dict:
    r, c = run["report"], run["config"]
    lora = c["method"] == "lora"
    best = r.get("best") or {}
    epochs = r.get("epoch_seconds") or []
    targets = c["lora"]["target_modules"]
    return {
        "variant": r["name"], "method": c["method"], "r": c["lora"]["r"] if lora else "",
        "alpha": c["lora"]["alpha"] if lora else "",
        "target_modules": ("default" if targets is None else ",".join(targets) if isinstance(targets, list)
                           else targets) if lora else "all",
        "trainable_params": r.get("trainable_params", ""), "adapter_size": r["output_bytes"],
        "epoch_seconds": round(sum(epochs) / len(epochs), 2) if epochs else "",
        "total_seconds": round(r["total_seconds"], 2), "tokens_per_second": round(r["tokens_per_second"], 1),
        "peak_memory": r["peak_memory_bytes"], "best_metric": best.get("metric", ""),
        "best_value": round(best["value"], 4) if best else "", "best_epoch": round(best["epoch"], 2) if best else "",
    }


def compare(run_dirs: list[str], out: str) -> tuple[list[dict], Path]:
    if not run_dirs:
        raise LoralabError("no runs to compare", fix="loralab compare runs/a runs/b ...")
    runs = [read_run(Path(d)) for d in run_dirs]
    tasks = {run["report"]["task"] for run in runs}
    if len(tasks) > 1:
        raise LoralabError(f"these runs are of different tasks ({', '.join(sorted(tasks))}); their metrics do not "
                           "compare", fix="compare runs of one task")
    rows = [summary_row(run) for run in runs]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plots = make_plots(runs, out_dir)
    (out_dir / "report.md").write_text(markdown(rows, plots), encoding="utf-8")
    return rows, out_dir


def markdown(rows: list[dict], plots: list[str]) -> str:
    header = ["variant", "method", "r", "alpha", "targets", "trainable params", "adapter size", "time/epoch (s)",
              "total (s)", "tokens/s", "peak memory", "best", "at epoch"]
    lines = ["# Comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        best = f"{r['best_metric']} {r['best_value']}" if r["best_metric"] else ""
        lines.append("| " + " | ".join(str(x) for x in (
            r["variant"], r["method"], r["r"], r["alpha"], r["target_modules"], f"{r['trainable_params']:,}",
            human_bytes(r["adapter_size"]), r["epoch_seconds"], r["total_seconds"], r["tokens_per_second"],
            human_bytes(r["peak_memory"]), best, r["best_epoch"])) + " |")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def make_plots(runs: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = []
    metric = next((r["report"]["best"]["metric"] for r in runs if r["report"].get("best")), None)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = run["report"]["name"]
        evals = run["report"].get("evaluations", [])
        if metric and evals:
            axes[0].plot([e["epoch"] for e in evals], [e["metrics"][metric] for e in evals], marker="o", label=label)
        if run["losses"]:
            steps, losses = zip(*run["losses"], strict=True)
            axes[1].plot(steps, losses, label=label)
    axes[0].set(title=f"validation {metric} per epoch", xlabel="epoch", ylabel=metric)
    axes[1].set(title="training loss", xlabel="optimizer step", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=110)
    plt.close(fig)
    names.append("curves.png")

    lora = sorted((r for r in runs if r["config"]["method"] == "lora"), key=lambda r: r["config"]["lora"]["r"])
    full = [r for r in runs if r["config"]["method"] == "full"]
    if lora and metric:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ranks = [r["config"]["lora"]["r"] for r in lora]
        best = [r["report"]["best"]["value"] if r["report"].get("best") else float("nan") for r in lora]
        memory = [r["report"]["peak_memory_bytes"] / 2**20 for r in lora]
        axes[0].plot(ranks, best, marker="o", label="LoRA")
        axes[1].plot(ranks, memory, marker="o", label="LoRA")
        for run in full:
            if run["report"].get("best"):
                axes[0].axhline(run["report"]["best"]["value"], color="grey", linestyle="--", label="full fine-tuning")
            axes[1].axhline(run["report"]["peak_memory_bytes"] / 2**20, color="grey", linestyle="--",
                            label="full fine-tuning")
        axes[0].set(title=f"best {metric} vs rank", xlabel="r", ylabel=metric, xscale="log", xticks=ranks)
        axes[1].set(title=f"peak memory vs rank ({lora[0]['report']['peak_memory_kind']})", xlabel="r",
                    ylabel="MiB", xscale="log", xticks=ranks)
        top = max(memory + [r["report"]["peak_memory_bytes"] / 2**20 for r in full])
        axes[1].set_ylim(0, top * 1.15)  # memory from zero, so differences are not exaggerated
        for ax in axes:
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticklabels([str(r) for r in ranks])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "by_rank.png", dpi=110)
        plt.close(fig)
        names.append("by_rank.png")
    return names
