"""The training loop and the pieces it is built from, one job each.

    dist = setup_distributed()          # process group when launched by torchrun
    model = build_training_model(cfg)   # built on meta, materialized on the device, paper init
    model = parallelize(model, cfg)     # per-block compile now; DDP / FSDP2 / AC slot in here
    opt, sched = build_optimizer(...)   # AdamW, three groups, LambdaLR schedule
    Trainer(...).train()                # accumulation, clipping, rank-1 refresh, logging

Only single-process training is implemented; `parallel.mode` other than "none" is refused at
config validation.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ultramem.model import Transformer, build_model

from .config import TrainConfig
from .optim import build_optimizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Process group and device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False  # whether this process created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but CUDA is not available; use 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE set): gloo on CPU, nccl on CUDA."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    initialized = False
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        initialized = True
    return DistInfo(rank, world, local_rank, initialized)


def teardown_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Model and parallelism


def build_training_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    model.train()
    if model.memory_tables is not None:
        # The shared tables' gradients accumulate row by row into persistent fp32 buffers instead
        # of a dense [N, D] gradient per layer and micro-batch (ultramem.ops.weighted_lookup).
        model.memory_tables.use_grad_buffers()
        if cfg.train.dtype == "bfloat16" and cfg.train.bf16_table_copy:
            model.memory_tables.use_compute_copy(torch.bfloat16)
        flush = staged_flush_interval(cfg, device)
        if flush:
            tokens = flush * len(model.memory_layers) * cfg.train.batch_size * cfg.train.seq_len
            model.memory_tables.use_grad_staging(
                tokens, *cfg.model.memory.lookup_shape, torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32)
            log.info("table gradients staged, flushed every %d micro-batches (%.2f GB)", flush,
                     model.memory_tables.grad_staging.nbytes / 1e9)
    return model


def staged_flush_interval(cfg: TrainConfig, device: torch.device) -> int:
    """Micro-batches per flush of the staged table gradients (0: not staged). UltraMemV2 layers
    stage (gate_lookup's backward, or weighted_lookup's without pre-values): at 227M with CUDA
    graphs +1.3% tokens/s with pre-values, +2.4% without. Memory+ does not: its layers' lookups
    can stage (ValueTables.use_grad_staging), but at 227M its 129,600-row table keeps the
    atomics in L2 and staging measured +0.2% for 0.7 GB. On CUDA only with CUDA graphs: without
    them the memory layers are host-bound, and the staged backward launches three kernels where
    the unstaged one launches one."""
    mem = cfg.model.memory
    if mem.type != "ultramem_v2" or (device.type == "cuda" and not uses_cudagraphs(cfg)):
        return 0
    return min(cfg.train.table_grad_flush, cfg.train.grad_accum)


def parallelize(model: Transformer, cfg: TrainConfig, info: DistInfo) -> Transformer:
    """Apply (in torchtitan's order) activation checkpointing → compile → sharding.
    Built so far: per-block torch.compile. DDP/FSDP2 are refused at config validation."""
    if info.world_size > 1:
        raise NotImplementedError(
            f"world_size={info.world_size}: only single-process training is implemented "
            f"(parallel.mode={cfg.parallel.mode!r})")
    if cfg.train.compile:
        mode = cfg.train.compile_mode
        for block in model.blocks:
            block.compile(mode=mode)
        for layer in model.memory_layers:
            layer.compile(mode=mode)
    return model


def uses_cudagraphs(cfg: TrainConfig) -> bool:
    return cfg.train.compile and cfg.train.compile_mode in ("reduce-overhead", "max-autotune")


# ---------------------------------------------------------------------------------------------
# Checkpoints (stub: DCP save / exact resume slots in here)


class CheckpointManager:
    def __init__(self, directory: str, interval: int):
        self.directory, self.interval = directory, interval

    def maybe_save(self, step: int, **state) -> bool:
        """Save at multiples of `interval`; not built yet (config validation refuses interval > 0)."""
        if self.interval and step % self.interval == 0:
            raise NotImplementedError("checkpoint saving is not implemented yet")
        return False

    def load_latest(self, **state) -> int:
        """Step to resume from (0: fresh start)."""
        return 0


# ---------------------------------------------------------------------------------------------
# Metrics sink


class MetricsWriter:
    """Tensorboard scalars on the main rank (no-op elsewhere or when no directory is set)."""

    def __init__(self, directory: str, enabled: bool):
        self._writer = None
        if directory and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=directory)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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
    extra: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Transformer, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, train_batches, device: torch.device,
                 info: DistInfo, val_batches=None):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.train_batches, self.val_batches = train_batches, val_batches
        self.device, self.info = device, info
        self.step = 0
        self.history: list[StepRecord] = []
        self.metrics = MetricsWriter(cfg.metrics.tensorboard_dir, info.is_main)
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.interval)
        self._cudagraphs = uses_cudagraphs(cfg)  # (on CPU Inductor skips the graphs; the rest holds)
        tables = self.model.memory_tables
        staged = tables is not None and tables.grad_staging is not None
        # (at least once per step whenever the tables stage, whatever the config says)
        self._flush_every = max(1, min(cfg.train.table_grad_flush, cfg.train.grad_accum)) if staged else 0
        if self._cudagraphs:
            # A gradient first set from a CUDA-graph output aliases the graph's memory, which the
            # next micro-batch's replay overwrites: give every parameter its own .grad up front
            # (kept, zeroed in place each step) so the backward adds into it instead.
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._value_group = next((i for i, g in enumerate(optimizer.param_groups) if g.get("name") == "values"), None)

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

    def train_step(self) -> StepRecord:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        value_mult = self._value_lr_mult()
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        accum = cfg.train.grad_accum
        for micro in range(accum):
            batch = self.train_batches.batch(self.step * accum + micro).to(self.device, non_blocking=True)
            self._mark_step()
            with self._autocast():
                loss, aux = self.model(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
            loss_sum += (loss - aux).detach().float()  # the LM loss, comparable with val/loss; aux apart
            aux_sum += aux.detach().float()
            if self._flush_every and ((micro + 1) % self._flush_every == 0 or micro + 1 == accum):
                # staged table gradients into the buffers: before the staging area fills up, and
                # before clipping and the optimizer read them (without a host sync: the staging
                # area holds table_grad_flush micro-batches, full at each regular flush)
                self.model.memory_tables.flush_grad_staging(wait=False)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self._cudagraphs)
        if self.model.memory_tables is not None:
            self.model.memory_tables.zero_grad_buffers()
            self.model.memory_tables.refresh_compute_copy()
        self.model.refresh_rank1()
        self.step += 1

        record = None
        if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.max_steps:
            loss_v = loss_sum.item() / accum  # the only host sync of a step, on logging steps
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - t0
            tokens = cfg.train.batch_size * cfg.train.seq_len * accum * self.info.world_size
            record = StepRecord(self.step, loss_v, lr, value_mult, float(grad_norm), tokens / elapsed,
                                aux_sum.item() / accum)
        if self.model.memory_layers and self.step % cfg.model.memory.log_interval == 0:
            mem = self.model.memory_metrics()
            if record is not None:
                record.extra.update(mem)
            if self.info.is_main:
                log.info("step %d memory metrics: %s", self.step,
                         " ".join(f"{k}={v:.4g}" for k, v in sorted(mem.items())))
                self.metrics.scalars(self.step, {f"memory/{k}": v for k, v in mem.items()})
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        for i in range(self.cfg.train.eval_batches):
            batch = self.val_batches.batch(i).to(self.device)
            self._mark_step()
            with self._autocast():
                loss, aux = self.model(batch[:, :-1], batch[:, 1:])
            total += (loss - aux).item()
        self.model.train()
        return total / self.cfg.train.eval_batches

    def prepare(self) -> None:
        """Before the first step: resume from the latest checkpoint, then refresh what derives
        from the parameters (the tables' compute copy, the rank-1 approximations)."""
        self.step = self.checkpoints.load_latest(model=self.model, optimizer=self.optimizer)
        if self.model.memory_tables is not None:
            self.model.memory_tables.refresh_compute_copy()  # after a checkpoint load
        self.model.refresh_rank1()  # before the first forward

    def train(self) -> list[StepRecord]:
        cfg = self.cfg
        self.prepare()
        while self.step < cfg.train.max_steps:
            record = self.train_step()
            if record is not None:
                self.history.append(record)
                if self.info.is_main:
                    log.info("step %5d | loss %.4f | lr %.3e | value lr x%.3f | grad norm %.3f | %.0f tok/s",
                             record.step, record.loss, record.lr, record.value_lr_mult, record.grad_norm,
                             record.tokens_per_s)
                    self.metrics.scalars(record.step, {
                        "train/loss": record.loss, "train/aux_loss": record.aux, "train/lr": record.lr,
                        "train/value_lr_mult": record.value_lr_mult, "train/grad_norm": record.grad_norm,
                        "train/tokens_per_s": record.tokens_per_s})
            if (self.val_batches is not None and cfg.train.eval_interval
                    and self.step % cfg.train.eval_interval == 0):
                val = self.evaluate()
                if self.info.is_main:
                    log.info("step %5d | val loss %.4f", self.step, val)
                    self.metrics.scalars(self.step, {"val/loss": val})
            self.checkpoints.maybe_save(self.step, model=self.model, optimizer=self.optimizer)
        self.metrics.close()
        return self.history


# ---------------------------------------------------------------------------------------------
# Putting it together


def build_data(cfg: TrainConfig, info: DistInfo):
    """(train windows, validation windows or None, tokenizer vocab). The main rank builds the
    token cache first so that other ranks only read it."""
    from ultramem.data import TokenWindows, load_token_splits

    def load():
        return load_token_splits(cfg.data.source, cfg.data.vocab_size, cfg.data.max_corpus_bytes,
                                 cfg.data.val_fraction, cfg.data.cache_dir or None)

    if info.world_size > 1 and dist.is_initialized():
        splits = load() if info.is_main else None
        dist.barrier()
        if splits is None:
            splits = load()
    else:
        splits = load()
    if splits.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {splits.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; raise model.vocab_size")
    t = cfg.train
    train = TokenWindows(splits.train, t.batch_size, t.seq_len, t.seed, info.rank, info.world_size)
    val = None
    if len(splits.val) >= t.seq_len + 2:
        val = TokenWindows(splits.val, t.batch_size, t.seq_len, t.seed + 1, info.rank, info.world_size)
    log.info("data: %d train tokens, %d validation tokens, vocab %d", len(splits.train), len(splits.val),
             splits.vocab_size)
    return train, val, splits.vocab_size


def run_training(cfg: TrainConfig) -> list[StepRecord]:
    device_hint = torch.device("cuda") if cfg.train.device in ("cuda", "auto") and torch.cuda.is_available() \
        else torch.device("cpu")
    info = setup_distributed(device_hint)
    try:
        return build_trainer(cfg, info).train()
    finally:
        teardown_distributed(info)


def build_trainer(cfg: TrainConfig, info: DistInfo) -> Trainer:
    """Data, model (compiled as configured), optimizer and schedule on this rank's device."""
    device = resolve_device(cfg.train.device, info.local_rank)
    torch.manual_seed(cfg.train.seed)
    train_batches, val_batches, _ = build_data(cfg, info)
    model = build_training_model(cfg, device)
    model = parallelize(model, cfg, info)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f M parameters on %s, dtype %s, compile=%s", n_params / 1e6, device,
             cfg.train.dtype, cfg.train.compile)
    return Trainer(cfg, model, optimizer, scheduler, train_batches, device, info, val_batches)
