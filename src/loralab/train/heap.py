"""Handing the C heap's freed pages back to the system during CPU training.

On CPU, tensors come from glibc's malloc. Batches of changing length leave holes in its heap that later, larger
requests cannot reuse, and freed holes stay resident: over a run, the process's RSS drifts well above what its
tensors ever hold at once. `malloc_trim` returns whole free pages inside the heap (not only at its top), so
calling it now and then keeps that drift from adding up. Pages it returns are faulted in again on reuse, which
is why it runs every few steps, not after each one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

TRIM_EVERY = 5  # optimizer steps between trims


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
