"""The Ollama Modelfile: the per-role pieces measured from the training template render every conversation as the
template does, and a template that is not a per-role wrapper is refused, never approximated."""

import pytest

from loralab.cli import main
from loralab.data.templates import BUILTIN_TEMPLATES, render
from loralab.errors import LoralabError
from loralab.export.ollama import go_template, modelfile, role_wrappers
from tiny_tokenizer import tiny_tokenizer

# SmolLM2's own template: ChatML that writes a default system prompt when a conversation has none
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
]


@pytest.mark.parametrize("template", ["chatml", "qwen", "llama3", "alpaca", "smollm2"])
def test_the_pieces_render_every_conversation_as_the_template(template):
    tokenizer = tiny_tokenizer()
    source = SMOLLM2 if template == "smollm2" else BUILTIN_TEMPLATES[template]
    w = role_wrappers(tokenizer, source)
    for conversation in CONVERSATIONS:
        for gen in (False, True):
            if conversation[-1]["role"] == "assistant" and gen:
                continue
            expected = render(tokenizer, source, conversation, gen).removeprefix(tokenizer.bos_token)
            assert w.render(conversation, gen) == expected
    # qwen, smollm2 and alpaca open a conversation without a system prompt with a default one
    assert (w.first_user_prefix != w.user_prefix) == (template in ("qwen", "smollm2", "alpaca"))


def test_the_modelfile_carries_template_system_and_stops():
    tokenizer = tiny_tokenizer()
    text = modelfile("run.f16.gguf", tokenizer, BUILTIN_TEMPLATES["chatml"], system="You answer in French.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./run.f16.gguf"
    assert 'SYSTEM """You answer in French."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "</s>"' in lines
    w = role_wrappers(tokenizer, BUILTIN_TEMPLATES["chatml"])
    assert f'TEMPLATE """{go_template(w)}"""' in text
    assert ('{{ else if eq .Role "user" }}{{ if eq $i 0 }}<|im_start|>user\n{{ else }}<|im_start|>user\n{{ end }}'
            '{{ .Content }}<|im_end|>\n') in text


def test_a_template_that_is_not_per_role_is_refused():
    with pytest.raises(LoralabError, match="cannot be written as an Ollama template") as e:
        role_wrappers(tiny_tokenizer(), BUILTIN_TEMPLATES["llama2"])  # folds the system prompt into a user turn
    assert "--format gguf" in e.value.fix


def test_export_ollama_writes_the_gguf_and_modelfile(sft_adapter, tmp_path):
    base, adapter, _ = sft_adapter("qwen2", template=BUILTIN_TEMPLATES["qwen"])
    out = tmp_path / "ollama"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--format", "ollama", "--out", str(out),
                 "--quant", "q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "run.q8_0.gguf"]
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./run.q8_0.gguf") and "SYSTEM" not in text
    assert "{{ if eq $i 0 }}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" in text


def test_a_raw_text_adapter_gets_a_prompt_only_template(sft_adapter, tmp_path):
    base, adapter, _ = sft_adapter("llama", template=None)
    (adapter / "chat_template.jinja").unlink()  # trained on raw text, with a tokenizer that has no template
    out = tmp_path / "ollama"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--format", "ollama", "--out",
                 str(out)]) == 0
    assert (out / "Modelfile").read_text() == 'FROM ./run.f16.gguf\nTEMPLATE """{{ .Prompt }}"""\n'
