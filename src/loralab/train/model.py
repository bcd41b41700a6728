"""The model a run trains, built one way for `loralab train` (real weights) and the memory planner (fake tensors,
from config.json alone): base model, LoRA adapter or full fine-tuning, fp32 trainable copies, gradient
checkpointing, and the speed techniques of `loralab.fast`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from loralab import fast
from loralab.config import RunConfig
from loralab.errors import LoralabError
from loralab.lora import LoraConfig, apply_lora
from loralab.models import AUTO_CLASSES, compute_dtype, load_model, pick_device, read_model_config
from loralab.quantize import quantized_layer_names
from loralab.tasks import get_task

log = logging.getLogger("loralab")


def build_model(config: RunConfig, labels: list[str] | None = None, weights: bool = True
                ) -> tuple[nn.Module, list[str], list[str]]:
    """(model, modules initialised fresh, speed techniques turned on), on the CPU (a quantised base: on its
    device, where bitsandbytes quantises it). weights=False builds the same
    model from the model's config alone, for the memory planner to trace under FakeTensorMode."""
    device = pick_device(config.train.device)
    # LoRA: the frozen base in the compute dtype; full fine-tuning: fp32 master weights, compute under autocast
    dtype = compute_dtype(config.model, device) if config.method == "lora" else torch.float32
    labels = labels if get_task(config.task).LABELLED else None
    if weights:
        model, fresh = load_model(config.model, config.task, dtype, len(labels) if labels else None,
                                  dict(enumerate(labels)) if labels else None, device,
                                  trained_in_full=list(config.lora.modules_to_save or []))
    else:
        m = config.model
        model_config = read_model_config(m.path, m.gguf_file, m.trust_remote_code)
        if labels:
            model_config.num_labels = len(labels)
        model = AUTO_CLASSES[config.task].from_config(model_config, dtype=dtype, trust_remote_code=m.trust_remote_code)
        fresh = []  # without weights nothing tells which modules the checkpoint lacks
    if config.method == "full":
        if quantized_layer_names(model):
            raise LoralabError("this checkpoint is quantised (bitsandbytes), and quantised weights cannot be "
                               "fine-tuned in full", file=config.model.path, field="method",
                               fix="method: lora (QLoRA), or point model.path at the float checkpoint")
        model.requires_grad_(True)
    else:
        lora: LoraConfig = config.lora
        if fresh:
            # weights the checkpoint lacks start random; a frozen random layer (a head, a pooler) would cap the
            # model at chance, so they train in full and are saved with the adapter
            saved = list(dict.fromkeys([*(lora.modules_to_save or []), *fresh]))
            lora = LoraConfig(**{**lora.__dict__, "modules_to_save": saved})
            log.info("initialised fresh by the model class and trained in full: %s", ", ".join(fresh))
        apply_lora(model, lora)
        trainable_copies_in_fp32(model)
    if config.train.gradient_checkpointing:
        enable_checkpointing(model, config.method, config.train.gradient_checkpointing)
    speedups = fast.apply(model, config, device, tracing=not weights)
    return model, fresh, speedups


def trainable_copies_in_fp32(model: nn.Module) -> None:
    """Optimizer updates to low-precision weights would round away; trainable parameters train in fp32."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def enable_checkpointing(model: nn.Module, method: str, every: bool | int = True) -> None:
    """Recompute layers' activations in the backward pass instead of keeping them: every layer's (True), or every
    N-th layer's (the others keep theirs: less recompute for less memory saved)."""
    every_n = int(every)
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=every_n)
    elif every_n == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise LoralabError(f"checkpointing every {every_n}th layer needs transformers 5",
                           field="train.gradient_checkpointing",
                           fix="train.gradient_checkpointing=true, or pip install -U 'transformers>=5'")
    if method == "lora":
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    model.config.use_cache = False
