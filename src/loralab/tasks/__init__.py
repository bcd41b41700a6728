"""Tasks: how records become training examples and how a model is scored on them.

Each task module has `prepare(config, tokenizer, train_records, validation_records) -> TaskData` and
`evaluate(model, tokenizer, data, config, device, autocast) -> dict` and names its main metric.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from loralab.errors import LoralabError, did_you_mean


@dataclass
class TaskData:
    train: list[dict]
    validation: list[dict]
    labels: list[str] | None = None  # classification / tagging label names, id order
    stats: dict = field(default_factory=dict)  # truncated, without_trainable_tokens, ...
    extra: dict = field(default_factory=dict)  # what evaluate needs besides examples (texts, gold labels, ...)


MODULES = {"sft": "sft", "classification": "classification", "tagging": "tagging",
           "generate-classify": "generate_classify"}


def get_task(name: str):
    if name not in MODULES:
        raise LoralabError(f"unknown task {name!r}", field="task", fix=did_you_mean(name, MODULES))
    return importlib.import_module(f"loralab.tasks.{MODULES[name]}")
