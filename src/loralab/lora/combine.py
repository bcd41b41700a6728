"""Combining adapters by weight into a new one, as PEFT's add_weighted_adapter does.

linear: A = sum_i sqrt(w_i * s_i) A_i and B likewise (all ranks equal); cat: ranks stacked, A = [A_1; A_2; ...],
B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], so B·A = sum_i w_i s_i B_i A_i exactly. The new adapter has alpha = r
(scaling 1) since the scalings are folded in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.errors import LoralabError, did_you_mean
from loralab.lora.config import LoraConfig
from loralab.lora.inject import adapter_names, lora_layers, saved_modules


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], name: str,
                         combination: str = "linear") -> None:
    """Add adapter `name` = the weighted combination of `adapters` (see the module docstring); make it active.

    Example:
        add_weighted_adapter(model, ["formal", "brief"], [0.7, 0.3], "mix", combination="cat")
    """
    known = adapter_names(model)
    for a in adapters:
        if a not in known:
            raise LoralabError(f"unknown adapter {a!r}", fix=did_you_mean(a, known))
    if name in known:
        raise LoralabError(f"an adapter named {name!r} already exists", fix="choose another name")
    if len(adapters) != len(weights) or not adapters:
        raise LoralabError("give one weight per adapter", fix="e.g. --combine a=0.7,b=0.3")
    if combination not in ("linear", "cat"):
        raise LoralabError(f"unknown combination {combination!r}", fix=did_you_mean(combination, ["linear", "cat"]))
    if any(a in w.modules_to_save for _, w in saved_modules(model) for a in adapters):
        raise LoralabError("adapters with modules_to_save (trained heads) cannot be combined by weight",
                           fix="combine adapters that only hold LoRA weights")
    configs = [model.lora_configs[a][0] for a in adapters]
    rank = None
    for layer_name, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.lora_A]
        if not present:
            continue
        ranks = [layer.lora_A[a].out_features for a, _ in present]
        if combination == "linear" and len(set(ranks)) > 1:
            raise LoralabError(f"linear combination needs equal ranks, got {ranks} at {layer_name}",
                               fix="use combination cat")
        new_rank = ranks[0] if combination == "linear" else sum(ranks)
        rank = max(rank or 0, new_rank)
        layer.add_adapter(name, r=new_rank, scaling=1.0)
        with torch.no_grad():
            a_new, b_new = layer.lora_A[name].weight, layer.lora_B[name].weight
            if combination == "linear":
                factors = [math.sqrt(w * layer.scaling[a]) for a, w in present]
                a_new.copy_(sum(f * layer.lora_A[a].weight for f, (a, _) in zip(factors, present, strict=True)))
                b_new.copy_(sum(f * layer.lora_B[a].weight for f, (a, _) in zip(factors, present, strict=True)))
            else:
                a_new.copy_(torch.cat([layer.lora_A[a].weight for a, _ in present]))
                b_new.copy_(torch.cat([layer.lora_B[a].weight * w * layer.scaling[a] for a, w in present], dim=1))
    targets = sorted({t for _, recorded in (model.lora_configs[a] for a in adapters)
                      for t in (recorded if isinstance(recorded, list) else [])})
    config = LoraConfig(r=rank, alpha=rank, target_modules=targets or configs[0].target_modules)
    model.lora_configs[name] = (config, targets or model.lora_configs[adapters[0]][1])
    for _, layer in lora_layers(model):
        layer.active_adapters = [name] if name in layer.lora_A else []
