"""Tasks: how records become training examples and how a model is scored on them. Each task is a module that
provides what `Task` lists; `get_task(name)` returns it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

from loralab.errors import LoralabError, did_you_mean


@dataclass
class TaskData:
    train: list[dict]
    validation: list[dict]
    labels: list[str] | None = None  # classification / tagging label names, id order
    stats: dict = field(default_factory=dict)  # truncated, without_trainable_tokens, ...
    extra: dict = field(default_factory=dict)  # what evaluate needs besides examples (texts, gold labels, ...)


class Task(Protocol):
    """What a task module provides (the optional `samples(model, tokenizer, data, config, device, autocast) ->
    list[str]` gives answers to show before and after training)."""

    MAIN_METRIC: str  # what train.best_metric=auto picks the best checkpoint by
    CAUSAL: bool  # trained as a causal LM (next-token loss, causal attention), else an encoder with a head
    LABELLED: bool  # a head with one output per label (classification, tagging)

    def prepare(self, config, tokenizer, train_records: list, validation_records: list) -> TaskData: ...

    def evaluate(self, model, tokenizer, data: TaskData, config, device, autocast) -> dict: ...


MODULES = {"sft": "sft", "classification": "classification", "tagging": "tagging",
           "generate-classify": "generate_classify"}


def get_task(name: str) -> Task:
    if name not in MODULES:
        raise LoralabError(f"unknown task {name!r}", field="task", fix=did_you_mean(name, MODULES))
    return importlib.import_module(f"loralab.tasks.{MODULES[name]}")
