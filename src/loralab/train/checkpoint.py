"""Checkpoints: the trainable weights (safetensors) and the loop's state (optimizer, scheduler, RNG, position).

Each is written into a temporary folder, synced, and renamed into place, so a crash mid-save leaves the previous
checkpoints intact and never a half-written one. Nothing is unpickled when loading (weights_only=True).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.errors import LoralabError

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_tree(folder)
    except (OSError, SafetensorError) as e:  # disk full, read-only folder, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoralabError(f"could not write the checkpoint ({getattr(e, 'strerror', None) or e})", file=str(target),
                           fix="free disk space; earlier checkpoints are intact: rerun the same command to resume"
                           ) from None
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


def load_weights(checkpoint: Path, model: nn.Module) -> None:
    weights = load_file(checkpoint / WEIGHTS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE, weights_only=True)
