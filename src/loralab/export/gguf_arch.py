"""What llama.cpp expects of each architecture it runs: its name, its metadata keys, and tensors in its layout.

Tensor names come from the `gguf` package's own table (the one llama.cpp's converter uses), so only the few
places where llama.cpp stores a weight differently from transformers are spelled out here:
- llama and mistral: the rows of q and k are ordered for interleaved rotary pairs (llama.cpp's "permute");
- gemma: RMSNorm weights are stored as 1 + w, because transformers' Gemma norm multiplies by (1 + w).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from loralab.errors import LoralabError


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp's architecture name (general.architecture)
    permute_qk: bool = False
    norm_plus_one: bool = False


ARCHITECTURES = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "gemma": GGUFArch("gemma", norm_plus_one=True),
    "gemma2": GGUFArch("gemma2", norm_plus_one=True),
    "phi3": GGUFArch("phi3"),
}


def gguf_arch(config) -> GGUFArch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise LoralabError(f"exporting a {model_type!r} model to GGUF is not supported", field="--model",
                           fix=f"GGUF export covers {', '.join(sorted(ARCHITECTURES))}; for this model use "
                               "`loralab merge` (a transformers folder) or --format vllm")
    _check_supported(config, model_type)
    return ARCHITECTURES[model_type]


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _check_supported(config, model_type: str) -> None:
    rope_type = _rope(config)["rope_type"]
    allowed = {"default", "linear", "llama3"} if model_type in ("llama", "mistral") else {"default", "linear"}
    if rope_type not in allowed:
        raise LoralabError(f"this {model_type} model uses {rope_type!r} RoPE scaling, which the GGUF export does not "
                           "write", field="--model", fix="use `loralab merge` and llama.cpp's convert_hf_to_gguf.py")
    if model_type == "gemma2" and getattr(config, "query_pre_attn_scalar", None) != head_dim(config):
        raise LoralabError("this gemma2 model scales queries by query_pre_attn_scalar, not head_dim, which llama.cpp "
                           "infers from the model size only", field="--model",
                           fix="use `loralab merge` and llama.cpp's convert_hf_to_gguf.py")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_tensor_name(arch: GGUFArch, n_layers: int, hf_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (None: not a tensor llama.cpp reads)."""
    module, _, suffix = hf_name.rpartition(".")
    name = _name_map(arch.name, n_layers).get_name(module)
    return f"{name}.{suffix}" if name else None


@cache
def _name_map(arch_name: str, n_layers: int):
    """gguf's table of transformers -> GGUF tensor names (built once: it enumerates every layer's names)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    return gguf.get_tensor_name_map(arch_id, n_layers)


def permute_rows(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' rotary layout (the two halves of each head) -> llama.cpp's (interleaved pairs), on dim 0."""
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def to_gguf_layout(arch: GGUFArch, config, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or a LoRA B, which shares its rows) in the layout llama.cpp computes with."""
    if arch.permute_qk and ".attn_q." in gguf_name:
        return permute_rows(tensor, config.num_attention_heads)
    if arch.permute_qk and ".attn_k." in gguf_name:
        return permute_rows(tensor, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch.norm_plus_one and gguf_name.endswith("norm.weight"):
        return tensor + 1
    return tensor


def write_model_metadata(writer, arch: GGUFArch, config) -> None:
    """The hyper-parameters llama.cpp reads for this architecture (the keys its converter writes)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(head_dim(config) * rope.get("partial_rotary_factor", 1.0)))
    if rope["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
    if arch.name == "phi3":
        writer.add_rope_scaling_orig_ctx_len(
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that transformers computes instead: Llama 3.1's RoPE frequency factors."""
    if _rope(config)["rope_type"] != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = int(head_dim(config) * rope.get("partial_rotary_factor", 1.0))
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    # llama.cpp divides each rotary frequency by its factor
    return {"rope_freqs.weight": (plain / scaled.double()).float()}
