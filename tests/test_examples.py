"""Every example config runs end to end on a tiny model of the same architecture (the real model swapped out)."""

import json
from pathlib import Path

import pytest

from loralab.cli import main

ROOT = Path(__file__).resolve().parent.parent
# example -> the tiny architecture standing in for its model (ChatGLM is remote code, not in transformers: its
# template and data run on a tiny llama)
EXAMPLES = {
    "rams_argument_extraction.yaml": "bert",
    "llama_alpaca_bf16.yaml": "llama",
    "smollm2_alpaca.yaml": "llama",
    "chatglm3_advertisegen.yaml": "llama",
    "qwen_huanhuan.yaml": "qwen2",
    "bloom_generate_classify.yaml": "bloom",
    "seed000_study.yaml": "bert",
}


def test_every_example_is_listed():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.yaml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("example,arch", sorted(EXAMPLES.items()))
def test_example_runs_on_a_tiny_model(example, arch, model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in the examples are relative to the repository
    overrides = [f"model.path={model_dirs[arch]}", "model.gguf_file=null", "model.trust_remote_code=false",
                 f"output_dir={tmp_path}", "data.limit=24", "train.max_steps=3", "train.eval_every=null",
                 "train.eval_batch_size=16"]
    if arch == "bert":  # all of RAMS' training documents, so that every role in dev has been seen
        overrides += ["lora.target_modules=[query, value]", "data.limit=null", "data.max_length=64"]
    assert main(["train", f"examples/{example}", *overrides]) == 0
    run_dir = next(tmp_path.iterdir())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 3 and report["evaluations"], example
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
