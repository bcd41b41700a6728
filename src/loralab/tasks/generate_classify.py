"""Classification by generation (seed 004): a causal LM learns to write the label as text after the prompt, and
is scored by generating greedily and comparing the answer with the gold label (exact match after trimming)."""

from __future__ import annotations

import torch

from loralab.data.collate import pad_batch
from loralab.data.formats import resolve_format, to_classification, to_conversation
from loralab.data.records import Record
from loralab.data.templates import encode_chat, encode_prompt, resolve_template
from loralab.errors import LoralabError
from loralab.tasks import TaskData
from loralab.tasks.metrics import classification_metrics
from loralab.tasks.sft import evaluate as sft_evaluate

MAIN_METRIC = "accuracy"


def labelled_turns(record: Record, fmt: str) -> tuple[list[dict], str]:
    if fmt == "classification":
        text, pair, label = to_classification(record)
        prompt = text if pair is None else f"{text}\n{pair}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": label}], label
    if fmt in ("alpaca", "messages"):
        turns = to_conversation(record, fmt)
        return turns, turns[-1]["content"]
    raise LoralabError(f"generate-classify needs text + label (or alpaca) records, got format {fmt!r}",
                       file=record.file, field="data.format")


def prepare(config, tokenizer, train_records: list[Record], validation_records: list[Record]) -> TaskData:
    fmt = resolve_format(config.data.format, train_records)
    template = resolve_template(tokenizer, config.data.template)
    data, prompts, gold = {}, [], []
    for name, records in (("train", train_records), ("validation", validation_records)):
        examples = []
        for record in records:
            turns, label = labelled_turns(record, fmt)
            encoded = encode_chat(tokenizer, template, turns, config.data.max_length, config.data.train_on_prompt)
            if encoded.trainable_tokens == 0:
                raise record.error(f"the prompt fills all {config.data.max_length} tokens: no room for the label",
                                   "text", fix="raise data.max_length or shorten the text")
            examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
            if name == "validation":
                prompts.append({"input_ids": encode_prompt(tokenizer, template, turns[:-1])[-config.data.max_length:]})
                gold.append(label.strip())
        data[name] = examples
    labels = sorted({labelled_turns(r, fmt)[1].strip() for r in train_records})
    return TaskData(data["train"], data["validation"], labels,
                    extra={"template": template, "prompts": prompts, "gold": gold})


def generate_labels(model, tokenizer, prompts: list[dict], batch_size: int, max_new_tokens: int, device,
                    autocast) -> list[str]:
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = pad_batch(prompts[start:start + batch_size], tokenizer.pad_token_id, side="left")
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast:
                    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                new = out[:, batch["input_ids"].shape[1]:]
                answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers


def evaluate(model, tokenizer, data: TaskData, config, device, autocast) -> dict:
    loss = sft_evaluate(model, tokenizer, data, config, device, autocast)
    answers = generate_labels(model, tokenizer, data.extra["prompts"], config.train.eval_batch_size,
                              config.train.max_new_tokens, device, autocast)
    return {**loss, **classification_metrics(data.extra["gold"], answers)}
