"""The training loop and the pieces it is built from, one job each.

info = setup_distributed(device)          # process group under torchrun (alone=True: FSDP without it)
model = build_training_model(cfg, dev)    # built on meta, materialized on the device, paper init
par = parallelize(model, cfg, info, dev)  # activation checkpointing → compile → FSDP2 / DDP
opt, sched = build_optimizer(...)         # AdamW, three groups, LambdaLR schedule
Trainer(...).train()                      # accumulation, table-gradient all-reduce, clipping,
                                          # rank-1 refresh, validation, checkpoints, metrics
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ultramem.config import ConfigError
from ultramem.model import Transformer, build_model

from .accumulate import FoldedGrads
from .checkpoint import CheckpointManager, flatten_config, resolve_checkpoint
from .config import TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum_,
    broadcast_object,
    env_dist_info,
    resolve_device,
    set_cpu_threads,
    setup_distributed,
    teardown_distributed,
)
from .metrics import MetricsLogger, format_duration, peak_flops, run_log_handler
from .optim import build_optimizer
from .parallelize import Parallelized, TableGradReducer, parallelize, uses_cudagraphs

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "Trainer",
    "TrainingDiverged",
    "build_trainer",
    "build_training_model",
    "parallelize",
    "run_trainer",
    "run_training",
    "staged_flush_interval",
    "uses_cudagraphs",
]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was updated with it."""


# ---------------------------------------------------------------------------------------------
# Model


def build_training_model(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> Transformer:
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    model.train()
    if model.memory_tables is not None:
        # The shared tables' gradients accumulate row by row into persistent fp32 buffers instead
        # of a dense [N, D] gradient per layer and micro-batch (ultramem.ops.weighted_lookup).
        model.memory_tables.use_grad_buffers()
        as_inputs = cfg.train.table_grads_as_inputs
        if as_inputs is None and world_size > 1:
            # run on a GPU in one process only (FSDP2's included); by id on several until then
            as_inputs = False
        model.memory_tables.grads_as_inputs = as_inputs
        if cfg.train.dtype == "bfloat16" and cfg.train.bf16_table_copy:
            model.memory_tables.use_compute_copy(torch.bfloat16)
        flush = staged_flush_interval(cfg, device)
        if flush:
            tokens = flush * len(model.memory_layers) * cfg.train.batch_size * cfg.train.seq_len
            model.memory_tables.use_grad_staging(
                tokens,
                *cfg.model.memory.lookup_shape,
                torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32,
            )
            log.info(
                "table gradients staged, flushed every %d micro-batches (%.2f GB)",
                flush,
                model.memory_tables.grad_staging.nbytes / 1e9,
            )
    return model


def staged_flush_interval(cfg: TrainConfig, device: torch.device) -> int:
    """Micro-batches per flush of the staged table gradients (0: not staged). UltraMemV2 layers
    stage; Memory+ does not (its small table keeps the atomics in L2: measured no faster). On
    CUDA when compiled (measured faster with CUDA graphs and without); not in eager CUDA runs nor
    under FSDP, where each staged call's host time adds to host-bound layers (under FSDP,
    measured slower with two launches a staged call, no faster with one: perf/NOTES.md).
    `train.table_grad_staging` true or false overrides where. docs/table-gradients.md."""
    staging = cfg.train.table_grad_staging
    if cfg.model.memory.type != "ultramem_v2" or staging is False:
        return 0
    if staging is None and device.type == "cuda" and (not cfg.train.compile or cfg.parallel.mode == "fsdp"):
        return 0
    return min(cfg.train.table_grad_flush, cfg.train.grad_accum)


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm over all ranks, and clipping to `max_norm`. FSDP's sharded
    gradients give partial norms that are summed over ranks; replicated ones (DDP, the value
    tables after their all-reduce) are whole on every rank and count once."""
    sharded = [p for p in params if p.grad is not None and isinstance(p.grad, DTensor)]
    local = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    squares = []
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded], 2.0, foreach=True)
        squares.append(norm.full_tensor().float().square())
    if local:
        squares.append(torch.nn.utils.get_total_norm([p.grad for p in local], 2.0, foreach=True).float().square())
    if not squares:
        return torch.zeros(())
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    if math.isfinite(max_norm):
        for group in (sharded, local):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    value_lr_mult: float
    grad_norm: float
    tokens_per_s: float
    aux: float = 0.0
    mfu: float | None = None
    peak_memory_gb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


_ECHO_S = 3.0


class _StopRequest:
    """SIGINT / SIGTERM ask for a checkpoint and a clean exit at the end of the current step;
    all ranks agree on it through the step's all-reduce. Another signal later exits at once."""

    def __init__(self):
        self.signal: int | None = None
        # what the last step's all-reduce agreed on: every rank stops after the same step, even
        # when its own signal lands after that all-reduce (it counts in the next one)
        self.agreed = False
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                return

    def _handle(self, signum, frame) -> None:
        # torchrun forwards the Ctrl-C its workers already got from the terminal: a signal within
        # a few seconds of the first is that echo; a later one means "now"
        now = time.monotonic()
        if self.signal is not None and now - self._first > _ECHO_S:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal, self._first = signum, now

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: Transformer,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_batches,
        device: torch.device,
        info: DistInfo,
        val_batches=None,
        parallel: Parallelized | None = None,
    ):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.train_batches, self.val_batches = train_batches, val_batches
        self.device, self.info = device, info
        self.parallel = parallel or Parallelized(model, model, "none")
        self.step = 0
        self.history: list[StepRecord] = []
        self.val_history: list[tuple[int, float]] = []
        # (a Trainer built in code without a run directory or checkpoint.dir saves nothing)
        self.run_dir, ckpt_dir, tb_dir = output_dirs(cfg)
        self.checkpoints = CheckpointManager(
            ckpt_dir or Path("checkpoints"), cfg.checkpoint.interval, cfg.checkpoint.keep, info
        )
        self._saving = cfg.checkpoint.enabled and ckpt_dir is not None
        if info.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(self.run_dir, tb_dir, info.is_main, cfg.train.max_steps, cfg.metrics.progress)
        self._cudagraphs = uses_cudagraphs(cfg)  # (on CPU Inductor skips the graphs; the rest holds)
        tables = self.model.memory_tables
        staged = tables is not None and tables.grad_staging is not None
        # (at least once per step whenever the tables stage, whatever the config says)
        self._flush_every = max(1, min(cfg.train.table_grad_flush, cfg.train.grad_accum)) if staged else 0
        self.table_reducer = TableGradReducer(model, info)
        if self._cudagraphs:
            # A gradient first set from a CUDA-graph output aliases the graph's memory, which the
            # next micro-batch's replay overwrites: give every parameter its own .grad up front
            # (kept, zeroed in place each step) so each backward's gradients add into it instead.
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._value_group = next((i for i, g in enumerate(optimizer.param_groups) if g.get("name") == "values"), None)
        self._params = [p for p in model.parameters() if p.requires_grad]
        # Each micro-batch's gradients added in with one foreach add where one compiled backward
        # hands them all over at once anyway (the whole model one region, one process), so that
        # holding them until the add costs no memory. The tables are left out: with gradient
        # buffers (as `build_training_model` sets them) their .grad is the buffer.
        table_params = set(tables.parameters()) if tables is not None else set()
        folds = cfg.train.compile and self.parallel.mode == "none"
        self._folded = FoldedGrads(p for p in self._params if p not in table_params) if folds else None
        self._flops_per_token = _flops_per_token(cfg)
        self._peak_flops = peak_flops(device)
        self._stop = _StopRequest()
        self.stopped_by: int | None = None  # the signal that stopped the run before max_steps
        self._run_dir_hold = _RunDirHold()  # the run directory's lock and log, as build_trainer took them
        self._timed = False  # whether this run's first logged interval (compile, warm-up) is behind it
        self.last_checkpoint: Path | None = None

    # -- pieces ---------------------------------------------------------------------------

    def _autocast(self):
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _mark_step(self) -> None:
        # CUDA-graph trees reuse their output memory from one forward to the next: tell them a
        # new forward (micro-batch or evaluation batch) begins
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _value_lr_mult(self) -> float:
        if self._value_group is None:
            return 1.0
        lrs = self.scheduler.get_last_lr()
        base = lrs[0]
        return lrs[self._value_group] / base if base > 0 else 1.0

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum * self.info.world_size

    def _peak_memory_gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
        except ImportError:
            return None

    def _fold_grads(self):
        """Context for one micro-batch's backward: its gradients are added into the kept ones with
        one foreach add (`FoldedGrads`) where the trainer folds, else by autograd."""
        return self._folded.backward() if self._folded is not None else contextlib.nullcontext()

    # -- one optimizer step ----------------------------------------------------------------

    def _on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the training device. To CUDA through pinned memory: a copy from pageable
        memory may wait for the stream (the driver stages it), one from pinned memory is queued."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def train_step(self) -> StepRecord | None:
        cfg = self.cfg
        lr = self.scheduler.get_last_lr()[0]
        value_mult = self._value_lr_mult()
        # [LM loss, aux loss, stop requested]: summed over micro-batches, then over ranks
        totals = torch.zeros(3, device=self.device)
        accum = cfg.train.grad_accum
        for micro in range(accum):
            last = micro + 1 == accum
            batch = self._on_device(self.train_batches.batch(self.step * accum + micro))
            self._mark_step()
            with self.parallel.grad_sync(last):
                with self._autocast():
                    loss, aux = self.parallel.forward(batch[:, :-1], batch[:, 1:])
                with self._fold_grads():
                    (loss / accum).backward()
            totals[0] += (loss - aux).detach().float()  # the LM loss, comparable with val/loss; aux apart
            totals[1] += aux.detach().float()
            if self._flush_every and ((micro + 1) % self._flush_every == 0 or last):
                # staged table gradients into the buffers: before the staging area fills up, and
                # before clipping and the optimizer read them (without a host sync: the staging
                # area holds table_grad_flush micro-batches, full at each regular flush)
                self.model.memory_tables.flush_grad_staging(wait=False)
        self.table_reducer.start()
        totals[2] = float(self._stop.signal is not None)
        all_reduce_sum_(totals, self.info)
        self.table_reducer.wait()
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(self._params, max_norm)
        # one host sync per optimizer step: a diverged step must not reach the weights
        loss_sum, aux_sum, stops = totals.tolist()
        loss_v = loss_sum / (accum * self.info.world_size)
        norm_v = float(grad_norm)
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            kept = (
                f"the last good checkpoint, {self.last_checkpoint}, is kept"
                if self.last_checkpoint
                else "this run has no checkpoint yet"
            )
            raise TrainingDiverged(
                f"step {self.step + 1}: loss {loss_v} and gradient norm {norm_v}; stopped before the optimizer "
                f"step; {kept}"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self._cudagraphs)
        if self.model.memory_tables is not None:
            self.model.memory_tables.zero_grad_buffers()
            self.model.memory_tables.refresh_compute_copy()
        self.model.refresh_rank1()
        self.step += 1
        if stops > 0:
            self._stop.agreed = True
            if self._stop.signal is None:
                self._stop.signal = signal.SIGTERM  # another rank was asked to stop

        record = None
        if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.max_steps:
            record = StepRecord(
                self.step, loss_v, lr, value_mult, norm_v, 0.0, aux_sum / (accum * self.info.world_size)
            )
        if self.model.memory_layers and self.step % cfg.model.memory.log_interval == 0:
            mem = self.memory_metrics()
            if record is not None:
                record.extra.update(mem)
            if self.info.is_main:
                self.metrics.line(
                    f"step {self.step} memory metrics: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(mem.items()))
                )
                self.metrics.scalars(self.step, {f"memory/{k}": v for k, v in mem.items()}, kind="memory")
        return record

    def memory_metrics(self) -> dict[str, float]:
        """Every memory layer's metrics over all ranks' tokens since the last report."""
        if self.info.distributed:
            for layer in self.model.memory_layers:
                for buf in layer.stats.buffers():
                    all_reduce_sum_(buf, self.info)
        return self.model.memory_metrics()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over `eval_batches` batches per rank, averaged over ranks."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.train.eval_batches):
            batch = self._on_device(self.val_batches.batch(i))
            self._mark_step()
            with self._autocast():
                loss, aux = self.model(batch[:, :-1], batch[:, 1:])
            total += (loss - aux).float()
        all_reduce_sum_(total, self.info)
        self.model.train()
        return total.item() / (self.cfg.train.eval_batches * self.info.world_size)

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        if not self._saving:
            return None
        if self.last_checkpoint is not None and self.last_checkpoint.name == f"step_{self.step:08d}":
            return self.last_checkpoint
        self.last_checkpoint = self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, self.cfg)
        return self.last_checkpoint

    def prepare(self) -> None:
        """Before the first step: resume as asked, then refresh what derives from the parameters
        (the tables' compute copy, the rank-1 approximations)."""
        resume = self.cfg.run.resume
        found = self.checkpoints.resolve(resume) if self._saving or resume not in ("", "auto") else None
        if found is not None:
            self.step = self.checkpoints.load(found, self.model, self.optimizer, self.scheduler, self.cfg)
            self.last_checkpoint = found
            self.metrics.line(f"resumed from {found} at step {self.step} of {self.cfg.train.max_steps}")
        if self.info.is_main and self.run_dir is not None:  # once the resume is accepted: a refused one changes nothing
            run_dir = self.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(flatten_config(self.cfg), indent=1) + "\n")
        if self._saving:
            later = self.checkpoints.supersede_past(self.step)
            if later and self.info.is_main:
                log.warning(
                    "%d checkpoint(s) in %s past this run's start (step %d), up to %s, are another run's: "
                    "they are removed at this run's first save",
                    len(later),
                    self.checkpoints.directory,
                    self.step,
                    later[-1].name,
                )
        if self.model.memory_tables is not None:
            self.model.memory_tables.zero_grad_buffers()
            self.model.memory_tables.refresh_compute_copy()  # after a checkpoint load
        self.model.refresh_rank1()  # before the first forward

    # -- the run ---------------------------------------------------------------------------

    def _log_record(self, record: StepRecord, seconds: float, steps: int) -> None:
        record.tokens_per_s = self.tokens_per_step * steps / max(seconds, 1e-9)
        if self._peak_flops is not None:
            record.mfu = record.tokens_per_s * self._flops_per_token / (self._peak_flops * self.info.world_size)
        record.peak_memory_gb = self._peak_memory_gb()
        self.history.append(record)
        if not self.info.is_main:
            return
        # the first interval holds the compile and warm-up: no estimate from it
        left = (self.cfg.train.max_steps - record.step) * seconds / max(steps, 1) if self._timed else math.nan
        self._timed = True
        mfu = f" | mfu {record.mfu:.1%}" if record.mfu is not None else ""
        mem = f" | mem {record.peak_memory_gb:.2f} GB" if record.peak_memory_gb is not None else ""
        self.metrics.line(
            f"step {record.step:5d} | loss {record.loss:.4f} | lr {record.lr:.3e}"
            f" | value lr x{record.value_lr_mult:.3f} | grad norm {record.grad_norm:.3f}"
            f" | {record.tokens_per_s:.0f} tok/s{mfu}{mem}"
            f" | eta {format_duration(left)}"
        )
        values = {
            "train/loss": record.loss,
            "train/aux_loss": record.aux,
            "train/lr": record.lr,
            "train/value_lr_mult": record.value_lr_mult,
            "train/grad_norm": record.grad_norm,
            "train/tokens_per_s": record.tokens_per_s,
        }
        if record.mfu is not None:
            values["train/mfu"] = record.mfu
        if record.peak_memory_gb is not None:
            values["train/peak_memory_gb"] = record.peak_memory_gb
        self.metrics.scalars(record.step, values)
        self.metrics.advance(record.step, f"loss {record.loss:.3f}")

    def _validate(self) -> None:
        if self.val_batches is None:
            return
        val = self.evaluate()
        self.val_history.append((self.step, val))
        if self.info.is_main:
            self.metrics.line(f"step {self.step:5d} | val loss {val:.4f}")
            self.metrics.scalars(self.step, {"val/loss": val}, kind="val")

    def close(self) -> None:
        """Release the run directory (its lock and train.log's handler) and the DDP wrapper
        (`Parallelized.release`); run_trainer does when the run ends, before it leaves the process
        group; a trainer from build_trainer is closed by whoever built it."""
        self.parallel.release()
        self._run_dir_hold.release()

    _OUTCOME = ("cfg", "info", "device", "run_dir", "step", "history", "val_history", "stopped_by", "last_checkpoint")

    def release(self) -> None:
        """Drop the model and all that holds it, keeping the run's outcome (`_OUTCOME`); run_trainer
        does once the run ends, after close() and before it leaves the process group. FSDP's
        state holds the group; a group that outlives destroy_process_group is freed later with the
        GIL held (or during interpreter shutdown), joining gloo's threads while one of them may be
        waiting for the GIL: a rank that hangs or aborts at exit."""
        for name in list(vars(self)):
            if name not in self._OUTCOME:
                delattr(self, name)
        gc.collect()  # (the model's modules hold reference cycles)

    def train(self) -> list[StepRecord]:
        cfg = self.cfg
        self.prepare()
        self.metrics.start(self.step)
        start_step, t_start = self.step, time.perf_counter()
        if self.step >= cfg.train.max_steps:
            self.metrics.line(
                f"nothing to do: the checkpoint is at step {self.step}, train.max_steps="
                f"{cfg.train.max_steps} (raise it to train on, or --run.resume= to start afresh)"
            )
        self._stop.install()
        self._timed = False
        t_log, steps_since = time.perf_counter(), 0
        self.stopped_by = None
        try:
            while self.step < cfg.train.max_steps:
                record = self.train_step()
                steps_since += 1
                if record is not None:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    self._log_record(record, now - t_log, steps_since)
                    t_log, steps_since = now, 0
                paused = time.perf_counter()
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                    self._validate()
                if self.checkpoints.due(self.step):
                    self.save_checkpoint()
                if self._stop.agreed and self.step < cfg.train.max_steps:  # (at the end: done)
                    self.stopped_by = self._stop.signal
                    break
                t_log += time.perf_counter() - paused  # evaluation and saving are not training time
            else:
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval and self.step > start_step:
                    self._validate()  # the final one, when the interval did not land on the end
            if self.step > start_step or self.stopped_by:
                self.save_checkpoint()
        finally:
            self._stop.restore()
            self.metrics.close()
        elapsed = time.perf_counter() - t_start
        if self.stopped_by:
            log.warning(
                "rank %d: stopped by %s at step %d%s",
                self.info.rank,
                signal.Signals(self.stopped_by).name,
                self.step,
                f"; checkpoint {self.last_checkpoint}" if self.last_checkpoint else "",
            )
        if self.info.is_main and self.step > start_step:
            last = self.history[-1] if self.history else None
            val = f", val loss {self.val_history[-1][1]:.4f}" if self.val_history else ""
            rate = self.tokens_per_step * (self.step - start_step) / max(elapsed, 1e-9)
            # the first logged interval holds the compile; the run's rate also holds evals and saves
            steps = sorted(r.tokens_per_s for r in self.history[1:] if r.tokens_per_s)
            steady = f", {steps[len(steps) // 2]:.0f} tok/s a step (median after the first)" if steps else ""
            log.info(
                "done: step %d/%d in %s, loss %s%s, %.0f tok/s over the run%s%s",
                self.step,
                cfg.train.max_steps,
                format_duration(elapsed),
                f"{last.loss:.4f}" if last else "?",
                val,
                rate,
                steady,
                f", checkpoint {self.last_checkpoint}" if self.last_checkpoint else "",
            )
        return self.history


def _flops_per_token(cfg: TrainConfig) -> float:
    from .summary import summarize

    return float(summarize(build_model(cfg.model, device="meta"), cfg.model, cfg.train.seq_len).flops_per_token)


# ---------------------------------------------------------------------------------------------
# Putting it together


def build_data(cfg: TrainConfig, info: DistInfo):
    """(train windows, validation windows or None, tokenizer vocab). The main rank builds the
    token cache first so that other ranks only read it."""
    from ultramem.data import TokenWindows, load_token_splits, token_segments

    def load():
        kwargs = {"val_source": cfg.data.val_source} if cfg.data.val_source else {}
        try:
            return load_token_splits(
                cfg.data.source,
                cfg.data.vocab_size,
                cfg.data.max_corpus_bytes,
                cfg.data.val_fraction,
                cfg.data.cache_dir or None,
                val_split=cfg.data.val_split,
                val_chunk_tokens=cfg.data.val_chunk_tokens,
                **kwargs,
            )
        except ValueError as e:  # the data's own rules (they name their data.* key): bad input, not a bug
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from e

    if info.distributed:
        from .distributed import barrier

        splits = load() if info.is_main else None
        barrier(info)
        if splits is None:
            splits = load()
    else:
        splits = load()
    if splits.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {splits.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size"
        )
    t = cfg.train
    try:
        train = TokenWindows(
            splits.train,
            t.batch_size,
            t.seq_len,
            t.seed,
            info.rank,
            info.world_size,
            t.grad_accum,
            per_step=cfg.data.window_draw == "step",
        )
    except ValueError as e:
        raise ConfigError(f"data.source={cfg.data.source!r}: {e}") from e
    val = None
    if t.eval_interval:
        longest = max(b - a for a, b in token_segments(splits.val))
        if longest < t.seq_len + 2:
            where = (
                f"data.val_source={cfg.data.val_source!r}"
                if cfg.data.val_source
                else f"data.val_fraction={cfg.data.val_fraction}"
            )
            chunks = f" (at most {longest} in one chunk)" if longest < len(splits.val) else ""
            raise ConfigError(
                f"{where} leaves {len(splits.val)} validation tokens{chunks}, fewer than one window "
                f"(train.seq_len + 2 = {t.seq_len + 2}); raise it, or set train.eval_interval=0"
            )
        val = TokenWindows(splits.val, t.batch_size, t.seq_len, t.seed + 1, info.rank, info.world_size)
    log.info(
        "data: %d train tokens, %d validation tokens%s, vocab %d",
        len(splits.train),
        len(splits.val),
        f" in {len(splits.val.segments)} chunks spread over the stream"
        if cfg.data.val_split == "spread" and not cfg.data.val_source and len(splits.val.segments) > 1
        else "",
        splits.vocab_size,
    )
    return train, val, splits.vocab_size


def output_dirs(cfg: TrainConfig) -> tuple[Path | None, Path | None, Path | None]:
    """Where a run writes: its run directory, checkpoint directory and tensorboard directory (the
    last two default to checkpoints/ and tb/ in the first; None: nothing written there)."""
    # `~` expanded here: the shell leaves it alone in `--run.dir=~/x`
    run_dir = Path(cfg.run.dir).expanduser() if cfg.run.dir else None
    ckpt_dir = (
        Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else (run_dir / "checkpoints" if run_dir else None)
    )
    tb_dir = None
    if cfg.metrics.tensorboard:
        named = cfg.metrics.tensorboard_dir
        tb_dir = Path(named).expanduser() if named else (run_dir / "tb" if run_dir else None)
    return run_dir, ckpt_dir, tb_dir


class RunDirLock:
    """An exclusive lock on a run directory (or a checkpoint directory outside it), held for the
    run (rank 0): a second run started in the same directory would write into the same
    checkpoints, metrics and log. The OS drops the lock when the process ends, however it ends,
    so a crashed run never leaves the directory locked. `key` names the setting in messages."""

    def __init__(self, run_dir: Path, key: str = "run.dir"):
        self.path = run_dir / ".lock"
        self.key = key
        self._file = None

    def acquire(self) -> str | None:
        """Take the lock; None, or why not (another process holds it, or no lock file can be made)."""
        try:
            import fcntl
        except ImportError:  # (no flock on this platform: unlocked)
            return None
        try:
            f = open(self.path, "a+")
        except OSError as e:
            return f"{self.key}={str(self.path.parent)!r}: cannot open the lock file {self.path.name}: {e.strerror}"
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if holder == self._me():  # (a notebook that built a Trainer and builds another)
                return (
                    f"{self.key}={str(self.path.parent)!r}: another run is using this directory (process {holder}, "
                    f"this one): close() the Trainer that build_trainer made for it, or choose another {self.key}"
                )
            return (
                f"{self.key}={str(self.path.parent)!r}: another run is using this directory (process {holder}); "
                f"wait for it to end, or choose another {self.key}"
            )
        f.truncate(0)
        f.write(self._me() + "\n")
        f.flush()
        self._file = f
        return None

    @staticmethod
    def _me() -> str:
        return f"{os.getpid()} on {socket.gethostname()}"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # (closing drops the flock)
            self._file = None


def _foreign_config(path: Path) -> bool:
    """Whether `path` is a file other than a run's config.json (a flat JSON object of config keys),
    e.g. a model's config in a directory given as run.dir by mistake."""
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True
    return not (isinstance(saved, dict) and "train.max_steps" in saved and "model.dim" in saved)


def _check_output_dirs(cfg: TrainConfig, info: DistInfo) -> list[RunDirLock]:
    """Check the checkpoint to resume from, then make the run's directories, lock the run
    directory and check that the directories take files, before anything is trained: otherwise
    the first save would find out. Rank 0 looks (and returns the locks it holds); every rank
    raises its answer."""
    problem = None
    locks = []
    if info.is_main and cfg.run.resume not in ("", "auto"):
        try:  # a wrong path is refused before anything is made
            resolve_checkpoint(cfg.run.resume, "--resume")
        except FileNotFoundError as e:
            problem = str(e)
    if info.is_main and problem is None:
        run_dir, ckpt_dir, tb_dir = output_dirs(cfg)
        dirs = [
            ("run.dir", run_dir),
            ("checkpoint.dir", ckpt_dir if cfg.checkpoint.enabled else None),
            ("metrics.tensorboard_dir", tb_dir),
        ]
        for key, path in dirs:
            if path is None:
                continue
            try:
                path.mkdir(parents=True, exist_ok=True)
                writable = os.access(path, os.W_OK | os.X_OK)
            except OSError as e:
                problem = f"{key}={str(path)!r}: cannot make the directory: {e.strerror}"
                break
            if not writable:
                problem = f"{key}={str(path)!r}: the directory is not writable"
                break
            # a checkpoint directory outside the run directory is locked too: two runs sharing it
            # would rotate each other's checkpoints away
            if key == "run.dir" or (key == "checkpoint.dir" and run_dir not in (path, *path.parents)):
                locks.append(RunDirLock(path, key))
                problem = locks[-1].acquire()
                if problem:
                    locks.pop()
                    break
            if key == "run.dir":
                clash = [n for n in ("config.json", "metrics.jsonl", "train.log") if (path / n).is_dir()]
                if clash:
                    problem = f"run.dir={str(path)!r}: {clash[0]} is a directory; the run writes a file there"
                    break
                if _foreign_config(path / "config.json"):
                    problem = (
                        f"run.dir={str(path)!r}: its config.json is not a training run's config, and the run "
                        f"would write its own over it; choose another run.dir"
                    )
                    break
    problem = broadcast_object(problem, info)
    if problem:
        for lock in locks:
            lock.release()
        raise ConfigError(problem)
    return locks


@dataclass
class _RunDirHold:
    """What a run holds in its directory until it ends (rank 0): the locks, and train.log's handler
    on the root logger (taken off again, so a second run in this process logs only to its own file)."""

    locks: list[RunDirLock] = field(default_factory=list)
    log: logging.Handler | None = None

    def release(self) -> None:
        if self.log is not None:
            logging.getLogger().removeHandler(self.log)
            self.log.close()
            self.log = None
        for lock in self.locks:
            lock.release()
        self.locks = []


def _start_run_dir(cfg: TrainConfig, info: DistInfo) -> _RunDirHold:
    """Check the output directories and lock the run directory (and a checkpoint directory outside
    it); on rank 0, log to its train.log too."""
    hold = _RunDirHold(locks=_check_output_dirs(cfg, info))
    if not cfg.run.dir:  # (the command line always sets one; code calling run_training may not)
        if info.is_main:
            log.info("no run directory (run.dir is empty): no log file, metrics file or checkpoints")
        return hold
    if not info.is_main:
        return hold
    run_dir, ckpt_dir, _ = output_dirs(cfg)
    hold.log = run_log_handler(run_dir / "train.log")
    logging.getLogger().addHandler(hold.log)
    log.info(
        "run directory %s: config.json, train.log, metrics.jsonl%s, checkpoints in %s",
        run_dir,
        ", tb/" if cfg.metrics.tensorboard and not cfg.metrics.tensorboard_dir else "",
        ckpt_dir if cfg.checkpoint.enabled else "(none: checkpoint.enabled=false)",
    )
    return hold


def build_trainer(cfg: TrainConfig, info: DistInfo) -> Trainer:
    """Data, model (parallelized as configured), optimizer and schedule on this rank's device."""
    if cfg.parallel.mode == "none" and info.world_size > 1:
        raise ConfigError(
            f"parallel.mode='none' with {info.world_size} processes: each would train a copy of its own, "
            f"never synchronized; use 'ddp' or 'fsdp'"
        )
    if cfg.parallel.mode == "fsdp" and not dist.is_initialized():
        raise ConfigError(
            "parallel.mode='fsdp' needs a process group: launch with torchrun, or call "
            "setup_distributed(device, alone=True) first (run_training does)"
        )
    device = resolve_device(cfg.train.device, info.local_rank)
    hold = _start_run_dir(cfg, info)
    try:
        trainer = _build_trainer(cfg, info, device)
    except BaseException:
        hold.release()
        raise
    trainer._run_dir_hold = hold
    return trainer


def _build_trainer(cfg: TrainConfig, info: DistInfo, device: torch.device) -> Trainer:
    torch.manual_seed(cfg.train.seed)
    train_batches, val_batches, _ = build_data(cfg, info)
    model = build_training_model(cfg, device, info.world_size)
    par = parallelize(model, cfg, info, device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    n_params = sum(p.numel() for p in model.parameters())
    if info.world_size > 1 or par.checkpointed:
        log.info(
            "parallel: %s on %d ranks; activation checkpointing on %d of %d blocks",
            par.mode,
            info.world_size,
            len(par.checkpointed),
            cfg.model.n_layers,
        )
    log.info(
        "model: %.2f M parameters on %s, dtype %s, compile=%s",
        n_params / 1e6,
        device,
        cfg.train.dtype,
        cfg.train.compile_backend
        if cfg.train.compile and cfg.train.compile_backend != "inductor"
        else cfg.train.compile,
    )
    trainer = Trainer(cfg, model, optimizer, scheduler, train_batches, device, info, val_batches, par)
    if trainer.table_reducer.active:
        log.info(
            "value tables replicated; their gradients (%.3f GB) are all-reduced once per step",
            trainer.table_reducer.nbytes / 1e9,
        )
    return trainer


def run_training(cfg: TrainConfig) -> list[StepRecord]:
    """Train as configured, alone or as one rank under torchrun; the logged step records."""
    return run_trainer(cfg).history


def run_trainer(cfg: TrainConfig) -> Trainer:
    """`run_training`, returning the trainer once done, released (`Trainer.release`): its
    history, last checkpoint, and `stopped_by`, the signal that stopped it early."""
    set_cpu_threads(env_dist_info())
    device_hint = (
        torch.device("cuda")
        if cfg.train.device in ("cuda", "auto") and torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device_hint.type == "cuda":
        device_hint = resolve_device("cuda", env_dist_info().local_rank)
    info = setup_distributed(device_hint, alone=cfg.parallel.mode == "fsdp")
    trainer = None
    try:
        trainer = build_trainer(cfg, info)
        trainer.train()
        return trainer
    finally:
        if trainer is not None:
            trainer.close()
            trainer.release()
        teardown_distributed(info)
