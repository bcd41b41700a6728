"""An interrupted run resumed with resume: auto ends with exactly the adapter of an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file

import loralab.train.loop as loop
from loralab.cli import main
from loralab.train.checkpoint import list_checkpoints
from run_helpers import SENTIMENT, write_config, write_jsonl


class Crash(BaseException):
    """An abrupt stop (like a kill): not an error the CLI would catch and report."""


def config_for(tmp_path, model_dirs, name, quantize="none"):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 3])
    return write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"),
                        task="classification", model={"path": str(model_dirs["bert"]), "quantize": quantize},
                        lora={"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must be restored too
                        data={"train": str(data), "validation": str(data)},
                        train={"epochs": 2, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "checkpoint_every": 2,
                               "keep_checkpoints": 2, "schedule": "cosine", "warmup": 2})


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_resumed_run_is_bit_identical(tmp_path, model_dirs, monkeypatch, quantize):
    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    assert main(["train", str(config_for(tmp_path, model_dirs, "whole", quantize))]) == 0
    whole = load_file(tmp_path / "runs/whole/adapter/adapter_model.safetensors")

    config = config_for(tmp_path, model_dirs, "cut", quantize)
    real_step, calls = loop.optimizer_step, {"n": 0}

    def crashing_step(*args):
        calls["n"] += 1
        if calls["n"] == 8:  # dies in step 8: step 7 is lost (checkpoints every 2 steps and at the epoch end, 5)
            raise Crash()
        real_step(*args)

    monkeypatch.setattr(loop, "optimizer_step", crashing_step)
    with pytest.raises(Crash):
        main(["train", str(config)])
    checkpoints = list_checkpoints(tmp_path / "runs/cut/checkpoints")
    assert checkpoints[-1].name == "step-00000006" and len(checkpoints) <= 3  # keep 2, and the best
    (tmp_path / "runs/cut/checkpoints/.tmp-step-00000006").mkdir()  # a save cut short: must be ignored
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert main(["train", str(config)]) == 0
    resumed = load_file(tmp_path / "runs/cut/adapter/adapter_model.safetensors")
    # every tensor bit for bit (the file bytes may differ: safetensors orders its metadata map at random)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
