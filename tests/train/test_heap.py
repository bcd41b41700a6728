import os
import platform
import sys

import pytest
import torch

from loralab.train.heap import release_free_heap


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's, /proc Linux's")
def test_freed_heap_pages_go_back_to_the_system():
    chunks = [torch.ones(24_000) for _ in range(4000)]  # 96 KB each: below the mmap threshold, so heap chunks
    top = torch.ones(24_000)  # allocated last, it pins the heap's top: free() alone cannot shrink the heap
    del chunks
    before = resident_bytes()
    assert release_free_heap()
    assert before - resident_bytes() > 200 * 2**20  # of the 366 MiB freed in the middle of the heap
    assert top.sum() == 24_000
