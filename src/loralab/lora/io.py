"""Adapter files in PEFT's format: adapter_config.json + adapter_model.safetensors, keys `base_model.model.<module>...`.

Only JSON and safetensors are ever read (no pickle). Loading checks the whole file against the model before the
model is touched, so a wrong adapter fails with a list of what differs instead of half-loading.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from loralab.errors import LoralabError, did_you_mean
from loralab.files import write_atomically
from loralab.lora.config import LoraConfig
from loralab.lora.inject import _modules_to_save_names, apply_lora, lora_layers, saved_modules
from loralab.lora.layer import LoraLinear, linear_shape
from loralab.lora.modules_to_save import ModulesToSave
from loralab.lora.targets import name_matches, resolve_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT features this loader does not implement; an adapter using them is refused rather than loaded wrongly
UNSUPPORTED = {"use_dora": False, "layer_replication": None, "target_parameters": None, "exclude_modules": None,
               "trainable_token_indices": None, "lora_bias": False, "use_qalora": False,
               "alora_invocation_tokens": None}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, so PEFT picks the matching PeftModel subclass."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    config, _ = model.lora_configs[adapter_name]
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            state[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            state[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                state[f"{name}.base_layer.bias"] = layer.base_layer.bias
    if config.bias == "all":
        state.update({n: p for n, p in model.named_parameters() if "bias" in n and not _in_saved_module(n)})
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                state[f"{name}.{key}"] = tensor
    return {PREFIX + k: v.detach().contiguous() for k, v in state.items()}


def _in_saved_module(param_name: str) -> bool:
    return ".original_module." in param_name or ".modules_to_save." in param_name


def peft_config_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """adapter_config.json as PEFT writes it (the fields PEFT needs to rebuild the same adapter)."""
    config, recorded_targets = model.lora_configs[adapter_name]
    model_config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": recorded_targets,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "modules_to_save": config.modules_to_save,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_dora": False,
        "revision": None,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the adapter in PEFT's format. Each file is written to a temporary name, synced, then renamed over the
    old one, so a crash never leaves a half-written adapter behind.

    Example:
        save_adapter(model, "runs/demo/adapter")
        PeftModel.from_pretrained(base_model, "runs/demo/adapter")   # loads in PEFT too
    """
    if adapter_name not in getattr(model, "lora_configs", {}):
        raise LoralabError(f"the model has no adapter named {adapter_name!r}",
                           fix=did_you_mean(adapter_name, getattr(model, "lora_configs", {})))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    metadata = {"format": "pt", "loralab.model_type": str(model_type)}
    tensors = {k: v.cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    config_text = json.dumps(peft_config_dict(model, adapter_name), indent=2, sort_keys=True)
    _write_atomically(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _write_atomically(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text + "\n"))
    return path


def _write_atomically(target: Path, write) -> None:
    try:
        write_atomically(target, write)
    except (OSError, SafetensorError) as e:  # disk full, read-only folder, ...
        raise LoralabError(f"could not write {target.name} ({getattr(e, 'strerror', None) or e})", file=str(target),
                           fix="free disk space; the previous file, if any, is intact") from None


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """Parse adapter_config.json (written by loralab or PEFT) into a LoraConfig; also returns the raw dict."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise LoralabError(f"no {CONFIG_NAME} in adapter folder {path}", file=str(path),
                           fix="point at the folder that save_adapter / PEFT's save_pretrained wrote")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", None)
        raise LoralabError(f"not valid JSON: {e}", file=str(config_file), record=line,
                           fix="restore the file from the run that wrote it") from None
    if not isinstance(raw, dict):
        raise LoralabError("expected a JSON object", file=str(config_file))
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoralabError(f"this is a {raw.get('peft_type')} adapter; loralab loads LoRA adapters only",
                           file=str(config_file), field="peft_type")
    for key, plain in UNSUPPORTED.items():
        if raw.get(key) not in (plain, None, {}, []):
            raise LoralabError(f"{key}={raw[key]!r} is a PEFT feature loralab does not support",
                               file=str(config_file), field=key, fix="load this adapter with PEFT instead")
    targets = raw.get("target_modules")
    init = raw.get("init_lora_weights", True)
    try:
        config = LoraConfig(
            r=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            target_modules=sorted(targets) if isinstance(targets, (list, set)) else targets,
            layers_to_transform=raw.get("layers_to_transform"),
            layers_pattern=_single_pattern(raw.get("layers_pattern")),
            modules_to_save=list(dict.fromkeys(raw["modules_to_save"])) if raw.get("modules_to_save") else None,
            bias=raw.get("bias", "none"),
            use_rslora=bool(raw.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
        )
    except LoralabError as e:
        e.file = str(config_file)
        raise
    return config, raw


def _single_pattern(pattern):
    # PEFT accepts a list of layer patterns; one is all any known architecture needs
    if isinstance(pattern, list):
        return pattern[0] if len(pattern) == 1 else "(?:" + "|".join(pattern) + ")"
    return pattern


def _open_weights(path: Path) -> tuple[dict[str, tuple], dict]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise LoralabError(f"{pickled[0]} is a pickle file, which can run code when loaded; "
                               "loralab reads adapters only from safetensors", file=str(path / pickled[0]),
                               fix=f"convert it to {WEIGHTS_NAME} in a trusted environment")
        raise LoralabError(f"no {WEIGHTS_NAME} in adapter folder {path}", file=str(path))
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise LoralabError(f"cannot read the adapter weights, the file is corrupt or truncated ({e})",
                           file=str(weights), fix="re-save the adapter from its run") from None
    return shapes, metadata


def expected_adapter_layout(model: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) file keys (without the PEFT prefix) and their shapes for `config` on `model`."""
    _, targets = resolve_targets(model, config)
    required: dict[str, tuple] = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        in_features, out_features = linear_shape(base)
        r, _ = config.rank_and_scaling(name)
        required[f"{name}.lora_A.weight"] = (r, in_features)
        required[f"{name}.lora_B.weight"] = (out_features, r)
    for name in _modules_to_save_names(model, config.modules_to_save or []):
        module = model.get_submodule(name)
        module = module.original_module if isinstance(module, ModulesToSave) else module
        required.update({f"{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    optional: dict[str, tuple] = {}
    if config.bias != "none":
        target_set = set(targets)
        for pname, p in model.named_parameters():
            owner, _, leaf = pname.rpartition(".")
            if leaf != "bias" or _in_saved_module(pname) or f"{pname}" in required:
                continue
            key = f"{owner}.base_layer.bias" if owner in target_set else pname
            optional[key] = tuple(p.shape)
    return required, optional


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Add the adapter saved at `path` (by loralab or PEFT) to `model` in place.

    Example:
        model = AutoModelForCausalLM.from_pretrained(base_path)
        load_adapter(model, "runs/demo/adapter")
    """
    path = Path(path)
    config, raw = read_adapter_config(path)
    shapes, metadata = _open_weights(path)
    weights_file = str(path / WEIGHTS_NAME)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    saved_type = metadata.get("loralab.model_type")
    if saved_type not in (None, "None", str(model_type)):
        raise LoralabError(f"this adapter was trained on a {saved_type!r} model, but the base model is "
                           f"{model_type!r} (adapter's base: {raw.get('base_model_name_or_path')})",
                           file=weights_file, fix="load it on the base model it was trained on")
    if config.modules_to_save:
        # PEFT lists both `classifier` and `score` for every classification adapter; keep those this model has
        names = [n for n, _ in model.named_modules() if n]
        config.modules_to_save = [p for p in config.modules_to_save if any(name_matches(n, [p]) for n in names)] or None
    file_keys = {_file_key(k): v for k, v in shapes.items() if ".original_module." not in k}
    if any("lora_embedding" in k or "lora_magnitude" in k for k in file_keys):
        raise LoralabError("the adapter holds embedding-LoRA or DoRA weights, which loralab does not support",
                           file=weights_file, fix="load this adapter with PEFT instead")
    try:
        required, optional = expected_adapter_layout(model, config)
    except LoralabError as e:
        raise LoralabError(f"the adapter does not fit this model: {e.message} (adapter's base: "
                           f"{raw.get('base_model_name_or_path')})", file=str(path / CONFIG_NAME),
                           field="target_modules", fix=e.fix) from None
    heads = _resized_heads(model, config, file_keys, required)
    _check_layout(file_keys, {k: heads.get(k, v) for k, v in required.items()}, optional, weights_file,
                  raw.get("base_model_name_or_path"))
    _check_finite(weights_file)

    apply_lora(model, config, adapter_name)
    for key, shape in heads.items():
        _resize_head_copy(model, key, shape, adapter_name)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    wrappers = {name for name, _ in saved_modules(model)}
    with safe_open(weights_file, framework="pt") as f, torch.no_grad():
        for key in f.keys():
            if ".original_module." in key:
                continue  # PEFT (bias="all") also writes the frozen originals of modules_to_save: base values
            name = _file_key(key)
            owner, _, leaf = name.rpartition(".")
            if leaf == "weight" and owner.endswith((".lora_A", ".lora_B")):
                name = f"{owner}.{adapter_name}.weight"
            else:
                wrapper = next((w for w in wrappers if name.startswith(w + ".")), None)
                if wrapper is not None:
                    name = f"{wrapper}.modules_to_save.{adapter_name}.{name[len(wrapper) + 1:]}"
            tensors[name].copy_(f.get_tensor(key))
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _resized_heads(model: nn.Module, config: LoraConfig, found: dict, required: dict) -> dict[str, tuple]:
    """Head tensors (modules_to_save) whose first dimension is another label count than the model's: each
    classification adapter brings its own head, so adapters for 2 and 5 classes can share one base model."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    saved = _modules_to_save_names(model, config.modules_to_save or []) if num_labels else []
    heads = {}
    for key, want in required.items():
        have = found.get(key)
        if (have is not None and any(key.startswith(name + ".") for name in saved) and len(have) == len(want)
                and want[0] == num_labels and have[0] != want[0] and tuple(have[1:]) == tuple(want[1:])):
            heads[key] = tuple(have)
    return heads


def _resize_head_copy(model: nn.Module, key: str, shape: tuple, adapter_name: str) -> None:
    """Give this adapter's copy of the head the file's label count (the original head and other copies keep theirs)."""
    wrapper = next(name for name, _ in saved_modules(model) if key.startswith(name + "."))
    owner_path, _, leaf = key[len(wrapper) + 1:].rpartition(".")
    copy = model.get_submodule(f"{wrapper}.modules_to_save.{adapter_name}")
    owner = copy.get_submodule(owner_path) if owner_path else copy
    old = getattr(owner, leaf)
    setattr(owner, leaf, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                      requires_grad=old.requires_grad))
    if isinstance(owner, nn.Linear) and leaf == "weight":
        owner.out_features = shape[0]


def _check_finite(weights_file: Path) -> None:
    """NaN or inf weights (a diverged run saved anyway, a damaged file) would make every output NaN: refused."""
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise LoralabError(f"{bad} of {tensor.numel()} values are NaN or infinite", file=str(weights_file),
                                   field=key, fix="the run that wrote it diverged or the file is damaged: use an "
                                                  "earlier checkpoint or retrain (e.g. with a lower train.lr)")


def _file_key(key: str) -> str:
    """A key of the file without PEFT's prefix and with `modules_to_save.<adapter>.` folded into the module path."""
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.removeprefix(PREFIX))


def _check_layout(found: dict, required: dict, optional: dict, file: str, base: str | None) -> None:
    missing = [k for k in required if k not in found]
    unexpected = [k for k in found if k not in required and k not in optional]
    wrong = [f"{k}: file {found[k]} vs model {want}" for k, want in {**required, **optional}.items()
             if k in found and tuple(found[k]) != tuple(want)]
    problems = []
    for label, items in (("missing", missing), ("not in this model", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise LoralabError("the adapter's tensors do not match this model: " + "; ".join(problems)
                           + f" (adapter's base: {base})", file=file,
                           fix="load the adapter on the base model it was trained on")
