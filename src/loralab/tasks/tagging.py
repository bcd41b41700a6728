"""Token classification (NER, event-argument extraction): BIO tags from word tags or character spans.

The first sub-token of each word (or every token of a span) carries the tag; the rest are left out of the loss and
of the scores. Metrics: entity-level precision / recall / F1, computed as seqeval does.
"""

from __future__ import annotations

from loralab.data.formats import resolve_format, to_spans, to_tokens
from loralab.data.records import Record
from loralab.data.templates import IGNORE_INDEX
from loralab.errors import LoralabError
from loralab.tasks import TaskData
from loralab.tasks.evaluation import batches, loss_sum
from loralab.tasks.metrics import entity_metrics

MAIN_METRIC = "f1"
CAUSAL = False  # an encoder with a head
LABELLED = True  # a head with one output per label


def tagged_tokens(record: Record, fmt: str, tokenizer, max_length: int) -> tuple[list[int], list[str | None], bool]:
    """(input ids, the tag of each token or None for tokens not scored, truncated?)."""
    if fmt == "tokens":
        words, tags = to_tokens(record)
        full = tokenizer(words, is_split_into_words=True)
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        token_tags, previous = [], None
        for word in encoded.word_ids():
            token_tags.append(tags[word] if word is not None and word != previous else None)
            previous = word
        return encoded["input_ids"], token_tags, len(full["input_ids"]) > max_length
    text, spans = to_spans(record)
    full = tokenizer(text)
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    token_tags, previous_span = [], None
    for start, end in encoded["offset_mapping"]:
        if start == end:  # special tokens
            token_tags.append(None)
            previous_span = None
            continue
        span = next((k for k, (s, e, _) in enumerate(spans) if start < e and end > s), None)
        if span is None:
            token_tags.append("O")
        else:  # the first token touching a span begins it, the others continue it
            token_tags.append(f"{'I' if span == previous_span else 'B'}-{spans[span][2]}")
        previous_span = span
    return encoded["input_ids"], token_tags, len(full["input_ids"]) > max_length


def record_tags(record: Record, fmt: str) -> set[str]:
    if fmt == "tokens":
        return set(to_tokens(record)[1])
    return {"O"} | {f"{p}-{label}" for *_, label in to_spans(record)[1] for p in "BI"}


def prepare(config, tokenizer, train_records: list[Record], validation_records: list[Record]) -> TaskData:
    fmt = resolve_format(config.data.format, train_records)
    if fmt not in ("tokens", "spans"):
        raise LoralabError(f"the tagging task needs tokens + tags or text + spans records, got format {fmt!r}",
                           file=train_records[0].file, field="data.format")
    if fmt == "spans" and not tokenizer.is_fast:
        raise LoralabError("span data needs a fast tokenizer (for character offsets)", field="model.path")
    tagged = {name: [(r, *tagged_tokens(r, fmt, tokenizer, config.data.max_length)) for r in records]
              for name, records in (("train", train_records), ("validation", validation_records))}
    # the label set comes from the records themselves, not from what survives truncation
    seen = set().union(*(record_tags(r, fmt) for r in train_records))
    # every entity type seen gets both its B- and I- tag, so a one-token-only type in training can still be scored
    types = sorted({t.split("-", 1)[1] for t in seen if "-" in t})
    other = sorted(t for t in seen if t != "O" and "-" not in t)
    labels = list(config.data.labels) if config.data.labels else ["O", *other, *(f"{p}-{k}" for k in types
                                                                                for p in "BI")]
    ids = {label: i for i, label in enumerate(labels)}
    data = {}
    for name, rows in tagged.items():
        examples = []
        for record, input_ids, tags, _ in rows:
            unknown = sorted(record_tags(record, fmt) - set(ids))
            if unknown:
                raise record.error(f"tag {unknown[0]!r} never occurs in the training data", "tags",
                                   fix="fix the tag, or list every tag in data.labels")
            examples.append({"input_ids": input_ids,
                             "labels": [IGNORE_INDEX if t is None else ids[t] for t in tags]})
        data[name] = examples
    stats = {"truncated": sum(t for *_, t in tagged["train"])}
    return TaskData(data["train"], data["validation"], labels, stats=stats)


def predict_tags(model, tokenizer, examples, config, device, autocast, labels) -> tuple[list, list, float]:
    gold, predicted, total, count = [], [], 0.0, 0
    for batch, output in batches(model, examples, tokenizer.pad_token_id, config.train.eval_batch_size, device,
                                 autocast):
        best = output.logits.argmax(-1)
        for row_labels, row_pred in zip(batch["labels"].tolist(), best.tolist(), strict=True):
            keep = [i for i, lab in enumerate(row_labels) if lab != IGNORE_INDEX]
            gold.append([labels[row_labels[i]] for i in keep])
            predicted.append([labels[row_pred[i]] for i in keep])
        s, n = loss_sum(output.loss, batch["labels"])
        total, count = total + s, count + n
    return gold, predicted, total / max(count, 1)


def evaluate(model, tokenizer, data: TaskData, config, device, autocast) -> dict:
    gold, predicted, loss = predict_tags(model, tokenizer, data.validation, config, device, autocast, data.labels)
    return {"loss": loss, **entity_metrics(gold, predicted)}
