import json
from dataclasses import asdict

import pytest
import torch

from loralab.infer.settings import SETTINGS_NAME, InferenceSettings
from loralab.lora import LoraConfig, apply_lora, merge_and_unload, save_adapter
from tiny_models import tiny_model
from tiny_tokenizer import CHATML, tiny_tokenizer

# shapes transformers' GGUF reader recovers as they are (it reads no head_dim for qwen3: 128 is its default)
SHAPES = {"qwen3": dict(head_dim=128), "gemma2": dict(query_pre_attn_scalar=8)}


@pytest.fixture
def sft_adapter(tmp_path):
    """make(model_type, **lora settings) -> (base folder, adapter folder, merged fp32 model): a tiny base and an
    sft adapter with random (non-zero) B, saved as a run saves it (tokenizer and loralab.json beside it)."""

    def make(model_type="llama", template=CHATML, seed=0, **lora):
        tokenizer = tiny_tokenizer()
        model = tiny_model(model_type, vocab_size=len(tokenizer), initializer_range=0.2, max_position_embeddings=64,
                           **SHAPES.get(model_type, {}))
        base = tmp_path / f"{model_type}-base"
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        apply_lora(model, LoraConfig(**{"r": 4, "target_modules": "all-linear", **lora}))
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
        adapter = tmp_path / model_type / "run" / "adapter"  # the run is named "run"
        save_adapter(model, adapter)
        tokenizer.save_pretrained(adapter)
        settings = InferenceSettings(task="sft", template=template, system=None)
        (adapter / SETTINGS_NAME).write_text(json.dumps(asdict(settings)))
        return base, adapter, merge_and_unload(model).eval()

    return make
