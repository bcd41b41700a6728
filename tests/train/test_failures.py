"""Crashes and bad luck: disk full while saving, NaN losses, SIGKILL at random moments."""

import contextlib
import errno
import os
import random
import re
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


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_the_rerun_ends_as_an_unbroken_run(tmp_path, model_dirs):
    settings = dict(epochs=30, checkpoint_every=100000)  # between epoch ends, the signal alone saves
    assert main(["train", str(config_for(tmp_path, model_dirs, "whole", **settings))]) == 0
    command = [sys.executable, "-m", "loralab", "train", str(config_for(tmp_path, model_dirs, "cut", **settings))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "trainable params" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read()
    assert process.wait() == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "rerun the same command to resume" in err
    newest = list_checkpoints(tmp_path / "runs/cut/checkpoints")[-1]  # (epoch ends checkpoint too)
    step = int(re.search(r"after step (\d+)", err).group(1))
    assert newest.name in err and load_state(newest)["step"] == step and 0 < step < 360
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert same(adapter(tmp_path, "cut"), adapter(tmp_path, "whole"))


def _steps(run_dir):
    import json

    return [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, model_dirs, capsys):
    config = config_for(tmp_path, model_dirs, "r", max_steps=6, keep_checkpoints=3, log_every=1)
    assert main(["train", str(config)]) == 0
    folder = tmp_path / "runs/r/checkpoints"
    assert [c.name for c in list_checkpoints(folder)] == ["step-00000002", "step-00000004", "step-00000006"]
    weights = folder / "step-00000006" / "trainable.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = b"\xff" * 8  # a flipped tail: the file still parses, only its checksum tells
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["train", str(config), "train.max_steps=10"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-00000006" in err and "resuming" in err and "step-00000004" in err
    assert _steps(tmp_path / "runs/r") == list(range(1, 11))  # steps 5-6 logged once, after the replay
    assert load_state(list_checkpoints(folder)[-1])["step"] == 10


def test_a_damaged_config_yaml_is_read_from_the_checkpoints(tmp_path, model_dirs, capsys):
    config = config_for(tmp_path, model_dirs, "r", max_steps=4)
    assert main(["train", str(config)]) == 0
    (tmp_path / "runs/r/config.yaml").write_text("name: [unclosed\n\x00")
    assert main(["train", str(config), "train.max_steps=6"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert main(["train", str(config), "lora.r=2"]) == USER_ERROR  # still compared with the run it was
    assert "holds a different run" in capsys.readouterr().err


def test_a_changed_data_file_is_refused_on_resume_unless_asked(tmp_path, model_dirs, capsys):
    config = config_for(tmp_path, model_dirs, "r", max_steps=4)
    assert main(["train", str(config)]) == 0
    data = tmp_path / "train.jsonl"
    data.write_text(data.read_text().replace("great", "superb"))
    assert main(["train", str(config), "train.max_steps=6"]) == USER_ERROR
    err = capsys.readouterr().err
    assert "data file changed" in err and str(data) in err and "train.resume=ignore-data-changes" in err
    assert main(["train", str(config), "train.max_steps=6", "train.resume=ignore-data-changes"]) == 0


def test_disk_full_inside_torch_save_leaves_no_temporary_files_and_says_how_much_is_needed(
        tmp_path, model_dirs, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    assert main(["train", str(config_for(tmp_path, model_dirs, "r"))]) == USER_ERROR
    err = capsys.readouterr().err
    assert "MiB are free there" in err and "needs about" in err and "crashed" not in err
    assert not list((tmp_path / "runs/r/checkpoints").iterdir())


def test_the_first_sigint_is_a_request_to_stop_and_the_second_acts_at_once():
    with loop.StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT  # noted, no KeyboardInterrupt: the loop ends its step and saves
        try:
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the second SIGINT was swallowed")
        except KeyboardInterrupt:
            pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
