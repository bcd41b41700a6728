"""Data-parallel training with PyTorch's engine: 2 CPU processes (gloo) under torchrun."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loralab.cli import main
from run_helpers import SENTIMENT, write_config, write_jsonl


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny encoder without dropout: random masks differ between processes, so no run could match another."""
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    folder = tmp_path_factory.mktemp("bert_no_dropout")
    tokenizer = tiny_tokenizer()
    tiny_model("bert", head="base", vocab_size=len(tokenizer), initializer_range=0.2, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"bert": folder}


def config_for(tmp_path, model_dirs, name, batch_size):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 4])  # 24
    return write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"),
                        task="classification", model={"path": str(model_dirs["bert"])}, lora={"r": 4},
                        data={"train": str(data), "validation": str(data)},
                        train={"epochs": 2, "batch_size": batch_size, "grad_accum": 2, "lr": 1e-2, "log_every": 1,
                               "checkpoint_every": 2, "keep_checkpoints": 20})


def losses(run_dir):
    return [e["loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in e]


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def close(a, b, atol):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_two_processes_follow_one_with_twice_the_batch_and_resume(tmp_path, model_dirs):
    assert main(["train", str(config_for(tmp_path, model_dirs, "one", batch_size=4))]) == 0
    assert main(["train", str(config_for(tmp_path, model_dirs, "two", batch_size=2)), "--nproc", "2"]) == 0
    one, two = tmp_path / "runs/one", tmp_path / "runs/two"
    assert len(losses(one)) == len(losses(two)) == 6  # 24 examples / (4 x 2 accumulated) x 2 epochs
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert close(adapter(two), adapter(one), atol=1e-5)
    assert json.loads((two / "report.json").read_text())["steps"] == 6

    # resume the 2-process run from its step-2 checkpoint, on 2 processes and on 1: it continues exactly
    for nproc, out in ((2, "resumed2"), (1, "resumed1")):
        copy = tmp_path / out / "two"
        shutil.copytree(two, copy)
        for path in (copy / "checkpoints").iterdir():
            if path.name != "step-00000002":
                shutil.rmtree(path)
        shutil.rmtree(copy / "adapter")
        (copy / "report.json").unlink()
        saved = yaml.safe_load((copy / "config.yaml").read_text())
        saved["output_dir"] = str(tmp_path / out)
        if nproc == 1:
            saved["train"]["batch_size"] = 4  # the same global batch on one process
        (copy / "config.yaml").write_text(yaml.safe_dump(saved))
        config = write_config(tmp_path / f"{out}.yaml", **saved)
        assert main(["train", str(config), "--nproc", str(nproc)]) == 0
        assert close(adapter(copy), adapter(two), atol=1e-5), nproc


def test_batch_size_auto_splits_the_global_batch_between_processes(tmp_path, model_dirs, capfd):
    # each process plans its share (8 / 2) and they agree on one size: 8 examples a step, as on one process
    auto = {"train.batch_size=auto", "train.global_batch=8", "train.memory_budget=64GiB"}
    assert main(["train", str(config_for(tmp_path, model_dirs, "one", batch_size=4)), *auto]) == 0
    assert main(["train", str(config_for(tmp_path, model_dirs, "two", batch_size=4)), *auto, "--nproc", "2"]) == 0
    assert "batch size auto: 4 x 1 accumulation steps x 2 processes" in " ".join(capfd.readouterr().err.split())
    one, two = tmp_path / "runs/one", tmp_path / "runs/two"
    assert len(losses(one)) == len(losses(two)) == 6  # 24 examples / 8 a step x 2 epochs
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)


def test_a_4bit_base_trains_on_two_processes_as_on_one(tmp_path, model_dirs, capfd):
    """QLoRA under DDP: the quantised base replicated, A and B (and the fresh head) synchronised; the batch planned
    with the base counted in 4 bits."""
    pytest.importorskip("bitsandbytes")
    settings = {"model.quantize=nf4", "train.batch_size=auto", "train.global_batch=8", "train.memory_budget=64GiB"}
    assert main(["train", str(config_for(tmp_path, model_dirs, "one", batch_size=4)), *settings]) == 0
    assert main(["train", str(config_for(tmp_path, model_dirs, "two", batch_size=4)), *settings, "--nproc", "2"]) == 0
    assert "batch size auto: 4 x 1 accumulation steps x 2 processes" in " ".join(capfd.readouterr().err.split())
    one, two = tmp_path / "runs/one", tmp_path / "runs/two"
    assert json.loads((two / "report.json").read_text())["base_quantization"].startswith("nf4")
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert close(adapter(two), adapter(one), atol=1e-5)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny llama (decoder blocks for FSDP to shard), no dropout anywhere."""
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    folder = tmp_path_factory.mktemp("llama_fsdp")
    tokenizer = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_config(tmp_path, llama_dir, name, batch_size, distributed):
    rows = [{"instruction": f"Say {w} twice", "input": "", "output": f"{w} {w}"}
            for w in ("good", "bad", "fine", "great", "poor", "awful")] * 2
    data = write_jsonl(tmp_path / "train.jsonl", rows)  # 12
    return write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"), task="sft",
                        distributed=distributed, model={"path": str(llama_dir)},
                        lora={"r": 4, "target_modules": "all-linear"},
                        data={"train": str(data), "validation": str(data), "template": "chatml"},
                        train={"epochs": 2, "batch_size": batch_size, "lr": 1e-2, "log_every": 1,
                               "checkpoint_every": 1, "keep_checkpoints": 20})


def test_fsdp_shards_the_base_and_follows_one_process(tmp_path, llama_dir):
    assert main(["train", str(sft_config(tmp_path, llama_dir, "one", 4, "ddp"))]) == 0
    assert main(["train", str(sft_config(tmp_path, llama_dir, "fsdp", 2, "fsdp")), "--nproc", "2"]) == 0
    one, fsdp = tmp_path / "runs/one", tmp_path / "runs/fsdp"
    assert len(losses(fsdp)) == len(losses(one)) == 6  # 12 examples / 4 per step x 2 epochs
    assert losses(fsdp) == pytest.approx(losses(one), abs=1e-5)
    assert close(adapter(fsdp), adapter(one), atol=1e-5)
    evaluations = json.loads((fsdp / "report.json").read_text())["evaluations"]
    reference = json.loads((one / "report.json").read_text())["evaluations"]
    assert [e["metrics"]["loss"] for e in evaluations] == pytest.approx([e["metrics"]["loss"] for e in reference],
                                                                        abs=1e-5)

    # resumed from its step-3 checkpoint on 2 processes, it ends where the uninterrupted run ended
    copy, config = interrupted_copy(fsdp, tmp_path / "resumed", "step-00000003")
    assert main(["train", str(config), "--nproc", "2"]) == 0
    assert close(adapter(copy), adapter(fsdp), atol=1e-5)


def interrupted_copy(run_dir, root, checkpoint):
    """The run as a crash right after `checkpoint` would have left it, under root/; returns (its folder, config)."""
    copy = root / run_dir.name
    shutil.copytree(run_dir, copy)
    for path in (copy / "checkpoints").iterdir():
        if path.name != checkpoint:
            shutil.rmtree(path)
    shutil.rmtree(copy / "adapter")
    (copy / "report.json").unlink()
    (copy / "metrics.jsonl").write_text("")
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["output_dir"] = str(root)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    return copy, write_config(root.parent / f"{root.name}.yaml", **saved)


def test_fsdp_trains_an_encoder_classifier_like_one_process(tmp_path, model_dirs):
    assert main(["train", str(config_for(tmp_path, model_dirs, "one", batch_size=4))]) == 0
    assert main(["train", str(config_for(tmp_path, model_dirs, "fsdp", batch_size=2)), "distributed=fsdp",
                 "--nproc", "2"]) == 0
    one, fsdp = tmp_path / "runs/one", tmp_path / "runs/fsdp"
    assert losses(fsdp) == pytest.approx(losses(one), abs=1e-5)
    assert close(adapter(fsdp), adapter(one), atol=1e-5)


def test_fsdp_is_for_lora_runs(tmp_path, llama_dir):
    config = sft_config(tmp_path, llama_dir, "full", 2, "fsdp")
    assert main(["train", str(config), "method=full"]) == 2


def test_a_resumed_run_with_dropout_continues_each_process_random_stream(tmp_path, llama_dir):
    config = yaml.safe_load(sft_config(tmp_path, llama_dir, "dropout", 2, "ddp").read_text())
    config["lora"]["dropout"] = 0.3  # different masks on each process: resuming must restore both streams
    path = write_config(tmp_path / "dropout.yaml", **config)
    assert main(["train", str(path), "--nproc", "2"]) == 0
    run_dir = tmp_path / "runs" / "dropout"
    copy, resumed = interrupted_copy(run_dir, tmp_path / "resumed", "step-00000002")
    assert main(["train", str(resumed), "--nproc", "2"]) == 0
    assert close(adapter(copy), adapter(run_dir), atol=1e-6)
    assert losses(copy) == pytest.approx(losses(run_dir)[2:], abs=1e-6)
