"""Modules trained in full alongside an adapter (a classification head, say), saved with it.

The original module stays untouched so that disabling adapters, or switching to another adapter, gives the base
model back; each adapter owns a trainable copy. Names (original_module, modules_to_save) follow PEFT.
"""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.train(original_module.training)

    def add_adapter(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = trained
        if not self.active_adapters:
            self.active_adapters = [name]

    def active_module(self) -> nn.Module:
        # a full module cannot be summed like low-rank updates: the first active adapter that has a copy wins
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # models read attributes of their heads (e.g. `score.weight`); answer for the module in use
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)
