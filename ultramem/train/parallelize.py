"""Activation checkpointing, compile and data parallelism, applied to a built model in one place.

Order (as torchtitan): activation checkpointing wraps each chosen block and the memory layers
that read there, then compile (the whole model, or each block and memory layer under FSDP),
then FSDP2 shards each block, the memory layers and finally the root (or DDP wraps the whole
model).

The value tables stay outside both: each rank holds them whole, and their gradients, which the
memory ops add into persistent buffers that autograd's hooks never see, are summed over ranks by
`TableGradReducer` once per optimizer step (docs/training.md has the bytes this moves).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from ultramem.model import Transformer

from .config import ParallelConfig, TrainConfig
from .distributed import DistInfo, all_reduce_sum_

log = logging.getLogger(__name__)


def uses_cudagraphs(cfg: TrainConfig) -> bool:
    return cfg.train.compile and cfg.train.compile_mode in ("reduce-overhead", "max-autotune")


def checkpointed_blocks(cfg: TrainConfig) -> list[int]:
    """Blocks whose activations are recomputed in the backward: all ("full"), every
    `ac_every`-th starting with block 0 ("selective"), or none."""
    n = cfg.model.n_layers
    if cfg.train.ac == "full":
        return list(range(n))
    if cfg.train.ac == "selective":
        return list(range(0, n, cfg.train.ac_every))
    return []


def apply_ac(model: Transformer, blocks: list[int]) -> None:
    """Recompute the chosen blocks, and the memory layers reading at them, in the backward.
    A memory layer's table gradient is added by its ops' backwards, which run once whatever is
    recomputed: the recompute repeats only forward work."""
    chosen = set(blocks)
    for i in chosen:
        model.blocks[i] = checkpoint_wrapper(model.blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for l, (read, _) in enumerate(model.placement):
        if read in chosen:
            model.memory_layers[l] = checkpoint_wrapper(
                model.memory_layers[l], checkpoint_impl=CheckpointImpl.NO_REENTRANT
            )


COMPILE_REGIONS = ("model", "module")


def compile_regions(mode: str) -> str:
    """Where `apply_compile` draws its regions for a parallel mode. Entering a compiled region
    costs host time (guards, autograd wrappers) in the forward and the backward, which sets the
    pace of a memory model without CUDA graphs, so the fewer the better:
    - "model": the whole model as one region. Under DDP, Dynamo splits it at the gradient
      buckets' boundaries (its DDP optimizer), so that each bucket is reduced as soon as the
      backward has produced it;
    - "module": one region per block and one per memory layer, under FSDP, whose hooks run
      between them."""
    return "module" if mode == "fsdp" else "model"


def apply_compile(
    model: Transformer, mode: str, regions: str, options: dict | None = None, backend: str = "inductor"
) -> None:
    """torch.compile in `mode` over the regions `compile_regions` names; `options` (Inductor's)
    add to the mode's. Another `backend` takes neither."""
    if backend != "inductor":
        kwargs = {"backend": backend}
    elif options:  # torch.compile takes a mode or options, not both: a mode is a set of options
        kwargs = {"options": {**torch._inductor.list_mode_options(mode), **options}}
    else:
        kwargs = {"mode": mode}
    if regions == "model":
        model.compile(**kwargs)
    elif regions == "module":
        for module in [*model.blocks, *model.memory_layers]:
            module.compile(**kwargs)
    else:
        raise ValueError(f"regions={regions!r}: expected one of {COMPILE_REGIONS}")


def apply_fsdp(model: Transformer, cfg: TrainConfig, tables: set[nn.Parameter]) -> None:
    """FSDP2 per block, the memory layers (one unit for all where they share the tables), then
    the root. bf16 runs gather the blocks' weights in bf16 and reduce gradients in fp32 (the fp32
    shards stay the master weights); memory layers keep fp32 weights, since their ops take the
    retrieval weights as given.
    `parallel.reshard_after_forward` says which units gather their weights again for the backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = cfg.train.dtype == "bfloat16"
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32 if bf16 else None)
    policy = cfg.parallel.reshard_after_forward

    def reshard(default: bool | None) -> bool | None:
        return default if policy == "default" else policy == "always"

    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's weights are needed again at once by the backward: keep them gathered
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard(i < n - 1))
    layers = list(model.memory_layers)
    shared = model.memory_tables is not None
    # With shared tables (outside FSDP) a layer's own weights are small (5.9 MB at 227M), and each
    # unit's gather and backward hooks cost host time in a host-bound layer: one unit for all,
    # kept gathered for the backward. Layers that own their tables (UltraMem v1) are a unit each,
    # resharded after their forward like the blocks, so one table is gathered at a time.
    units = [layers] if shared and layers else layers
    for unit in units:
        fully_shard(unit, mp_policy=fp32, reshard_after_forward=reshard(not shared))
    # None: FSDP's own choice for the root (keep its weights gathered)
    fully_shard(model, mp_policy=mp, ignored_params=tables or None, reshard_after_forward=reshard(None))
    # FSDP warns that a memory layer returns a view (its output reshaped to the input's shape):
    # in-place ops on it would skip a hook, and the model adds it out of place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def apply_ddp(
    model: Transformer, info: DistInfo, device: torch.device, tables: set[nn.Parameter], bucket_cap_mb: float
) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = [n for n, p in model.named_parameters() if p in tables]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    # Buffers are not broadcast: u, v and the permutation are identical on every rank by
    # construction, and the usage counters are per rank (summed when reported).
    with warnings.catch_warnings():
        # its replacement still syncs buffers at construction, which would overwrite rank-local counters
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated")
        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            bucket_cap_mb=bucket_cap_mb,
        )


@dataclass
class Parallelized:
    """The model as built (for state dicts, refreshes, metrics) and the module to call forward
    on (the DDP wrapper under DDP, else the model itself)."""

    model: Transformer
    forward: nn.Module
    mode: str
    checkpointed: list[int] = field(default_factory=list)

    def release(self) -> None:
        """Drop the DDP wrapper, before the process group is destroyed. Its C++ reducer holds the
        group; a group freed from there joins gloo's threads with the GIL held, and a thread still
        releasing a finished collective's Python tensors then waits for the GIL forever (a rank
        hung at exit). Dropped first, the reducer leaves the group to destroy_process_group,
        which frees it without the GIL."""
        if self.mode == "ddp":
            self.forward, self.mode = self.model, "none"
            gc.collect()  # (a DDP wrapper holds no reference cycle today; the reducer must be gone)

    def grad_sync(self, enabled: bool):
        """Context for one micro-batch: reduce gradients only when `enabled` (the last one)."""
        if self.mode == "ddp" and not enabled:
            return self.forward.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def parallelize(model: Transformer, cfg: TrainConfig, info: DistInfo, device: torch.device) -> Parallelized:
    mode = cfg.parallel.mode
    tables = set(model.memory_tables.parameters()) if model.memory_tables is not None else set()
    blocks = checkpointed_blocks(cfg)
    if blocks:
        apply_ac(model, blocks)
    for key, needs in (("reshard_after_forward", "fsdp"), ("bucket_cap_mb", "ddp")):
        value = getattr(cfg.parallel, key)
        if mode != needs and value != getattr(ParallelConfig, key):
            log.warning("parallel.%s=%r has no effect with parallel.mode=%r (%s only)", key, value, mode, needs.upper())
    if cfg.train.compile:
        apply_compile(model, cfg.train.compile_mode, compile_regions(mode), backend=cfg.train.compile_backend)
    forward: nn.Module = model
    if mode == "fsdp":
        apply_fsdp(model, cfg, tables)
    elif mode == "ddp" and info.world_size > 1:
        forward = apply_ddp(model, info, device, tables, cfg.parallel.bucket_cap_mb)
    elif mode == "ddp":
        mode = "none"  # one process: nothing to reduce
    return Parallelized(model, forward, mode, blocks)


class TableGradReducer:
    """Sums the shared value tables' gradient buffers over ranks, once per optimizer step, after
    the last flush, as a mean like the data-parallel gradients. The all-reduces are issued
    asynchronously, one per table, and waited for just before the gradients are read."""

    def __init__(self, model: Transformer, info: DistInfo):
        self.info = info
        tables = model.memory_tables
        self.buffers = (
            [] if tables is None else [b for b in (tables.values_grad, tables.pre_values_grad) if b is not None]
        )
        self._work: list = []
        self.active = info.distributed and bool(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def start(self) -> None:
        if self.active:
            self._work = [all_reduce_sum_(b, self.info, async_op=True) for b in self.buffers]

    def wait(self) -> None:
        if not self.active:
            return
        for w in self._work:
            w.wait()
        self._work = []
        for b in self.buffers:
            b.div_(self.info.world_size)
