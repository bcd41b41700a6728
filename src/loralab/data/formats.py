"""Recognise a record's format and turn it into what the tasks consume.

Formats: alpaca (instruction, input, output, optional system and history), messages (OpenAI role/content or
sharegpt from/value, multi-turn, system), text (raw text), classification (text [, text_pair], label),
spans (text + [[start, end, label], ...]) and tokens (tokens + tags).
"""

from __future__ import annotations

from loralab.data.records import Record
from loralab.errors import LoralabError, did_you_mean

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}


def detect_format(record: Record) -> str:
    keys = set(record.data)
    for fmt, needed in (("messages", {"messages"}), ("messages", {"conversations"}), ("alpaca", {"instruction"}),
                        ("tokens", {"tokens", "tags"}), ("spans", {"text", "spans"}),
                        ("classification", {"text", "label"}), ("text", {"text"})):
        if needed <= keys:
            return fmt
    raise record.error(f"cannot tell the data format from the fields {sorted(keys)}", fix=(
        "set data.format (alpaca, messages, text, classification, spans, tokens) and map your columns with "
        "data.columns, e.g. data.columns.text=sentence"))


def resolve_format(fmt: str, records: list[Record]) -> str:
    return detect_format(records[0]) if fmt == "auto" else fmt


def to_conversation(record: Record, fmt: str) -> list[dict]:
    """A chat as [{"role": ..., "content": ...}]; raw text is one assistant turn with no prompt."""
    if fmt == "alpaca":
        turns = []
        if record.data.get("system"):
            turns.append({"role": "system", "content": record.get("system")})
        for i, pair in enumerate(record.get("history", list, required=False) or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise record.error(f"history[{i}] must be a [question, answer] pair of strings", "history")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = record.get("instruction")
        extra = record.get("input", required=False, empty_ok=True)
        turns.append({"role": "user", "content": f"{prompt}\n{extra}" if extra else prompt})
        turns.append({"role": "assistant", "content": record.get("output")})
        return turns
    if fmt == "messages":
        field = "messages" if "messages" in record.data else "conversations"
        turns = []
        for i, message in enumerate(record.get(field, list)):
            where = f"{field}[{i}]"
            if not isinstance(message, dict):
                raise record.error("each message must be an object", where)
            role = message.get("role", message.get("from"))
            content = message.get("content", message.get("value"))
            if role not in ROLES:
                raise record.error(f"unknown role {role!r}", f"{where}.role",
                                   fix=did_you_mean(role, ROLES))
            if not isinstance(content, str):
                raise record.error("missing or non-text content", f"{where}.content")
            turns.append({"role": ROLES[role], "content": content})
        if not any(t["role"] == "assistant" for t in turns):
            raise record.error("the conversation has no assistant turn to learn from", field)
        return turns
    if fmt == "text":
        return [{"role": "assistant", "content": record.get("text")}]
    raise LoralabError(f"format {fmt!r} does not hold chat or instruction data", file=record.file,
                       field="data.format", fix="use alpaca, messages or text for the sft task")


def label_of(record: Record) -> str:
    value = record.get("label", (str, int))
    return str(value)


def to_classification(record: Record) -> tuple[str, str | None, str]:
    return record.get("text"), record.get("text_pair", required=False), label_of(record)


def to_spans(record: Record) -> tuple[str, list[tuple[int, int, str]]]:
    """Character spans [start, end) with labels, checked against the text and each other."""
    text = record.get("text")
    spans = []
    for i, span in enumerate(record.get("spans", list, empty_ok=True)):
        where = f"spans[{i}]"
        if not (isinstance(span, (list, tuple)) and len(span) == 3 and all(isinstance(x, int) for x in span[:2])):
            raise record.error("a span must be [start, end, label] with integer offsets", where)
        start, end, label = span
        if start >= end:
            raise record.error(f"the span ends at {end}, not after its start {start}", where,
                               fix="write spans as [start, end, label] with start < end (end exclusive)")
        if not 0 <= start < end <= len(text):
            raise record.error(f"offsets [{start}, {end}) fall outside the text (length {len(text)})", where,
                               fix="character offsets, end exclusive")
        spans.append((start, end, str(label)))
    spans.sort()
    for (s1, e1, _), (s2, _, _) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise record.error(f"spans [{s1}, {e1}) and one starting at {s2} overlap", "spans",
                               fix="BIO tagging needs non-overlapping spans; keep one of them")
    return text, spans


def to_tokens(record: Record) -> tuple[list[str], list[str]]:
    tokens = record.get("tokens", list)
    tags = record.get("tags", list)
    if len(tokens) != len(tags):
        raise record.error(f"{len(tokens)} tokens but {len(tags)} tags", "tags", fix="one tag per token")
    return [str(t) for t in tokens], [str(t) for t in tags]
