"""Sequence classification: text (and optionally text_pair) -> one label. Metrics: accuracy, macro P/R/F1."""

from __future__ import annotations

from collections import Counter

from loralab.data.formats import resolve_format, to_classification
from loralab.data.records import Record
from loralab.errors import LoralabError
from loralab.tasks import TaskData
from loralab.tasks.evaluation import batches, loss_sum
from loralab.tasks.metrics import classification_metrics

MAIN_METRIC = "accuracy"
CAUSAL = False  # an encoder with a head
LABELLED = True  # a head with one output per label


def label_set(records: list[Record], declared: list[str] | None) -> list[str]:
    """The labels in id order: as declared in the config, else sorted (numerically when they are numbers)."""
    if declared:
        return [str(label) for label in declared]
    seen = {to_classification(r)[2] for r in records}
    return sorted(seen, key=lambda x: (0, int(x)) if x.lstrip("-").isdigit() else (1, x))


def encode(records: list[Record], tokenizer, max_length: int, labels: list[str]) -> tuple[list[dict], int]:
    ids = {label: i for i, label in enumerate(labels)}
    examples, truncated = [], 0
    for record in records:
        text, pair, label = to_classification(record)
        if label not in ids:
            raise record.error(f"label {label!r} never occurs in the training data (labels: {', '.join(labels)})",
                               "label", fix="fix the label, or list every label in data.labels")
        encoded = tokenizer(text, pair, truncation=True, max_length=max_length)
        truncated += len(tokenizer(text, pair)["input_ids"]) > max_length
        example = {"input_ids": encoded["input_ids"], "labels": ids[label]}
        if "token_type_ids" in encoded:
            example["token_type_ids"] = encoded["token_type_ids"]
        examples.append(example)
    return examples, truncated


def prepare(config, tokenizer, train_records: list[Record], validation_records: list[Record]) -> TaskData:
    fmt = resolve_format(config.data.format, train_records)
    if fmt != "classification":
        raise LoralabError(f"the classification task needs text + label records, got format {fmt!r}",
                           file=train_records[0].file, field="data.format",
                           fix="map your columns, e.g. data.columns.text=sentence data.columns.label=label")
    labels = label_set(train_records, config.data.labels)
    if len(labels) < 2:
        raise LoralabError(f"only one label ({labels[0]!r}) in the training data", file=train_records[0].file,
                           field="label", fix="classification needs at least two labels")
    train, truncated = encode(train_records, tokenizer, config.data.max_length, labels)
    validation, _ = encode(validation_records, tokenizer, config.data.max_length, labels)
    return TaskData(train, validation, labels, stats={"truncated": truncated, **label_baseline(train, validation,
                                                                                               labels)})


def label_baseline(train: list[dict], validation: list[dict], labels: list[str]) -> dict:
    """How often each label occurs in training, and the validation accuracy of always answering the most frequent
    one: the score a classifier that learnt nothing reaches, shown beside the real one."""
    counts = Counter(example["labels"] for example in train)
    majority = max(range(len(labels)), key=lambda i: counts[i])
    stats = {"label_counts": {label: counts[i] for i, label in enumerate(labels)}, "majority_label": labels[majority]}
    if validation:
        stats["majority_baseline_accuracy"] = sum(e["labels"] == majority for e in validation) / len(validation)
    return stats


def evaluate(model, tokenizer, data: TaskData, config, device, autocast) -> dict:
    gold, predicted, total, count = [], [], 0.0, 0
    for batch, output in batches(model, data.validation, tokenizer.pad_token_id, config.train.eval_batch_size,
                                 device, autocast):
        gold += batch["labels"].tolist()
        predicted += output.logits.argmax(-1).tolist()
        s, n = loss_sum(output.loss, batch["labels"])
        total, count = total + s, count + n
    return {"loss": total / max(count, 1), **classification_metrics(gold, predicted)}
