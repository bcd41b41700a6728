"""Memory planner: the peak memory of a training run, predicted from config.json alone (no weights loaded).

    loralab estimate run.yaml --budget 24GiB

The model is built exactly as `loralab train` builds it (dtype, LoRA, trainable copies, gradient checkpointing) but
from fake tensors, which have shapes and no data. One training step (forward, loss, backward) then runs on them
while a dispatch hook adds up the bytes of every tensor the step allocates and subtracts those freed, so the
activation peak comes from the model's own code, whatever the architecture, rather than from a formula. The trace
runs on the CPU's code paths; for a CUDA run, the one operator that keeps less there (the fused RMSNorm) is traced
as CUDA runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
import transformers.masking_utils
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from loralab.config import RunConfig
from loralab.errors import LoralabError
from loralab.fast.forward_source import replace_forwards
from loralab.fast.lm_loss import CHUNK_ELEMENTS, LinearCrossEntropy, supports_chunked_loss
from loralab.fast.rms_norm import is_rms_norm
from loralab.models import compute_dtype, kept_in_floats, pick_device, read_model_config
from loralab.quantize import checkpoint_quantization, planned_bytes, planned_layers
from loralab.tasks import get_task
from loralab.tasks.evaluation import position_limit
from loralab.train.model import build_model

UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32, per trainable parameter


@dataclass
class MemoryEstimate:
    batch_size: int
    seq_len: int
    base_weights: int  # frozen parameters as stored (the compute dtype)
    trainable_weights: int  # trainable parameters (fp32 copies)
    optimizer: int  # AdamW states
    step_peak: int  # the most bytes one training step holds at once: gradients, activations, temporaries
    gradients: int  # part of step_peak: one fp32 gradient per trainable parameter
    loss_buffers: int  # part of step_peak: logits (or one chunk of them) and their gradient

    @property
    def activations(self) -> int:
        return max(self.step_peak - self.gradients, 0)

    @property
    def total(self) -> int:
        return self.base_weights + self.trainable_weights + self.optimizer + self.step_peak


def parse_bytes(text: str, field: str = "--budget") -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise LoralabError(f"cannot read {text!r} as an amount of memory", field=field, fix="e.g. 24GiB or 80GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive (allocated under this mode and not yet freed) and their peak."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.sizes: dict[int, int] = {id(t.untyped_storage()): 0 for t in known}  # existing storages cost nothing
        self.keep = known  # alive, so that no new storage reuses their ids
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if id(storage) not in self.sizes:
                    self.sizes[id(storage)] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, id(storage))
        return out

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)


class FusedRmsNormOnCuda(torch.autograd.Function):
    """torch's rms_norm as it runs on CUDA: one fused kernel each way, keeping x and each row's fp32 reciprocal
    RMS for the backward pass. Elsewhere torch composes it from elementwise ops that keep fp32 copies of x (so the
    CPU trace would count bytes a GPU run never holds). Fake tensors only: the fused backward has no CPU kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = torch.ops.aten._fused_rms_norm_backward(grad_out, x, [x.shape[-1]], rstd, weight,
                                                                      list(ctx.needs_input_grad[:2]))
        return grad_x, grad_weight, None


def rms_norm_on_cuda(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:
        return type(self).forward(self, hidden_states)
    return FusedRmsNormOnCuda.apply(hidden_states, self.weight, self.variance_epsilon)


class KeepsInput(torch.autograd.Function):
    """A frozen product that keeps its input for the backward pass, as bitsandbytes' 8-bit product does (LLM.int8()
    keeps it whenever any input needs a gradient); torch's linear with a frozen weight keeps only the weight. Kept
    as bitsandbytes keeps it, as an attribute of the context rather than a saved tensor, which gradient
    checkpointing cannot drop."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.kept = (x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.kept
        return grad @ weight, None, None


def keeps_input_forward(self, x: torch.Tensor) -> torch.Tensor:
    return KeepsInput.apply(x, self.weight, self.bias)


def _fake_model(config: RunConfig):
    """The training model of `config`, built as `train` builds it but from its config.json, on fake tensors."""
    model, _, _ = build_model(config, config.data.labels or ["0", "1"], weights=False)
    if pick_device(config.train.device).type == "cuda":
        replace_forwards(model, is_rms_norm, rms_norm_on_cuda)
    model.train()
    return model


def _step_peak(model, config: RunConfig, batch_size: int, seq_len: int) -> int:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    known = [*model.parameters(), *model.buffers()]
    dtype = compute_dtype(config.model, pick_device(config.train.device))
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with LiveBytes(known) as live:
        with autocast:
            if get_task(config.task).CAUSAL and supports_chunked_loss(model):
                # every position scored: the worst case of the chunked loss
                hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                loss = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]),
                                                model.get_output_embeddings().weight, ids[:, 1:].reshape(-1))
            else:
                labels = ids[:, 0] if config.task == "classification" else ids
                loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        del loss
    return live.peak


@contextlib.contextmanager
def planner(config: RunConfig):
    """Yields estimate(batch_size) -> MemoryEstimate for rows of data.max_length tokens (the longest batches; no
    longer than the model's position table, which `train` holds examples to);
    the fake model is built once."""
    # packed-sequence detection reads tensor values, which fake tensors do not have (estimates assume no packing:
    # a packed row costs what a padded one does)
    with FakeTensorMode(allow_non_fake_inputs=True), \
            mock.patch.object(transformers.masking_utils, "find_packed_sequence_indices", lambda _: None):
        model = _fake_model(config)
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
        dequantized = 0
        m = config.model
        quantize = m.quantize if m.quantize != "none" else checkpoint_quantization(
            read_model_config(m.path, m.gguf_file, m.trust_remote_code)) or "none"
        if quantize != "none":
            # traced in floats: the quantised layers' weights as bitsandbytes stores them, and the dequantised copy
            # of one weight that each of their products makes
            saved, dequantized = planned_bytes(model, quantize,
                                               kept_in_floats(list(config.lora.modules_to_save or [])))
            frozen -= saved
            if quantize == "int8":
                for _, layer in planned_layers(model, kept_in_floats(list(config.lora.modules_to_save or []))):
                    layer.forward = types.MethodType(keeps_input_forward, layer)
        causal = get_task(config.task).CAUSAL
        chunked = causal and supports_chunked_loss(model)
        vocab = model.get_output_embeddings().weight.shape[0] if causal else 0
        seq_len = min(config.data.max_length, position_limit(model) or config.data.max_length)

        def estimate(batch_size: int) -> MemoryEstimate:
            peak = _step_peak(model, config, batch_size, seq_len) + dequantized
            model.zero_grad(set_to_none=True)
            tokens = batch_size * seq_len
            # chunked: one chunk of fp32 logits and its low-precision copy; else logits, fp32 copy, log-softmax, grad
            loss = min(tokens, max(1, CHUNK_ELEMENTS // max(vocab, 1))) * vocab * 6 if chunked else tokens * vocab * 14
            return MemoryEstimate(batch_size, seq_len, frozen, 4 * trainable,
                                  trainable * ADAM_STATE_BYTES, peak, 4 * trainable, loss)

        yield estimate


def estimate_with_and_without_checkpointing(config: RunConfig, batch_size: int, budget: Budget
                                            ) -> tuple[dict[str, MemoryEstimate], dict[str, MemoryEstimate | None]]:
    """`loralab estimate`'s two columns: the run as configured and with gradient checkpointing switched (compiled
    layers cannot also be checkpointed, so that variant runs uncompiled); per column the estimate at
    `batch_size` and the largest batch that fits the budget."""
    other = not config.train.gradient_checkpointing
    uncompiled = other and config.train.compile
    variants = {"as configured": config,
                f"with{'' if other else 'out'} gradient checkpointing{' (not compiled)' if uncompiled else ''}":
                    dataclasses.replace(config, train=dataclasses.replace(
                        config.train, gradient_checkpointing=other, compile=config.train.compile and not other))}
    estimates, fits = {}, {}
    for name, variant in variants.items():
        with planner(variant) as estimate:
            estimates[name] = estimate(batch_size)
            fits[name] = largest_batch_size(variant, budget.usable(variant.train.gradient_checkpointing),
                                            estimate=estimate)
    return estimates, fits


def settings_for_model(model: str, gguf_file: str | None = None) -> dict:
    """The settings `loralab estimate --model` plans with: SFT for a causal LM, classification for an encoder, the
    architecture's usual LoRA targets."""
    config = read_model_config(model, gguf_file, field="--model")
    if config.architectures:
        causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in config.architectures)
    else:  # GGUF files name no architecture: a decoder-only model type (BERT has a causal head too, and a masked one)
        causal = (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                  and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return {"task": "sft" if causal else "classification", "model": {"path": model},
            "data": {"train": "(not read by estimate)"}}


def estimate_memory(config: RunConfig, batch_sizes: list[int]) -> list[MemoryEstimate]:
    with planner(config) as estimate:
        return [estimate(b) for b in batch_sizes]


def largest_batch_size(config: RunConfig, budget: int, limit: int = 1024, estimate=None) -> MemoryEstimate | None:
    """The largest micro-batch (≤ limit) whose estimate fits `budget` bytes, or None if even 1 does not. Memory
    grows about linearly with the batch: two estimates give a guess, which is tried with its neighbour, and
    halving settles the rest (each estimate takes seconds; stepping one batch size at a time from a guess a
    hundred off took minutes). `estimate`: an open planner(config), to reuse its model."""
    with contextlib.nullcontext(estimate) if estimate else planner(config) as estimate:
        one = estimate(1)
        if one.total > budget:
            return None
        if limit == 1:
            return one
        probe = estimate(min(8, limit))
        per_example = max((probe.total - one.total) / (probe.batch_size - 1), 1.0)
        # fits: the largest size known to fit; too_big: the smallest known not to
        fits, too_big = (one, probe.batch_size) if probe.total > budget else (probe, limit + 1)
        size = 1 + int((budget - one.total) / per_example)
        neighbour = True
        while too_big - fits.batch_size > 1:
            if not fits.batch_size < size < too_big:
                size = (fits.batch_size + too_big) // 2
            current = estimate(size)
            if current.total > budget:
                too_big = size
            else:
                fits = current
            # after the guess, its neighbour (usually the answer's other side); then halving
            size = (size - 1 if current.total > budget else size + 1) if neighbour else 0
            neighbour = False
        return fits


@dataclass
class Budget:
    total: int  # what the user gave, or what the device offers this process
    held: int  # on a CPU, what this process holds already, outside the planner's count: the interpreter, libraries
    device_type: str

    def usable(self, checkpointing: bool | int = False) -> int:
        """What the planner's total may reach."""
        return int(headroom(self.device_type, checkpointing) * self.total) - self.held


def headroom(device_type: str, checkpointing: bool | int = False) -> float:
    """The share of a budget the planner's total may fill (before what is held already is taken off); the rest is for
    what the planner cannot count. On a GPU, the CUDA context (0.5 GiB on an H100) and the allocator's cached
    blocks: Llama-1B shapes planned for 24 GiB peaked at 92-93% of it with expandable segments (which `train` turns
    on), and at 105% with checkpointing without them (BENCHMARKS.md). On a CPU, the pages glibc's
    heap keeps of freed tensors between the trims of fast/heap.py: the peak RSS rose 6-24% above the planned total
    without checkpointing and 8-104% with it, where the blocks recomputed between two trims all leave pages behind
    (SmolLM2 and an 8-layer llama, 1-47 rows of 512 tokens; BENCHMARKS.md). With these shares the peaks came to
    50-90% of their budgets. Trimming after every block instead took 12-25% longer steps on SmolLM2, so the budget
    gives way, not the heap."""
    if device_type == "cuda":
        return 0.9
    return 0.5 if checkpointing else 0.75


def memory_budget(text: str | None, device: str, field: str = "--budget") -> Budget:
    """The memory a run may fill: `text` (e.g. 24GiB, the whole process's or GPU's share), or by default what the
    device offers now: a GPU's free memory, or the RAM available plus what this process holds. A GPU that is not
    on this machine (planning ahead on a laptop) has no memory to read: the budget must be given (`field`)."""
    where = pick_device(device)
    if where.type == "cuda":
        if text:  # the CUDA context (0.3-0.6 GB) is inside the headroom
            return Budget(parse_bytes(text, field), 0, "cuda")
        if not torch.cuda.is_available():
            raise LoralabError(f"train.device is {device}, and this machine has no GPU whose memory could be the "
                               "budget", field=field, fix="give the GPU's memory, e.g. 80GiB")
        # free memory already leaves out the context and other processes; this process's cache is its own
        free, _ = torch.cuda.mem_get_info(where)
        return Budget(free + torch.cuda.memory_reserved(where), 0, "cuda")
    held = resident_bytes()
    return Budget(parse_bytes(text, field) if text else _available_ram(field) + held, held, "cpu")


def resident_bytes() -> int:
    """The process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: unknown, left to the headroom
        return 0


def _available_ram(field: str) -> int:
    """RAM that can be had without swapping: MemAvailable counts the page cache the kernel would drop, which the
    free pages alone (sysconf's figure) leave out."""
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        raise LoralabError("this system does not say how much memory is free", field=field,
                           fix="give the memory the run may use, e.g. 16GiB") from None


# seed 001's comparison: the same run on bases stored in fewer bytes per weight
BASES = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "int8": ("bf16", "int8"), "nf4": ("bf16", "nf4")}


def estimate_per_base(config: RunConfig, batch_size: int, budget: Budget
                      ) -> dict[str, tuple[MemoryEstimate, MemoryEstimate | None]]:
    """`loralab estimate --compare-bases`: per base (fp32, bf16, int8 and nf4 with bf16 compute), the estimate at
    `batch_size` and the largest batch that fits the budget."""
    rows = {}
    for name, (dtype, quantize) in BASES.items():
        variant = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype, quantize=quantize))
        with planner(variant) as estimate:
            rows[name] = (estimate(batch_size), largest_batch_size(
                variant, budget.usable(variant.train.gradient_checkpointing), estimate=estimate))
    return rows
