"""Chat templates, and turning a conversation into input ids with the prompt masked out of the loss.

A conversation is rendered with a Jinja chat template (the tokenizer's own, a built-in one, or the user's), once up
to each assistant turn with the generation prompt and once including that turn; the difference is exactly what the
model must learn to produce (its text and end-of-turn marker). Each piece is tokenized on its own, so the prompt's
tokens are the same ones `chat`/`generate` will feed the model at inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jinja2

from loralab.errors import LoralabError, did_you_mean

log = logging.getLogger("loralab")
IGNORE_INDEX = -100  # label of tokens left out of the loss (PyTorch's cross_entropy default)

BUILTIN_TEMPLATES = {
    "alpaca": (
        "{{ bos_token }}{% if messages[0].role != 'system' %}Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n"
        "{% elif m.role == 'user' %}{% if not loop.first %}\n\n{% endif %}### Instruction:\n{{ m.content }}"
        "\n\n### Response:\n{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen": (
        "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama2": (
        "{% set ns = namespace(system='') %}{% if messages[0].role == 'system' %}"
        "{% set ns.system = messages[0].content %}{% endif %}"
        "{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first and ns.system %}<<SYS>>\n{{ ns.system }}\n<</SYS>>\n\n{% endif %}{{ m.content }} [/INST]"
        "{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "chatglm3": (
        "[gMASK]sop{% for m in messages %}<|{{ m.role }}|>\n {{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trainable_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def resolve_template(tokenizer, template: str) -> str:
    """The Jinja source for `template`: auto = the tokenizer's own, else alpaca; a built-in name; or Jinja itself."""
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        log.info("the tokenizer has no chat template: using the built-in 'alpaca' template")
        return BUILTIN_TEMPLATES["alpaca"]
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise LoralabError(f"unknown template {template!r}", field="data.template",
                       fix=did_you_mean(template, ["auto", *BUILTIN_TEMPLATES]) + " (or give a Jinja template string)")


def render(tokenizer, template: str, turns: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # a syntax error, an undefined name, or what the sandbox forbids
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise LoralabError(f"the chat template fails{line}: {e.message or e}", field="data.template",
                           fix="fix the Jinja template, or use a built-in one: auto, "
                               f"{', '.join(BUILTIN_TEMPLATES)}") from None


def chat_segments(tokenizer, template: str, turns: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_output) pieces."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, template, turns[:i], add_generation_prompt=True) if i else ""
        after = render(tokenizer, template, turns[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise LoralabError("the chat template renders earlier turns differently once later turns are added, "
                               "so the assistant's tokens cannot be told apart", field="data.template",
                               fix="choose a built-in template (chatml, qwen, llama3, ...) or a simpler Jinja one")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return [(text, trainable) for text, trainable in segments if text]


def encode_chat(tokenizer, template: str | None, turns: list[dict], max_length: int,
                train_on_prompt: bool = False) -> Encoded:
    """Token ids and labels for one conversation; template None means raw text (all of it trained)."""
    if template is None:
        text = "".join(t["content"] for t in turns)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        labels = list(ids)
    else:
        ids, labels = [], []
        for text, is_output in chat_segments(tokenizer, template, turns):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (is_output or train_on_prompt) else [IGNORE_INDEX] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in labels[-3:]:  # chat templates end turns with eos (+ a newline) or not at all
        ids.append(eos)  # the model must learn to stop
        labels.append(eos)
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def encode_prompt(tokenizer, template: str, turns: list[dict]) -> list[int]:
    """Ids of a conversation's prompt, ending with the generation prompt: what inference feeds the model."""
    return tokenizer(render(tokenizer, template, turns, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
