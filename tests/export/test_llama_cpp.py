"""llama.cpp itself (through llama-cpp-python) runs what loralab exports: its logits agree with the merged model
for each architecture, and a base GGUF with the LoRA GGUF applied agrees with base + adapter.

llama-cpp-python is built from source (`pip install llama-cpp-python`, a few minutes); without it these skip."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loralab.export.formats import export
from loralab.export.gguf_model import write_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
IDS = [1, *range(40, 52)]


def llama_cpp_logits(model_path, lora_path=None):
    llm = llama_cpp.Llama(str(model_path), lora_path=lora_path and str(lora_path), n_ctx=64, logits_all=True,
                          verbose=False, n_threads=2)
    try:
        llm.eval(IDS)
        return torch.from_numpy(np.array(llm.scores[: len(IDS)]))
    finally:
        llm.close()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_llama_cpp_runs_the_merged_export(sft_adapter, tmp_path, model_type):
    base, adapter, merged = sft_adapter(model_type)
    out = tmp_path / "model.gguf"
    export("gguf", str(base), str(adapter), str(out), quant="f32")
    with torch.no_grad():
        want = merged(torch.tensor([IDS])).logits[0]
    got = llama_cpp_logits(out)
    # llama.cpp keeps its KV cache in f16: agreement to ~1e-3 of the logits' scale, the same next tokens
    assert (got - want).abs().max() < 5e-3 * want.abs().max() * 4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_cpp_applies_the_lora_gguf(sft_adapter, tmp_path, model_type):
    base, adapter, merged = sft_adapter(model_type, use_rslora=True)
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    write_gguf(plain, AutoTokenizer.from_pretrained(base), None, tmp_path / "base.gguf", "f32")
    export("gguf-lora", str(base), str(adapter), str(tmp_path / "lora.gguf"))
    with torch.no_grad():
        want = merged(torch.tensor([IDS])).logits[0]
        without = plain(torch.tensor([IDS])).logits[0]
    got = llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "lora.gguf")
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    assert (without - want).abs().max() > 0.5  # the adapter changes the logits, so the check can fail
