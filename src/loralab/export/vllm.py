"""Will vLLM's LoRA loader take this adapter? The checks it makes, made before the user finds out in production.

vLLM loads PEFT-format LoRA adapters onto its own fused layers. It refuses modules trained in full
(`modules_to_save`, such as a resized output head or embeddings), DoRA, trained biases, and a rank above the
`--max-lora-rank` it was started with; and it applies one scaling, lora_alpha/r, to every module, so per-module
ranks or alphas would be served with the wrong scale.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from loralab.lora.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
VLLM_DEFAULT_MAX_RANK = 16


def vllm_problems(adapter: str) -> list[str]:
    """Each reason vLLM would refuse (or mis-serve) the adapter, naming the weights and the fix; [] if none."""
    folder = Path(adapter)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    problems = []
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type is {config['task_type']}: vLLM serves LoRA adapters of causal language models "
                        "only; serve this adapter with `loralab serve`")
    saved = sorted({k.removeprefix(PREFIX) for k in _keys(folder) if ".lora_" not in k and not k.endswith(".bias")})
    if config.get("modules_to_save") or saved:
        names = ", ".join(saved[:4]) + (" ..." if len(saved) > 4 else "")
        problems.append(f"modules_to_save ({', '.join(config.get('modules_to_save') or [])}: {names}) are weights "
                        "trained in full, which vLLM does not load; merge the adapter (`loralab merge`) and serve "
                        "the merged model, or train without modules_to_save")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not loaded by vLLM; merge the adapter (`loralab merge`) and serve the "
                        "merged model")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']}: the adapter trains biases, which vLLM does not load; retrain with "
                        "lora.bias: none, or merge the adapter")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_RANKS[-1]:
        problems.append(f"rank {max(ranks)} is above {VLLM_RANKS[-1]}, the largest --max-lora-rank vLLM accepts; "
                        "retrain with a smaller lora.r, or merge the adapter")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern give modules their own scaling, but vLLM scales every module by "
                        "lora_alpha/r; retrain without them, or merge the adapter")
    return problems


def vllm_notes(adapter: str) -> list[str]:
    """What the vLLM command line needs for this adapter (not problems)."""
    config = json.loads((Path(adapter) / CONFIG_NAME).read_text(encoding="utf-8"))
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    notes = []
    if rank > VLLM_DEFAULT_MAX_RANK:
        needed = next((v for v in VLLM_RANKS if v >= rank), VLLM_RANKS[-1])
        notes.append(f"rank {rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: start vLLM with "
                     f"--max-lora-rank {needed}")
    return notes


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return list(f.keys())
