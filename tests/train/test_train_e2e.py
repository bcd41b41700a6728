"""`loralab train` end to end on tiny models, one run per task, through the CLI entry point."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loralab.cli import USER_ERROR, main
from loralab.data.collate import pack_batch
from loralab.fast.heap import TRIM_EVERY
from loralab.train import loop, sampling, step
from run_helpers import SENTIMENT, write_config, write_jsonl


def run(config_path, *overrides):
    return main(["train", str(config_path), *overrides])


def read_report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_classification_learns_trains_the_fresh_head_and_writes_everything(tmp_path, model_dirs):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 4])
    config = write_config(tmp_path / "run.yaml", name="cls", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"])}, lora={"r": 4, "alpha": 8},
                          data={"train": str(data), "validation": str(data), "max_length": 16},
                          train={"epochs": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1})
    assert run(config) == 0
    run_dir = tmp_path / "runs" / "cls"
    for name in ("config.yaml", "metrics.jsonl", "report.md", "report.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    report = read_report(run_dir)
    assert report["fresh_modules"] == ["classifier"]  # missing from the checkpoint, so trained in full
    # the label distribution and the majority-class baseline beside the metrics
    assert report["data"]["label_counts"] == {"negative": 12, "positive": 12}
    assert report["data"]["majority_baseline_accuracy"] == 0.5
    assert "negative 12 (50.0%), positive 12 (50.0%); always answering the most frequent (negative) scores " \
           "accuracy 0.5000 on validation" in (run_dir / "report.md").read_text()
    assert any("classifier" in k for k in load_file(run_dir / "adapter/adapter_model.safetensors"))
    evals = report["evaluations"]
    assert evals[0]["step"] == 0 and evals[-1]["metrics"]["accuracy"] == 1.0
    assert evals[-1]["metrics"]["loss"] < evals[0]["metrics"]["loss"]
    assert report["best"]["metric"] == "accuracy" and report["tokens_per_second"] > 0
    assert report["peak_memory_bytes"] > 0 and report["output_bytes"] > 0 and report["base_model_bytes"] > 0
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line]
    assert losses[-1] < losses[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lora"]["r"] == 4


def test_sft_memorises_answers_with_chat_template(tmp_path, model_dirs):
    rows = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital."},
            {"instruction": "Give three tips", "input": "for staying healthy", "output": "Eat well, sleep enough."}]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows * 4)
    config = write_config(tmp_path / "sft.yaml", name="sft", output_dir=str(tmp_path / "runs"), task="sft",
                          model={"path": str(model_dirs["llama"])},
                          lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
                          data={"train": str(data), "validation": str(data), "max_length": 64},
                          train={"epochs": 30, "batch_size": 4, "lr": 2e-2, "schedule": "constant",
                                 "gradient_checkpointing": 2})  # every other layer: one recomputes, one keeps
    assert run(config) == 0
    evals = read_report(tmp_path / "runs" / "sft")["evaluations"]
    assert evals[-1]["metrics"]["loss"] < 0.3 * evals[0]["metrics"]["loss"]


def test_generate_classify_learns_labels_by_generation(tmp_path, model_dirs):
    data = write_jsonl(tmp_path / "complaints.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 2])
    config = write_config(tmp_path / "gc.yaml", name="gc", output_dir=str(tmp_path / "runs"),
                          task="generate-classify", model={"path": str(model_dirs["bloom"])},
                          lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
                          data={"train": str(data), "validation": str(data), "max_length": 32},
                          train={"epochs": 12, "batch_size": 4, "lr": 1e-2},
                          generate_classify={"max_new_tokens": 6})
    assert run(config) == 0
    evals = read_report(tmp_path / "runs" / "gc")["evaluations"]
    assert evals[0]["metrics"]["accuracy"] == 0.0 and evals[-1]["metrics"]["accuracy"] == 1.0


def test_tagging_from_spans_learns_entities(tmp_path, model_dirs):
    rows = [{"text": "Paris is the capital of France", "spans": [[0, 5, "LOC"], [24, 30, "LOC"]]},
            {"text": "the quick brown fox jumps", "spans": [[16, 19, "ANIMAL"]]},
            {"text": "hello world from Paris", "spans": [[17, 22, "LOC"]]}]
    data = write_jsonl(tmp_path / "spans.jsonl", rows * 4)
    config = write_config(tmp_path / "tag.yaml", name="tag", output_dir=str(tmp_path / "runs"), task="tagging",
                          model={"path": str(model_dirs["bert"])},
                          lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
                          data={"train": str(data), "validation": str(data), "max_length": 32},
                          train={"epochs": 30, "batch_size": 4, "lr": 1e-2})
    assert run(config) == 0
    report = read_report(tmp_path / "runs" / "tag")
    assert report["evaluations"][0]["metrics"]["f1"] < 0.5
    assert report["best"]["metric"] == "f1" and report["best"]["value"] == 1.0  # the saved adapter holds these


def test_full_fine_tuning_baseline_writes_a_model(tmp_path, model_dirs):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT])
    config = write_config(tmp_path / "full.yaml", name="full", output_dir=str(tmp_path / "runs"),
                          task="classification", method="full", model={"path": str(model_dirs["bert"])},
                          data={"train": str(data), "validation_fraction": 0.34, "max_length": 16},
                          train={"epochs": 1, "batch_size": 2, "lr": 1e-3})
    assert run(config) == 0
    report = read_report(tmp_path / "runs" / "full")
    assert (tmp_path / "runs" / "full" / "model" / "model.safetensors").is_file()
    assert report["data"] == {"train_examples": 4, "validation_examples": 2, "truncated": 0,
                              "label_counts": {"negative": 2, "positive": 2}, "majority_label": "negative",
                              "majority_baseline_accuracy": 0.5}
    assert "trainable%: 100.0000" in report["parameters"]


def test_overrides_and_resume_of_a_finished_run(tmp_path, model_dirs, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT])
    config = write_config(tmp_path / "run.yaml", name="r", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"])}, data={"train": str(data)},
                          train={"epochs": 1, "batch_size": 2})
    assert run(config, "lora.r=2") == 0
    assert yaml.safe_load((tmp_path / "runs/r/config.yaml").read_text())["lora"]["r"] == 2
    adapter = (tmp_path / "runs/r/adapter/adapter_model.safetensors").read_bytes()
    assert run(config, "lora.r=4") == USER_ERROR  # a different run in the same folder is refused
    assert "lora.r: 2 -> 4" in capsys.readouterr().err
    assert (tmp_path / "runs/r/adapter/adapter_model.safetensors").read_bytes() == adapter  # untouched
    # a replacement that cannot start (no such model, bad data) leaves the old run as it was
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    for bad in (f"model.path={tmp_path / 'nowhere'}", f"data.train={tmp_path / 'bad.jsonl'}"):
        assert run(config, "lora.r=4", "train.overwrite=true", bad) == USER_ERROR
        assert (tmp_path / "runs/r/adapter/adapter_model.safetensors").read_bytes() == adapter
    assert run(config, "lora.r=4", "train.overwrite=true") == 0


def test_a_finished_run_continues_for_more_epochs(tmp_path, model_dirs, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT])
    config = write_config(tmp_path / "run.yaml", name="r", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"])}, data={"train": str(data), "validation": str(data)},
                          train={"epochs": 1, "batch_size": 2})
    assert run(config) == 0  # 3 steps
    real_step, steps = loop.optimizer_step, []
    monkeypatch.setattr(loop, "optimizer_step", lambda *args: steps.append(1) or real_step(*args))
    assert run(config, "train.epochs=2", "train.log_every=1") == 0  # longer, logged more often: the same run
    assert len(steps) == 3  # steps 4 to 6 only
    report = read_report(tmp_path / "runs" / "r")
    assert [e["step"] for e in report["evaluations"]] == [0, 3, 6]  # the base model was not scored again
    assert yaml.safe_load((tmp_path / "runs/r/config.yaml").read_text())["train"]["epochs"] == 2
    assert run(config, "train.epochs=1") == USER_ERROR  # shorter than what was trained: another run


@pytest.mark.parametrize("override,message", [
    ("lora.rank=4", "field 'lora.rank': unknown config key (fix: did you mean 'r'?)"),
    ("train.lr=fast", "field 'train.lr': expected float, got 'fast'"),
    ("lora.dropout=1.5", "dropout must be in [0, 1)"),
    ("task=clasification", "did you mean 'classification'?"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, model_dirs, capsys, override, message):
    config = write_config(tmp_path / "run.yaml", task="classification", model={"path": str(model_dirs["bert"])},
                          data={"train": "x.jsonl"})
    assert run(config, override) == USER_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and str(config) in err


@pytest.mark.parametrize("content,where", [
    ('{"text": "good", "label": "1"}\n{"text": "bad", "label": \n', "train.jsonl:2: malformed JSON"),
    ('{"text": "good", "label": "1"}\n{"label": "0"}\n', "train.jsonl:2: field 'text': missing field"),
    ('{"text": "good", "label": "1"}\n{"text": "", "label": "0"}\n', "train.jsonl:2: field 'text': empty field"),
    ("", "train.jsonl: the data file is empty"),
])
def test_bad_training_data_is_one_line_naming_file_line_and_field(tmp_path, model_dirs, capsys, content, where):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"])}, data={"train": str(tmp_path / "train.jsonl")})
    assert run(config) == USER_ERROR
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_validation_label_and_debug_traceback(tmp_path, model_dirs, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "good", "label": "positive"},
                                               {"text": "meh", "label": "neutral"}])
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"])}, data={"train": str(train), "validation": str(dev)})
    assert run(config) == USER_ERROR
    err = capsys.readouterr().err
    assert "dev.jsonl:2: field 'label': label 'neutral' never occurs in the training data" in err
    assert main(["--debug", "train", str(config)]) == USER_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_examples_longer_than_the_model_handles(tmp_path, model_dirs, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "good " * 200, "label": "a"}, {"text": "b", "label": "b"}])
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "runs"), task="classification",
                          model={"path": str(model_dirs["bert"])}, data={"train": str(train), "max_length": 512})
    assert run(config) == USER_ERROR
    assert "handles 64 positions (fix: data.max_length=64)" in capsys.readouterr().err


def test_fp16_keeps_trainable_weights_in_fp32_and_scales_the_loss(tmp_path, model_dirs):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 2])
    config = write_config(tmp_path / "fp16.yaml", name="fp16", output_dir=str(tmp_path / "runs"),
                          task="classification", model={"path": str(model_dirs["bert"]), "dtype": "fp16"},
                          data={"train": str(data), "validation": str(data)},
                          train={"epochs": 4, "batch_size": 4, "lr": 1e-2})
    assert run(config) == 0
    report = read_report(tmp_path / "runs" / "fp16")
    assert report["dtype"] == "float16" and report["skipped_steps"] == 0
    evals = report["evaluations"]
    assert evals[-1]["metrics"]["loss"] < evals[0]["metrics"]["loss"]
    weights = load_file(tmp_path / "runs/fp16/adapter/adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights: no eps underflow


def sft_run(tmp_path, model_dirs, name, **train):
    rows = [{"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w} {w}"} for w in ("one", "two", "three")]
    data = write_jsonl(tmp_path / "words.jsonl", rows * 4 + [{"instruction": "Say nothing much", "input": "",
                                                               "output": "ok"}] * 4)
    config = write_config(tmp_path / f"{name}.yaml", name=name, output_dir=str(tmp_path / "runs"), task="sft",
                          model={"path": str(model_dirs["llama"])}, lora={"r": 4, "dropout": 0.0},
                          data={"train": str(data), "max_length": 64, "template": "chatml",
                                "packing": train.pop("packing", False),
                                "padding_free": train.pop("padding_free", "auto")},
                          train={"epochs": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1, **train})
    assert run(config) == 0
    return [json.loads(line)["loss"] for line in (tmp_path / "runs" / name / "metrics.jsonl").open()
            if '"loss"' in line], read_report(tmp_path / "runs" / name)


def test_packing_trains_on_fewer_fuller_rows(tmp_path, model_dirs):
    plain, plain_report = sft_run(tmp_path, model_dirs, "plain")
    packed, packed_report = sft_run(tmp_path, model_dirs, "packed", packing=True)
    assert packed_report["steps"] < plain_report["steps"]  # 16 short examples fill few 64-token rows
    assert packed_report["tokens_per_second"] > 0 and packed[-1] < packed[0]


def test_padding_free_batches_train_as_padded_random_batches_do(tmp_path, model_dirs, monkeypatch):
    rows = []
    monkeypatch.setattr(step, "pack_batch", lambda batch, pad_id: rows.append(len(batch)) or pack_batch(batch, pad_id))
    padded, _ = sft_run(tmp_path, model_dirs, "padded", padding_free=False, group_by_length=False)
    assert rows == []
    flat, report = sft_run(tmp_path, model_dirs, "flat")  # auto: the tiny Llama keeps a row's examples apart
    assert rows == [1] * report["steps"]  # each step's 4 examples in one row
    assert flat == pytest.approx(padded, abs=1e-4)  # the same examples each step, so the same losses


def test_padding_free_micro_batches_are_the_random_order_one_row_each():
    from loralab.config import load_config
    from loralab.tasks import TaskData
    from loralab.train.sampling import micro_batches

    data = TaskData([{"input_ids": [0] * n} for n in [3, 40, 5, 38, 4, 41, 6, 39] * 4], [])
    base = {"task": "sft", "model": {"path": "m"}, "data": {"train": "t.json"}, "train": {"batch_size": 4}}
    flat = micro_batches(data, load_config(None, ["data.padding_free=true"], base=base), epoch=1)
    padded = micro_batches(data, load_config(None, ["data.padding_free=false", "train.group_by_length=false"],
                                             base=base), epoch=1)
    assert flat == [[[i for row in rows for i in row]] for rows in padded] and len(flat[0][0]) == 4


def test_padding_free_is_left_out_where_the_model_cannot_keep_examples_apart(tmp_path, model_dirs, capsys):
    from loralab.config import load_config
    from loralab.errors import LoralabError

    class OwnCodeLM(torch.nn.Module):  # code of its own that takes none of the packed rows' arguments
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 8)
            self.config = SimpleNamespace(_attn_implementation=sampling.LORALAB_ATTENTION)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, position_ids, use_cache):
            return type("Output", (), {"logits": self.embed(input_ids)})

    base = {"task": "sft", "model": {"path": "m"}, "data": {"train": "t.json"}}
    console = loop.Console(file=None, force_terminal=False)
    auto = sampling.resolve_padding_free(load_config(None, [], base=base), OwnCodeLM(), torch.device("cpu"),
                                     torch.autocast("cpu", enabled=False), console)
    assert auto.data.padding_free is False and "batches are padded: OwnCodeLM does not take" in capsys.readouterr().out
    with pytest.raises(LoralabError, match="data.padding_free=false"):
        sampling.resolve_padding_free(load_config(None, ["data.padding_free=true"], base=base), OwnCodeLM(),
                                  torch.device("cpu"), torch.autocast("cpu", enabled=False), console)
    encoder = load_config(None, [], base={**base, "task": "classification"})
    assert sampling.resolve_padding_free(encoder, None, torch.device("cpu"), None, console).data.padding_free is False
    assert run(write_config(tmp_path / "bad.yaml", task="classification", model={"path": str(model_dirs["bert"])},
                            data={"train": "x.jsonl", "padding_free": True})) == USER_ERROR
    assert "data.padding_free" in capsys.readouterr().err


def test_padding_free_is_auto_only_where_attention_takes_each_example_alone(monkeypatch):
    from loralab.config import load_config

    monkeypatch.setattr(sampling, "check_packing", lambda *args, **kwargs: None)  # the model keeps examples apart
    base = {"task": "sft", "model": {"path": "m"}, "data": {"train": "t.json"}}
    console = loop.Console(quiet=True)

    def resolved(device, flash, *overrides, attention=sampling.LORALAB_ATTENTION):
        monkeypatch.setattr(sampling, "flash_kernel_runs_on", lambda d: flash)
        config = load_config(None, list(overrides), base=base)
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))
        return sampling.resolve_padding_free(config, model, torch.device(device), None, console).data.padding_free

    assert resolved("cpu", False) is True
    assert resolved("cuda", True) is True  # auto: bf16 on a GPU, through the variable-length flash kernel
    # a block mask would compute each row's whole square: padded batches instead, unless asked
    assert resolved("cuda", True, "model.dtype=fp32") is False
    assert resolved("cuda", False) is False
    assert resolved("cpu", False, attention="eager") is False
    assert resolved("cuda", False, attention="flash_attention_2") is True  # transformers' varlen path
    assert resolved("cuda", False, "data.padding_free=true") is True


def test_cpu_training_takes_its_frozen_products_through_onednn(tmp_path, model_dirs, monkeypatch):
    import loralab.fast.frozen_linear as frozen

    if frozen.onednn_linear() is None:
        pytest.skip("frozen products go through oneDNN on AMD CPUs only")
    calls = []
    real = frozen.onednn_linear()
    monkeypatch.setattr(frozen, "onednn_linear", lambda: lambda *args: calls.append(1) or real(*args))
    sft_run(tmp_path, model_dirs, "onednn")
    assert len(calls) > 100  # 8 steps of 2 layers' 7 products, forward and backward, and the head's


def test_compiled_blocks_train_like_eager_ones(tmp_path, model_dirs):
    eager, _ = sft_run(tmp_path, model_dirs, "eager")
    compiled, _ = sft_run(tmp_path, model_dirs, "compiled", compile=True)
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_cpu_training_hands_freed_heap_back_every_few_steps(tmp_path, model_dirs, monkeypatch):
    trims = []
    monkeypatch.setattr(loop, "release_free_heap", lambda: trims.append(1))
    _, report = sft_run(tmp_path, model_dirs, "trim")
    assert report["steps"] == 8 and len(trims) == 8 // TRIM_EVERY


def test_batch_size_auto_fills_the_budget_and_keeps_the_global_batch(tmp_path, model_dirs):
    _, report = sft_run(tmp_path, model_dirs, "auto", batch_size="auto", global_batch=8, memory_budget="64GiB")
    assert report["steps"] == 2 * 2  # 16 examples / 8 per step x 2 epochs, whatever the micro-batch
    assert run(write_config(tmp_path / "bad.yaml", task="sft", model={"path": str(model_dirs["llama"])},
                            data={"train": "x.json"}, train={"batch_size": "auto"})) == USER_ERROR


def test_micro_batches_group_by_length_or_not_and_cover_every_example_once():
    from loralab.config import load_config
    from loralab.tasks import TaskData
    from loralab.train.sampling import micro_batches

    lengths = [3, 40, 5, 38, 4, 41, 6, 39] * 4
    data = TaskData([{"input_ids": [0] * n} for n in lengths], [])
    base = {"model": {"path": "m"}, "data": {"train": "t.json"}, "train": {"batch_size": 4}}
    spread = {}
    for grouped in (True, False):
        config = load_config(None, [f"train.group_by_length={str(grouped).lower()}"], base=base)
        batches = micro_batches(data, config, epoch=0)
        assert sorted(i for b in batches for row in b for i in row) == list(range(len(lengths)))
        spread[grouped] = sum(max(lengths[r[0]] for r in b) - min(lengths[r[0]] for r in b) for b in batches)
    assert spread[True] < spread[False]
