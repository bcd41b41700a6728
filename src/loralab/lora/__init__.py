"""LoRA: the layer, its injection into transformers models, and adapter files in PEFT's format."""

from loralab.lora.config import LoraConfig
from loralab.lora.inject import (
    adapter_names,
    apply_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    merge_adapters,
    merge_and_unload,
    row_adapters,
    set_active_adapters,
    trainable_parameters_report,
    unmerge_adapters,
)
from loralab.lora.io import load_adapter, read_adapter_config, save_adapter
from loralab.lora.layer import LoraLinear
from loralab.lora.targets import DEFAULT_TARGETS, linear_suffixes

__all__ = [
    "DEFAULT_TARGETS",
    "LoraConfig",
    "LoraLinear",
    "adapter_names",
    "apply_lora",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "linear_suffixes",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
    "row_adapters",
    "set_active_adapters",
    "trainable_parameters_report",
    "unmerge_adapters",
]
