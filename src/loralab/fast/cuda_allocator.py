"""The CUDA caching allocator with expandable segments: one segment per stream that grows as needed, instead of
fixed blocks cut to each request's size. Training steps whose shapes change (padding-free rows, packed rows, a
checkpointed step's recomputed blocks) otherwise leave cached blocks too small for the next request, and the
reserved memory climbs over what the tensors hold: on an H100, Llama-1B shapes at the batch planned for 24 GiB
with checkpointing reserved 17% more than the tensors' peak (which the planner had within 2%) and ran over the
budget; with expandable segments 4% more, within it (BENCHMARKS.md). PyTorch leaves it off by
default; torchtune and axolotl turn it on."""

from __future__ import annotations

import os

import torch

SETTINGS = "expandable_segments:True"
USER_SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch's names, the newer first
SETTERS = ((torch._C, "_cuda_setAllocatorSettings"), (torch._C, "_accelerator_setAllocatorSettings"),
           (torch.cuda.memory, "_set_allocator_settings"))


def use_expandable_segments() -> bool:
    """Turn expandable segments on for this process's CUDA allocator, unless the user configured the allocator
    (their settings win). Called before the run's first CUDA allocation; True if torch was asked to."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    # the runtime call, not the environment variable, which torch may already have read. torch has no public
    # call for it: the CUDA allocator's own where it has one, else torch 2.9's accelerator-wide one, else the older
    # name (2.1-2.8); a torch with none keeps its defaults
    for owner, name in SETTERS:
        set_settings = getattr(owner, name, None)
        if set_settings is not None:
            set_settings(SETTINGS)
            return True
    return False
