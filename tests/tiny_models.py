"""Tiny transformers models built from configs (no hub), one per architecture the tests cover."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=128)
EXTRA = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8),
    "gpt2": dict(n_positions=64),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
    "gptj": dict(n_positions=64, rotary_dim=4),
    "opt": dict(ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64),
    "t5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
    "mt5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48),
    "phi": dict(num_key_value_heads=4),
    "phi3": dict(num_key_value_heads=4, pad_token_id=0),
    "falcon": dict(new_decoder_architecture=False, multi_query=True),
    "bert": dict(max_position_embeddings=64),
}
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "electra"}
SEQ2SEQ = {"t5", "mt5", "bart"}


def tiny_config(model_type: str, **overrides):
    kwargs = {**COMMON, **EXTRA.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    # ids inside the tiny vocabulary (defaults such as gpt2's 50256 would not be)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return config


def tiny_model(model_type: str, seed: int = 0, head: str | None = None, **overrides):
    """A randomly initialised model of `model_type`; head: 'causal', 'seq2seq', 'classification' or 'base'."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    if head is None:
        head = "classification" if model_type in ENCODERS else "seq2seq" if model_type in SEQ2SEQ else "causal"
    if head == "classification":
        config.num_labels = 3
        model = AutoModelForSequenceClassification.from_config(config)
    elif head == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif head == "causal":
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModel.from_config(config)
    return model.eval()


def sample_inputs(model, batch: int = 2, length: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.model_type in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def losses_and_gradients(models, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """For each causal LM: its loss on `ids` (as labels too) and the gradients of its trainable parameters."""
    results = []
    for model in models:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    return results


def packed_examples(*lengths, seed=0) -> list[dict]:
    """Random SFT examples of these lengths (every token scored), for packed rows."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(3, 128, (n,), generator=g).tolist()), "labels": ids} for n in lengths]
