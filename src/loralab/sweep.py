"""`loralab sweep`: one run per combination of grid values, each in its own folder, resumable.

    loralab sweep study.yaml --grid lora.r=4,8,16 --grid method=full,lora

Finished variants are skipped and an interrupted one resumes (the training command's own resume); the results are
then compared (see compare.py).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml

from loralab.config import RunConfig, load_config
from loralab.errors import LoralabError


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


def plan(config_path: str, grid: list[str], overrides: list[str]) -> list[RunConfig]:
    """All variant configs, checked before any of them runs (a bad grid key fails here, naming the key)."""
    base = load_config(config_path, overrides)
    configs = []
    for variant in variants(parse_grid(grid)):
        extra = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in variant.items()]
        try:
            config = load_config(config_path, [*overrides, *extra, f"name={variant_name(base.name, variant)}"])
        except LoralabError as e:
            raise LoralabError(f"grid: {e.message}", field=e.field, fix=e.fix, file="--grid") from None
        configs.append(config)
    return configs


def is_finished(config: RunConfig) -> bool:
    """Done, with this very config (a changed config is left to `train`, which refuses to mix two runs)."""
    from loralab.config import to_dict
    from loralab.train.loop import _differences

    saved = config.run_dir / "config.yaml"
    if not (config.run_dir / "report.json").is_file() or not saved.is_file():
        return False
    return not _differences(yaml.safe_load(saved.read_text(encoding="utf-8")), to_dict(config))


def run_sweep(config_path: str, grid: list[str], overrides: list[str], console) -> list[Path]:
    from loralab.train.loop import train

    configs = plan(config_path, grid, overrides)
    console.print(f"sweep: {len(configs)} variants: {', '.join(c.name for c in configs)}")
    for i, config in enumerate(configs, 1):
        if is_finished(config):
            console.print(f"[{i}/{len(configs)}] {config.name}: finished earlier, skipped")
            continue
        console.print(f"[{i}/{len(configs)}] {config.name}")
        train(config, console)
    return [c.run_dir for c in configs]
