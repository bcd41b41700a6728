"""Whether a run folder holds this run to resume, and what a resume keeps: the same settings (more epochs or
steps, and the WATCHING settings, may change), the same data, and metrics.jsonl up to the resumed step."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import yaml

from loralab.config import DataConfig, RunConfig, load_config, save_config, to_dict
from loralab.errors import LoralabError
from loralab.files import write_text_atomically
from loralab.train.checkpoint import damage, list_checkpoints, load_state
from loralab.train.run_folder import empty_run_folder, is_run_folder, mark_run_folder, run_files, run_folder

# settings that change how a run is watched and saved, not what it trains: a resumed run may change them
WATCHING = {"train.resume", "train.overwrite", "train.log_every", "train.tensorboard", "train.eval_every",
            "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints"}
# raised, these continue a run past its old end; its schedule then runs to the new end from where it stands
LENGTH = {"train.epochs", "train.max_steps"}


def check_run_dir(config: RunConfig) -> bool:
    """Whether runs/<name> holds this run to resume; refuses a folder holding another run (unless train.overwrite
    is set). Writes nothing: open_run_dir does, once the model and data have loaded, so that a run that fails to
    start (a wrong path, bad data) leaves an existing folder as it was, even with train.overwrite. The same run
    may come back with other WATCHING settings, or longer (more epochs or steps)."""
    run_dir = run_folder(config.output_dir, config.name)
    saved = run_dir / "config.yaml"
    if not run_files(run_dir):
        return False
    if config.train.overwrite:
        if not is_run_folder(run_dir):  # refused now, before the model loads; open_run_dir checks again
            empty_run_folder(run_dir)
        return False
    if not saved.is_file():
        raise LoralabError("the output folder exists and is not a loralab run", file=str(run_dir),
                           fix="choose another name, or train.overwrite=true to replace it")
    old = saved_config(run_dir)
    if old is None:  # config.yaml is damaged and no intact checkpoint says what the run was
        if not list_checkpoints(run_dir / "checkpoints"):
            return False  # nothing to resume: the run starts afresh and config.yaml is written anew
        raise LoralabError("config.yaml is damaged and no intact checkpoint holds the run's config", file=str(saved),
                           fix="restore config.yaml, or train.overwrite=true to start over")
    try:  # settings added since that run was saved take their defaults
        old = to_dict(load_config(saved))
    except LoralabError:
        pass
    differences = [d for d in config_differences(old, to_dict(config))
                   if d[0] not in WATCHING and not (d[0] in LENGTH and _longer(d[1], d[2]))]
    if differences:
        listed = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in differences[:3])
        raise LoralabError(f"the output folder holds a different run ({listed})", file=str(run_dir),
                           fix="choose another name, or train.overwrite=true (only more train.epochs or "
                               "train.max_steps, or logging and checkpoint settings, continue it)")
    if config.train.resume == "never":
        raise LoralabError("the output folder already holds this run", file=str(run_dir),
                           fix="train.resume=auto to continue it, or train.overwrite=true to start over")
    return bool(list_checkpoints(run_dir / "checkpoints"))


def saved_config(run_dir: Path) -> dict | None:
    """The run's config as config.yaml holds it or, if that file is damaged, as its newest intact checkpoint does."""
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        if isinstance(old, dict):
            return old
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        pass
    for checkpoint in reversed(list_checkpoints(run_dir / "checkpoints")):
        if damage(checkpoint) is None:
            with contextlib.suppress(Exception):  # unreadable: try the one before
                return load_state(checkpoint)["config"]
    return None


def open_run_dir(config: RunConfig) -> None:
    """The run folder as check_run_dir decided: emptied first under train.overwrite (only a loralab run folder);
    marked as a run folder; config.yaml (re)written."""
    run_dir = run_folder(config.output_dir, config.name)
    if config.train.overwrite:
        empty_run_folder(run_dir)
    mark_run_folder(run_dir)
    save_config(config, run_dir / "config.yaml")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every setting that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append((name, a, b))
    return out


def _longer(old, new) -> bool:
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new > old


def file_hashes(data: DataConfig) -> dict[str, str]:
    """sha256 of the run's data files: a resumed run must train on the data its checkpoints saw."""
    paths = [p for p in (data.train, data.validation) if p and Path(p).is_file()]
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def keep_metrics_until(path: Path, step: int) -> None:
    """metrics.jsonl cut back to the entries up to `step` (the resumed checkpoint's), rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", step + 1) <= step:
                kept.append(line + "\n")
        except (ValueError, AttributeError):
            break  # a line cut short by a kill: nothing after it was written whole
    write_text_atomically(path, "".join(kept))
