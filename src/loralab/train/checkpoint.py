"""Checkpoints: the trainable weights (safetensors) and the loop's state (optimizer, scheduler, RNG, position).

Each is written into a temporary folder, synced, and renamed into place, so a crash mid-save leaves the previous
checkpoints intact and never a half-written one. A checksum of each file is written beside them: a checkpoint
damaged later (a bad disk, a copy cut short) is found and skipped for the next older one. Nothing is unpickled
when loading (weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.errors import LoralabError
from loralab.files import replace_folder

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, model: nn.Module, state: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep` (and the best, if named)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{state['step']:08d}"
    tmp = folder / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    try:
        tmp.mkdir()
        save_file(weights, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        sums = {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)}
        (tmp / CHECKSUMS).write_text(json.dumps(sums), encoding="utf-8")
        replace_folder(tmp, target)
    except (OSError, SafetensorError, RuntimeError) as e:  # disk full (torch.save says so as a RuntimeError), ...
        shutil.rmtree(tmp, ignore_errors=True)
        # the weights, and Adam's two moments of each in the state
        needed = 3 * sum(t.numel() * t.element_size() for t in weights.values())
        free = shutil.disk_usage(folder).free
        raise LoralabError(f"could not write the checkpoint ({getattr(e, 'strerror', None) or e}); it needs about "
                           f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free there", file=str(target),
                           fix="free disk space in that folder; earlier checkpoints are intact: rerun the same "
                               "command to resume") from None
    protected = {state.get("best_checkpoint")}
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        if old.name not in protected:
            shutil.rmtree(old)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders from an interrupted save are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / STATE).is_file()
                  and (p / WEIGHTS).is_file())


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files (a checksum that does not match), or None if they are intact."""
    sums_file = checkpoint / CHECKSUMS
    if not sums_file.is_file():
        return None  # written before checksums were kept: the load itself is the check
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    for name, expected in sums.items():
        if not (checkpoint / name).is_file() or _sha256(checkpoint / name) != expected:
            return f"{name} does not match its checksum"
    return None


def load_intact(folder: Path, model: nn.Module, report) -> tuple[Path, dict] | None:
    """The newest checkpoint that is intact: its weights copied into `model`, its state returned. Damaged ones are
    skipped, each named through `report(message)`. None if there is none."""
    for checkpoint in reversed(list_checkpoints(folder)):
        problem = damage(checkpoint)
        if problem is None:
            try:
                state = load_state(checkpoint)
                load_weights(checkpoint, model)
                return checkpoint, state
            except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError, KeyError) as e:
                problem = f"cannot be read ({e})"
        report(f"skipping checkpoint {checkpoint}: {problem}; trying the one before it")
    return None


def load_weights(checkpoint: Path, model: nn.Module) -> None:
    weights = load_file(checkpoint / WEIGHTS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE, weights_only=True)
