"""Which modules get LoRA: per-architecture defaults, PEFT-compatible name matching, and helpful errors."""

from __future__ import annotations

import logging
import re

from torch import nn

from loralab.errors import LoralabError
from loralab.lora.config import LoraConfig
from loralab.lora.layer import LoraLinear, linear_types

log = logging.getLogger("loralab")

# The attention projections LoRA is usually put on (the LoRA paper adapts W_q and W_v), keyed by config.model_type.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
}

# Tried in order for architectures not listed above.
FALLBACK_TARGETS = [
    ["q_proj", "v_proj"],
    ["query", "value"],
    ["query_key_value"],
    ["qkv_proj"],
    ["c_attn"],
    ["Wqkv"],
    ["q_lin", "v_lin"],
    ["query_proj", "value_proj"],
    ["q", "v"],
]

# Heads that map hidden states to outputs; "all-linear" leaves them alone (train them with modules_to_save).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "embed_out", "output_layer")


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every nn.Linear / Conv1D in the model; an already wrapped layer counts once, by its own name."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoraLinear)]
    return [name for name, module in model.named_modules()
            if isinstance(module, (*linear_types(), LoraLinear)) and not any(name.startswith(w + ".") for w in wrapped)]


def linear_suffixes(model: nn.Module) -> list[str]:
    """The last name component of every linear layer, deduplicated, in model order: what target_modules lists."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear_module_names(model)))


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal the name or end it at a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern: str | None) -> int | None:
    """The transformer block index in a module name, found as PEFT finds it: the first numbered segment (lazy, so
    that T5's `block.1.layer.0` gives 1 and a MoE expert index is not taken for the layer)."""
    pattern = rf"(?:^|.*?\.){layers_pattern}\.(\d+)\." if layers_pattern else r".*?\.[^.]*\.(\d+)\."
    match = re.match(pattern, name)
    return int(match.group(1)) if match else None


def in_any(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def output_head_names(model: nn.Module) -> list[str]:
    heads = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads += [name for name, module in model.named_modules() if module is out]
    return heads


def default_targets(model: nn.Module) -> list[str]:
    """The architecture's default target names; for unknown ones, the attention projections found by name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    present = set(linear_suffixes(model))
    for candidate in FALLBACK_TARGETS:
        if set(candidate) <= present:
            log.warning("no built-in LoRA targets for model_type %r; using the attention projections %s",
                        model_type, candidate)
            return candidate
    raise LoralabError(
        f"no built-in LoRA targets for model_type {model_type!r} and no attention projection found by name",
        field="lora.target_modules",
        fix=f"set target_modules to some of this model's linear layers: {', '.join(linear_suffixes(model))}",
    )


def check_every_target_matches(model: nn.Module, targets: list[str] | str) -> None:
    """A listed target that names no linear layer would be left out without a word (PEFT does so while others
    match): a typo, or a module LoRA does not adapt here, such as embeddings."""
    if isinstance(targets, str):
        return  # a regex: matching nothing at all is refused below
    linear = linear_module_names(model)
    missing = [t for t in targets if not any(name_matches(n, [t]) for n in linear)]
    if not missing:
        return
    kinds = {type(m).__name__ for n, m in model.named_modules() if n and name_matches(n, missing)}
    other = (f" ({', '.join(sorted(kinds))}: LoRA adapts linear layers here; lora.modules_to_save trains a module "
             "in full and saves it with the adapter)") if kinds else ""
    raise LoralabError(f"target_modules {', '.join(missing)} matched no linear layer of this "
                       f"{type(model).__name__}{other}", field="lora.target_modules",
                       fix=f"pick from this model's linear layers: {', '.join(linear_suffixes(model))}")


def resolve_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str] | str, list[str]]:
    """Return (target_modules as PEFT should record them, full names of the modules to wrap)."""
    skip = list(config.modules_to_save or [])
    skip_parents = [name for name, _ in model.named_modules() if name and name_matches(name, skip)]
    candidates = [n for n in linear_module_names(model) if not in_any(n, skip_parents)]

    spec = config.target_modules
    if spec == "all-linear":
        heads = output_head_names(model)
        chosen = [n for n in candidates if not in_any(n, heads)]
        spec = chosen  # recorded as full names, exactly as PEFT records "all-linear"
    else:
        if spec is None:
            spec = default_targets(model)
        else:
            check_every_target_matches(model, spec)
        chosen = [n for n in candidates if name_matches(n, spec)]
        if config.layers_to_transform is not None and not isinstance(spec, str):
            wanted = set(config.layers_to_transform)
            chosen = [n for n in chosen if n in spec or layer_index(n, config.layers_pattern) in wanted]

    if not chosen:
        raise LoralabError(
            f"target_modules {spec!r} matched no linear layer of this {type(model).__name__}",
            field="lora.target_modules",
            fix=f"pick from this model's linear layers: {', '.join(linear_suffixes(model))}",
        )
    return spec, chosen


def linear_layer_table(model_config, trust_remote_code: bool = False) -> list[tuple[str, int, str, bool]]:
    """(name, count, weight shape, default target?) per linear-layer name of a model built from its transformers
    config on the meta device: the layout only, no weights loaded or allocated (`loralab targets`)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(model_config, trust_remote_code=trust_remote_code)
    counts: dict[str, int] = {}
    shapes: dict[str, str] = {}
    for name in linear_module_names(model):
        suffix = name.rsplit(".", 1)[-1]
        counts[suffix] = counts.get(suffix, 0) + 1
        shapes.setdefault(suffix, " x ".join(map(str, model.get_submodule(name).weight.shape)))
    default = DEFAULT_TARGETS.get(model_config.model_type, [])
    return [(suffix, count, shapes[suffix], suffix in default) for suffix, count in counts.items()]
