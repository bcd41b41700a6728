"""Metrics shared by the tasks: accuracy, macro P/R/F1, and entity-level P/R/F1 computed as seqeval does."""

from __future__ import annotations


def classification_metrics(gold: list, predicted: list) -> dict:
    """Accuracy and macro-averaged precision / recall / F1 over the labels that occur in gold or predictions."""
    labels = sorted(set(gold) | set(predicted), key=str)
    precisions, recalls, f1s = [], [], []
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        pred_n = sum(p == label for p in predicted)
        gold_n = sum(g == label for g in gold)
        p = tp / pred_n if pred_n else 0.0
        r = tp / gold_n if gold_n else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    n = len(labels) or 1
    accuracy = sum(g == p for g, p in zip(gold, predicted, strict=True)) / max(len(gold), 1)
    return {"accuracy": accuracy, "macro_precision": sum(precisions) / n, "macro_recall": sum(recalls) / n,
            "macro_f1": sum(f1s) / n}


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) chunks of a BIO/IOB sequence, with seqeval's default (lenient) rules: an I- after O or
    after another type starts a new chunk, as does any B-."""
    chunks = set()
    kind, start = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-") if tag != "O" else ("O", "", "")
        ends = kind is not None and (prefix in ("O", "B") or label != kind)
        if ends:
            chunks.add((kind, start, i - 1))
            kind = None
        if prefix == "B" or (prefix == "I" and kind is None):
            kind, start = label, i
    return chunks


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Micro precision / recall / F1 over entities, as seqeval.metrics.{precision,recall,f1}_score."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, predicted, strict=True):
        gold_chunks = {(k, s, e) for k, s, e in bio_entities(g)}
        pred_chunks = {(k, s, e) for k, s, e in bio_entities(p)}
        tp += len(gold_chunks & pred_chunks)
        n_pred += len(pred_chunks)
        n_gold += len(gold_chunks)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
