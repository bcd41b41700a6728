"""The `loralab` command. Each verb is a thin layer over a library function; user errors print one line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

from loralab.errors import LoralabError, did_you_mean

USER_ERROR = 2  # bad input: config, data, adapter files
CRASH = 1  # a bug or an environment failure: the traceback is printed


def cmd_targets(args) -> None:
    """List a model's linear layers (what target_modules can name) and loralab's default choice."""
    from rich.console import Console
    from rich.table import Table

    from loralab.lora.targets import linear_layer_table
    from loralab.models import read_model_config

    config = read_model_config(args.model, trust_remote_code=args.trust_remote_code, field="--model")
    table = Table(title=f"{config.model_type}: linear layers (target_modules names)")
    for column in ("name", "count", "weight shape", "default target"):
        table.add_column(column)
    for name, count, shape, default in linear_layer_table(config, args.trust_remote_code):
        table.add_row(name, str(count), shape, "yes" if default else "")
    Console().print(table)


def cmd_train(args) -> None:
    """Train from a YAML config (plus key=value overrides); with no config, the embedded demo."""
    from loralab.train.loop import train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # the same command under torchrun: PyTorch's launcher starts the processes and their rendezvous
        argv = [a for i, a in enumerate(args.argv) if not (a.startswith("--nproc") or
                                                           (i and args.argv[i - 1] == "--nproc"))]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                   "-m", "loralab", *argv]
        code = subprocess.call(command)
        if code:
            raise LoralabError(f"the distributed run stopped with exit code {code}", fix="see the messages above")
        return
    train(_load_config(args))


def _load_config(args, model: str | None = None):
    """The config file with its key=value overrides; with none, the embedded demo, or with `model` (estimate's
    --model) that model's defaults. A first argument that is a setting rather than a file (`loralab train
    lora.r=4`) is an override."""
    from loralab.config import load_config
    from loralab.demo import DEMO_CONFIG
    from loralab.estimate import settings_for_model

    config_file, overrides = args.config, [*args.overrides, *([f"model.path={model}"] if model else [])]
    if config_file is not None and "=" in config_file and not config_file.endswith((".yaml", ".yml")):
        overrides.insert(0, config_file)
        config_file = None
    if config_file is not None:
        return load_config(config_file, overrides)
    gguf_file = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.gguf_file=")), None)
    return load_config(None, overrides, base=settings_for_model(model, gguf_file) if model else DEMO_CONFIG)


def cmd_estimate(args) -> None:
    """Peak training memory from config.json alone, and the largest batch that fits a budget."""
    from rich.console import Console
    from rich.table import Table

    from loralab.estimate import estimate_with_and_without_checkpointing, headroom, memory_budget
    from loralab.models import compute_dtype, pick_device
    from loralab.train.report import human_bytes

    config = _load_config(args, model=args.model)
    device = pick_device(config.train.device)
    dtype_name = str(compute_dtype(config.model, device)).removeprefix("torch.") + f" on {device.type}"
    if config.model.quantize != "none":
        dtype_name += f", base in {config.model.quantize}"
    batch = args.batch_size or (config.train.batch_size if config.train.batch_size != "auto" else 1)
    budget = memory_budget(args.budget, config.train.device)
    if args.compare_bases:
        _print_bases(config, batch, budget, device)
        return
    estimates, fits = estimate_with_and_without_checkpointing(config, batch, budget)
    table = Table(title=f"peak training memory: {config.model.path}, {config.task}, {config.method}, batch {batch} "
                        f"x {next(iter(estimates.values())).seq_len} tokens, {dtype_name}")
    table.add_column("")
    for name in estimates:
        table.add_column(name, justify="right")
    rows = [("frozen base weights", "base_weights"), ("trainable weights (fp32)", "trainable_weights"),
            ("gradients (fp32)", "gradients"), ("AdamW states (fp32)", "optimizer"),
            ("activations and temporaries", "activations"), ("  of which logits / loss buffers", "loss_buffers"),
            ("total", "total")]
    for label, key in rows:
        table.add_row(label, *(human_bytes(getattr(e, key)) for e in estimates.values()))
    table.add_row(f"largest batch within {human_bytes(budget.total)}",
                  *(str(f.batch_size) if f else "none fits" for f in fits.values()))
    Console().print(table)
    plain, checkpointed = headroom(budget.device_type), headroom(budget.device_type, checkpointing=True)
    share = f"{plain:.0%}" + (f" ({checkpointed:.0%} with checkpointing)" if checkpointed != plain else "")
    held = f", less what this process holds already ({human_bytes(budget.held)})" if budget.held else ""
    cache = "the allocator's cache and the CUDA context" if budget.device_type == "cuda" else "the C heap's cache"
    print(f"trainable parameters: {next(iter(estimates.values())).trainable_weights // 4:,}. Not counted: the "
          "framework itself (CUDA context or the Python process, roughly 0.3-1 GB). The largest batch keeps the total "
          f"within {share} of the budget{held}: the rest is for {cache}.")


def _print_bases(config, batch: int, budget, device) -> None:
    from rich.console import Console
    from rich.table import Table

    from loralab.estimate import estimate_per_base
    from loralab.train.report import human_bytes

    rows = estimate_per_base(config, batch, budget)
    seq_len = next(iter(rows.values()))[0].seq_len
    table = Table(title=f"peak training memory by base: {config.model.path}, {config.task}, {config.method}, "
                        f"batch {batch} x {seq_len} tokens, on {device.type}")
    for column in ("base", "frozen weights", "LoRA + grads + AdamW", "activations", f"total at batch {batch}",
                   f"largest batch in {human_bytes(budget.total)}"):
        table.add_column(column, justify="right")
    for name, (e, fit) in rows.items():
        table.add_row(name if name in ("fp32", "bf16") else f"{name} (bf16 compute)", human_bytes(e.base_weights),
                      human_bytes(e.trainable_weights + e.gradients + e.optimizer), human_bytes(e.activations),
                      human_bytes(e.total), str(fit.batch_size) if fit else "none fits")
    Console(width=160).print(table)
    print("int8 and nf4: bitsandbytes' storage (int8 rows and their scales; packed 4-bit weights and double-quantised "
          "absmax), heads and embeddings in bf16. Choose one with model.quantize and model.dtype.")


def parse_combination(spec: str, adapters: list[str]) -> tuple[list[str], list[float]]:
    """'sql=0.7,chat=0.3' -> (['sql', 'chat'], [0.7, 0.3]), each name one of the loaded adapters."""
    names, weights = [], []
    for item in spec.split(","):
        name, sep, weight = item.strip().partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or value is None or value != value:
            raise LoralabError(f"{item!r} is not name=weight", field="--combine", fix="e.g. --combine sql=0.7,chat=0.3")
        if name not in adapters:
            raise LoralabError(f"no adapter is named {name!r}", field="--combine",
                               fix=did_you_mean(name, adapters) if adapters else "load adapters with --adapter")
        names.append(name)
        weights.append(value)
    return names, weights


def _load(args, load_adapters: bool = True):
    from loralab.infer.load import load_for_inference, parse_adapters
    from loralab.lora.combine import add_weighted_adapter

    adapters = parse_adapters(args.adapter)
    loaded = load_for_inference(args.model, adapters, gguf_file=args.gguf_file, dtype=args.dtype,
                                device=args.device, trust_remote_code=args.trust_remote_code,
                                quantize=args.quantize,
                                load_adapters=load_adapters and not getattr(args, "no_adapter", False))
    if getattr(args, "combine", None):
        names, weights = parse_combination(args.combine, list(adapters))
        add_weighted_adapter(loaded.model, names, weights, "combined", args.combination)
    elif getattr(args, "use", None):
        loaded.use(args.use)
    return loaded


def cmd_chat(args) -> None:
    from loralab.infer.generate import chat

    chat(_load(args), sys.stdin, sys.stdout, system=args.system, temperature=args.temperature, top_p=args.top_p,
         max_new_tokens=args.max_new_tokens, template=args.template)


def cmd_generate(args) -> None:
    from loralab.infer.generate import generate_file

    n = generate_file(_load(args), args.input, args.output, batch_size=args.batch_size, temperature=args.temperature,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens, template=args.template,
                      system=args.system)
    print(f"{n} answers written to {args.output}")


def _columns(args) -> dict:
    return dict(item.split("=", 1) for item in args.column or [])


def cmd_eval(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from loralab.infer.predict import evaluate_file

    metrics = evaluate_file(_load(args), args.data, _columns(args), args.batch_size)
    table = Table(title=f"{args.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def cmd_predict(args) -> None:
    from loralab.infer.predict import predict_file

    n = predict_file(_load(args), args.data, args.output, _columns(args), args.batch_size)
    print(f"{n} predictions written to {args.output}")


def cmd_merge(args) -> None:
    from loralab.infer.merge import merge_to_folder

    out = merge_to_folder(args.model, args.adapter[0], args.out, gguf_file=args.gguf_file,
                          trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                          quantize=args.quantize)
    print(f"merged model written to {out}")


def cmd_export(args) -> None:
    from loralab.export.formats import export

    for line in export(args.format, args.model, args.adapter[0], args.out, args.quant, gguf_file=args.gguf_file,
                       trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, check=args.check,
                       quantize=args.quantize):
        print(line)


def cmd_serve(args) -> None:
    """An OpenAI-compatible HTTP server for the base model and its adapters."""
    try:
        import uvicorn

        from loralab.serve.app import create_app
    except ImportError:
        raise LoralabError("serving needs FastAPI and uvicorn", fix="pip install 'loralab[serve]'") from None
    loaded = _load(args)
    base_name = args.name or Path(args.model.rstrip("/")).name
    if base_name in loaded.adapters:
        raise LoralabError(f"the base model's name {base_name!r} is also an adapter's", field="--name",
                           fix="give the base another name with --name")
    app = create_app(loaded, base_name, api_key=args.api_key or os.environ.get("LORALAB_API_KEY"),
                     max_batch=args.max_batch, max_waiting=args.max_waiting)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or os.environ.get("LORALAB_API_KEY")):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {base_name} and {', '.join(loaded.adapters) or 'no adapters'} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_sweep(args) -> None:
    from rich.console import Console

    from loralab.compare import compare
    from loralab.sweep import run_sweep

    console = Console(stderr=True)
    run_dirs = run_sweep(args.config, args.grid, args.overrides, console)
    out = args.out or str(Path(run_dirs[0]).parent / f"{Path(args.config).stem}-comparison")
    _print_comparison(*compare([str(d) for d in run_dirs], out))


def cmd_compare(args) -> None:
    from loralab.compare import compare

    _print_comparison(*compare(args.runs, args.out))


def _print_comparison(rows, out_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    from loralab.train.report import human_bytes

    table = Table(title="comparison")
    for column in ("variant", "method", "r", "trainable", "adapter", "s/epoch", "tok/s", "peak mem", "best", "epoch"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["variant"], r["method"], str(r["r"]), f"{r['trainable_params']:,}",
                      human_bytes(r["adapter_size"]), str(r["epoch_seconds"]), str(r["tokens_per_second"]),
                      human_bytes(r["peak_memory"]), f"{r['best_metric']} {r['best_value']}", str(r["best_epoch"]))
    Console(width=160).print(table)
    print(f"written: {out_dir / 'report.md'}, {out_dir / 'results.csv'} and plots in {out_dir}")


def _model_args(parser, adapters: str = "*") -> None:
    parser.add_argument("--model", required=True, help="base model: folder, hub id or package:<module>/<dir>")
    parser.add_argument("--adapter", action="append", help="adapter folder, or name=folder (repeat for several)",
                        required=adapters == "1")
    parser.add_argument("--gguf-file", help="a .gguf file inside --model")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"],
                        help="the base's bitsandbytes quantisation (default: the one the adapter was trained on)")
    if adapters != "1":
        parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        parser.add_argument("--device", default="auto")
        parser.add_argument("--use", help="the adapter to use when several are loaded (default: the first)")
        parser.add_argument("--combine", help="a weighted combination instead, e.g. sql=0.7,chat=0.3")
        parser.add_argument("--combination", default="linear", choices=["linear", "cat"])


def _generation_args(parser, temperature: float) -> None:
    parser.add_argument("--system", help="system prompt (default: the one used in training)")
    parser.add_argument("--template", help="override the chat template (a built-in name or Jinja)")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    from loralab import __version__

    parser = argparse.ArgumentParser(prog="loralab", description="LoRA fine-tuning of transformer models.")
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors too")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")
    train = verbs.add_parser("train", help="fine-tune a model from a YAML config (no config: the embedded demo)")
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. lora.r=16 train.lr=2e-4")
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine (data-parallel, torchrun)")
    train.set_defaults(run=cmd_train)
    est = verbs.add_parser("estimate", help="predict peak training memory from config.json alone (no weights)")
    est.add_argument("config", nargs="?", help="YAML config file (none: the demo)")
    est.add_argument("overrides", nargs="*", help="dotted key=value settings")
    est.add_argument("--model", help="a model folder or hub id, instead of the config's")
    est.add_argument("--budget", help="memory to fit, e.g. 24GiB (default: this device's)")
    est.add_argument("--batch-size", type=int, help="the batch to break down (default: the config's)")
    est.add_argument("--compare-bases", action="store_true",
                     help="the same run on fp32, bf16, int8 and nf4 bases side by side")
    est.set_defaults(run=cmd_estimate)
    chat = verbs.add_parser("chat", help="chat in the terminal with a base model + adapter")
    _model_args(chat)
    _generation_args(chat, temperature=0.7)
    chat.add_argument("--no-adapter", action="store_true", help="answer with the base model, for comparison")
    chat.set_defaults(run=cmd_chat)
    gen = verbs.add_parser("generate", help="answer a file of prompts (jsonl/json/csv) into a jsonl file")
    _model_args(gen)
    _generation_args(gen, temperature=0.0)
    gen.add_argument("--input", required=True)
    gen.add_argument("--output", "--out", required=True)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.set_defaults(run=cmd_generate)
    for verb, helptext, run in (("eval", "the training metrics on a labelled file", cmd_eval),
                                ("predict", "predictions for a file, as jsonl", cmd_predict)):
        p = verbs.add_parser(verb, help=helptext)
        _model_args(p)
        p.add_argument("--data", required=True)
        p.add_argument("--output", "--out", required=verb == "predict", help="where to write (json metrics / jsonl)")
        p.add_argument("--column", action="append", help="map a column, e.g. --column text=sentence")
        p.add_argument("--batch-size", type=int, default=32)
        p.set_defaults(run=run)
    merge = verbs.add_parser("merge", help="merge an adapter into the base model: a plain transformers folder")
    _model_args(merge, adapters="1")
    merge.add_argument("--out", "--output", required=True, help="the merged model's folder")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(run=cmd_merge)
    export = verbs.add_parser("export", help="write a trained adapter for llama.cpp, Ollama or vLLM")
    _model_args(export, adapters="1")
    export.add_argument("--format", required=True, choices=["gguf", "gguf-lora", "ollama", "vllm"],
                        help="gguf: merged model; gguf-lora: the adapter alone for llama.cpp; ollama: GGUF + "
                             "Modelfile; vllm: the checked adapter folder")
    export.add_argument("--out", "--output", help="the file (gguf, gguf-lora) or folder (ollama, vllm) to write")
    export.add_argument("--quant", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                        help="the GGUF weight type (gguf, ollama)")
    export.add_argument("--check", action="store_true", help="with --format vllm: only say whether vLLM loads it")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=cmd_export)
    serve = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server: the base model and its adapters")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' (default: $LORALAB_API_KEY)")
    serve.add_argument("--name", help="the base model's name in requests (default: the model folder's name)")
    serve.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    serve.add_argument("--max-waiting", type=int, default=256, help="queued requests; more get HTTP 429")
    serve.set_defaults(run=cmd_serve)
    sweep = verbs.add_parser("sweep", help="one run per combination of --grid values, then a comparison")
    sweep.add_argument("config")
    sweep.add_argument("overrides", nargs="*", help="key=value settings for every variant")
    sweep.add_argument("--grid", action="append", help="key=v1,v2,... (repeat for more axes)")
    sweep.add_argument("--out", "--output", help="where the comparison goes (default: next to the runs)")
    sweep.set_defaults(run=cmd_sweep)
    comp = verbs.add_parser("compare", help="table, csv and plots comparing finished runs")
    comp.add_argument("runs", nargs="+")
    comp.add_argument("--out", "--output", default="runs/comparison")
    comp.set_defaults(run=cmd_compare)
    targets = verbs.add_parser("targets", help="list a model's linear layers and the default LoRA targets")
    targets.add_argument("model", help="local model folder or hub id")
    targets.add_argument("--trust-remote-code", action="store_true")
    targets.set_defaults(run=cmd_targets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
        return getattr(e, "exit_code", USER_ERROR)  # a stop by signal: 128 + its number, as shells expect
    except KeyboardInterrupt:
        print("interrupted (rerun the same command to resume a training run)", file=sys.stderr)
        return 130
    except Exception:  # not the user's fault: show everything, and say so
        traceback.print_exc()
        print("error: loralab crashed (a bug or an environment failure, not bad input); checkpoints written so far "
              "are intact", file=sys.stderr)
        return CRASH
    return 0


if __name__ == "__main__":
    sys.exit(main())
