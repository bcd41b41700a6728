"""Put adapters into a model in place, freeze the rest, and switch, disable or merge them.

The model stays the same transformers object (generate, save_pretrained, Trainer all keep working); only the
targeted linear layers are replaced by LoraLinear and modules_to_save by ModulesToSave.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from loralab.errors import LoralabError, did_you_mean
from loralab.lora.config import LoraConfig
from loralab.lora.layer import LoraLinear
from loralab.lora.modules_to_save import ModulesToSave
from loralab.lora.targets import name_matches, resolve_targets


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave))


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter to `model` in place and make only it (plus modules_to_save and chosen biases) trainable.

    Example:
        model = AutoModelForCausalLM.from_pretrained(path)
        apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        print(trainable_parameters_report(model))
    """
    if adapter_name in adapter_names(model):
        raise LoralabError(f"the model already has an adapter named {adapter_name!r}",
                           fix="choose another adapter name")
    recorded_targets, targets = resolve_targets(model, config)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _replace(model, name, module)
        r, scaling = config.rank_and_scaling(name)
        module.add_adapter(adapter_name, r=r, scaling=scaling, dropout=config.dropout, init=config.init)

    for name in _modules_to_save_names(model, config.modules_to_save or []):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _replace(model, name, module)
        module.add_adapter(adapter_name)

    _set_trainable(model, adapter_name, config.bias)
    # remember how the adapter was made, so that it is saved as it was specified
    model.lora_configs = {**getattr(model, "lora_configs", {}), adapter_name: (config, recorded_targets)}
    return model


def _modules_to_save_names(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, m in model.named_modules() if n and name_matches(n, patterns)]
    # the outermost match only: wrapping `classifier` already covers `classifier.dense` (and a wrapper made for an
    # earlier adapter covers its own copies)
    names = [n for n in names if not any(n.startswith(p + ".") for p in names)]
    missing = [p for p in patterns if not any(name_matches(n, [p]) for n, _ in model.named_modules() if n)]
    if missing:
        tops = [n for n, _ in model.named_children()]
        raise LoralabError(f"modules_to_save {missing} not found in this {type(model).__name__}",
                           field="lora.modules_to_save", fix=f"name modules of the model, e.g. one of {tops}")
    return names


def _set_trainable(model: nn.Module, adapter_name: str, bias: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].weight.requires_grad_(True)
            layer.lora_B[adapter_name].weight.requires_grad_(True)
            if bias == "lora_only" and layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if "bias" in name and "original_module" not in name:
                p.requires_grad_(True)


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Choose which adapter(s) the model uses; LoRA updates of several active adapters add up."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise LoralabError(f"unknown adapter {unknown[0]!r}", fix=did_you_mean(unknown[0], adapter_names(model)))
    for _, layer in lora_layers(model):
        if layer.merged_adapters and set(layer.merged_adapters) - set(names):
            layer.unmerge()
        layer.active_adapters = list(names)
    for _, wrapper in saved_modules(model):
        wrapper.active_adapters = list(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from the model in place (its LoRA weights and its copies of modules_to_save); the
    model computes as if it had never been added."""
    if name not in adapter_names(model) and name not in getattr(model, "lora_configs", {}):
        raise LoralabError(f"unknown adapter {name!r}", fix=did_you_mean(name, adapter_names(model)))
    for _, layer in lora_layers(model):
        if name in layer.merged_adapters:
            layer.unmerge()
        for table in (layer.lora_A, layer.lora_B, layer.lora_dropout):
            if name in table:
                del table[name]
        layer.scaling.pop(name, None)
        layer.active_adapters = [a for a in layer.active_adapters if a != name]
    for _, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
        wrapper.active_adapters = [a for a in wrapper.active_adapters if a != name]
    configs = dict(getattr(model, "lora_configs", {}))
    configs.pop(name, None)
    model.lora_configs = configs


@contextmanager
def row_adapters(model: nn.Module, names: list[str | None]):
    """Within this block, row i of every batch uses adapter names[i] (None: the base model alone): requests for
    several adapters share one batch. Merged adapters are unmerged first; modules_to_save heads cannot differ per
    row, so all rows must then name the same adapter.

    Example:
        with row_adapters(model, ["sql", None, "chat"]):
            logits = model(input_ids).logits   # three rows, three models
    """
    unknown = [n for n in names if n is not None and n not in adapter_names(model)]
    if unknown:
        raise LoralabError(f"unknown adapter {unknown[0]!r}", fix=did_you_mean(unknown[0], adapter_names(model)))
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    if wrappers and len(set(names)) > 1:
        raise LoralabError("adapters with modules_to_save (trained heads) cannot be mixed in one batch",
                           fix="send each adapter's rows in a batch of their own")
    previous = [w.active_adapters for w in wrappers]
    for layer in layers:
        if layer.merged_adapters:
            layer.unmerge()
        layer.row_adapters = list(names)
    for wrapper in wrappers:
        wrapper.active_adapters = [n for n in names[:1] if n is not None]
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None
        for wrapper, active in zip(wrappers, previous, strict=True):
            wrapper.active_adapters = active


@contextmanager
def disable_adapters(model: nn.Module):
    """Within this block the model computes exactly as the base model did.

    Example:
        with disable_adapters(model):
            base_logits = model(input_ids).logits
    """
    modules = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous, strict=True):
            m.disabled = was


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold the active (or named) adapters into the base weights; undo with unmerge_adapters."""
    for _, layer in lora_layers(model):
        layer.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put plain modules back: a model with no trace of LoRA and no extra cost."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        _replace(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        _replace(model, name, wrapper.active_module())
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counted as PEFT counts them (modules_to_save copies included; a 4-bit
    weight, stored two to a byte, counts its weights, not its bytes)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_parameters_report(model: nn.Module) -> str:
    """PEFT's wording: 'trainable params: N || all params: M || trainable%: P'."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
