"""Crashes and bad luck: disk full while saving, NaN losses, SIGKILL at random moments."""

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

import loralab.train.checkpoint as checkpoint
import loralab.train.loop as loop
from loralab.cli import USER_ERROR, main
from loralab.train.checkpoint import list_checkpoints, load_state
from run_helpers import SENTIMENT, write_config, write_jsonl


def config_for(tmp_path, model_dirs, name, **train):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 4])
    return write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"),
                        task="classification", model={"path": str(model_dirs["bert"])},
                        lora={"r": 4, "dropout": 0.1}, data={"train": str(data), "validation": str(data)},
                        train={"epochs": 2, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 2, **train})


def adapter(tmp_path, name):
    return load_file(tmp_path / "runs" / name / "adapter" / "adapter_model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_saving_keeps_earlier_checkpoints_and_resumes(tmp_path, model_dirs, monkeypatch, capsys):
    config = config_for(tmp_path, model_dirs, "full")
    real, calls = checkpoint.save_file, {"n": 0}

    def fill_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fill_disk)
    assert main(["train", str(config)]) == USER_ERROR
    assert "No space left on device" in capsys.readouterr().err
    folder = tmp_path / "runs/full/checkpoints"
    assert [c.name for c in list_checkpoints(folder)] == ["step-00000002", "step-00000004"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]
    assert load_state(list_checkpoints(folder)[-1])["step"] == 4
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main(["train", str(config)]) == 0


def test_nan_steps_are_skipped_and_counted_then_stop_the_run(tmp_path, model_dirs, monkeypatch, capsys):
    real, calls = loop.train_step, {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        loss, tokens = real(*args)
        return (float("nan"), tokens) if calls["n"] == 3 else (loss, tokens)

    monkeypatch.setattr(loop, "train_step", sometimes_nan)
    assert main(["train", str(config_for(tmp_path, model_dirs, "one"))]) == 0
    import json

    assert json.loads((tmp_path / "runs/one/report.json").read_text())["skipped_steps"] == 1
    monkeypatch.setattr(loop, "train_step", lambda *args: (float("inf"), 1))
    assert main(["train", str(config_for(tmp_path, model_dirs, "all"))]) == USER_ERROR
    err = capsys.readouterr().err
    assert "NaN/inf for 10 steps in a row" in err and "fp16" in err and "train.lr" in err


def test_a_nan_micro_batch_still_runs_its_backward_and_makes_the_step_nan():
    """Every process must run every backward (DDP all-reduces inside it; one that skipped would leave the others
    waiting); the step's loss carries the NaN, so the loop drops the step and its gradients."""
    weight = torch.nn.Parameter(torch.ones(2))

    class Loss(torch.nn.Module):
        def forward(self, input_ids, **batch):
            return (weight * input_ids.float()).sum() * (float("nan") if input_ids[0, 0] == 9 else 1.0)

    rows = [[[{"input_ids": [1, 2], "labels": [1, 2]}]], [[{"input_ids": [9, 2], "labels": [9, 2]}]]]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, tokens = loop.train_step(Loss(), rows, 0, torch.device("cpu"), contextlib.nullcontext(), scaler)
    assert loss != loss and tokens == 4  # NaN
    assert weight.grad is not None and torch.isnan(weight.grad).all()  # both backward passes ran


def test_sigkill_at_random_moments_then_resume_gives_the_same_adapter(tmp_path, model_dirs):
    settings = dict(epochs=80, checkpoint_every=3, keep_checkpoints=3)  # ~960 short steps, a save every 3
    assert main(["train", str(config_for(tmp_path, model_dirs, "whole", **settings))]) == 0
    command = [sys.executable, "-m", "loralab", "train", str(config_for(tmp_path, model_dirs, "cut", **settings))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(0)
    folder = tmp_path / "runs/cut/checkpoints"
    steps_seen = []
    for _ in range(3):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:  # wait until training has started, then kill at a random moment
            if "trainable params" in line:
                break
        time.sleep(rng.uniform(0.3, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (tmp_path / "runs/cut/report.json").exists()  # killed mid-run, not after it
        for complete in list_checkpoints(folder):  # whatever survived is whole and loads
            load_file(complete / "trainable.safetensors")
        steps_seen.append(load_state(list_checkpoints(folder)[-1])["step"] if list_checkpoints(folder) else 0)
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 0  # each resumed run made progress
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert same(adapter(tmp_path, "cut"), adapter(tmp_path, "whole"))
