"""Process group, device and thread setup, and the few collectives the trainer calls itself.

Launched by torchrun (WORLD_SIZE set) every rank joins one process group: gloo on CPU, NCCL on
CUDA. Launched as a plain process it runs alone and no collective is ever issued (under FSDP it
still makes a group of one, which FSDP needs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ultramem.config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False  # whether this process created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def env_dist_info() -> DistInfo:
    """Rank and world size as torchrun sets them (a single process when it did not)."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return DistInfo(rank, world, local_rank, local_world)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but CUDA is not available here; use 'cpu' or 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                f"launch at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def set_cpu_threads(info: DistInfo) -> int:
    """Intra-op threads: the cores this process may use, split between the ranks of this node.
    Several ranks each running one thread per core oversubscribe the machine many times over.
    An explicit OMP_NUM_THREADS wins."""
    omp = os.environ.get("OMP_NUM_THREADS")
    # torchrun sets 1 for every rank when it starts several on a node and the user set nothing
    torchruns_default = omp == "1" and "TORCHELASTIC_RUN_ID" in os.environ and info.local_world_size > 1
    if omp is not None and not torchruns_default:
        threads = int(omp) if omp.strip().isdigit() else 0
        if threads < 1:  # e.g. a nested list such as "4,2": OpenMP's own reading stands
            return torch.get_num_threads()
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(1, info.local_world_size))
    torch.set_num_threads(threads)
    return threads


def setup_distributed(device: torch.device, alone: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun: gloo on CPU, NCCL on CUDA. With `alone`,
    a plain process makes a group of one of its own (FSDP needs a group)."""
    info = env_dist_info()
    launched = "WORLD_SIZE" in os.environ
    if (launched or alone) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and device.index is None:  # NCCL binds the group to one GPU: this rank's
            device = resolve_device("cuda", info.local_rank)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if not launched:  # no rendezvous to join: an in-process store
            kwargs["store"] = dist.HashStore()
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, **kwargs)
        info.initialized = True
    return info


def teardown_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor, info: DistInfo, async_op: bool = False):
    """Sum over ranks in place (gloo has no AVG); returns the work handle when async, else None."""
    if not info.distributed:
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
