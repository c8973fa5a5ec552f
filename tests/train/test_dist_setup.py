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
