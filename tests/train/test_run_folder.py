"""Run folders: names that would escape output_dir, overwrite that deletes only loralab's own run folders, and
the lock that keeps a second run out."""

import os
import subprocess
import sys

import pytest

from loralab.cli import USER_ERROR, main
from loralab.errors import LoralabError
from loralab.train.run_folder import MARKER, RunLock, empty_run_folder, run_folder
from run_helpers import SENTIMENT, write_config, write_jsonl


def config_for(tmp_path, model_dirs, output_dir):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in SENTIMENT])
    return write_config(tmp_path / "run.yaml", name="r", output_dir=str(output_dir), task="classification",
                        model={"path": str(model_dirs["bert"])}, data={"train": str(data)},
                        train={"epochs": 1, "batch_size": 2})


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["..", ".", "", "../../x", "a/b", "/tmp/elsewhere"])
def test_names_that_leave_output_dir_are_refused_and_nothing_is_deleted(tmp_path, model_dirs, monkeypatch, capsys,
                                                                        name):
    work = tmp_path / "work"
    (work / "runs" / "other").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    (work / "runs" / "other" / "adapter.bin").write_text("weights")
    monkeypatch.chdir(work)
    config = config_for(tmp_path, model_dirs, "runs")
    before = listing(tmp_path)
    assert main(["train", str(config), f"name={name}", "train.overwrite=true"]) == USER_ERROR
    assert "field 'name'" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_overwrite_replaces_a_run_but_never_a_folder_loralab_did_not_make(tmp_path, model_dirs, capsys):
    runs = tmp_path / "runs"
    config = config_for(tmp_path, model_dirs, runs)
    assert main(["train", str(config), "train.overwrite=true", "name=fresh"]) == 0  # nothing to replace yet
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "thesis.tex").write_text("two years of work")
    assert main(["train", str(config), "train.overwrite=true"]) == USER_ERROR
    assert f"no {MARKER} file" in capsys.readouterr().err
    assert (runs / "r" / "thesis.tex").read_text() == "two years of work"
    (runs / "r" / "thesis.tex").unlink()
    assert main(["train", str(config)]) == 0
    assert (runs / "r" / MARKER).is_file()
    (runs / "r" / "stale.txt").write_text("old")
    assert main(["train", str(config), "train.overwrite=true", "lora.r=2"]) == 0  # a run folder: replaced
    assert not (runs / "r" / "stale.txt").exists() and (runs / "r" / "adapter").is_dir()


def test_a_run_folder_linked_outside_output_dir_or_onto_the_current_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LoralabError, match="not inside output_dir"):
        run_folder(tmp_path / "runs", "linked")
    monkeypatch.chdir(tmp_path / "runs")
    (tmp_path / "runs" / "here").symlink_to(tmp_path / "runs" / "sub", target_is_directory=True)
    (tmp_path / "runs" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "runs" / "sub")
    with pytest.raises(LoralabError, match="current folder"):
        run_folder(tmp_path / "runs", "sub")
    with pytest.raises(LoralabError, match="no .loralab-run"):
        empty_run_folder(tmp_path / "runs" / "sub")


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, model_dirs, capsys):
    runs = tmp_path / "runs"
    config = config_for(tmp_path, model_dirs, runs)
    with RunLock(runs / "r"):
        assert main(["train", str(config)]) == USER_ERROR
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert not (runs / "r").exists()  # refused before anything was written into it
    assert main(["train", str(config)]) == 0


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "runs" / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from loralab.train.run_folder import RunLock; "
                               f"lock = RunLock(Path({str(folder)!r})).__enter__(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LoralabError, match=f"pid {holder.pid}"):
        RunLock(folder).__enter__()
    holder.kill()
    holder.wait()
    with RunLock(folder) as lock:  # the kernel dropped the dead process's lock
        assert lock.fd is not None
