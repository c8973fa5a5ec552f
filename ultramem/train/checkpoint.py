"""Distributed checkpoints: torch.distributed.checkpoint (DCP), written atomically, resumed exactly.

A checkpoint is a directory `step_00001000/` holding
- the DCP files: model (parameters and the memory layers' persistent buffers: u, v, the
  permutation), optimizer, and the `train` entry (step, LR schedule, the memory layers' usage
  counters summed over ranks);
- `rng/rank{r}.pt`: each rank's RNG states;
- `config.json`: the config the run was made with, compared key by key on resume.

Atomic: every rank writes into `.step_00001000.tmp/`, and only when all have finished does rank 0
rename it to its final name. A run killed while saving leaves a temporary directory that the
loader ignores (and the next save removes), so the previous checkpoint stays the latest. The data
position is the step itself: the windows of step `s` depend only on `s` and the global batch
(`TokenWindows`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ultramem.config import ConfigError

from .distributed import DistInfo, all_reduce_sum_, barrier, broadcast_object

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint or exported model that cannot be read (truncated, corrupt, not one)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint the file system refused (a full disk, a quota, a lost mount): the run stops,
    the checkpoints before it are intact."""


def _os_cause(e: BaseException) -> OSError | None:
    """The OSError behind a failed save, also from inside DCP's per-rank CheckpointException."""
    if isinstance(e, OSError):
        return e
    for exc, _trace in getattr(e, "failures", {}).values():
        if isinstance(exc, OSError):
            return exc
    return None


@contextlib.contextmanager
def reading(what: str, path: str | Path):
    """Failures while reading `path` as one error that names it: a truncated or corrupt file
    otherwise surfaces deep inside DCP, safetensors or torch.load, without the file's name."""
    try:
        yield
    except (ConfigError, FileNotFoundError, CheckpointError):
        raise
    except (Exception, dcp.CheckpointException) as e:  # (DCP's is a BaseException)
        if isinstance(e, dcp.CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]  # the first rank's own error
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(
            f"{what} {str(path)!r} could not be read ({type(e).__name__}{': ' + reason if reason else ''}); "
            f"is it complete?"
        ) from e


def read_meta(meta_file: Path) -> dict[str, Any]:
    """A checkpoint's config.json: its step, world size and flattened config."""
    with reading("checkpoint", meta_file):
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta["config"], dict):
            raise TypeError(f"its config is a {type(meta['config']).__name__}, not an object")
    return meta


# Keys that may change between a checkpoint and the run resuming from it: how long to run, how to
# run it (parallelism, compile, activation checkpointing, device), and where to write.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.log_interval",
    "train.eval_interval",
    "train.eval_batches",
    "train.compile",
    "train.compile_mode",
    "train.compile_backend",
    "train.ac",
    "train.ac_every",
    "train.device",
    "train.table_grad_flush",
    "train.table_grad_staging",
    "train.table_grads_as_inputs",
    "train.batch_size",
    "train.grad_accum",  # with another world size (the global batch is checked apart)
    "parallel.",
    "checkpoint.",
    "metrics.",
    "run.",
    "data.cache_dir",
    "optim.fused",
    "model.memory.log_interval",
)


# Keys added after checkpoints were made without them: such a checkpoint ran with this value.
ADDED_KEYS = {
    "data.val_split": "tail",
    "data.val_chunk_tokens": 65_536,
    "train.table_grads_as_inputs": False,
    "data.window_draw": "micro_batch",
}


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass (or its dict) → {"section.key": value} in field order."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_mismatch(saved: dict[str, Any], current: Any) -> str | None:
    """The first key (in config order) whose value differs and must not, as a message; else None."""
    now = flatten_config(current)
    saved = {**ADDED_KEYS, **saved}
    if saved.get("train.grad_accum") == 1:
        # one micro-batch a step: both draws took the same windows so far, and neither takes
        # them again later
        saved["data.window_draw"] = now.get("data.window_draw")
    for key in list(now) + [k for k in saved if k not in now]:
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES):
            continue
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            return (
                f"{key}: the checkpoint was made with {saved.get(key, '<absent>')!r}, this run has "
                f"{now.get(key, '<absent>')!r}"
            )
    return None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _memory_stats(model, info: DistInfo) -> dict[str, torch.Tensor]:
    """The memory layers' usage counters, summed over ranks (identical on every rank)."""
    out = {}
    for l, layer in enumerate(model.memory_layers):
        stats = getattr(layer, "stats", None)
        if stats is None:
            continue
        for name, buf in stats.named_buffers():
            total = buf.detach().clone()
            all_reduce_sum_(total, info)
            out[f"mem{l}.{name}"] = total.cpu()
    return out


@torch.no_grad()
def _load_memory_stats(model, saved: dict[str, torch.Tensor], info: DistInfo) -> None:
    # the totals go to rank 0 only: summed over ranks again when reported, they count once
    for l, layer in enumerate(model.memory_layers):
        stats = getattr(layer, "stats", None)
        if stats is None:
            continue
        for name, buf in stats.named_buffers():
            key = f"mem{l}.{name}"
            if key in saved and info.is_main:
                buf.copy_(saved[key])
            else:
                buf.zero_()


class CheckpointManager:
    def __init__(self, directory: str | Path, interval: int, keep: int, info: DistInfo):
        self.directory = Path(directory)
        self.interval, self.keep, self.info = interval, keep, info
        self._superseded: list[Path] = []

    # -- finding ---------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and _STEP_DIR.match(p.name) and (p / ".metadata").is_file()
        ]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def supersede_past(self, step: int) -> list[Path]:
        """A run that starts at `step` (0 afresh, or an earlier checkpoint's) makes this
        directory's later checkpoints another run's: it removes them at its first save, so that
        the latest checkpoint (auto-resume, eval, export) is its own. Returns them."""
        self._superseded = [p for p in self.checkpoints() if int(_STEP_DIR.match(p.name).group(1)) > step]
        return self._superseded

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    # -- saving ----------------------------------------------------------------------------

    def _state(self, model, optimizer, scheduler, step: int, stats: dict[str, torch.Tensor]) -> dict[str, Any]:
        sched = scheduler.state_dict()
        sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))  # rebuilt from the config
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "train": {"step": step, "scheduler": sched, "memory_stats": stats},
        }

    def save(self, step: int, model, optimizer, scheduler, config) -> Path:
        info = self.info
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        if info.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier(info)
        t0 = time.perf_counter()
        state = self._state(model, optimizer, scheduler, step, _memory_stats(model, info))
        try:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp))
            (tmp / "rng").mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), tmp / "rng" / f"rank{info.rank}.pt")
        except (Exception, CheckpointException) as e:  # (DCP's exception is a BaseException)
            cause = _os_cause(e)
            if cause is None:
                raise
            if info.is_main:  # what was written is of no use and may fill the disk
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(
                f"checkpoint {str(final)!r} could not be written: {cause.strerror or cause}; the run "
                f"stopped before it, and the checkpoints before step {step} are intact"
            ) from e
        barrier(info)
        if info.is_main:
            meta = {
                "step": step,
                "world_size": info.world_size,
                "saved_at": time.time(),
                "config": flatten_config(config),
            }
            with open(tmp / "config.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # an older run's checkpoint of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            for other in self._superseded:  # another run's, now that this run has one of its own
                if other != final:
                    shutil.rmtree(other, ignore_errors=True)
            for old in self.checkpoints()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self._superseded = []
        barrier(info)
        log.info("checkpoint %s saved (%.1f s)", final, time.perf_counter() - t0)
        return final

    # -- loading ---------------------------------------------------------------------------

    def load(self, path: str | Path, model, optimizer, scheduler, config) -> int:
        """Restore everything from checkpoint `path`; returns its step."""
        path = Path(path)
        meta_file = path / "config.json"
        if not (path / ".metadata").is_file() or not meta_file.is_file():
            raise FileNotFoundError(
                f"checkpoint {str(path)!r}: not a complete checkpoint (no .metadata or "
                f"config.json); complete ones are directories step_NNNNNNNN with both"
            )
        meta = read_meta(meta_file)
        saved = meta["config"]
        problem = config_mismatch(saved, config)
        if problem:
            raise ConfigError(
                f"checkpoint {str(path)!r} does not match this run's config: {problem} "
                f"(to start afresh instead: --no-resume, or another --run.dir)"
            )
        saved_batch = saved["train.batch_size"] * saved["train.grad_accum"] * meta.get("world_size", 1)
        batch = config.train.batch_size * config.train.grad_accum * self.info.world_size
        if saved_batch != batch and self.info.is_main:
            log.warning(
                "resuming with a global batch of %d sequences per step; the checkpoint was made with %d",
                batch,
                saved_batch,
            )
        accum, saved_accum = config.train.grad_accum, saved["train.grad_accum"]
        if config.data.window_draw == "micro_batch" and accum < saved_accum and self.info.is_main:
            log.warning(
                "data.window_draw='micro_batch' with train.grad_accum=%d (the checkpoint: %d): the steps "
                "ahead draw windows this run has already trained on (a train.grad_accum of %d or more does not)",
                accum,
                saved_accum,
                saved_accum,
            )
        # DCP fills the optimizer's state in place, so a fresh optimizer first gets zero state from
        # one step at lr 0, which it takes only when no parameter has a gradient yet: set aside the
        # persistent ones (the tables' buffers, the CUDA-graph gradients) meanwhile
        grads = {p: p.grad for p in model.parameters()}
        for p in grads:
            p.grad = None
        try:
            state = self._state(model, optimizer, scheduler, 0, _memory_stats(model, DistInfo()))
        finally:
            for p, g in grads.items():
                p.grad = g
        with _quiet_single_process(), reading("checkpoint", path):
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
        set_optimizer_state_dict(model, optimizer, state["optim"])
        scheduler.load_state_dict(state["train"]["scheduler"])
        # the optimizer's stored rates are the saved schedule's, and max_steps (so the schedule)
        # may have changed: take this step's rates from the schedule as built now
        scheduler.last_epoch -= 1
        scheduler.step()
        _load_memory_stats(model, state["train"]["memory_stats"], self.info)
        rng = path / "rng" / f"rank{self.info.rank}.pt"
        if rng.is_file():
            with reading("checkpoint", rng):
                _set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.warning(
                "checkpoint %s has no RNG state for rank %d (saved with %d ranks): RNG not restored",
                path,
                self.info.rank,
                meta.get("world_size", -1),
            )
        step = int(state["train"]["step"])
        if step != meta["step"]:
            raise RuntimeError(f"checkpoint {str(path)!r}: step {step} in the state, {meta['step']} in config.json")
        return step

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `resume` a checkpoint or checkpoint directory, "auto" the
        latest in this run's directory, "" none. The same answer on every rank."""
        found: Path | None = None
        if resume == "auto":
            found = self.latest()
        elif resume:
            found = resolve_checkpoint(resume, "--resume")
        return broadcast_object(found, self.info)


def resolve_checkpoint(path: str | Path, name: str = "checkpoint") -> Path:
    """A checkpoint directory, or the latest complete checkpoint in a directory of them or in a
    run directory's `checkpoints/`; errors name the path as `name`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{name} {str(path)!r}: no such file or directory")
    if (p / ".metadata").is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        latest = CheckpointManager(candidate, 0, 0, DistInfo()).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{name} {str(path)!r}: no complete checkpoint there")


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes" a single process when no process group exists: it is one
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
