import json
import shutil

import pytest
import torch

from loralab.cli import USER_ERROR, main
from tiny_models import tiny_model


def test_targets_lists_linear_layers_and_marks_defaults(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    assert main(["targets", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    q_line = next(line for line in lines if " q_proj " in line)
    k_line = next(line for line in lines if " k_proj " in line)
    assert "yes" in q_line and "yes" not in k_line and " 2 " in q_line  # two layers each


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["targets", str(tmp_path / "missing")]) == USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1


def test_crashes_exit_with_their_own_code_and_traceback(monkeypatch, capsys):
    from loralab import cli

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "cmd_targets", boom)
    assert main(["targets", "x"]) == cli.CRASH != USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "kaboom" in err and "not bad input" in err


def test_estimate_offers_checkpointing_uncompiled_when_the_run_compiles(tmp_path, model_dirs, capsys):
    # compiled layers cannot also be checkpointed (refused in the config), so the other column drops compile
    config = tmp_path / "run.yaml"
    config.write_text(f"task: sft\nmodel:\n  path: {model_dirs['llama']}\ndata:\n  train: t.json\n"
                      "train:\n  compile: true\n")
    assert main(["estimate", str(config), "--budget", "8MiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "as configured" in out and "(not compiled)" in out


@pytest.mark.parametrize("name,task", [("llama", "sft"), ("bert", "classification")])
def test_estimate_a_model_without_a_config_uses_its_own_defaults(name, task, model_dirs, capsys):
    # the README's form: a model and settings, no config file (the demo's BERT targets would match no llama layer)
    assert main(["estimate", "--model", str(model_dirs[name]), "data.max_length=64", "--budget", "1GiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"{task}, lora, batch 8 x 64 tokens" in out and "largest batch within 1.0 GiB" in out


def test_estimate_plans_rows_no_longer_than_the_models_positions(model_dirs, capsys):
    # the tiny bert has 64 positions; the default max_length (512) would crash its position table
    positions = json.loads((model_dirs["bert"] / "config.json").read_text())["max_position_embeddings"]
    assert main(["estimate", "--model", str(model_dirs["bert"]), "--budget", "1GiB"]) == 0
    assert f"batch 8 x {positions} tokens" in " ".join(capsys.readouterr().out.split())


def test_estimate_a_model_whose_config_names_no_architecture_goes_by_its_type(tmp_path, model_dirs, capsys):
    # as GGUF files read: model_type llama and no architectures
    folder = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], folder)
    settings = json.loads((folder / "config.json").read_text())
    settings.pop("architectures")
    (folder / "config.json").write_text(json.dumps(settings))
    assert main(["estimate", "--model", str(folder), "data.max_length=64", "--budget", "1GiB"]) == 0
    assert "sft, lora" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans a GPU run on a machine without one")
def test_estimate_plans_a_gpu_run_here_given_the_gpus_memory(tmp_path, model_dirs, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"task: sft\nmodel:\n  path: {model_dirs['llama']}\ndata:\n  train: t.json\n")
    # no GPU here to read the budget from: said, with the option that gives it
    assert main(["estimate", str(config), "train.device=cuda"]) == USER_ERROR
    err = capsys.readouterr().err
    assert "no GPU" in err and "--budget" in err and "80GiB" in err
    assert main(["estimate", str(config), "train.device=cuda", "--budget", "80GiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "bfloat16 on cuda" in out
