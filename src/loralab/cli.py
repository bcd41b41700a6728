"""The `loralab` command. Each verb is a thin layer over a library function; user errors print one line."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from loralab.errors import LoralabError

USER_ERROR = 2  # bad input: config, data, adapter files
CRASH = 1  # a bug or an environment failure: the traceback is printed


def cmd_targets(args) -> None:
    """List a model's linear layers (what target_modules can name) and loralab's default choice."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoConfig, AutoModel

    from loralab.lora.targets import DEFAULT_TARGETS, linear_module_names

    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except OSError as e:
        raise LoralabError(f"cannot read a model config: {e}", file=args.model,
                           fix="pass a local model folder holding config.json, or a hub id") from None
    with torch.device("meta"):  # the layout only: no weights are loaded or allocated
        model = AutoModel.from_config(config, trust_remote_code=args.trust_remote_code)
    counts: dict[str, int] = {}
    shapes: dict[str, str] = {}
    for name in linear_module_names(model):
        suffix = name.rsplit(".", 1)[-1]
        counts[suffix] = counts.get(suffix, 0) + 1
        weight = model.get_submodule(name).weight
        shapes.setdefault(suffix, " x ".join(map(str, weight.shape)))
    default = DEFAULT_TARGETS.get(config.model_type, [])
    table = Table(title=f"{config.model_type}: linear layers (target_modules names)")
    for column in ("name", "count", "weight shape", "default target"):
        table.add_column(column)
    for suffix, count in counts.items():
        table.add_row(suffix, str(count), shapes[suffix], "yes" if suffix in default else "")
    Console().print(table)


def cmd_train(args) -> None:
    """Train from a YAML config (plus key=value overrides); with no config, the embedded demo."""
    from loralab.config import load_config
    from loralab.demo import DEMO_CONFIG
    from loralab.train.loop import train

    config_file = args.config
    overrides = list(args.overrides)
    if config_file is not None and "=" in config_file and not config_file.endswith((".yaml", ".yml")):
        overrides.insert(0, config_file)  # `loralab train lora.r=4`: overrides of the demo
        config_file = None
    config = load_config(config_file, overrides, base=DEMO_CONFIG if config_file is None else None)
    train(config)


def build_parser() -> argparse.ArgumentParser:
    from loralab import __version__

    parser = argparse.ArgumentParser(prog="loralab", description="LoRA fine-tuning of transformer models.")
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors too")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")
    train = verbs.add_parser("train", help="fine-tune a model from a YAML config (no config: the embedded demo)")
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. lora.r=16 train.lr=2e-4")
    train.set_defaults(run=cmd_train)
    targets = verbs.add_parser("targets", help="list a model's linear layers and the default LoRA targets")
    targets.add_argument("model", help="local model folder or hub id")
    targets.add_argument("--trust-remote-code", action="store_true")
    targets.set_defaults(run=cmd_targets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    # transformers' own load reports and warnings: loralab says what matters (fresh weights, pad token) itself
    transformers.logging.set_verbosity_error()
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except LoralabError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
