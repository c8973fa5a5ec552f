"""AdamW with three parameter groups and the learning-rate schedule (docs/training.md).

Groups: "decay" (weights of two or more dims), "no_decay" (1-D: norm scales, biases), "values"
(the memory value / pre-value tables: their own weight decay and a learning-rate multiplier that
decays linearly from `value_lr_mult` to 1 over `value_lr_decay_frac · max_steps` steps, on top of
the global schedule). Global schedule: linear warmup from `min_lr_frac`·peak to the peak over
`warmup_steps`, then cosine down to `min_lr_frac`·peak at `max_steps`. Memory+ models instead
give their value table the constant `memory_plus_value_lr` (docs/training.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

TABLE_PARAM_NAMES = ("values", "pre_values")  # attribute names of value tables in memory modules


class GlobalSchedule:
    """Multiplier of the peak lr at a step (0-based: step s is the s-th optimizer update)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_frac: float = 0.1):
        self.warmup_steps, self.max_steps, self.min_frac = warmup_steps, max_steps, min_frac

    def __call__(self, step: int) -> float:
        lo = self.min_frac
        if step < self.warmup_steps:
            return lo + (1.0 - lo) * step / self.warmup_steps
        decay_steps = self.max_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ValueLrMultiplier:
    """The value tables' extra lr multiplier: value_lr_mult at step 0, linearly 1 at decay end."""

    def __init__(self, value_lr_mult: float, decay_frac: float, max_steps: int):
        self.start = value_lr_mult
        self.decay_steps = decay_frac * max_steps

    def __call__(self, step: int) -> float:
        if self.decay_steps <= 0:
            return 1.0
        t = min(1.0, step / self.decay_steps)
        return self.start + (1.0 - self.start) * t


class _GroupLambda:
    """Picklable per-group LambdaLR factor: global schedule × optional value multiplier, or a
    constant 1 when `schedule` is None."""

    def __init__(self, schedule: GlobalSchedule | None, value_mult: ValueLrMultiplier | None):
        self.schedule, self.value_mult = schedule, value_mult

    def __call__(self, step: int) -> float:
        f = self.schedule(step) if self.schedule is not None else 1.0
        return f * self.value_mult(step) if self.value_mult is not None else f


def table_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The memory value tables: everything in `model.memory_tables`, plus any parameter of a
    memory module named like a table (UltraMem v1 layers own their tables)."""
    tables: set[nn.Parameter] = set()
    shared = getattr(model, "memory_tables", None)
    if shared is not None:
        tables.update(shared.parameters())
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in TABLE_PARAM_NAMES:
            tables.add(p)
    return tables


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Named groups (empty ones dropped); each parameter lands in exactly one."""
    tables = table_parameters(model)
    decay, no_decay, values = [], [], []
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        if p in tables:
            values.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "values", "params": values, "weight_decay": cfg.table_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    max_steps: int,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, cfg)
    model_cfg = getattr(model, "cfg", None)
    constant_values = model_cfg is not None and model_cfg.memory.type == "memory_plus"
    if constant_values:
        for g in groups:
            if g["name"] == "values":
                g["lr"] = cfg.memory_plus_value_lr
    device_type = next(model.parameters()).device.type
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None, foreach=None if fused else True
    )
    schedule = GlobalSchedule(cfg.warmup_steps, max_steps, cfg.min_lr_frac)
    value_mult = ValueLrMultiplier(cfg.value_lr_mult, cfg.value_lr_decay_frac, max_steps)
    lambdas = []
    for g in groups:
        if g["name"] != "values":
            lambdas.append(_GroupLambda(schedule, None))
        elif constant_values:
            lambdas.append(_GroupLambda(None, None))
        else:
            lambdas.append(_GroupLambda(schedule, value_mult))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
