"""`loralab export --format vllm [--check]`: the reasons vLLM's LoRA loader would refuse or mis-serve an adapter,
each naming the weights and the fix, before anything is written."""

import pytest

from loralab.cli import USER_ERROR, main
from loralab.errors import LoralabError
from loralab.export.formats import export


def check(adapter, capsys):
    code = main(["export", "--model", "unused", "--adapter", str(adapter), "--format", "vllm", "--check"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_plain_adapter_passes_and_is_written(sft_adapter, tmp_path, capsys):
    _, adapter, _ = sft_adapter("llama")
    code, text = check(adapter, capsys)
    assert code == 0 and "vLLM will load this adapter" in text and "max-lora-rank" not in text
    out = tmp_path / "for-vllm"
    lines = export("vllm", "unused", str(adapter), str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert any("--enable-lora --lora-modules run=" in line for line in lines)


@pytest.mark.parametrize("lora, expected", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save (lm_head: lm_head.weight)"),
    ({"bias": "all"}, "bias=all"),
    ({"rank_pattern": {"v_proj": 2}}, "rank_pattern/alpha_pattern"),
])
def test_what_vllm_refuses_is_named_with_its_fix(sft_adapter, tmp_path, capsys, lora, expected):
    _, adapter, _ = sft_adapter("llama", **lora)
    code, text = check(adapter, capsys)
    assert code == USER_ERROR and "vLLM will not load this adapter" in text and expected in text
    assert "merge" in text
    with pytest.raises(LoralabError, match="will not load"):
        export("vllm", "unused", str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_high_rank_needs_the_max_lora_rank_flag(sft_adapter, capsys):
    _, adapter, _ = sft_adapter("llama", r=40)
    code, text = check(adapter, capsys)
    assert code == 0 and "--max-lora-rank 64" in text


def test_check_belongs_to_vllm_and_an_export_needs_an_output(sft_adapter, capsys):
    _, adapter, _ = sft_adapter("llama")
    assert main(["export", "--model", "m", "--adapter", str(adapter), "--format", "gguf", "--check"]) == USER_ERROR
    assert "--check applies to --format vllm" in capsys.readouterr().err
    assert main(["export", "--model", "m", "--adapter", str(adapter), "--format", "vllm"]) == USER_ERROR
    assert "--out" in capsys.readouterr().err
