"""setup_distributed's process-group arguments, with the group's creation intercepted (no GPU or
second process needed)."""

from __future__ import annotations

import pytest
import torch

from ultramem.config import ConfigError
from ultramem.train import distributed


def fake_launch(monkeypatch, gpus: int, local_rank: str, init_process_group) -> None:
    """torchrun's environment for this rank of 2 on a machine with `gpus` GPUs (as far as
    resolve_device asks), with no process group yet and its creation intercepted."""
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    env = {"WORLD_SIZE": "2", "RANK": local_rank, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    ("device", "local_rank", "want"),
    [
        (torch.device("cuda"), "1", torch.device("cuda", 1)),  # no index: this rank's GPU
        (torch.device("cuda", 3), "1", torch.device("cuda", 3)),  # an index given is kept
        (torch.device("cpu"), "1", None),  # gloo takes no device
    ],
)
def test_process_group_binds_this_ranks_gpu(monkeypatch, device, local_rank, want):
    calls = []
    fake_launch(monkeypatch, 2, local_rank, lambda **kw: calls.append(kw))
    info = distributed.setup_distributed(device)
    assert info.initialized and len(calls) == 1
    assert calls[0]["backend"] == ("gloo" if want is None else "nccl")
    assert calls[0].get("device_id") == want


def test_a_rank_without_a_gpu_is_told_so(monkeypatch):
    fake_launch(monkeypatch, 1, "1", lambda **kw: pytest.fail("no group without a GPU"))
    with pytest.raises(ConfigError, match="local rank 1 has no GPU: this machine has 1"):
        distributed.setup_distributed(torch.device("cuda"))


def test_parallel_mode_none_is_refused_on_several_processes(tmp_path):
    # each rank would train a copy of its own, never synchronized; refused before anything is made
    from tiny import TINY_MODEL

    from ultramem.train.config import load_config
    from ultramem.train.trainer import build_trainer

    cfg = load_config("debug", [*TINY_MODEL, "--parallel.mode=none", f"--run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"parallel.mode='none' with 2 processes: .* use 'ddp' or 'fsdp'"):
        build_trainer(cfg, distributed.DistInfo(rank=1, world_size=2))
    assert not (tmp_path / "run").exists()
    assert load_config("debug").parallel.mode == "ddp"  # the packaged configs' mode, the default


def test_a_plain_process_gets_a_group_of_its_own_when_asked(monkeypatch):
    # FSDP needs a process group: without torchrun, `alone` makes one of one rank
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    assert distributed.setup_distributed(torch.device("cpu")).initialized is False and calls == []
    info = distributed.setup_distributed(torch.device("cpu"), alone=True)
    assert info.initialized and (info.rank, info.world_size) == (0, 1) and not info.distributed
    (kw,) = calls
    assert kw["backend"] == "gloo" and kw["world_size"] == 1 and "store" in kw


def test_release_frees_the_ddp_reducer_while_the_group_lives():
    # The reducer holds the process group; freed after destroy_process_group it would free the
    # group itself, with the GIL held (a rank hung at exit). Trainer.close releases it first.
    import weakref

    from torch.nn.parallel import DistributedDataParallel as DDP

    from ultramem.train.parallelize import Parallelized

    dist = distributed.dist
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        par = Parallelized(model, DDP(model), "ddp")
        with par.grad_sync(True):
            par.forward(torch.randn(2, 4)).sum().backward()
        reducer = weakref.ref(par.forward.reducer)
        par.release()
        assert reducer() is None, "the reducer outlived release()"
        assert par.forward is model and par.mode == "none"
        with par.grad_sync(False):  # nothing left to hold back
            model(torch.randn(2, 4)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_run_trainer_leaves_nothing_holding_the_process_group(tmp_path, monkeypatch):
    # FSDP's state holds the process group (its mesh infos). Held past destroy_process_group, the
    # group is freed later with the GIL held, or during interpreter shutdown: the likely cause of
    # a rank that aborted at exit. run_trainer releases the trainer first.
    import gc

    from launch import token_shards
    from tiny import TINY_MODEL

    from ultramem.train.config import load_config
    from ultramem.train.trainer import run_trainer

    def mesh_infos():
        gc.collect()
        return {id(o) for o in gc.get_objects() if type(o).__name__ == "FSDPMeshInfo"}

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    before = mesh_infos()
    args = ["--parallel.mode=fsdp", "--train.max_steps=1", "--optim.warmup_steps=0", "--train.eval_interval=0"]
    args += ["--metrics.tensorboard=false", "--train.batch_size=2"]
    data = f"--data.source={token_shards(tmp_path / 'data')}"
    trainer = run_trainer(load_config("debug", [*TINY_MODEL, *args, data, f"--run.dir={tmp_path / 'run'}"]))
    assert not distributed.dist.is_initialized()
    assert mesh_infos() <= before, "FSDP's state outlived the process group"
    assert len(trainer.history) == 1 and trainer.step == 1 and trainer.stopped_by is None
    assert trainer.last_checkpoint is not None and trainer.last_checkpoint.exists()
    assert not hasattr(trainer, "model")
