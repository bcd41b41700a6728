"""Quantised frozen bases (QLoRA): the base model's linear layers stored in 4 or 8 bits by bitsandbytes.

    model.quantize: nf4     # 4-bit NormalFloat, double-quantised absmax (QLoRA's recipe)
    model.quantize: fp4     # 4-bit float
    model.quantize: int8    # LLM.int8(): 8-bit rows with a per-row scale

The base is loaded through transformers' BitsAndBytesConfig (the layers become bitsandbytes' Linear4bit and
Linear8bitLt, computing in model.dtype); LoRA's A and B wrap them and train in fp32 as on a float base. A folder
whose config.json already holds a bitsandbytes `quantization_config` (the *-bnb-4bit uploads) loads as it is.

bitsandbytes is imported only when a quantised base is asked for or found (it takes seconds to import).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys

import torch
from torch import nn

from loralab.errors import LoralabError

QUANTIZE = ("none", "nf4", "fp4", "int8")
MIN_VERSION = {"cpu": (0, 50), "cuda": (0, 45)}  # CPU kernels for 4- and 8-bit layers arrived in 0.50
BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantisation: the absmax values, as uint8, in blocks of 256 with one fp32 scale each
PIP = "pip install 'loralab[qlora]'  (or: pip install -U 'bitsandbytes>=0.50')"


def require_bitsandbytes(device: torch.device | str = "cpu"):
    """bitsandbytes, imported, if it is installed and new enough for `device`; else an error naming the pip command."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise LoralabError("a quantised base needs bitsandbytes, which is not installed", field="model.quantize",
                           fix=PIP) from None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION[kind]:
        need = ".".join(map(str, MIN_VERSION[kind]))
        raise LoralabError(f"bitsandbytes {version} is too old for quantised layers on the {kind.upper()} "
                           f"(needs {need} or newer)", field="model.quantize", fix=PIP)
    quiet_bitsandbytes()
    import bitsandbytes

    return bitsandbytes


def not_by_design(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Failed to load CPU gemm_4bit_forward", "MatMul8bitLt: inputs will be cast"))


def quiet_bitsandbytes() -> None:
    """Two warnings bitsandbytes repeats about what is by design: its optional CPU kernel package (`kernels`, which
    the generic kernels stand in for) at import, and at every 8-bit product that LLM.int8() quantises fp32 inputs
    through fp16."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not_by_design not in logger.filters:
            logger.addFilter(not_by_design)


def quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' linear layers, once bitsandbytes is imported (a model cannot hold them before)."""
    if "bitsandbytes" not in sys.modules:
        return ()
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    return (Linear4bit, Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, quantized_linear_types())


def bnb_config(quantize: str, compute_dtype: torch.dtype, keep: list[str]):
    """transformers' BitsAndBytesConfig: double quantisation on for 4 bits, compute in `compute_dtype`, the modules
    named in `keep` (output heads, modules trained in full) left in floats, as trainable weights must be."""
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)


def checkpoint_quantization(model_config) -> str | None:
    """The quantisation a checkpoint was saved in ("nf4", "fp4", "int8"), from its config.json; None: float weights.
    Other methods (GPTQ, AWQ, GGUF's own) are not bitsandbytes' and are left to transformers."""
    q = getattr(model_config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("quant_method") != "bitsandbytes":
        return None
    if q.get("load_in_8bit"):
        return "int8"
    return q.get("bnb_4bit_quant_type", "fp4") if q.get("load_in_4bit") else None


def cpu_computes_fp16() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.float16)
        return (x @ x).sum().item() == 8
    except RuntimeError:
        return False


def check_compute_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """fp16 products on a CPU run only where torch has kernels for them; refused up front rather than mid-step."""
    if dtype == torch.float16 and device.type == "cpu" and not cpu_computes_fp16():
        raise LoralabError("this CPU cannot compute in fp16", field="model.dtype",
                           fix="model.dtype=fp32 (or bf16) on a CPU")


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_quantized_linear(module)]


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a Linear4bit or Linear8bitLt computes with, (out, in), in fp32."""
    import bitsandbytes.functional as bf
    from bitsandbytes.nn import Linear4bit

    weight = layer.weight
    if isinstance(layer, Linear4bit):
        return bf.dequantize_4bit(weight.data, weight.quant_state).float()
    # after its first product an 8-bit layer keeps the row scales in its matmul state, not on the weight
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bf.int8_vectorwise_dequant(weight.data, scales).float()


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every quantised linear layer of `model` (LoRA's base layers included) by an nn.Linear holding its
    dequantised weight, so that merging adds B·A to the very weights training saw; returns the names replaced."""
    names = quantized_layer_names(model)
    for name in names:
        layer = model.get_submodule(name)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                          device=layer.weight.device)
        with torch.no_grad():
            plain.weight.copy_(dequantized_weight(layer))
            if layer.bias is not None:
                plain.bias.copy_(layer.bias.float())
        plain.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    if names:
        # a model of plain float layers now: save_pretrained must not write the quantisation config
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
    return names


def stored_bytes(out_features: int, in_features: int, quantize: str) -> int:
    """The bytes bitsandbytes keeps for one (out, in) weight: int8 rows plus an fp32 scale per row; 4 bits packed two
    to a byte plus one absmax per 64-weight block, itself double-quantised to uint8 with one fp32 scale per 256
    blocks (and the 16-entry fp32 code tables)."""
    n = out_features * in_features
    if quantize == "int8":
        return n + 4 * out_features
    blocks = -(-n // BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * 16 + 4 * 256


def loading_kwargs(quantize: str, model_config, dtype: torch.dtype, device: torch.device | str, keep: list[str],
                   field: str = "model.quantize") -> tuple[dict, str]:
    """from_pretrained's extra arguments for a quantised base, and the quantisation in effect: `quantize` as asked,
    or the one the checkpoint was saved in. Quantised layers are made on the device they compute on; `keep` names
    modules left in floats."""
    device = torch.device(device)
    saved = checkpoint_quantization(model_config)
    if saved and quantize not in ("none", saved):
        raise LoralabError(f"the checkpoint is already quantised as {saved}; it cannot be loaded as {quantize}",
                           field=field, fix=f"{field}={saved} (or none), or point at the float checkpoint")
    effective = saved or quantize
    if effective == "none":
        return {}, "none"
    require_bitsandbytes(device)
    check_compute_dtype(dtype, device)
    kwargs = {"device_map": {"": str(device)}}
    if not saved:
        kwargs["quantization_config"] = bnb_config(effective, dtype, keep)
    return kwargs, effective


def check_quantized(model: nn.Module, quantize: str, path: str, field: str = "model.quantize",
                    fresh: list[str] = ()) -> None:
    """A quantisation that found no layer to take would train a float model while the run says otherwise; a module
    the checkpoint lacks (`fresh`: random, so it must train) cannot train once quantised. Layers
    that were found keep one storage layout: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in
    place the first time it runs without gradients (an evaluation), which fails for layers narrower than 64 and
    leaves a layout that dequantisation and saving must undo; its generic kernel serves every shape."""
    names = quantized_layer_names(model)
    if quantize != "none" and not names:
        raise LoralabError(f"model.quantize={quantize}, but bitsandbytes found no linear layer of this "
                           f"{type(model).__name__} to quantise", file=path, field=field,
                           fix=f"{field}=none (bitsandbytes quantises torch.nn.Linear layers only)")
    random = [f for f in fresh if any(n == f or n.startswith(f + ".") for n in names)]
    if random:
        raise LoralabError(f"{', '.join(random)} {'is' if len(random) == 1 else 'are'} missing from the checkpoint, "
                           "so initialised at random, and bitsandbytes quantised it, which leaves it untrainable",
                           file=path, field="lora.modules_to_save",
                           fix=f"lora.modules_to_save={random}: modules trained in full stay in floats")
    for name in names:
        layer = model.get_submodule(name)
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    if names and next(model.parameters()).device.type == "cpu":
        # the float weights left unquantised (embeddings, norms, heads) are views of the memory-mapped checkpoint,
        # which keeps the whole file mapped, the pages read to quantise the other layers included: copies let it go
        with torch.no_grad():
            for p in model.parameters():
                if p.dtype.is_floating_point:
                    p.data = p.data.clone()


def describe(model: nn.Module) -> str | None:
    """How the base is stored, for reports and `loralab merge`: e.g. 'nf4 (double-quantised), 14 layers'."""
    names = quantized_layer_names(model)
    if not names:
        return None
    weight = model.get_submodule(names[0]).weight
    state = getattr(weight, "quant_state", None)
    kind = "int8" if state is None else state.quant_type + (" (double-quantised)" if state.nested else "")
    return f"{kind}, {len(names)} linear layers, by bitsandbytes"


def planned_layers(model: nn.Module, keep: list[str]) -> list[tuple[str, nn.Linear]]:
    """The layers of a float model that bitsandbytes would quantise when loading it (transformers' own rule: every
    nn.Linear whose name no `keep` pattern matches; LoRA's own trainable A and B are not the base's): what the
    memory planner counts in 4 or 8 bits."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and not m.weight.requires_grad
            and should_convert_module(name.replace(".base_layer", ""), keep)]


def planned_bytes(model: nn.Module, quantize: str, keep: list[str]) -> tuple[int, int]:
    """(bytes the quantised layers of `model` save against its float weights, bytes of the largest one's weight
    dequantised in the compute dtype: bitsandbytes makes it for each product, forward and backward)."""
    saved = largest = 0
    for _, layer in planned_layers(model, keep):
        weight = layer.weight
        saved += weight.numel() * weight.element_size() - stored_bytes(*weight.shape, quantize)
        largest = max(largest, weight.numel() * weight.element_size())
    return saved, largest
