"""What the end-to-end benchmarks share: each side runs in its own fresh process, and its peak memory is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def peak_bytes(device: str) -> int:
    """The process's peak: RSS on CPU (ru_maxrss, load included), allocated bytes on CUDA."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_side(script: str, side: str, argv: list[str]) -> dict:
    """`python script ARGV --side SIDE` in a fresh process; its last stdout line is the JSON result."""
    result = subprocess.run([sys.executable, script, *argv, "--side", side], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if result.returncode != 0:
        sys.exit(f"the {side} side failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def without_workdir(argv: list[str], workdir: Path) -> list[str]:
    """The command line for the sides: the same arguments, with the resolved workdir."""
    if "--workdir" in argv:
        i = argv.index("--workdir")
        argv = argv[:i] + argv[i + 2:]
    return [*argv, "--workdir", str(workdir)]
