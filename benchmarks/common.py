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


def run_side(script: str, side: str, argv: list[str], env: dict | None = None) -> dict:
    """`python script ARGV --side SIDE` in a fresh process (`env` added to this one's environment); its last
    stdout line is the JSON result."""
    result = subprocess.run([sys.executable, script, *argv, "--side", side], capture_output=True, text=True,
                            env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
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


def trainer_rows(rows: list[dict]):
    """The peer's training set as the seeds build it, a datasets.Dataset; where datasets cannot be imported (the
    H200 image lacks its `multiprocess`) the plain list of the same rows, which the Trainer reads alike."""
    try:
        from datasets import Dataset
    except Exception:
        return rows
    return Dataset.from_list(rows)


def random_row_config(model: str, dtype: str, length: int, device: str, overrides=(), dropout: float = 0.1):
    """The sft RunConfig the step benchmarks train on: LoRA r=8 on q/v, rows of up to `length` tokens."""
    from loralab.config import load_config

    return load_config(None, overrides=list(overrides), base={
        "task": "sft", "model": {"path": model, "dtype": dtype},
        "lora": {"r": 8, "alpha": 16, "dropout": dropout, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "unused.json", "max_length": length}, "train": {"device": device}})


def train_peer_on_random_rows(model_path: str, dtype: str, batch_size: int, length: int, steps: int, device: str,
                              callback, dropout: float = 0.1) -> None:
    """The peer's side of the step benchmarks: HF PEFT (LoRA r=8 on q/v) + the real `Trainer.train()` for `steps`
    optimizer steps of random full rows; `callback` (a TrainerCallback) observes its steps."""
    import tempfile

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=dropout,
                                             target_modules=["q_proj", "v_proj"]))
    vocab = model.get_input_embeddings().num_embeddings
    rows = torch.randint(3, vocab, (batch_size * steps, length)).tolist()
    data = trainer_rows([{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows])
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-4,
            save_strategy="no", report_to="none", logging_steps=10**6, bf16=dtype == "bf16", use_cpu=device == "cpu",
            disable_tqdm=True)
        Trainer(model=model, args=training_args, train_dataset=data, callbacks=[callback]).train()


def loop_step(config):
    """One optimizer step of the training loop's own functions (train_step, optimizer_step) on the model `train`
    would build from `config` (an sft RunConfig): step(micro), micro as train_step takes it (micro-batches of rows
    of examples). Returns (step, model, device)."""
    import contextlib

    from loralab.fast.lm_loss import TrainingLoss
    from loralab.models import compute_dtype, pick_device
    from loralab.train.model import build_model
    from loralab.train.optim import make_optimizer, make_scheduler
    from loralab.train.step import optimizer_step, train_step

    device = pick_device(config.train.device)
    dtype = compute_dtype(config.model, device)
    model, _, _ = build_model(config)
    model.to(device)
    model.train()
    trained = TrainingLoss(model, causal=True)
    optimizer = make_optimizer(model, 1e-4, 0.0)
    scheduler = make_scheduler(optimizer, 10**6, 0, "constant")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step(micro) -> None:
        train_step(trained, micro, 0, device, autocast, scaler, causal=True)
        optimizer_step(optimizer, scheduler, scaler, 1.0)

    return step, model, device


def random_row_step(config):
    """loop_step fed random full rows: step(batch_size, length). Returns (step, device)."""
    one_step, model, device = loop_step(config)
    vocab = model.get_output_embeddings().weight.shape[0]

    def step(batch_size: int, length: int) -> None:
        rows = torch.randint(3, vocab, (batch_size, length)).tolist()
        one_step([[[{"input_ids": r, "labels": r}] for r in rows]])

    return step, device
