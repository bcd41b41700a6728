"""A run's configuration: YAML -> typed dataclasses, with dotted command-line overrides and strict checking.

    loralab train run.yaml lora.r=16 train.lr=2e-4

An unknown key or a wrong type is an error that names the key and the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loralab.errors import LoralabError, did_you_mean
from loralab.files import write_text_atomically
from loralab.lora.config import LoraConfig
from loralab.tasks import get_task
from loralab.train.run_folder import check_run_name


def bounded(default, low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
            fix: str):
    """A numeric setting with its valid range, checked by check_ranges for every config however it was built."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open), "fix": fix})


def check_ranges(config, prefix: str = "", file: str | None = None) -> None:
    """Every number in `config` (and its sections) inside the range its field declares; NaN and inf never are."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.", file)
            continue
        if "range" not in f.metadata or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high, low_open, high_open = f.metadata["range"]
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (high is None or (value < high if high_open else value <= high)))
        if not inside:
            span = f"{'>' if low_open else '>='} {low}" + (
                "" if high is None else f" and {'<' if high_open else '<='} {high}")
            raise LoralabError(f"{value!r} is out of range (must be {span})", file=file, field=f"{prefix}{f.name}",
                               fix=f.metadata["fix"])


@dataclass
class ModelConfig:
    path: str = ""  # local folder, hub id, or package:<python module>/<sub folder> for a model shipped on PyPI
    gguf_file: str | None = None  # a .gguf file inside `path` (dequantised to a float model by transformers)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # compute dtype; auto: bf16 on a GPU that has it, else fp32
    trust_remote_code: bool = False  # run the model's own Python code from its folder or hub repo
    # the frozen base's linear layers in 4 bits (nf4, fp4: QLoRA) or 8 bits (int8), through bitsandbytes
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"


@dataclass
class DataConfig:
    train: str = ""  # the training file: .json, .jsonl, .csv, .tsv or .parquet
    validation: str | None = None  # a validation file; null: none, or validation_fraction of train
    # held out from train when no validation file is given
    validation_fraction: float = bounded(0.0, 0, 1, high_open=True, fix="use e.g. 0.1")
    # how records read; auto: from the fields of the first record (see docs/data.md)
    format: Literal["auto", "alpaca", "messages", "text", "classification", "spans", "tokens"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the file's column name
    template: str = "auto"  # auto | alpaca | chatml | llama2 | llama3 | chatglm3 | qwen | a Jinja string
    system: str | None = None  # default system prompt for chat templates
    max_length: int = bounded(512, 8, fix="use e.g. 512")  # tokens per example; longer ones are truncated
    train_on_prompt: bool = False  # sft: score the prompt tokens too, not only the answers
    packing: bool = False  # sft: several examples per row of max_length tokens, kept apart by position ids
    # causal tasks: each micro-batch's examples end to end in one row, kept apart as packed rows are: the same
    # examples a step as padded batches, in random order, with nothing spent on padding; auto: where the model
    # keeps them apart (checked once at the start), else padded batches
    padding_free: bool | Literal["auto"] = "auto"
    labels: list[str | int] | None = None  # the label set, in order; default: sorted labels seen in training
    # use only the first N training records
    limit: int | None = bounded(None, 1, fix="a number of records, 1 or more; null uses them all")
    delimiter: str | None = None  # csv/tsv column separator; default from the extension

    def __post_init__(self):
        if self.labels is not None:
            self.labels = [str(label) for label in self.labels]  # labels: [0, 1] in YAML means "0", "1"


@dataclass
class TrainConfig:
    epochs: float = bounded(1, 0, low_open=True, fix="use 1 or more")  # passes over the training data
    # optimizer steps in all, instead of epochs
    max_steps: int | None = bounded(None, 1, fix="use 1 or more, or null to train train.epochs")
    # auto: the largest that fits memory_budget, up to global_batch
    batch_size: int | Literal["auto"] = bounded(8, 1, fix="use 1 or more, or auto")
    grad_accum: int = bounded(1, 1, fix="use 1 or more")  # micro-batches per optimizer step
    group_by_length: bool = True  # padded batches of similar lengths (little padding); false: a plain random order
    # with batch_size auto: examples per step (grad_accum makes up the rest)
    global_batch: int | None = bounded(None, 1, fix="use 1 or more")
    memory_budget: str | None = None  # with batch_size auto: the process's (or GPU's) memory, e.g. 24GiB; default: free
    # peak learning rate (AdamW)
    lr: float = bounded(2e-4, 0, low_open=True, fix="use e.g. 2e-4 for LoRA, 2e-5 for full fine-tuning")
    weight_decay: float = bounded(0.0, 0, fix="use 0 to 0.1")  # AdamW's, on the trainable weights
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # learning rate after warmup
    # a fraction of all steps (< 1) or a number of steps (>= 1)
    warmup: float = bounded(0.0, 0, fix="use 0.03 (a fraction) or 100 (steps)")
    # gradients clipped to this norm; null: no clipping
    max_grad_norm: float | None = bounded(1.0, 0, low_open=True, fix="use e.g. 1.0, or null for no clipping")
    # true: every layer recomputes; N: every N-th (less time, more memory)
    gradient_checkpointing: bool | int = bounded(False, 0,
            fix="use true (every layer), false, or N >= 1 (every N-th layer)")
    # torch.compile for training steps: each transformer block on its own (one graph serves them all; seconds)
    compile: bool = False
    # optimizer steps; the run also evaluates after each epoch
    eval_every: int | None = bounded(None, 1, fix="use 1 or more, or null")
    eval_batch_size: int = bounded(32, 1, fix="use 1 or more")  # examples per batch when evaluating
    best_metric: str = "auto"  # a metric name from the task; auto: the task's main metric
    # newest checkpoints kept (the best one is kept too)
    keep_checkpoints: int = bounded(2, 0, fix="use 1 or more (0 keeps every checkpoint)")
    # optimizer steps; None: at each evaluation
    checkpoint_every: int | None = bounded(None, 1, fix="use 1 or more, or null")
    # auto: continue from the newest intact checkpoint; ignore-data-changes: even if the data files changed since
    resume: Literal["auto", "never", "ignore-data-changes"] = "auto"
    overwrite: bool = False  # replace a run folder holding another run (only one loralab made)
    log_every: int = bounded(10, 1, fix="use 1 or more")  # optimizer steps between metrics.jsonl lines
    tensorboard: bool = False  # also write TensorBoard logs to the run folder
    device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:N


@dataclass
class GenerateClassifyConfig:
    """task: generate-classify, where the model writes each label as text."""

    max_new_tokens: int = bounded(16, 1, fix="use 1 or more")  # the longest label generated, in tokens


@dataclass
class RunConfig:
    name: str = "run"  # the run folder's name: output_dir/name
    output_dir: str = "runs"  # where run folders go
    task: Literal["sft", "classification", "tagging", "generate-classify"] = "sft"  # see docs/data.md
    method: Literal["lora", "full"] = "lora"  # full: full fine-tuning, the baseline
    seed: int = bounded(0, 0, fix="use 0 or more")  # data order, initialisation and dropout
    # several processes (torchrun): ddp replicates the model; fsdp shards the frozen base weights across them (FSDP2)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate_classify: GenerateClassifyConfig = field(default_factory=GenerateClassifyConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# names other tools use for our keys
SYNONYMS = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
            "num_epochs": "epochs", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
            "per_device_train_batch_size": "batch_size", "cutoff_len": "max_length", "model_name_or_path": "path"}


# keys that moved to another section: old configs get the new name
MOVED = {"train.max_new_tokens": "generate_classify.max_new_tokens"}


def _closest(key: str, valid: list[str]) -> str:
    if SYNONYMS.get(key) in valid:
        return f"did you mean '{SYNONYMS[key]}'?"
    return did_you_mean(key, valid)


def _check_type(value: Any, hint, where: str, file: str | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, option, where, file)
            except LoralabError:
                continue
        raise LoralabError(f"{value!r} is not a valid value", file=file, field=where,
                           fix=f"expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise LoralabError(f"{value!r} is not one of {', '.join(map(str, args))}", file=file, field=where,
                               fix=_closest(str(value), [str(a) for a in args]))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise LoralabError(f"expected a list, got {value!r}", file=file, field=where)
        return [_check_type(v, args[0], f"{where}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LoralabError(f"expected a mapping, got {value!r}", file=file, field=where)
        return {_check_type(k, args[0], where, file): _check_type(v, args[1], f"{where}.{k}", file)
                for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise LoralabError(f"expected {_type_name(hint)}, got {value!r}", file=file, field=where)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:  # the allowed values themselves, e.g. auto
        return " or ".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def from_dict(cls, data: dict, prefix: str = "", file: str | None = None):
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise LoralabError(f"expected a mapping of settings, got {data!r}", file=file, field=prefix or None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if where in MOVED:
            raise LoralabError(f"{where} is now {MOVED[where]}", file=file, field=where,
                               fix=f"rename it to {MOVED[where]}")
        if key not in names:
            raise LoralabError("unknown config key", file=file, field=where, fix=_closest(str(key), names))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}.", file)
        else:
            kwargs[key] = _check_type(value, hint, where, file)
    try:
        return cls(**kwargs)
    except LoralabError as e:
        e.file = e.file or file
        raise


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, true/false, null)."""
    if "=" not in override:
        raise LoralabError(f"override {override!r} is not key=value", fix="e.g. lora.r=16 train.lr=2e-4")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LoralabError(f"cannot set {key}: {part} is not a section", field=key)
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML config (or start from `base`), apply overrides, and check everything."""
    data: dict = copy.deepcopy(base or {})  # overrides set nested keys: the caller's dict stays as it was
    file = None
    if path is not None:
        file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LoralabError("config file not found", file=file, fix="check the path") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise LoralabError(f"not valid YAML: {getattr(e, 'problem', e)}", file=file,
                               record=None if line is None else line + 1) from None
        if not isinstance(loaded, dict):
            raise LoralabError("a config file must be a mapping of settings", file=file)
        data.update(loaded)
    for override in overrides:
        apply_override(data, override)
    config = from_dict(RunConfig, data, file=file)
    _check_values(config, file)
    return config


def _check_values(config: RunConfig, file: str | None) -> None:
    check_run_name(config.name, file)
    check_ranges(config, file=file)
    t = config.train
    for name, value, ok, fix in (
        ("train.global_batch", t.global_batch, t.batch_size != "auto" or (t.global_batch or 0) >= 1,
         "batch_size: auto needs the examples per step, e.g. train.global_batch=32"),
        ("distributed", config.distributed, config.distributed == "ddp" or config.method == "lora",
         "fsdp shards the frozen base of a LoRA run; full fine-tuning uses distributed: ddp"),
        ("model.quantize", config.model.quantize, config.model.quantize == "none" or config.method == "lora",
         "a quantised base cannot be fine-tuned in full (its weights are frozen integers); use method: lora"),
        ("model.quantize", config.model.quantize, config.model.quantize == "none" or config.distributed == "ddp",
         "FSDP does not shard bitsandbytes' quantised weights here; use distributed: ddp (a quantised base is small "
         "enough to replicate)"),
        ("data.packing", config.data.packing, not config.data.packing or config.task == "sft",
         "packing is for task: sft; set data.packing=false"),
        ("data.padding_free", config.data.padding_free,
         config.data.padding_free is not True or get_task(config.task).CAUSAL,
         "padding-free batches are for causal LM tasks (sft, generate-classify); set data.padding_free=false"),
        # torch's partitioner fails on compiled layers that are also checkpointed (mid-run, after loading)
        ("train.compile", t.compile, not (t.compile and t.gradient_checkpointing),
         "compiled layers cannot also be checkpointed; use one: train.compile (which keeps fewer activations "
         "itself) or train.gradient_checkpointing"),
    ):
        if not ok:
            raise LoralabError(f"impossible value {value!r}", file=file, field=name, fix=fix)
    if not config.model.path:
        raise LoralabError("no model given", file=file, field="model.path", fix="model.path=<folder or hub id>")
    if not config.data.train:
        raise LoralabError("no training data given", file=file, field="data.train", fix="data.train=<file>")


def save_config(config: RunConfig, path: Path) -> None:
    """Written whole or not at all (a resumed run rewrites it)."""
    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
