"""Classification by generation (seed 004): a causal LM learns to write the label as text after the prompt, and
is scored by generating greedily and comparing the answer with the gold label (exact match after trimming)."""

from __future__ import annotations

from loralab.data.formats import resolve_format, to_classification, to_conversation
from loralab.data.records import Record
from loralab.data.templates import IGNORE_INDEX, encode_chat, encode_prompt, resolve_template
from loralab.errors import LoralabError
from loralab.tasks import TaskData
from loralab.tasks.evaluation import generate
from loralab.tasks.metrics import classification_metrics
from loralab.tasks.sft import evaluate as sft_evaluate

MAIN_METRIC = "accuracy"
CAUSAL = True  # trained as a causal LM: next-token loss, causal attention
LABELLED = False  # no label head


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


def fit_prompt(prompt: list[int], room: int) -> list[int]:
    """Shorten a prompt to `room` tokens by cutting its middle: the template's head and the text right before the
    answer (e.g. "Label :") both survive."""
    if len(prompt) <= room:
        return prompt
    head = room // 4
    return prompt[:head] + prompt[len(prompt) - (room - head):]


def encode_example(tokenizer, template: str, turns: list[dict], max_length: int, record: Record
                   ) -> tuple[dict, list[int], bool]:
    """(training example, prompt ids for generation, truncated?). A long text is cut, never the label."""
    prompt = encode_prompt(tokenizer, template, turns[:-1])
    full = encode_chat(tokenizer, template, turns, max_length=10**9)
    answer_ids, answer_labels = full.input_ids[len(prompt):], full.labels[len(prompt):]
    if full.input_ids[:len(prompt)] != prompt or not answer_ids:
        raise record.error("the template renders the prompt differently with and without the answer",
                           "data.template", fix="use a template whose prompt is a prefix of the full text")
    if len(answer_ids) > max_length // 2:
        raise record.error(f"the label takes {len(answer_ids)} tokens, over half of max_length={max_length}",
                           "label", fix="raise data.max_length or shorten the labels")
    truncated = len(full.input_ids) > max_length
    prompt = fit_prompt(prompt, max_length - len(answer_ids))
    example = {"input_ids": prompt + answer_ids, "labels": [IGNORE_INDEX] * len(prompt) + answer_labels}
    return example, prompt, truncated


def prepare(config, tokenizer, train_records: list[Record], validation_records: list[Record]) -> TaskData:
    fmt = resolve_format(config.data.format, train_records)
    template = resolve_template(tokenizer, config.data.template)
    data, prompts, gold, truncated = {}, [], [], 0
    for name, records in (("train", train_records), ("validation", validation_records)):
        examples = []
        for record in records:
            turns, label = labelled_turns(record, fmt)
            example, prompt, cut = encode_example(tokenizer, template, turns, config.data.max_length, record)
            examples.append(example)
            if name == "train":
                truncated += cut
            else:
                prompts.append({"input_ids": prompt})
                gold.append(label.strip())
        data[name] = examples
    labels = sorted({labelled_turns(r, fmt)[1].strip() for r in train_records})
    return TaskData(data["train"], data["validation"], labels, stats={"truncated": truncated},
                    extra={"template": template, "prompts": prompts, "gold": gold})


def evaluate(model, tokenizer, data: TaskData, config, device, autocast) -> dict:
    loss = sft_evaluate(model, tokenizer, data, config, device, autocast)
    answers = generate(model, tokenizer, data.extra["prompts"], config.train.eval_batch_size,
                       config.generate_classify.max_new_tokens, device, autocast)
    return {**loss, **classification_metrics(data.extra["gold"], answers)}
