"""`loralab export`: one trained adapter, written in the format a runtime loads.

gguf       base + adapter merged, one GGUF file (llama.cpp, LM Studio)
gguf-lora  the adapter alone, a llama.cpp LoRA GGUF to use with the base GGUF it was trained on
ollama     a folder with the merged GGUF and a Modelfile (training's chat template, system prompt, stop tokens)
vllm       the adapter folder, after checking that vLLM's LoRA loader takes it
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loralab.errors import LoralabError
from loralab.export.gguf_lora import write_gguf_lora
from loralab.export.gguf_model import write_gguf
from loralab.export.ollama import modelfile
from loralab.export.vllm import vllm_notes, vllm_problems
from loralab.files import write_folder_atomically
from loralab.infer.settings import read_inference_settings
from loralab.models import resolve_model_path
from loralab.tasks import get_task

FORMATS = ("gguf", "gguf-lora", "ollama", "vllm")


def export(fmt: str, model: str, adapter: str, out: str | None, quant: str = "f16", gguf_file: str | None = None,
           trust_remote_code: bool = False, overwrite: bool = False, check: bool = False,
           quantize: str | None = None) -> list[str]:
    """Write the export (with check: only say whether vLLM takes the adapter); returns lines to tell the user
    (what was written, what the runtime needs)."""
    if fmt not in FORMATS:
        raise LoralabError(f"unknown export format {fmt!r}", field="--format", fix=f"use one of {', '.join(FORMATS)}")
    if not Path(adapter).is_dir():
        raise LoralabError("adapter folder not found", file=adapter, field="--adapter",
                           fix="point at the adapter/ folder of a run")
    if check:
        if fmt != "vllm":
            raise LoralabError("--check applies to --format vllm", field="--check", fix="leave --check out")
        _refuse_vllm_problems(adapter)
        return ["vLLM will load this adapter", *vllm_notes(adapter)]
    if not out:
        raise LoralabError("no output given", field="--out", fix="add --out PATH")
    target = Path(out)
    if target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
        raise LoralabError("the output exists", file=out, fix="choose another --out or pass --overwrite")
    name = Path(adapter).resolve().parent.name  # the run's name
    if fmt == "vllm":
        _refuse_vllm_problems(adapter)
        write_folder_atomically(target, lambda tmp: shutil.copytree(adapter, tmp, dirs_exist_ok=True))
        return [f"adapter for vLLM written to {target}", *vllm_notes(adapter),
                f"serve it with: vllm serve BASE --enable-lora --lora-modules {name}={target}"]
    settings = read_inference_settings(adapter)
    if settings is not None and not get_task(settings.task).CAUSAL:
        raise LoralabError(f"a {settings.task} adapter has a task head that llama.cpp does not run", file=adapter,
                           field="--format", fix="GGUF export is for language models (sft adapters); serve this "
                                                 "one with `loralab serve`")
    source = Path(resolve_model_path(model)) / gguf_file if gguf_file else None
    if fmt == "gguf-lora":
        write_gguf_lora(model, adapter, target, gguf_file, trust_remote_code, name=name)
        base = f" -m {source}" if source else " -m BASE.gguf"
        lines = [f"LoRA GGUF written to {target} ({_size(target)})", f"run it with: llama-cli{base} --lora {target}"]
        if settings is not None and settings.quantize != "none":
            lines.append(f"note: this adapter learnt against the {settings.quantize} base; on another base GGUF its "
                         "answers can drift, and --format gguf (merged into the dequantised weights) keeps them")
        return lines

    from loralab.infer.merge import load_merged

    loaded = load_merged(model, adapter, gguf_file, trust_remote_code, quantize)
    # the template training used; an adapter that does not say (one from PEFT) chats with the tokenizer's, as in
    # `loralab chat`
    template = loaded.settings.template or getattr(loaded.tokenizer, "chat_template", None)
    if fmt == "gguf":
        write_gguf(loaded.model, loaded.tokenizer, template, target, quant, source, name)
        return [f"merged into {loaded.merged_into}", f"GGUF ({quant}) written to {target} ({_size(target)})",
                f"run it with: llama-cli -m {target}"]
    # ollama: the Modelfile is derived first, so a template Ollama cannot express stops the export before writing
    gguf_name = f"{name}.{quant}.gguf"
    text = modelfile(gguf_name, loaded.tokenizer, template, loaded.settings.system) if template else \
        f'FROM ./{gguf_name}\nTEMPLATE """{{{{ .Prompt }}}}"""\n'

    def write(tmp: Path) -> None:
        write_gguf(loaded.model, loaded.tokenizer, template, tmp / gguf_name, quant, source, name)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")

    write_folder_atomically(target, write)
    return [f"merged into {loaded.merged_into}",
            f"Ollama model written to {target} (Modelfile and {gguf_name}, {_size(target / gguf_name)})",
            f"create it with: cd {target} && ollama create {name} -f Modelfile"]


def _refuse_vllm_problems(adapter: str) -> None:
    problems = vllm_problems(adapter)
    if problems:
        raise LoralabError("vLLM will not load this adapter:\n  - " + "\n  - ".join(problems), file=adapter)


def _size(path: Path) -> str:
    from loralab.train.report import human_bytes

    return human_bytes(path.stat().st_size)
