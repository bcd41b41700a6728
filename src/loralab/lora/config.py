"""What a LoRA adapter is: rank, scaling, where it goes, what else trains."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from loralab.errors import LoralabError

Bias = Literal["none", "all", "lora_only"]
Init = Literal["kaiming", "gaussian"]


@dataclass
class LoraConfig:
    """Settings of one adapter: W x + (alpha/r) B A x, with A random and B zero at the start."""

    r: int = 8  # rank of the update B·A
    alpha: float = 16  # scale: the update is multiplied by alpha/r (alpha/sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input, in training
    # null: the architecture's default; a list matches module names exactly or by suffix (q_proj); a string is a
    # regex that must match the whole module name; all-linear: every linear layer except the output head
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None  # only these block indices (as PEFT counts them)
    layers_pattern: str | None = None  # the name of the block list, where layers_to_transform cannot tell
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter (e.g. classifier)
    bias: Bias = "none"  # which biases train: none, all, or those of the adapted layers (lora_only)
    use_rslora: bool = False  # scale by alpha/sqrt(r) (rank-stabilised LoRA)
    init: Init = "kaiming"  # A's initialisation: kaiming (uniform, as PEFT) or gaussian (std 1/r, the LoRA paper)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module r, keyed by a regex on the module name
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # per-module alpha, keyed the same way

    def __post_init__(self):
        def bad(name, message, fix):
            raise LoralabError(message, field=f"lora.{name}", fix=fix)

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            bad("r", f"r must be a positive integer, got {self.r!r}", "use a rank such as 4, 8 or 16")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            bad("alpha", f"alpha must be a positive number, got {self.alpha!r}", "use alpha = r or 2*r, e.g. 16")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            bad("dropout", f"dropout must be in [0, 1), got {self.dropout!r}", "use 0.0 to 0.1")
        if self.bias not in ("none", "all", "lora_only"):
            bad("bias", f"bias must be none, all or lora_only, got {self.bias!r}", "use bias: none")
        if self.init not in ("kaiming", "gaussian"):
            bad("init", f"init must be kaiming or gaussian, got {self.init!r}", "use init: kaiming")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                bad("target_modules", "target_modules must be a non-empty list of module names",
                    "e.g. [q_proj, v_proj], or leave it out for the architecture's default")
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            if isinstance(self.target_modules, str):
                bad("layers_to_transform", "layers_to_transform works with a list of target_modules, not a regex",
                    "put the layer indices into the regex instead")
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                bad("rank_pattern", f"rank for {name!r} must be a positive integer, got {value!r}", "e.g. 8")

    def rank_and_scaling(self, module_name: str) -> tuple[int, float]:
        """The rank and scaling of the adapter on one module, honouring rank_pattern / alpha_pattern."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT's rule: a key matches a module whose name ends with it, at a dot boundary
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
