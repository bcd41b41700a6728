"""`loralab train`: config -> data -> model + adapter -> optimizer steps with evaluation -> adapter + report."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loralab.config import DataConfig, RunConfig, atomic_write_text, load_config, save_config, to_dict
from loralab.data.collate import length_grouped_order, pack_batch, packed_rows, pad_batch, to_device
from loralab.data.records import read_records
from loralab.errors import LoralabError, did_you_mean
from loralab.infer.settings import save_inference_settings
from loralab.lora import LoraConfig, apply_lora, count_parameters, save_adapter, trainable_parameters_report
from loralab.models import compute_dtype, load_model, load_tokenizer, pick_device, resolve_model_path, usable_device
from loralab.tasks import TaskData, get_task
from loralab.tasks.evaluation import position_limit
from loralab.train.causal_attention import NAME as LORALAB_ATTENTION
from loralab.train.causal_attention import flash_kernel_runs_on, use_chunked_attention
from loralab.train.checkpoint import damage, list_checkpoints, load_intact, load_state, load_weights, save_checkpoint
from loralab.train.compiled import compile_model
from loralab.train.cuda_allocator import use_expandable_segments
from loralab.train.distributed import (
    SINGLE_PROCESS,
    World,
    average_gradients,
    barrier,
    close_world,
    device_of,
    gather_objects,
    init_world,
    min_over_ranks,
    shard,
    shard_frozen_base,
    sum_over_ranks,
    whole_root,
)
from loralab.train.frozen_linear import use_onednn_for_frozen_linears
from loralab.train.heap import TRIM_EVERY, release_free_heap, trim_inside_steps
from loralab.train.lm_loss import TrainingLoss, check_packing, scored_positions
from loralab.train.optim import make_optimizer, make_scheduler
from loralab.train.report import peak_memory_bytes, size_on_disk, write_report
from loralab.train.rms_norm import fuse_rms_norm
from loralab.train.run_folder import (
    RunLock,
    empty_run_folder,
    is_run_folder,
    mark_run_folder,
    run_files,
    run_folder,
)
from loralab.train.swiglu import fuse_swiglu

log = logging.getLogger("loralab")
LOWER_IS_BETTER = ("loss", "perplexity")
MAX_BAD_STEPS = 10  # consecutive non-finite losses before the run stops
CHECKPOINT_SECONDS = 600  # without train.checkpoint_every: the longest stretch of training a kill can lose


# settings that change how a run is watched and saved, not what it trains: a resumed run may change them
WATCHING = {"train.resume", "train.overwrite", "train.log_every", "train.tensorboard", "train.eval_every",
            "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints"}
# raised, these continue a run past its old end; its schedule then runs to the new end from where it stands
LENGTH = {"train.epochs", "train.max_steps"}


def check_run_dir(config: RunConfig) -> bool:
    """Whether runs/<name> holds this run to resume; refuses a folder holding another run (unless train.overwrite
    is set). Writes nothing: open_run_dir does, once the model and data have loaded, so that a run that fails to
    start (a wrong path, bad data) leaves an existing folder as it was, even with train.overwrite. The same run
    may come back with other WATCHING settings, or longer (more epochs or steps)."""
    run_dir = run_folder(config.output_dir, config.name)
    saved = run_dir / "config.yaml"
    if not run_files(run_dir):
        return False
    if config.train.overwrite:
        if not is_run_folder(run_dir):  # refused now, before the model loads; open_run_dir checks again
            empty_run_folder(run_dir)
        return False
    if not saved.is_file():
        raise LoralabError("the output folder exists and is not a loralab run", file=str(run_dir),
                           fix="choose another name, or train.overwrite=true to replace it")
    old = saved_config(run_dir)
    if old is None:  # config.yaml is damaged and no intact checkpoint says what the run was
        if not list_checkpoints(run_dir / "checkpoints"):
            return False  # nothing to resume: the run starts afresh and config.yaml is written anew
        raise LoralabError("config.yaml is damaged and no intact checkpoint holds the run's config", file=str(saved),
                           fix="restore config.yaml, or train.overwrite=true to start over")
    try:  # settings added since that run was saved take their defaults
        old = to_dict(load_config(saved))
    except LoralabError:
        pass
    differences = [d for d in _differences(old, to_dict(config))
                   if d[0] not in WATCHING and not (d[0] in LENGTH and _longer(d[1], d[2]))]
    if differences:
        listed = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in differences[:3])
        raise LoralabError(f"the output folder holds a different run ({listed})", file=str(run_dir),
                           fix="choose another name, or train.overwrite=true (only more train.epochs or "
                               "train.max_steps, or logging and checkpoint settings, continue it)")
    if config.train.resume == "never":
        raise LoralabError("the output folder already holds this run", file=str(run_dir),
                           fix="train.resume=auto to continue it, or train.overwrite=true to start over")
    return bool(list_checkpoints(run_dir / "checkpoints"))


def saved_config(run_dir: Path) -> dict | None:
    """The run's config as config.yaml holds it or, if that file is damaged, as its newest intact checkpoint does."""
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        if isinstance(old, dict):
            return old
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        pass
    for checkpoint in reversed(list_checkpoints(run_dir / "checkpoints")):
        if damage(checkpoint) is None:
            with contextlib.suppress(Exception):  # unreadable: try the one before
                return load_state(checkpoint)["config"]
    return None


def open_run_dir(config: RunConfig) -> None:
    """The run folder as check_run_dir decided: emptied first under train.overwrite (only a loralab run folder);
    marked as a run folder; config.yaml (re)written."""
    run_dir = run_folder(config.output_dir, config.name)
    if config.train.overwrite:
        empty_run_folder(run_dir)
    mark_run_folder(run_dir)
    save_config(config, run_dir / "config.yaml")


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{name}.")
        elif a != b:
            out.append((name, a, b))
    return out


def _longer(old, new) -> bool:
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new > old


def file_hashes(data: DataConfig) -> dict[str, str]:
    """sha256 of the run's data files: a resumed run must train on the data its checkpoints saw."""
    paths = [p for p in (data.train, data.validation) if p and Path(p).is_file()]
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def keep_metrics_until(path: Path, step: int) -> None:
    """metrics.jsonl cut back to the entries up to `step` (the resumed checkpoint's), rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", step + 1) <= step:
                kept.append(line + "\n")
        except (ValueError, AttributeError):
            break  # a line cut short by a kill: nothing after it was written whole
    atomic_write_text(path, "".join(kept))


def load_data(config: RunConfig):
    d = config.data
    train = read_records(d.train, d.columns, d.delimiter, d.limit)
    if d.validation:
        return train, read_records(d.validation, d.columns, d.delimiter)
    if d.validation_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        held = max(1, int(len(train) * d.validation_fraction))
        return [train[i] for i in sorted(order[held:])], [train[i] for i in sorted(order[:held])]
    return train, []


CAUSAL_TASKS = ("sft", "generate-classify")  # trained as causal LMs: next-token loss, causal attention


def setup_model(config: RunConfig, data: TaskData, device, dtype):
    """The model with only what should train left trainable; returns (model, fresh module names)."""
    labels = data.labels if config.task in ("classification", "tagging") else None
    id2label = dict(enumerate(labels)) if labels else None
    # LoRA: the frozen base in the compute dtype; full fine-tuning: fp32 master weights, compute under autocast
    weight_dtype = dtype if config.method == "lora" else torch.float32
    model, fresh = load_model(config.model, config.task, weight_dtype, len(labels) if labels else None, id2label)
    if config.method == "full":
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
    fuse_swiglu(model)
    fuse_rms_norm(model)
    if pick_device(config.train.device).type == "cpu":  # (fsdp loads on the CPU what trains on a GPU)
        use_onednn_for_frozen_linears(model)  # fp32 on an AMD CPU: about twice MKL's speed
    if config.task in CAUSAL_TASKS:
        use_chunked_attention(model)  # causal attention on CPU computes about 10/16 of the scores, not all
    if config.train.gradient_checkpointing:
        enable_checkpointing(model, config.method, config.train.gradient_checkpointing)
    if config.train.compile:
        compile_model(model, config.train.compile)
    else:
        # on the CPU, the C heap's holes inside a step; with checkpointing the backward pass holds the most
        trim_inside_steps(model, backward=bool(config.train.gradient_checkpointing))
    return model.to(device), fresh


def enable_checkpointing(model, method: str, every: bool | int = True) -> None:
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


def with_planned_batch(config: RunConfig, console: Console, device: torch.device | None = None,
                       world: World = SINGLE_PROCESS) -> RunConfig:
    """batch_size: auto -> the largest micro-batch the memory planner fits in the budget (at most this process's
    share of global_batch), and the gradient accumulation that keeps global_batch examples per step. Several
    processes take the smallest of their plans: they must step alike."""
    from loralab.estimate import largest_batch_size, memory_budget
    from loralab.train.report import human_bytes

    t = config.train
    processes = world.size
    share = math.ceil(t.global_batch / processes)  # this process's examples per optimizer step
    budget = memory_budget(t.memory_budget, str(device or t.device), "train.memory_budget")
    usable = budget.usable(t.gradient_checkpointing)
    best = largest_batch_size(config, usable, limit=share)
    (smallest,) = min_over_ranks(world, [best.batch_size if best else 0], device)
    batch = int(smallest)
    if not batch:
        raise LoralabError(f"even one example of {config.data.max_length} tokens needs more than the memory budget "
                           f"allows ({human_bytes(max(usable, 0))} of {human_bytes(budget.total)} for tensors"
                           f"{' on one of the processes' if processes > 1 and best else ''})",
                           field="train.memory_budget",
                           fix=("" if t.gradient_checkpointing else "train.gradient_checkpointing=true, ") +
                           "a lower data.max_length, a bf16 model.dtype, or a larger budget")
    accum = math.ceil(share / batch)
    console.print(f"batch size auto: {batch} x {accum} accumulation steps"
                  f"{f' x {processes} processes' if processes > 1 else ''} (the planner fits {best.batch_size}: "
                  f"{human_bytes(best.total)} in tensors, of a {human_bytes(budget.total)} budget)")
    return dataclasses.replace(config, train=dataclasses.replace(t, batch_size=batch, grad_accum=accum))


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(saved, world: World, device: torch.device) -> None:
    """Each process continues its own random stream; on another number of processes (or from a checkpoint that
    kept one stream) every process takes the first process's stream."""
    states = saved if isinstance(saved, list) else [{"cpu": saved, "cuda": None}]
    state = states[world.rank] if len(states) == world.size else states[0]
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_copies_in_fp32(model) -> None:
    """Optimizer updates to low-precision weights would round away; trainable parameters train in fp32."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def micro_batches(data: TaskData, config: RunConfig, epoch: int, world: World = SINGLE_PROCESS
                  ) -> list[list[list[int]]]:
    """This process's micro-batches for an epoch, each a list of rows of example indices (one example per row, or
    several when packing). The same global order on every process (batch_size x processes rows per global
    micro-batch), each taking its own part, so N processes follow one process with N times the batch."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    size = config.train.batch_size * world.size
    lengths = [len(e["input_ids"]) for e in data.train]
    flat = config.data.padding_free is True and not config.data.packing
    if config.data.packing:
        rows = packed_rows(lengths, config.data.max_length, generator)
    elif config.train.group_by_length and not flat:
        rows = [[i] for i in length_grouped_order(lengths, size, generator)]
    else:
        rows = [[i] for i in torch.randperm(len(lengths), generator=generator).tolist()]
    batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    mine = [shard(b, world) for b in batches if len(b) >= world.size]
    # padding-free: this process's examples of the micro-batch as one row
    return [[[i for row in rows for i in row]] for rows in mine] if flat else mine


def resolve_padding_free(config: RunConfig, model, device, autocast, console: Console) -> RunConfig:
    """data.padding_free as the run will use it, True or False. auto means padding-free batches for causal tasks
    whose model keeps the examples of a row apart (check_packing), where attention takes each example alone:
    loralab's on the CPU and on GPUs with torch's flash kernel in half precision, and transformers' flash
    attention. Elsewhere (fp32 on a GPU, older GPUs, eager attention) the row would go through a block mask that
    computes its whole square: 32 examples a row cost 32 times a padded batch's attention, so auto pads there.
    Asked for outright, a model that cannot keep examples apart is an error. Packed rows have no padding to
    free."""
    d = config.data
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    ours_per_example = device.type == "cpu" or (
        flash_kernel_runs_on(device) and compute_dtype(config.model, device) in (torch.float16, torch.bfloat16))
    attention_per_example = (attention.startswith("flash_attention")
                             or (attention == LORALAB_ATTENTION and ours_per_example))
    wanted = d.padding_free is True or (d.padding_free == "auto" and config.task in CAUSAL_TASKS
                                        and attention_per_example)
    use = wanted and not d.packing
    if use:
        try:
            check_packing(model, device, autocast, field="data.padding_free")
        except LoralabError as error:
            if d.padding_free is True:
                raise
            console.print(f"batches are padded: {error.message}")
            use = False
    return dataclasses.replace(config, data=dataclasses.replace(d, padding_free=use))


def train(config: RunConfig, console: Console | None = None) -> dict:
    if usable_device(config.train.device).type == "cuda":
        use_expandable_segments()
    world = init_world(config.train.device)
    try:
        # the main process alone writes the run folder; a second run into it is refused at once
        with RunLock(run_folder(config.output_dir, config.name)) if world.main else contextlib.nullcontext():
            return _train(config, console or Console(stderr=True, quiet=not world.main), world)
    finally:
        close_world(world)


def _train(config: RunConfig, console: Console, world: World) -> dict:
    if not world.main:
        log.setLevel(logging.WARNING)  # one process speaks
    resuming = check_run_dir(config) if world.main else False
    requested, run_dir = config, config.run_dir
    device = device_of(world, pick_device(config.train.device))
    if config.train.batch_size == "auto":
        config = with_planned_batch(config, console, device, world)
    torch.manual_seed(config.seed)
    dtype = compute_dtype(config.model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's in the same process
    task = get_task(config.task)
    tokenizer = load_tokenizer(config.model)
    train_records, validation_records = load_data(config)
    data = task.prepare(config, tokenizer, train_records, validation_records)
    # fsdp: the model loads on the CPU and fully_shard moves each process's part to its device
    fsdp = world.size > 1 and config.distributed == "fsdp"
    model, fresh = setup_model(config, data, torch.device("cpu") if fsdp else device, dtype)
    positions = position_limit(model)
    longest = max(len(e["input_ids"]) for e in data.train + data.validation)
    if positions and longest > positions:
        raise LoralabError(f"examples are up to {longest} tokens long but the model handles {positions} positions",
                           field="data.max_length", fix=f"data.max_length={positions}")
    console.print(trainable_parameters_report(model))
    if data.stats.get("truncated"):
        console.print(f"{data.stats['truncated']} training examples were longer than max_length="
                      f"{config.data.max_length} and were truncated")
    if data.stats.get("without_trainable_tokens"):
        console.print(f"{data.stats['without_trainable_tokens']} training examples had no answer token left after "
                      "truncation and were left out")

    t = config.train
    steps_per_epoch = math.ceil(len(micro_batches(data, config, 0, world)) / t.grad_accum)
    # the loss module (DDP-wrapped on several processes) trains; `model` stays the plain module for evaluation
    causal = config.task in CAUSAL_TASKS
    trained = TrainingLoss(model, causal=causal)
    replicated = []  # under fsdp: the trainable weights, whose gradients are averaged by hand
    if fsdp:
        replicated = shard_frozen_base(trained, model, device, world)
    elif world.size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    optimizer = make_optimizer(model, t.lr, t.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, t.warmup, t.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    # checked on the model as it trains (under fsdp, sharded on the device); padding-free or not, an epoch has
    # as many micro-batches, so steps_per_epoch above stands
    if config.data.packing:
        check_packing(model, device, autocast)
    config = resolve_padding_free(config, model, device, autocast, console)
    # started: the main process writes the run folder (the config as given, batch_size auto included); the
    # others follow once it has
    if world.main:
        open_run_dir(requested)
    barrier(world)
    if not world.main:
        resuming = bool(list_checkpoints(run_dir / "checkpoints"))
    best_metric = task.MAIN_METRIC if t.best_metric == "auto" else t.best_metric
    examples_per_step = t.batch_size * world.size * t.grad_accum
    state = {"step": 0, "epoch": 0, "batch": 0, "examples_per_step": examples_per_step, "tokens": 0, "seconds": 0.0,
             "epoch_seconds": [],
             "evaluations": [], "best": None, "best_checkpoint": None, "skipped_steps": 0}
    data_sha256 = file_hashes(config.data)
    found = load_intact(run_dir / "checkpoints", model, console.print) if resuming else None
    if found:
        last, saved = found
        changed = [path for path, digest in saved.get("data_sha256", {}).items() if data_sha256.get(path) != digest]
        if changed and t.resume != "ignore-data-changes":
            raise LoralabError("the data file changed since this run's checkpoints were written", file=changed[0],
                               fix="restore it, choose another name to train on the new data, train.overwrite=true "
                                   "to start over, or train.resume=ignore-data-changes to continue anyway")
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        scaler.load_state_dict(saved.pop("scaler"))
        restore_rng(saved.pop("rng"), world, device)
        if saved["batch"] and saved.get("examples_per_step", examples_per_step) != examples_per_step:
            # another number of processes or batch size: continue after the same examples, in this run's steps
            saved["batch"] = round(saved["batch"] * saved["examples_per_step"] / examples_per_step)
        state.update(saved)
        state["examples_per_step"] = examples_per_step
        console.print(f"resuming {run_dir} from {last.name}")
    state["data_sha256"] = data_sha256
    if world.main:  # what the steps to be replayed (or a fresh start) logged goes: they log again
        keep_metrics_until(run_dir / "metrics.jsonl", state["step"] if found else -1)

    metrics_log = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if world.main else None  # noqa: SIM115
    writer = _tensorboard(run_dir) if t.tensorboard and world.main else None

    def record(entry: dict) -> None:
        if metrics_log is None:
            return
        metrics_log.write(json.dumps(entry) + "\n")
        metrics_log.flush()
        if writer:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(key, value, entry["step"])

    def checkpoint() -> None:
        rng = gather_objects(world, rng_state(device))  # every process's generators (dropout differs per process)
        if world.main:
            save_checkpoint(run_dir / "checkpoints", model, {
                **state, "config": to_dict(requested), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng}, t.keep_checkpoints)
        barrier(world)

    def evaluate(epoch_float: float) -> None:
        if not data.validation:
            return
        with whole_root(trained):
            metrics = task.evaluate(model, tokenizer, data, config, device, autocast)
        if best_metric not in metrics:
            raise LoralabError(f"unknown metric {best_metric!r}", field="train.best_metric",
                               fix=did_you_mean(best_metric, metrics))
        state["evaluations"].append({"step": state["step"], "epoch": epoch_float, "metrics": metrics})
        record({"step": state["step"], "epoch": epoch_float, **{f"eval_{k}": v for k, v in metrics.items()}})
        console.print(f"step {state['step']} (epoch {epoch_float:.2f}): "
                      + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        value, best = metrics[best_metric], state["best"]
        better = best is None or (value < best["value"] if best_metric in LOWER_IS_BETTER else value > best["value"])
        if better and state["step"] > 0:
            state["best"] = {"metric": best_metric, "value": value, "step": state["step"], "epoch": epoch_float}
            state["best_checkpoint"] = f"step-{state['step']:08d}"

    if state["step"] == 0 and not state["evaluations"]:
        evaluate(0.0)  # the base model's score, for comparison
        if hasattr(task, "samples"):
            with whole_root(trained):
                state["answers_before"] = task.samples(model, tokenizer, data, config, device, autocast)

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
    bar = progress.add_task("train", total=total_steps, completed=state["step"], info="")
    model.train()
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
    # checkpoints bound the work a kill can lose: every checkpoint_every steps, or else every tenth of the run and
    # at least every CHECKPOINT_SECONDS
    every = t.checkpoint_every or max(1, total_steps // 10)
    last_saved = time.monotonic()
    with progress, StopRequests() as stop:
        while state["step"] < total_steps:
            epoch = state["epoch"]
            batches = micro_batches(data, config, epoch, world)
            groups = [batches[i:i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)]
            epoch_start = time.perf_counter()
            if state["batch"] >= len(groups):  # resumed at an epoch's very end
                state["epoch"], state["batch"] = epoch + 1, 0
                continue
            for group_index in range(state["batch"], len(groups)):
                step_start = time.perf_counter()
                micro = [[[data.train[i] for i in row] for row in rows] for rows in groups[group_index]]
                loss_value, tokens = train_step(trained, micro, tokenizer.pad_token_id, device, autocast, scaler,
                                                world, causal)
                # every process sees the same mean loss (NaN anywhere skips the step everywhere) and all tokens
                # a signal or a due checkpoint on any process: all of them act on it at this same step
                due = t.checkpoint_every is None and time.monotonic() - last_saved >= CHECKPOINT_SECONDS
                loss_value, tokens, stopping, due = sum_over_ranks(
                    world, [loss_value, tokens, float(stop.signal is not None), float(due)], device)
                loss_value, tokens = loss_value / world.size, int(tokens)
                state["batch"] = group_index + 1
                if not math.isfinite(loss_value):
                    optimizer.zero_grad(set_to_none=True)
                    state["skipped_steps"] += 1
                    state["bad_in_a_row"] = state.get("bad_in_a_row", 0) + 1
                    if state["bad_in_a_row"] >= MAX_BAD_STEPS:
                        raise LoralabError(f"the loss was NaN/inf for {MAX_BAD_STEPS} steps in a row (after step "
                                           f"{state['step']})", field="train.lr",
                                           fix="lower train.lr, or use model.dtype=bf16 or fp32 instead of fp16")
                    continue
                state["bad_in_a_row"] = 0
                average_gradients(replicated, world)
                optimizer_step(optimizer, scheduler, scaler, t.max_grad_norm)
                state["step"] += 1
                if device.type == "cpu" and state["step"] % TRIM_EVERY == 0:
                    release_free_heap()
                state["tokens"] += tokens
                state["seconds"] += time.perf_counter() - step_start
                window["loss"] += loss_value
                window["steps"] += 1
                window["tokens"] += tokens
                epoch_float = epoch + state["batch"] / len(groups)
                done = state["step"] >= total_steps
                if state["step"] % t.log_every == 0 or done:
                    elapsed = time.perf_counter() - window["start"]
                    entry = {"step": state["step"], "epoch": epoch_float, "loss": window["loss"] / window["steps"],
                             "lr": scheduler.get_last_lr()[0], "tokens_per_s": window["tokens"] / max(elapsed, 1e-9)}
                    record(entry)
                    progress.update(bar, info=f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                                              f"{entry['tokens_per_s']:.0f} tok/s")
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
                progress.update(bar, completed=state["step"])
                epoch_end = state["batch"] == len(groups)
                if epoch_end or done:
                    state["epoch_seconds"].append(time.perf_counter() - epoch_start)
                if epoch_end:
                    state["epoch"], state["batch"] = epoch + 1, 0
                if (t.eval_every and state["step"] % t.eval_every == 0) or epoch_end or done:
                    evaluate(epoch_float)
                    checkpoint()
                    last_saved = time.monotonic()
                elif state["step"] % every == 0 or due or stopping:
                    checkpoint()
                    last_saved = time.monotonic()
                if stopping and not done:
                    raise Interrupted(stop.signal or signal.SIGTERM, state["step"],
                                      run_dir / "checkpoints" / f"step-{state['step']:08d}")
                if done:
                    break
    if metrics_log is not None:
        metrics_log.close()
    if writer:
        writer.close()
    if state["best_checkpoint"] and (run_dir / "checkpoints" / state["best_checkpoint"]).is_dir():
        load_weights(run_dir / "checkpoints" / state["best_checkpoint"], model)  # the run's output: the best
    answers_after = []
    if hasattr(task, "samples"):
        with whole_root(trained):  # every process takes part under fsdp
            answers_after = task.samples(model, tokenizer, data, config, device, autocast)
    report = finish(config, model, tokenizer, data, state, fresh, device, dtype, answers_after, console) \
        if world.main else {}
    barrier(world)
    return report


class Interrupted(LoralabError):
    """SIGINT or SIGTERM: the run stopped after a whole optimizer step, with a checkpoint of it."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.exit_code = 128 + int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written to "
                         f"{checkpoint}", fix="rerun the same command to resume")


class StopRequests:
    """`with StopRequests() as stop:` — SIGINT and SIGTERM set `stop.signal` instead of killing the process, so
    the loop ends its optimizer step and saves; a second signal acts at once, as without this."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self.previous[signum] or signal.SIG_DFL)  # the second one is not caught

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python takes signals there alone
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)


def train_step(loss_module, micro: list[list[list[dict]]], pad_id: int, device, autocast, scaler,
               world: World = SINGLE_PROCESS, causal: bool = False) -> tuple[float, int]:
    """Forward and backward over the micro-batches (lists of rows of examples) of one optimizer step, on every
    process; returns (this process's share of the step's mean loss, its non-pad tokens).

    The step's loss is the mean over every scored item (token, or example) of the global batch, as one process
    with the whole batch computes it: each micro-batch's mean is weighted by its share of the items, counted
    over all micro-batches and processes (data-parallel averaging divides by the process count, hence the
    factor)."""
    batches = [pack_batch(rows, pad_id) if any(len(row) > 1 for row in rows) else
               pad_batch([row[0] for row in rows], pad_id) for rows in micro]
    if causal:
        # right padding under causal attention: real tokens never see the pads after them, so the padding mask
        # changes nothing they compute. Without it, attention takes its causal path (skipping the masked half:
        # causal_attention.py on CPU, the flash kernels on GPU; grouped-query heads not repeated) and keeps no mask
        # per layer for the backward pass.
        for batch in batches:
            batch.pop("attention_mask", None)
            batch["scored"] = scored_positions(batch["labels"])  # on the CPU too (see causal_lm_loss)
    # counted on the CPU: no device sync
    counts = [len(b["scored"]) if causal else scored_items(b["labels"]) for b in batches]
    (total,) = sum_over_ranks(world, [float(sum(counts))], device)
    batches = [to_device(b, device) for b in batches]
    losses = []
    for i, (batch, count) in enumerate(zip(batches, counts, strict=True)):
        # under DDP, gradients are all-reduced only on the step's last micro-batch
        sync = i == len(batches) - 1 or not hasattr(loss_module, "no_sync")
        with autocast, (contextlib.nullcontext() if sync else loss_module.no_sync()):
            loss = loss_module(**batch) * (count * world.size / max(total, 1.0))
            # backward even for a NaN/inf loss: every process must take part in DDP's all-reduce, and the step's
            # loss is then not finite, so the caller drops the step and its gradients. Looking at the loss here
            # would also make the host wait for a GPU's forward pass before it could queue the backward.
            scaler.scale(loss).backward()
        losses.append(loss.detach())
    loss_value = torch.stack(losses).sum().item()  # the step's one wait for the device
    tokens = sum(len(e["input_ids"]) for rows in micro for row in rows for e in row)
    return loss_value, tokens


def scored_items(labels: torch.Tensor) -> int:
    """How many items a batch's mean loss averages over, outside causal LMs (whose count is their scored
    positions): examples (one label each), or labelled tokens."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels != -100).sum())


def optimizer_step(optimizer, scheduler, scaler, max_grad_norm: float | None) -> None:
    if max_grad_norm:
        scaler.unscale_(optimizer)
        # the optimizer's own list of what trains: finding it in the model walks every module, about 5 ms a step
        # of host time for a 16-layer model (it bounds small steps on a GPU)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LoralabError("TensorBoard logging needs the tensorboard package", field="train.tensorboard",
                           fix="pip install tensorboard, or train.tensorboard=false") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def finish(config: RunConfig, model, tokenizer, data: TaskData, state: dict, fresh: list[str], device, dtype,
           answers_after: list[str], console: Console) -> dict:
    """Save the model's weights (the best, loaded by the caller, or the last) as the run's output, and write the
    report."""
    run_dir = config.run_dir
    output = run_dir / ("adapter" if config.method == "lora" else "model")
    if config.method == "lora":
        save_adapter(model, output)
    else:
        model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    save_inference_settings(output, config, data)
    peak, peak_kind = peak_memory_bytes(device)
    model_path = Path(resolve_model_path(config.model.path))
    report = {
        "name": config.name, "task": config.task, "method": config.method, "model": config.model.path,
        "parameters": trainable_parameters_report(model), "output": str(output),
        "trainable_params": count_parameters(model)[0], "all_params": count_parameters(model)[1],
        "output_bytes": sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors"),
        "base_model_bytes": size_on_disk(model_path, config.model.gguf_file),
        "data": {"train_examples": len(data.train), "validation_examples": len(data.validation), **data.stats},
        "fresh_modules": fresh, "epoch_seconds": state["epoch_seconds"], "total_seconds": state["seconds"],
        "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9), "steps": state["step"],
        "skipped_steps": state["skipped_steps"], "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "best": state["best"],
        "evaluations": state["evaluations"],
        "sample_answers": [{"before": b, "after": a} for b, a in
                           zip(state.get("answers_before", []), answers_after, strict=False)],
    }
    write_report(run_dir, report)
    console.print(f"done: {output} and {run_dir / 'report.md'}")
    return report
