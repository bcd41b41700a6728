"""A merged model as one GGUF file for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

Vectors (norms, biases) stay in f32 as llama.cpp's converter keeps them; matrices take the chosen type. q8_0 and
q4_0 quantise blocks of 32 values along a row, so a matrix whose rows do not divide into blocks is kept in f16, and
with q4_0 the embeddings and output head are kept in q8_0, where 4 bits cost the most quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from loralab.errors import LoralabError
from loralab.export.gguf_arch import extra_tensors, gguf_arch, gguf_tensor_name, to_gguf_layout, write_model_metadata
from loralab.export.gguf_tokenizer import copy_tokenizer_fields, write_chat_template, write_tokenizer_fields
from loralab.files import write_atomically

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # values per q8_0 / q4_0 block


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names and in its layout (fp32)."""
    config = model.config
    arch = gguf_arch(config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = gguf_tensor_name(arch, config.num_hidden_layers, hf_name)
        if name is None:
            raise LoralabError(f"the weight {hf_name} has no GGUF name for a {arch.name} model", field="--model",
                               fix="use `loralab merge` and llama.cpp's convert_hf_to_gguf.py")
        tensors[name] = to_gguf_layout(arch, config, name, tensor.detach().float().cpu())
    tensors.update(extra_tensors(config))
    return tensors


def encode(name: str, tensor: torch.Tensor, quant: str):
    """(data, GGML type or None for a plain numpy dtype) for one tensor."""
    import gguf

    array = tensor.numpy()
    if array.ndim == 1:
        return array.astype(np.float32), None
    kind = quant
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        kind = "q8_0"
    if kind in ("q8_0", "q4_0") and array.shape[-1] % BLOCK:
        kind = "f16"
    if kind in ("f32", "f16"):
        return array.astype(np.float32 if kind == "f32" else np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def write_gguf(model: nn.Module, tokenizer, template: str | None, out: Path, quant: str = "f16",
               source_gguf: Path | None = None, name: str | None = None) -> Path:
    """Write `model` (already merged) with its tokenizer and chat template to `out`, whole or not at all."""
    import gguf

    if quant not in QUANTS:
        raise LoralabError(f"unknown GGUF type {quant!r}", field="--quant", fix=f"use one of {', '.join(QUANTS)}")
    arch = gguf_arch(model.config)
    tensors = gguf_tensors(model)
    types = gguf.LlamaFileType
    file_type = {"f32": types.ALL_F32, "f16": types.MOSTLY_F16, "bf16": types.MOSTLY_BF16, "q8_0": types.MOSTLY_Q8_0,
                 "q4_0": types.MOSTLY_Q4_0}[quant]

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or "model")
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_model_metadata(writer, arch, model.config)
        if source_gguf is not None:
            copy_tokenizer_fields(writer, source_gguf)
        else:
            write_tokenizer_fields(writer, tokenizer, model.config.vocab_size)
        write_chat_template(writer, tokenizer, template)
        for tensor_name, tensor in tensors.items():
            data, qtype = encode(tensor_name, tensor, quant)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)

    return write_gguf_file(out, arch.name, fill)


def write_gguf_file(out: Path, architecture: str, fill) -> Path:
    """A GGUF file whose metadata and tensors `fill(writer)` adds, written whole or not at all."""
    import gguf

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(out, write)
    return out
