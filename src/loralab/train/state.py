"""What a run knows about itself: where it stands, what it has measured, and its random streams. Saved whole in
every checkpoint, so that a resumed run continues exactly where the checkpoint stood."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from loralab.train.distributed import World


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # optimizer steps into the epoch
    examples_per_step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # in training steps (evaluation and checkpoints aside)
    epoch_seconds: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)  # {"step", "epoch", "metrics"}
    best: dict | None = None  # {"metric", "value", "step", "epoch"}
    best_checkpoint: str | None = None
    skipped_steps: int = 0  # non-finite losses
    bad_in_a_row: int = 0
    answers_before: list[str] = field(default_factory=list)
    data_sha256: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's state; keys this version does not know (an optimizer's state, say) are left out."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])

    def resume_on(self, examples_per_step: int) -> None:
        """Another number of processes or batch size: continue after the same examples, in this run's steps."""
        if self.batch and self.examples_per_step and self.examples_per_step != examples_per_step:
            self.batch = round(self.batch * self.examples_per_step / examples_per_step)
        self.examples_per_step = examples_per_step


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(saved, world: World, device: torch.device) -> None:
    """Each process continues its own random stream; on another number of processes (or from a checkpoint that
    kept one stream) every process takes the first process's stream."""
    states = saved if isinstance(saved, list) else [{"cpu": saved, "cuda": None}]
    state = states[world.rank] if len(states) == world.size else states[0]
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
