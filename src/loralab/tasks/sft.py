"""Supervised fine-tuning of causal LMs on instruction / chat / raw text; the loss covers assistant tokens only."""

from __future__ import annotations

import logging
import math

from loralab.data.collate import pack_batch, pad_batch, to_device
from loralab.data.formats import resolve_format, to_conversation
from loralab.data.records import Record
from loralab.data.templates import encode_chat, encode_prompt, resolve_template
from loralab.fast.lm_loss import summed_causal_lm_loss
from loralab.tasks import TaskData
from loralab.tasks.evaluation import evaluating, generate

log = logging.getLogger("loralab")
MAIN_METRIC = "loss"
CAUSAL = True  # trained as a causal LM: next-token loss, causal attention
LABELLED = False  # no label head
SAMPLES = 3  # validation prompts answered before and after training


def conversations(config, records: list[Record]) -> list[list[dict]]:
    if not records:
        return []
    fmt = resolve_format(config.data.format, records)
    turns = [to_conversation(r, fmt) for r in records]
    if config.data.system and fmt != "text":
        turns = [t if t[0]["role"] == "system" else [{"role": "system", "content": config.data.system}, *t]
                 for t in turns]
    return turns


def template_for(config, tokenizer, records: list[Record]) -> str | None:
    """The Jinja template to render with, or None for raw text (no template)."""
    if resolve_format(config.data.format, records) == "text":
        return None
    return resolve_template(tokenizer, config.data.template)


def encode_all(config, tokenizer, records: list[Record], template) -> tuple[list[dict], dict]:
    examples, truncated, empty = [], 0, 0
    for turns in conversations(config, records):
        encoded = encode_chat(tokenizer, template, turns, config.data.max_length, config.data.train_on_prompt)
        truncated += encoded.truncated
        if encoded.trainable_tokens == 0:
            empty += 1  # the answer was cut off entirely: nothing to learn from, so it is left out
            continue
        examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return examples, {"truncated": truncated, "without_trainable_tokens": empty}


def prepare(config, tokenizer, train_records: list[Record], validation_records: list[Record]) -> TaskData:
    template = template_for(config, tokenizer, train_records)
    train, stats = encode_all(config, tokenizer, train_records, template)
    validation, _ = encode_all(config, tokenizer, validation_records, template)
    if not train:
        raise train_records[0].error("no training example keeps any answer token after truncation to "
                                     f"max_length={config.data.max_length}", "data.max_length",
                                     fix="raise data.max_length")
    # a few validation prompts answered before and after training, to see what the adapter changed
    sample_prompts = []
    if template is not None:
        for turns in conversations(config, validation_records[:SAMPLES]):
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            sample_prompts.append({"input_ids": encode_prompt(tokenizer, template, turns[:last])})
    return TaskData(train, validation, stats=stats, extra={"template": template, "sample_prompts": sample_prompts})


def samples(model, tokenizer, data: TaskData, config, device, autocast) -> list[str]:
    prompts = data.extra.get("sample_prompts", [])
    return generate(model, tokenizer, prompts, len(prompts) or 1, 64, device, autocast) if prompts else []


def evaluate(model, tokenizer, data: TaskData, config, device, autocast) -> dict:
    """The loss over the validation answers' tokens, eval_batch_size examples at a time: each batch one
    padding-free row where training uses them (data.padding_free as the run resolved it), and the chunked loss,
    which holds no full-vocabulary logits, where the model allows."""
    total, count = 0.0, 0
    size, pad_id = config.train.eval_batch_size, tokenizer.pad_token_id
    with evaluating(model):
        for start in range(0, len(data.validation), size):
            examples = data.validation[start:start + size]
            batch = (pack_batch([examples], pad_id) if config.data.padding_free is True and len(examples) > 1
                     else pad_batch(examples, pad_id))
            with autocast:
                summed, n = summed_causal_lm_loss(model, to_device(batch, device))
            total, count = total + float(summed), count + n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
