"""`loralab sweep`: one run per combination of grid values, each in its own folder, resumable.

    loralab sweep study.yaml --grid lora.r=4,8,16 --grid method=full,lora

Finished variants are skipped and an interrupted one resumes (the training command's own resume); the results are
then compared (see compare.py).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import yaml

from loralab.config import RunConfig, load_config, to_dict
from loralab.errors import LoralabError
from loralab.train.resume import WATCHING, config_differences


def parse_grid(grid: list[str]) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """['lora.r=4,8,16'] -> [(('lora.r',), [(4,), (8,), (16,)])]. Keys that must change together form one axis:
    'method,train.lr=full:5e-5,lora:1e-3' gives (full, 5e-5) and (lora, 1e-3)."""
    if not grid:
        raise LoralabError("no grid to sweep over", field="--grid", fix="e.g. --grid lora.r=4,8,16")
    axes, used = [], set()
    for item in grid:
        key, sep, values = item.partition("=")
        keys = tuple(k.strip() for k in key.split(","))
        parsed = [tuple(yaml.safe_load(p) for p in v.split(":")) for v in values.split(",") if v.strip()] if sep else []
        if not all(keys) or not parsed:
            raise LoralabError(f"grid {item!r} has no values", field="--grid", fix="write key=value1,value2")
        if any(len(p) != len(keys) for p in parsed):
            raise LoralabError(f"grid {item!r}: each value needs {len(keys)} parts joined by ':'", field="--grid",
                               fix="e.g. method,train.lr=full:5e-5,lora:1e-3")
        if used & set(keys):
            raise LoralabError(f"grid key {sorted(used & set(keys))[0]!r} given twice", field="--grid",
                               fix="list all values in one --grid")
        used |= set(keys)
        axes.append((keys, parsed))
    return axes


def variants(axes) -> list[dict]:
    """Every combination; LoRA settings are dropped for full fine-tuning, so it runs once, not once per r."""
    seen, out = set(), []
    for combination in itertools.product(*(values for _, values in axes)):
        variant = {k: v for (keys, _), values in zip(axes, combination, strict=True)
                   for k, v in zip(keys, values, strict=True)}
        if variant.get("method") == "full":
            variant = {k: v for k, v in variant.items() if not k.startswith("lora.")}
        key = tuple(sorted(variant.items(), key=str))
        if key not in seen:
            seen.add(key)
            out.append(variant)
    return out


def variant_name(base: str, variant: dict) -> str:
    """study + {method: lora, lora.r: 8, train.lr: 0.001} -> study-lora-r8-lr0.001"""
    parts = [str(v) if k == "method" else f"{k.rsplit('.', 1)[-1]}{v}" for k, v in variant.items()]
    return "-".join([base, *parts]).replace("/", "_").replace(" ", "")


def plan(config_path: str, grid: list[str], overrides: list[str]) -> list[tuple[RunConfig, list[str]]]:
    """All variants as (config, overrides that make it), checked before any runs (a bad grid key fails here)."""
    base = load_config(config_path, overrides)
    planned = []
    for variant in variants(parse_grid(grid)):
        extra = [*overrides, *(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in variant.items()),
                 f"name={variant_name(base.name, variant)}"]
        try:
            planned.append((load_config(config_path, extra), extra))
        except LoralabError as e:
            raise LoralabError(f"grid: {e.message}", field=e.field, fix=e.fix, file="--grid") from None
    return planned


def is_finished(config: RunConfig) -> bool:
    """Done, with this very config (a changed config is left to `train`, which refuses to mix two runs)."""
    saved = config.run_dir / "config.yaml"
    if not (config.run_dir / "report.json").is_file() or not saved.is_file():
        return False
    old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    return all(key in WATCHING for key, _, _ in config_differences(old, to_dict(config)))


def run_sweep(config_path: str, grid: list[str], overrides: list[str], console) -> list[Path]:
    """Each variant runs as its own `loralab train` process: peak memory is then each run's own, and a crash
    in one variant leaves the finished ones in place."""
    planned = plan(config_path, grid, overrides)
    console.print(f"sweep: {len(planned)} variants: {', '.join(c.name for c, _ in planned)}")
    for i, (config, extra) in enumerate(planned, 1):
        if is_finished(config):
            console.print(f"[{i}/{len(planned)}] {config.name}: finished earlier, skipped")
            continue
        console.print(f"[{i}/{len(planned)}] {config.name}")
        code = subprocess.call([sys.executable, "-m", "loralab", "train", config_path, *extra])
        if code != 0:
            raise LoralabError(f"variant {config.name} stopped with exit code {code}", file=str(config.run_dir),
                               fix="see its message above; finished variants are kept, rerun the sweep to go on")
    return [c.run_dir for c, _ in planned]
