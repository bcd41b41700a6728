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
    """Settings of one adapter.

    r: rank of the update B·A; alpha: its scale, the update is multiplied by alpha/r (alpha/sqrt(r) with use_rslora).
    target_modules: None picks the architecture's default; a list matches module names exactly or by suffix
        (".q_proj"), a string is a regex that must match the whole module name, "all-linear" takes every linear layer
        except the output head.
    layers_to_transform / layers_pattern: restrict a list of targets to these layer indices (as PEFT matches them).
    modules_to_save: modules trained in full and saved with the adapter (e.g. "classifier", "score").
    bias: which biases train: none, all, or those of the LoRA-wrapped layers (lora_only).
    init: "kaiming" (uniform, as PEFT) or "gaussian" (normal with std 1/r, as the LoRA paper) for A; B is always zero.
    rank_pattern / alpha_pattern: per-module r / alpha overriding the defaults, keyed by a regex on the module name.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    modules_to_save: list[str] | None = None
    bias: Bias = "none"
    use_rslora: bool = False
    init: Init = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

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
