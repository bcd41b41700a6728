"""Load a base model with zero or more named adapters, ready for inference.

    loaded = load_for_inference("path/to/base", {"sql": "runs/sql/adapter", "chat": "runs/chat/adapter"})
    loaded.use("chat")

Classification and tagging adapters each bring their own head (and label count), so `use` also switches the
labels the model predicts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loralab.config import ModelConfig
from loralab.errors import LoralabError, did_you_mean
from loralab.infer.settings import InferenceSettings, read_inference_settings
from loralab.lora import load_adapter, set_active_adapters
from loralab.models import (
    AUTO_CLASSES,
    compute_dtype,
    kept_in_floats,
    load_tokenizer,
    read_model_config,
    resolve_model_path,
    usable_device,
)
from loralab.quantize import check_quantized, loading_kwargs, quantized_layer_names
from loralab.tasks import get_task


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    settings: InferenceSettings
    device: torch.device
    dtype: torch.dtype
    adapters: list[str] = field(default_factory=list)
    adapter_settings: dict[str, InferenceSettings] = field(default_factory=dict)
    merged_into: str | None = None  # set by infer.merge.load_merged

    def use(self, name: str) -> None:
        """Make adapter `name` the active one, with its own task settings and labels."""
        if name not in self.adapters:
            raise LoralabError(f"no adapter is named {name!r}", field="--use", fix=did_you_mean(name, self.adapters))
        set_active_adapters(self.model, name)
        self.settings = self.adapter_settings[name]
        if self.settings.labels and get_task(self.settings.task).LABELLED:
            labels = self.settings.labels
            self.model.num_labels = len(labels)  # HF's classification losses read it
            self.model.config.num_labels = len(labels)
            self.model.config.id2label = dict(enumerate(labels))
            self.model.config.label2id = {label: i for i, label in enumerate(labels)}

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """['name=path', 'path'] -> {'name': 'path', 'default': 'path'} (an unnamed adapter is 'default')."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = ("default" if "default" not in adapters else Path(spec).name), spec
        if name in adapters:
            raise LoralabError(f"two adapters are named {name!r}", field="--adapter", fix="use name=path")
        adapters[name] = path
    return adapters


def _head_size(adapter: str) -> int | None:
    """Number of labels of a classification adapter written without loralab.json (e.g. by PEFT)."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def load_for_inference(model_path: str, adapters: dict[str, str] | None = None, gguf_file: str | None = None,
                       dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                       load_adapters: bool = True, quantize: str | None = None) -> Loaded:
    """The base model (in eval mode) with `adapters` loaded under their names, the first one active.
    load_adapters=False keeps the base model alone but still reads the first adapter's task and template.
    quantize: the base's bitsandbytes quantisation (none, nf4, fp4, int8); by default the one the first adapter
    was trained on, so that it computes on the very weights it learnt against."""
    adapters = adapters or {}
    for name, path in adapters.items():
        if not Path(path).is_dir():
            raise LoralabError("adapter folder not found", file=path, field=f"adapter {name}",
                               fix="point at the adapter/ folder of a run")
    all_settings = {name: adapter_inference_settings(path) for name, path in adapters.items()}
    first = next(iter(adapters.values()), None)
    settings = next(iter(all_settings.values()), None) or InferenceSettings()
    tasks = {name: s.task for name, s in all_settings.items()}
    if len({AUTO_CLASSES[t] for t in tasks.values()}) > 1:
        raise LoralabError(f"these adapters need different model heads ({tasks}), so they cannot share one base",
                           field="--adapter", fix="load adapters of one kind together (sft with generate-classify, "
                                                 "classification with classification, tagging with tagging)")
    config = ModelConfig(path=model_path, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code)
    # the tokenizer saved with the adapter is the one training used (pad token and all); else the base model's
    tokenizer_source = first if first and (Path(first) / "tokenizer_config.json").is_file() else model_path
    tokenizer_config = ModelConfig(path=tokenizer_source, gguf_file=None if tokenizer_source == first else gguf_file,
                                   trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_config, padding_side="left")
    device_ = usable_device(device)
    dtype_ = compute_dtype(config, device_)
    quantize = quantize or settings.quantize
    kwargs, quantize = loading_kwargs(quantize, read_model_config(model_path, gguf_file, trust_remote_code,
                                                                  field="--model"), dtype_, device_,
                                      kept_in_floats(trained_in_full(adapters.values())), "--quantize")
    if get_task(settings.task).LABELLED:
        labels = settings.labels or ["0", "1"]
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    try:
        model = AUTO_CLASSES[settings.task].from_pretrained(
            resolve_model_path(model_path), gguf_file=gguf_file, dtype=dtype_, trust_remote_code=trust_remote_code,
            **kwargs)
    except (OSError, ValueError) as e:
        raise LoralabError(f"cannot load the model: {e}", file=model_path, field="--model",
                           fix="point at a model folder with config.json and weights, or a hub id") from None
    check_quantized(model, quantize, model_path, "--quantize")
    if load_adapters:
        for name, path in adapters.items():
            load_adapter(model, path, adapter_name=name)
    if not quantized_layer_names(model):  # quantised layers were made on the device
        model.to(device_)
    model.eval()
    loaded = Loaded(model, tokenizer, settings, device_, dtype_, list(adapters) if load_adapters else [],
                    all_settings)
    if loaded.adapters:
        loaded.use(loaded.adapters[0])
    return loaded


def trained_in_full(adapters) -> list[str]:
    """The modules_to_save of the adapters' configs: a quantised base keeps them in floats, as in training."""
    names: list[str] = []
    for path in adapters:
        config = Path(path) / "adapter_config.json"
        if config.is_file():
            names += json.loads(config.read_text(encoding="utf-8")).get("modules_to_save") or []
    return list(dict.fromkeys(names))


def adapter_inference_settings(adapter: str) -> InferenceSettings:
    """The adapter's inference settings; a classifier saved without labels (by PEFT) gets '0', '1', ... per head row."""
    settings = read_inference_settings(adapter) or InferenceSettings()
    if get_task(settings.task).LABELLED and not settings.labels:
        settings.labels = [str(i) for i in range(_head_size(adapter) or 2)]
    return settings
