"""The loss mask, token by token: only the assistant's text and its end-of-turn marker are trained."""

import pytest

from loralab.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    chat_segments,
    encode_chat,
    encode_prompt,
    render,
    resolve_template,
)
from loralab.errors import LoralabError
from tiny_tokenizer import tiny_tokenizer

TURNS = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And the quick brown fox?"},
         {"role": "assistant", "content": "hello world"}]

# what each template must train on for TURNS: both answers with their end-of-turn markers
EXPECTED_TRAINED = {
    "alpaca": ["Paris.</s>", "hello world</s>"],
    "chatml": ["Paris.<|im_end|>\n", "hello world<|im_end|>\n", "</s>"],
    "qwen": ["Paris.<|im_end|>\n", "hello world<|im_end|>\n", "</s>"],
    "llama2": [" Paris. </s>", " hello world </s>"],
    "llama3": ["Paris.<|eot_id|>", "hello world<|eot_id|>", "</s>"],
    "chatglm3": ["\n Paris.", "\n hello world", "</s>"],
}


def trained_runs(tokenizer, encoded):
    """The decoded runs of consecutive trained tokens, checking labels equal input ids where trained."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_masks_everything_but_the_answers(name):
    tokenizer = tiny_tokenizer()
    encoded = encode_chat(tokenizer, BUILTIN_TEMPLATES[name], TURNS, max_length=512)
    runs = trained_runs(tokenizer, encoded)
    # the eos appended after the last turn may merge with the last answer's run
    assert "".join(runs) == "".join(EXPECTED_TRAINED[name])
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    # the untrained part is exactly the rendered prompt text
    full = tokenizer.decode(encoded.input_ids)
    assert full.startswith(tokenizer.decode(encode_prompt(tokenizer, BUILTIN_TEMPLATES[name], TURNS[:2])))


def test_tokenizer_own_template_is_used_by_default():
    tokenizer = tiny_tokenizer()
    template = resolve_template(tokenizer, "auto")
    assert template == tokenizer.chat_template
    encoded = encode_chat(tokenizer, template, TURNS, max_length=512)
    assert "".join(trained_runs(tokenizer, encoded)) == "Paris.<|im_end|>\nhello world<|im_end|>\n</s>"
    prompt_part = [t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab == IGNORE_INDEX]
    assert "<|im_start|>assistant\n" in tokenizer.decode(prompt_part)  # generation prompts are not trained


def test_no_tokenizer_template_falls_back_to_alpaca_and_custom_jinja_works():
    tokenizer = tiny_tokenizer(chat_template=None)
    assert resolve_template(tokenizer, "auto") == BUILTIN_TEMPLATES["alpaca"]
    jinja = "{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\nA:{% else %} {{ m.content }}\n" \
            "{% endif %}{% endfor %}"
    encoded = encode_chat(tokenizer, resolve_template(tokenizer, jinja), TURNS[1:3], max_length=512)
    assert trained_runs(tokenizer, encoded) == [" Paris.\n</s>"]


def test_train_on_prompt_trains_everything():
    tokenizer = tiny_tokenizer()
    encoded = encode_chat(tokenizer, tokenizer.chat_template, TURNS, max_length=512, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids


def test_raw_text_is_all_trained_with_eos():
    tokenizer = tiny_tokenizer()
    encoded = encode_chat(tokenizer, None, [{"role": "assistant", "content": "hello world"}], max_length=512)
    assert encoded.labels == encoded.input_ids and encoded.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_is_flagged_and_can_leave_nothing_to_train():
    tokenizer = tiny_tokenizer()
    long = encode_chat(tokenizer, tokenizer.chat_template, TURNS, max_length=12)
    assert long.truncated and len(long.input_ids) == 12 and long.trainable_tokens == 0
    fits = encode_chat(tokenizer, tokenizer.chat_template, TURNS, max_length=512)
    assert not fits.truncated and fits.trainable_tokens > 0


def test_unknown_template_and_unstable_template_are_clear_errors():
    tokenizer = tiny_tokenizer()
    with pytest.raises(LoralabError, match="unknown template 'vicuna'"):
        resolve_template(tokenizer, "vicuna")
    # a template that drops earlier answers (as reasoning templates do) cannot be masked by prefix
    dropping = "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.content }}|{% endif %}" \
               "{% endfor %}"
    with pytest.raises(LoralabError, match="renders earlier turns differently"):
        chat_segments(tokenizer, dropping, TURNS)


def test_render_with_generation_prompt_ends_where_the_answer_starts():
    tokenizer = tiny_tokenizer()
    prompt = render(tokenizer, tokenizer.chat_template, TURNS[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
