"""apply_fsdp's units and what each keeps gathered after its forward (`parallel.reshard_after_forward`),
with `fully_shard` intercepted: the units are recorded, nothing is sharded (no process group needed).
The trainer under FSDP2 itself runs in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.fsdp
from tiny import TINY_MODEL

from ultramem.model import Transformer
from ultramem.train.config import ConfigError, load_config
from ultramem.train.parallelize import apply_fsdp, parallelize
from ultramem.train.trainer import DistInfo, build_training_model


def _units(monkeypatch, policy: str, extra=()) -> list[tuple[str, object]]:
    cfg = load_config(
        "debug", TINY_MODEL + ["--model.n_layers=3", f"--parallel.reshard_after_forward={policy}", *extra]
    )
    model = build_training_model(cfg, torch.device("cpu"))
    calls = []

    def record(module, **kwargs):
        if isinstance(module, list):  # one unit of several modules
            kind = [type(m).__name__ for m in module]
            assert all(m is layer for m, layer in zip(module, model.memory_layers, strict=True))
        else:
            kind = "root" if isinstance(module, Transformer) else type(module).__name__
        calls.append((kind, kwargs["reshard_after_forward"]))
        if kind == "root":
            assert kwargs["ignored_params"] == (tables or None)

    tables = set(model.memory_tables.parameters()) if model.memory_tables is not None else set()
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", record)
    apply_fsdp(model, cfg, tables)
    return calls


@pytest.mark.parametrize(
    ("policy", "blocks", "layers", "root"),
    [
        ("default", [True, True, False], False, None),  # the last block and the memory layers stay gathered
        ("always", [True] * 3, True, True),
        ("never", [False] * 3, False, False),
    ],
)
def test_reshard_after_forward_per_unit(monkeypatch, policy, blocks, layers, root):
    """A unit per block, one for all memory layers, then the root."""
    calls = _units(monkeypatch, policy)
    assert calls == [("Block", b) for b in blocks] + [(["UltraMemV2"] * 3, layers), ("root", root)]


def test_layers_that_own_their_tables_stay_a_unit_each(monkeypatch):
    """UltraMem v1's layers hold their tables: each resharded after its forward, so one table is
    gathered at a time."""
    calls = _units(monkeypatch, "default", ["--model.memory.type=ultramem_v1"])
    assert calls == [("Block", True), ("Block", True), ("Block", False)] + [("UltraMemV1", True)] * 3 + [("root", None)]


def test_unknown_reshard_policy_is_refused():
    with pytest.raises(ConfigError, match="parallel.reshard_after_forward='sometimes'"):
        load_config("debug", ["--parallel.reshard_after_forward=sometimes"])


def test_a_policy_without_fsdp_is_reported(caplog):
    cfg = load_config("debug", TINY_MODEL + ["--parallel.mode=ddp", "--parallel.reshard_after_forward=never"])
    model = build_training_model(cfg, torch.device("cpu"))
    with caplog.at_level("WARNING", logger="ultramem.train.parallelize"):
        parallelize(model, cfg, DistInfo(), torch.device("cpu"))
    assert "parallel.reshard_after_forward='never' has no effect" in caplog.text


def test_a_bucket_size_without_ddp_is_reported(caplog):
    cfg = load_config("debug", TINY_MODEL + ["--parallel.mode=none", "--parallel.bucket_cap_mb=4"])
    model = build_training_model(cfg, torch.device("cpu"))
    with caplog.at_level("WARNING", logger="ultramem.train.parallelize"):
        parallelize(model, cfg, DistInfo(), torch.device("cpu"))
    assert "parallel.bucket_cap_mb=4.0 has no effect with parallel.mode='none'" in caplog.text
