"""`loralab train`: config -> data -> model + adapter -> optimizer steps with evaluation -> adapter + report.

Read top to bottom: `start` sets a run up (data, model, optimizer, run folder) and resumes it from its newest
intact checkpoint; `train` runs the steps, evaluating and checkpointing; `finish` writes the output and report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loralab.config import RunConfig, to_dict
from loralab.data.records import read_records
from loralab.errors import LoralabError, did_you_mean
from loralab.fast.cuda_allocator import use_expandable_segments
from loralab.fast.heap import TRIM_EVERY, release_free_heap
from loralab.fast.lm_loss import TrainingLoss, check_packing
from loralab.infer.settings import save_inference_settings
from loralab.lora import count_parameters, save_adapter, trainable_parameters_report
from loralab.models import compute_dtype, load_tokenizer, pick_device, resolve_model_path, usable_device
from loralab.quantize import describe as describe_quantization
from loralab.tasks import Task, TaskData, get_task
from loralab.tasks.evaluation import position_limit
from loralab.train.batch_plan import with_planned_batch
from loralab.train.checkpoint import list_checkpoints, load_intact, load_weights, save_checkpoint
from loralab.train.distributed import (
    World,
    average_gradients,
    barrier,
    close_world,
    device_of,
    gather_objects,
    init_world,
    shard_frozen_base,
    sum_over_ranks,
    whole_root,
)
from loralab.train.model import build_model
from loralab.train.optim import make_optimizer, make_scheduler
from loralab.train.report import peak_memory_bytes, size_on_disk, write_report
from loralab.train.resume import check_run_dir, file_hashes, keep_metrics_until, open_run_dir
from loralab.train.run_folder import RunLock, run_folder
from loralab.train.sampling import micro_batches, resolve_padding_free
from loralab.train.signals import Interrupted, StopRequests
from loralab.train.state import TrainState, restore_rng, rng_state
from loralab.train.step import optimizer_step, train_step

log = logging.getLogger("loralab")
LOWER_IS_BETTER = ("loss", "perplexity")
MAX_BAD_STEPS = 10  # consecutive non-finite losses before the run stops
CHECKPOINT_SECONDS = 600  # without train.checkpoint_every: the longest stretch of training a kill can lose


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


@dataclass
class Run:
    """A started run: everything its steps use."""

    config: RunConfig  # as it trains (batch size planned, padding-free resolved)
    requested: RunConfig  # as given: what config.yaml and the checkpoints record
    world: World
    console: Console
    device: torch.device
    dtype: torch.dtype
    task: Task
    tokenizer: object
    data: TaskData
    model: torch.nn.Module  # the plain module, for evaluation and saving
    trained: torch.nn.Module  # the loss module that trains (DDP- or FSDP-wrapped on several processes)
    replicated: list  # under fsdp: the trainable weights, whose gradients are averaged by hand
    fresh: list[str]
    speedups: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast: object
    total_steps: int
    best_metric: str
    state: TrainState
    metrics_log: object = None
    writer: object = None
    answers_after: list[str] = field(default_factory=list)

    def record(self, entry: dict) -> None:
        """One line of metrics.jsonl (and TensorBoard scalars), by the main process."""
        if self.metrics_log is None:
            return
        self.metrics_log.write(json.dumps(entry) + "\n")
        self.metrics_log.flush()
        if self.writer:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, entry["step"])

    def checkpoint(self) -> None:
        rng = gather_objects(self.world, rng_state(self.device))  # every process's (dropout differs per process)
        if self.world.main:
            save_checkpoint(self.config.run_dir / "checkpoints", self.model, {
                **self.state.state_dict(), "config": to_dict(self.requested),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng}, self.config.train.keep_checkpoints)
        barrier(self.world)

    def evaluate(self, epoch_float: float) -> None:
        if not self.data.validation:
            return
        with whole_root(self.trained):
            metrics = self.task.evaluate(self.model, self.tokenizer, self.data, self.config, self.device,
                                         self.autocast)
        if self.best_metric not in metrics:
            raise LoralabError(f"unknown metric {self.best_metric!r}", field="train.best_metric",
                               fix=did_you_mean(self.best_metric, metrics))
        state = self.state
        state.evaluations.append({"step": state.step, "epoch": epoch_float, "metrics": metrics})
        self.record({"step": state.step, "epoch": epoch_float, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.console.print(f"step {state.step} (epoch {epoch_float:.2f}): "
                           + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        value, best = metrics[self.best_metric], state.best
        lower = self.best_metric in LOWER_IS_BETTER
        if state.step > 0 and (best is None or (value < best["value"] if lower else value > best["value"])):
            state.best = {"metric": self.best_metric, "value": value, "step": state.step, "epoch": epoch_float}
            state.best_checkpoint = f"step-{state.step:08d}"

    def samples(self) -> list[str]:
        if not hasattr(self.task, "samples"):
            return []
        with whole_root(self.trained):  # every process takes part under fsdp
            return self.task.samples(self.model, self.tokenizer, self.data, self.config, self.device, self.autocast)


def start(config: RunConfig, console: Console, world: World) -> Run:
    """Data, model and optimizer; then the run folder, written once all of those loaded (a run that fails to
    start leaves an existing folder as it was); then the newest intact checkpoint, if the folder holds this run."""
    resuming = check_run_dir(config) if world.main else False
    requested = config
    device = device_of(world, pick_device(config.train.device))
    if config.train.batch_size == "auto":
        config = with_planned_batch(config, console, device, world)
    torch.manual_seed(config.seed)
    dtype = compute_dtype(config.model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's in the same process
    task = get_task(config.task)
    tokenizer = load_tokenizer(config.model)
    data = task.prepare(config, tokenizer, *load_data(config))
    model, fresh, speedups = build_model(config, data.labels)
    # fsdp: the model stays on the CPU and fully_shard moves each process's part to its device
    fsdp = world.size > 1 and config.distributed == "fsdp"
    model.to(torch.device("cpu") if fsdp else device)
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
    trained = TrainingLoss(model, causal=task.CAUSAL)
    replicated = []
    if fsdp:
        replicated = shard_frozen_base(trained, model, device, world)
    elif world.size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None)
    # padding-free or not, an epoch has as many micro-batches
    steps_per_epoch = math.ceil(len(micro_batches(data, config, 0, world)) / t.grad_accum)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    optimizer = make_optimizer(model, t.lr, t.weight_decay)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if config.data.packing:  # checked on the model as it trains (under fsdp, sharded on the device)
        check_packing(model, device, autocast)
    config = resolve_padding_free(config, model, device, autocast, console)
    if world.main:  # the main process writes the run folder; the others follow once it has
        open_run_dir(requested)
    barrier(world)
    if not world.main:
        resuming = bool(list_checkpoints(config.run_dir / "checkpoints"))
    run = Run(config, requested, world, console, device, dtype, task, tokenizer, data, model, trained, replicated,
              fresh, speedups, optimizer, make_scheduler(optimizer, total_steps, t.warmup, t.schedule),
              torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), autocast, total_steps,
              task.MAIN_METRIC if t.best_metric == "auto" else t.best_metric,
              TrainState(examples_per_step=t.batch_size * world.size * t.grad_accum))
    resumed = resume(run) if resuming else False
    run.state.data_sha256 = file_hashes(config.data)
    if world.main:  # what the steps to be replayed (or a fresh start) logged goes: they log again
        keep_metrics_until(config.run_dir / "metrics.jsonl", run.state.step if resumed else -1)
        run.metrics_log = open(config.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        run.writer = _tensorboard(config.run_dir) if t.tensorboard else None
    return run


def resume(run: Run) -> bool:
    """Load the newest intact checkpoint into the run; False if there is none."""
    found = load_intact(run.config.run_dir / "checkpoints", run.model, run.console.print)
    if not found:
        return False
    last, saved = found
    digests = file_hashes(run.config.data)
    changed = [path for path, digest in saved.get("data_sha256", {}).items() if digests.get(path) != digest]
    if changed and run.config.train.resume != "ignore-data-changes":
        raise LoralabError("the data file changed since this run's checkpoints were written", file=changed[0],
                           fix="restore it, choose another name to train on the new data, train.overwrite=true "
                               "to start over, or train.resume=ignore-data-changes to continue anyway")
    run.optimizer.load_state_dict(saved.pop("optimizer"))
    run.scheduler.load_state_dict(saved.pop("scheduler"))
    run.scaler.load_state_dict(saved.pop("scaler"))
    restore_rng(saved.pop("rng"), run.world, run.device)
    examples_per_step = run.state.examples_per_step
    run.state.load_state_dict(saved)
    run.state.resume_on(examples_per_step)
    run.console.print(f"resuming {run.config.run_dir} from {last.name}")
    return True


def train(config: RunConfig, console: Console | None = None) -> dict:
    """Train as `config` says; returns the report (also written to the run folder as report.json and report.md)."""
    if usable_device(config.train.device).type == "cuda":
        use_expandable_segments()
    world = init_world(config.train.device)
    try:
        # the main process alone writes the run folder; a second run into it is refused at once
        with RunLock(run_folder(config.output_dir, config.name)) if world.main else contextlib.nullcontext():
            if not world.main:
                log.setLevel(logging.WARNING)  # one process speaks
            run = start(config, console or Console(stderr=True, quiet=not world.main), world)
            steps(run)
            return finish(run) if world.main else {}
    finally:
        close_world(world)


def steps(run: Run) -> None:
    """The optimizer steps, from where the run stands to its last; evaluations and checkpoints between them."""
    config, state, t, world = run.config, run.state, run.config.train, run.world
    if state.step == 0 and not state.evaluations:
        run.evaluate(0.0)  # the base model's score, for comparison
        state.answers_before = run.samples()
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=run.console)
    bar = progress.add_task("train", total=run.total_steps, completed=state.step, info="")
    run.model.train()
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
    # checkpoints bound the work a kill can lose: every checkpoint_every steps, or else every tenth of the run and
    # at least every CHECKPOINT_SECONDS
    every = t.checkpoint_every or max(1, run.total_steps // 10)
    last_saved = time.monotonic()
    with progress, StopRequests() as stop:
        while state.step < run.total_steps:
            epoch = state.epoch
            batches = micro_batches(run.data, config, epoch, world)
            groups = [batches[i:i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)]
            epoch_start = time.perf_counter()
            if state.batch >= len(groups):  # resumed at an epoch's very end
                state.epoch, state.batch = epoch + 1, 0
                continue
            for group_index in range(state.batch, len(groups)):
                step_start = time.perf_counter()
                micro = [[[run.data.train[i] for i in row] for row in rows] for rows in groups[group_index]]
                loss_value, tokens = train_step(run.trained, micro, run.tokenizer.pad_token_id, run.device,
                                                run.autocast, run.scaler, world, run.task.CAUSAL)
                # every process sees the same mean loss (NaN anywhere skips the step everywhere) and all tokens;
                # a signal or a due checkpoint on any process: all of them act on it at this same step
                due = t.checkpoint_every is None and time.monotonic() - last_saved >= CHECKPOINT_SECONDS
                loss_value, tokens, stopping, due = sum_over_ranks(
                    world, [loss_value, tokens, float(stop.signal is not None), float(due)], run.device)
                loss_value, tokens = loss_value / world.size, int(tokens)
                state.batch = group_index + 1
                if not math.isfinite(loss_value):
                    run.optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += 1
                    state.bad_in_a_row += 1
                    if state.bad_in_a_row >= MAX_BAD_STEPS:
                        raise LoralabError(f"the loss was NaN/inf for {MAX_BAD_STEPS} steps in a row (after step "
                                           f"{state.step})", field="train.lr",
                                           fix="lower train.lr, or use model.dtype=bf16 or fp32 instead of fp16")
                    continue
                state.bad_in_a_row = 0
                average_gradients(run.replicated, world)
                optimizer_step(run.optimizer, run.scheduler, run.scaler, t.max_grad_norm)
                state.step += 1
                if run.device.type == "cpu" and state.step % TRIM_EVERY == 0:
                    release_free_heap()
                state.tokens += tokens
                state.seconds += time.perf_counter() - step_start
                window["loss"] += loss_value
                window["steps"] += 1
                window["tokens"] += tokens
                epoch_float = epoch + state.batch / len(groups)
                done = state.step >= run.total_steps
                if state.step % t.log_every == 0 or done:
                    elapsed = time.perf_counter() - window["start"]
                    entry = {"step": state.step, "epoch": epoch_float, "loss": window["loss"] / window["steps"],
                             "lr": run.scheduler.get_last_lr()[0],
                             "tokens_per_s": window["tokens"] / max(elapsed, 1e-9)}
                    run.record(entry)
                    progress.update(bar, info=f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                                              f"{entry['tokens_per_s']:.0f} tok/s")
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
                progress.update(bar, completed=state.step)
                epoch_end = state.batch == len(groups)
                if epoch_end or done:
                    state.epoch_seconds.append(time.perf_counter() - epoch_start)
                if epoch_end:
                    state.epoch, state.batch = epoch + 1, 0
                if (t.eval_every and state.step % t.eval_every == 0) or epoch_end or done:
                    run.evaluate(epoch_float)
                    run.checkpoint()
                    last_saved = time.monotonic()
                elif state.step % every == 0 or due or stopping:
                    run.checkpoint()
                    last_saved = time.monotonic()
                if stopping and not done:
                    raise Interrupted(stop.signal or signal.SIGTERM, state.step,
                                      config.run_dir / "checkpoints" / f"step-{state.step:08d}")
                if done:
                    break
    if run.metrics_log is not None:
        run.metrics_log.close()
    if run.writer:
        run.writer.close()
    best = config.run_dir / "checkpoints" / state.best_checkpoint if state.best_checkpoint else None
    if best and best.is_dir():
        load_weights(best, run.model)  # the run's output: the best
    run.answers_after = run.samples()
    barrier(world)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LoralabError("TensorBoard logging needs the tensorboard package", field="train.tensorboard",
                           fix="pip install tensorboard, or train.tensorboard=false") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def finish(run: Run) -> dict:
    """Save the model's weights (the best, loaded by `steps`, or the last) as the run's output, and write the
    report."""
    config, model, state, data = run.config, run.model, run.state, run.data
    run_dir = config.run_dir
    output = run_dir / ("adapter" if config.method == "lora" else "model")
    if config.method == "lora":
        save_adapter(model, output)
    else:
        model.save_pretrained(output)
    run.tokenizer.save_pretrained(output)
    save_inference_settings(output, config, data)
    peak, peak_kind = peak_memory_bytes(run.device)
    model_path = Path(resolve_model_path(config.model.path))
    trainable, total = count_parameters(model)
    report = {
        "name": config.name, "task": config.task, "method": config.method, "model": config.model.path,
        "parameters": trainable_parameters_report(model), "output": str(output),
        "trainable_params": trainable, "all_params": total,
        "output_bytes": sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors"),
        "base_model_bytes": size_on_disk(model_path, config.model.gguf_file),
        "data": {"train_examples": len(data.train), "validation_examples": len(data.validation), **data.stats},
        "fresh_modules": run.fresh, "speedups": run.speedups, "epoch_seconds": state.epoch_seconds,
        "total_seconds": state.seconds, "tokens_per_second": state.tokens / max(state.seconds, 1e-9),
        "steps": state.step, "skipped_steps": state.skipped_steps, "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind, "device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
        "base_quantization": describe_quantization(model), "best": state.best, "evaluations": state.evaluations,
        "sample_answers": [{"before": b, "after": a} for b, a in
                           zip(state.answers_before, run.answers_after, strict=False)],
    }
    write_report(run_dir, report)
    run.console.print(f"done: {output} and {run_dir / 'report.md'}")
    return report
