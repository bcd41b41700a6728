"""`loralab export --format gguf-lora`: what llama.cpp computes from the file, (alpha / rank) · B·A per tensor, is
each module's trained update in llama.cpp's layout, for plain LoRA, rsLoRA and per-module ranks and alphas."""

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from loralab.errors import LoralabError
from loralab.export.formats import export
from loralab.export.gguf_arch import gguf_arch, gguf_tensor_name, to_gguf_layout


def updates_llama_cpp_applies(path):
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    updates = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name.replace(".lora_a", ".lora_b")]
            assert a.shape[1] > a.shape[0] == b.shape[1]  # A: (rank, in), B: (out, rank), as llama.cpp checks
            updates[name.removesuffix(".lora_a")] = (alpha / b.shape[1]) * (b @ a)
    return updates


@pytest.mark.parametrize("model_type, lora", [
    ("llama", {}),
    ("llama", {"use_rslora": True, "r": 8}),
    ("qwen2", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3.0}}),
    ("phi3", {}),
])
def test_the_file_carries_each_modules_update(sft_adapter, tmp_path, model_type, lora):
    base, adapter, merged = sft_adapter(model_type, **lora)
    out = tmp_path / "adapter.gguf"
    export("gguf-lora", str(base), str(adapter), str(out))
    updates = updates_llama_cpp_applies(out)
    plain = AutoModelForCausalLM.from_pretrained(base).state_dict()
    arch = gguf_arch(merged.config)
    expected = {}
    for key, weight in merged.state_dict().items():
        if key in plain and not torch.equal(weight, plain[key]):
            name = gguf_tensor_name(arch, merged.config.num_hidden_layers, key)
            expected[name] = to_gguf_layout(arch, merged.config, name, weight - plain[key])
    assert sorted(updates) == sorted(expected) and len(updates) >= 8  # every linear of 2 blocks
    for name, update in updates.items():
        assert torch.allclose(update, expected[name], atol=1e-5), name


def test_what_llama_cpp_lora_cannot_carry_is_refused(sft_adapter, tmp_path):
    base, adapter, _ = sft_adapter("llama", modules_to_save=["lm_head"])
    with pytest.raises(LoralabError, match="lm_head") as e:
        export("gguf-lora", str(base), str(adapter), str(tmp_path / "a.gguf"))
    assert "--format gguf" in e.value.fix
    base, adapter, _ = sft_adapter("qwen2", bias="lora_only")
    with pytest.raises(LoralabError, match="biases"):
        export("gguf-lora", str(base), str(adapter), str(tmp_path / "a.gguf"))
    assert not (tmp_path / "a.gguf").exists()
