"""`loralab merge`: fold an adapter into the base weights and write a plain transformers model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from loralab.errors import LoralabError
from loralab.files import write_folder_atomically
from loralab.infer.load import load_for_inference
from loralab.lora import merge_and_unload
from loralab.models import read_model_config
from loralab.quantize import dequantize_model
from loralab.quantize import describe as describe_quantization


def merge_to_folder(model_path: str, adapter: str, out: str, gguf_file: str | None = None,
                    trust_remote_code: bool = False, overwrite: bool = False, quantize: str | None = None,
                    say=print) -> Path:
    """Base + adapter merged, saved (safetensors, config, tokenizer) in the base model's dtype. Written to a
    temporary folder and renamed at the end, so `out` is never left half-written. `say` hears which base the
    adapter was merged into."""
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LoralabError("the output folder exists and is not empty", file=out, fix="choose another --out or "
                                                                                       "pass --overwrite")
    # merged in fp32, then written in the dtype the base checkpoint declares
    config = read_model_config(model_path, gguf_file, trust_remote_code, field="--model")
    base_dtype = getattr(config, "dtype", None)
    loaded = load_merged(model_path, adapter, gguf_file, trust_remote_code, quantize)
    model = loaded.model
    say(f"merged into {loaded.merged_into}")
    if isinstance(base_dtype, torch.dtype):
        model.to(base_dtype)
    loaded.tokenizer.padding_side = "right"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)

    write_folder_atomically(target, write)
    return target


def load_merged(model_path: str, adapter: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                quantize: str | None = None):
    """Base + adapter loaded in fp32 on the CPU and merged: the weights every export writes. An adapter trained on
    a quantised base (QLoRA) is merged into that base's dequantised weights, W = dequant(Wq) + scaling·B·A: the
    weights it learnt against, not a float copy of the checkpoint, whose rounding differences B·A never saw.
    `loaded.merged_into` says which base it was."""
    loaded = load_for_inference(model_path, {"default": adapter}, gguf_file=gguf_file, dtype="fp32",
                                device="cpu", trust_remote_code=trust_remote_code, quantize=quantize)
    stored = describe_quantization(loaded.model)
    dequantize_model(loaded.model)
    loaded.model = merge_and_unload(loaded.model)
    loaded.merged_into = (f"the dequantised weights of {model_path} as quantised for training ({stored}), in fp32"
                          if stored else f"the weights of {model_path}, in fp32")
    if gguf_file:
        # transformers dequantised the GGUF weights to floats at load but still marks the model as GGUF-quantized,
        # which save_pretrained refuses; the merged weights are plain floats, so the mark goes
        loaded.model.hf_quantizer = None
        if hasattr(loaded.model.config, "quantization_config"):
            del loaded.model.config.quantization_config
    return loaded
