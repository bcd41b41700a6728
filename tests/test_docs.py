"""Every snippet in README.md and docs/ works as shown: Python blocks run (on tiny models standing in for the named
ones), and every `loralab` command line parses, with its config file and key=value settings accepted."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loralab.cli import build_parser
from loralab.config import load_config

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STANDIN = {"model": {"path": "m"}, "data": {"train": "t.json"}}  # for settings given without a config file


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def command_lines(block: str) -> list[list[str]]:
    """Each command of a bash block as argv (continuations joined, comments dropped, `&&` chains split)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return [c for c in commands if c]


def loralab_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCUMENTS:
        for block in blocks(path, "bash"):
            for argv in command_lines(block):
                if argv[0] == "loralab":
                    found.append((path.name, argv[1:]))
                elif argv[0] == "torchrun":
                    found.append((path.name, argv[argv.index("loralab") + 1:]))
    return found


@pytest.mark.parametrize("where,argv", loralab_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_command_lines_parse_and_their_settings_are_valid(where, argv):
    args = build_parser().parse_args(argv)
    if argv[0] in ("train", "estimate", "sweep"):
        config = getattr(args, "config", None)
        overrides = list(getattr(args, "overrides", []))
        if config and "=" in config:  # `loralab train lora.r=4`: a first setting, not a file
            overrides.insert(0, config)
            config = None
        if config and (ROOT / config).is_file():
            load_config(ROOT / config, overrides)
        else:
            load_config(None, overrides, base=STANDIN)


def test_files_the_documents_name_exist():
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCUMENTS)
    named = set(re.findall(r"\b((?:examples|benchmarks|docs|src/loralab|data)/[\w./-]+\.(?:py|yaml|md|sh|tsv))", text))
    assert named and [n for n in sorted(named) if not (ROOT / n).exists()] == []


def test_readme_library_snippet_runs(model_dirs, tmp_path, monkeypatch):
    (snippet,) = blocks(ROOT / "README.md", "python")
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(model_dirs["llama"])), {})
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_inference_snippet_runs(model_dirs, tmp_path, monkeypatch):
    from loralab import LoraConfig, apply_lora, save_adapter
    from tiny_models import tiny_model

    (snippet,) = blocks(ROOT / "docs" / "inference.md", "python")
    monkeypatch.chdir(tmp_path)
    for name in ("sql", "chat"):
        save_adapter(apply_lora(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), LoraConfig(r=2)),
                     tmp_path / "runs" / name / "adapter")
    for name, labels in (("sentiment", ["negative", "positive"]), ("topic", ["animal", "city", "colour"])):
        model = tiny_model("bert")  # the adapter's shapes are those of the tiny base folder's
        model.classifier = torch.nn.Linear(model.config.hidden_size, len(labels))
        model.config.num_labels = len(labels)
        folder = tmp_path / "runs" / name / "adapter"
        save_adapter(apply_lora(model, LoraConfig(r=2, modules_to_save=["classifier"])), folder)
        (folder / "loralab.json").write_text(json.dumps({"task": "classification", "labels": labels}))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "red blue"}) + "\n")
    exec(snippet, {"BASE": str(model_dirs["llama"]), "ENCODER": str(model_dirs["bert"])})
    assert json.loads((tmp_path / "topics.jsonl").read_text())["prediction"] in ("animal", "city", "colour")
    assert (tmp_path / "answers.jsonl").is_file() and (tmp_path / "merged" / "config.json").is_file()
