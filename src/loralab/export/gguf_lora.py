"""The adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora adapter.gguf`): a few MB beside the
quantised base a user already has.

llama.cpp applies scale·B·A with scale = adapter.lora.alpha / rank, rank read from each B. Where a module's
scaling is not alpha/r (rsLoRA, rank_pattern, alpha_pattern) the difference is folded into its B, so every module
keeps the exact scaling it trained with. B shares its rows with the base weight, so it takes the base weight's
row layout (llama.cpp's q/k permutation); A is stored as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from loralab.errors import LoralabError
from loralab.export.gguf_arch import gguf_arch, gguf_tensor_name, to_gguf_layout
from loralab.export.gguf_model import write_gguf_file
from loralab.lora import read_adapter_config
from loralab.lora.io import PREFIX, WEIGHTS_NAME
from loralab.models import read_model_config


def lora_tensors(model_config, adapter: str) -> tuple[dict[str, torch.Tensor], float]:
    """{gguf name.lora_a / .lora_b: tensor} and the alpha to write."""
    arch = gguf_arch(model_config)
    lora, raw = read_adapter_config(adapter)
    if lora.modules_to_save:
        raise LoralabError(f"the adapter trains {', '.join(lora.modules_to_save)} in full, which a llama.cpp LoRA "
                           "file cannot carry", file=adapter, field="modules_to_save",
                           fix="export the merged model instead: --format gguf")
    if lora.bias != "none":
        raise LoralabError(f"the adapter trains biases (bias={lora.bias}), which a llama.cpp LoRA file cannot carry",
                           file=adapter, field="bias", fix="export the merged model instead: --format gguf")
    weights = load_file(str(Path(adapter) / WEIGHTS_NAME))
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(weights.items()):
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise LoralabError(f"the adapter holds {key}, which a llama.cpp LoRA file cannot carry", file=adapter,
                               fix="export the merged model instead: --format gguf")
        name = gguf_tensor_name(arch, model_config.num_hidden_layers, f"{module}.weight")
        if name is None:
            raise LoralabError(f"the adapted module {module} has no GGUF name for a {arch.name} model",
                               file=adapter, fix="export the merged model instead: --format gguf")
        tensor = tensor.float()
        if kind == "B.weight":
            r, scaling = lora.rank_and_scaling(module)
            tensor = to_gguf_layout(arch, model_config, name, tensor * (scaling * r / lora.alpha))
        tensors[f"{name}.lora_{kind[0].lower()}"] = tensor.contiguous()
    if not tensors:
        raise LoralabError("the adapter has no LoRA weights", file=adapter)
    return tensors, float(lora.alpha)


def write_gguf_lora(model_path: str, adapter: str, out: Path, gguf_file: str | None = None,
                    trust_remote_code: bool = False, name: str | None = None) -> Path:
    import gguf

    model_config = read_model_config(model_path, gguf_file, trust_remote_code, field="--model")
    arch = gguf_arch(model_config)
    tensors, alpha = lora_tensors(model_config, adapter)

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or "adapter")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, tensor in tensors.items():
            writer.add_tensor(tensor_name, tensor.numpy())

    return write_gguf_file(out, arch.name, fill)
