"""`loralab sweep` and `loralab compare` on a tiny encoder."""

import csv

import pytest

from loralab.cli import USER_ERROR, main
from loralab.sweep import parse_grid, variants
from run_helpers import SENTIMENT, write_config, write_jsonl


def study(tmp_path, model_dirs, task="classification"):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT * 2])
    return write_config(tmp_path / "study.yaml", name="study", output_dir=str(tmp_path / "runs"), task=task,
                        model={"path": str(model_dirs["bert"])}, data={"train": str(data), "validation": str(data)},
                        train={"epochs": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1})


def test_grid_expansion_runs_full_fine_tuning_once():
    axes = parse_grid(["lora.r=4,8,16", "method,train.lr=full:5e-5,lora:1e-3"])
    found = variants(axes)
    # values stay as written (the config check turns "5e-5" into a float), so run names read as typed
    assert {"method": "full", "train.lr": "5e-5"} in found
    assert sum(v["method"] == "full" for v in found) == 1 and len(found) == 4
    assert {"lora.r": 8, "method": "lora", "train.lr": "1e-3"} in found


def test_sweep_runs_each_variant_skips_finished_ones_and_compares(tmp_path, model_dirs, capfd):
    config = study(tmp_path, model_dirs)
    args = ["sweep", str(config), "--grid", "lora.r=2,4", "--grid", "method,train.lr=full:1e-3,lora:1e-2",
            "--out", str(tmp_path / "cmp")]
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["study-full-lr1e-3", "study-r2-lora-lr1e-2", "study-r4-lora-lr1e-2"]
    rows = list(csv.DictReader((tmp_path / "cmp" / "results.csv").open()))
    assert [r["method"] for r in rows] == ["full", "lora", "lora"] and [r["r"] for r in rows] == ["", "2", "4"]
    full, lora = rows[0], rows[1]
    assert int(full["trainable_params"]) > 10 * int(lora["trainable_params"])
    assert all(float(r["best_value"]) > 0 and float(r["epoch_seconds"]) > 0 for r in rows)
    for plot in ("curves.png", "by_rank.png"):
        assert (tmp_path / "cmp" / plot).read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| study-r2-lora-lr1e-2 | lora | 2 |" in report and "![curves.png](curves.png)" in report
    capfd.readouterr()
    (tmp_path / "runs" / "study-r4-lora-lr1e-2" / "report.json").unlink()  # as if interrupted at the very end
    assert main(args) == 0
    out = capfd.readouterr().err  # variants run as subprocesses: read the file descriptors
    assert out.count("finished earlier, skipped") == 2 and "resuming" in out


@pytest.mark.parametrize("grid,message", [
    (["--grid", "lora.rank=4,8"], "field 'lora.rank': grid: unknown config key (fix: did you mean 'r'?)"),
    ([], "no grid to sweep over"),
    (["--grid", "lora.r="], "has no values"),
])
def test_bad_grids_are_refused_before_anything_runs(tmp_path, model_dirs, capsys, grid, message):
    assert main(["sweep", str(study(tmp_path, model_dirs)), *grid]) == USER_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_runs_of_different_tasks(tmp_path, model_dirs, capsys):
    config = study(tmp_path, model_dirs)
    assert main(["train", str(config), "name=a", "train.epochs=1"]) == 0
    tags = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["a", "b"], "tags": ["B-X", "O"]}] * 4)
    assert main(["train", str(config), "name=b", "task=tagging", f"data.train={tags}", f"data.validation={tags}",
                 "train.epochs=1"]) == 0
    assert main(["compare", str(tmp_path / "runs/a"), str(tmp_path / "runs/b")]) == USER_ERROR
    assert "different tasks (classification, tagging)" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "runs/a"), str(tmp_path / "nope")]) == USER_ERROR
