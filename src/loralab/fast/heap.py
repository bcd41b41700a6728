"""Handing the C heap's freed pages back to the system during CPU training.

On CPU, tensors come from glibc's malloc. Batches of changing length leave holes in its heap that later, larger
requests cannot reuse, and freed holes stay resident: over a run, the process's RSS drifts well above what its
tensors ever hold at once. `malloc_trim` returns whole free pages inside the heap (not only at its top), so
calling it now and then keeps that drift from adding up. Pages it returns are faulted in again on reuse, which
is why it runs every few steps, not after each one.

Within one step the same happens on a larger scale: the forward pass frees each block's temporaries between the
activations it keeps, and the heap grows past those holes, so an eager step's RSS peaked about 1 GiB above its
live tensors (SmolLM2-135M, 4 x 512 tokens: 3.65 against 2.62 GiB). Returning free pages every few blocks of
the forward pass keeps it at 2.90 GiB (benchmarks/step_memory.py; BENCHMARKS.md). Trimming in the backward pass
as well held 2.67 GiB, but once the products ran through oneDNN (frozen_linear.py) its page faults cost 6-10% of
a step for 0.1-0.2 GiB (the SmolLM2 benchmark: 108.0 against 115.0-120.6 s, 2.26 against 2.17 GiB).
With gradient checkpointing the user has chosen memory over time, and the backward pass is where a step's memory
is (each block recomputed, then differentiated), so there it trims in both passes. At 4 x 512 tokens that held
1.27-1.31 against 1.52-1.61 GiB at about the same step time (1.20 GiB if every free went straight back); on the
SmolLM2 benchmark's shorter padding-free rows, 1.36-1.37 against 1.39 GiB for 6-14% more time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

from loralab.models import transformer_blocks

TRIM_EVERY = 5  # optimizer steps between trims
TRIM_EVERY_BLOCKS = 4  # blocks between trims inside a step


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trim_inside_steps(model: torch.nn.Module, every: int = TRIM_EVERY_BLOCKS, backward: bool = False) -> int:
    """Return the heap's free pages after every `every`-th transformer block (the model's `_no_split_modules`) of
    a training step's forward pass, when the block runs on the CPU, and with `backward` also before the backward
    pass goes through that block. For eager training only (compiled blocks would trace the call). Returns how
    many blocks do so."""
    blocks = transformer_blocks(model)[::every]
    if _malloc_trim() is None:
        return 0
    for block in blocks:
        block.register_forward_hook(functools.partial(_trim_after_block, backward=backward))
    return len(blocks)


def _trim_after_block(module, args, output, backward: bool = False) -> None:
    hidden = output[0] if isinstance(output, tuple) else output
    if not (module.training and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor)
            and hidden.device.type == "cpu"):
        return  # evaluation and generation keep nothing for a backward pass; GPU memory is not the C heap's
    release_free_heap()
    if backward and hidden.requires_grad:
        hidden.register_hook(_trim_in_backward)


def _trim_in_backward(grad) -> None:
    release_free_heap()  # returns None: the gradient passes unchanged
