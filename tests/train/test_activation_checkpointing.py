"""Activation checkpointing recomputes the forward of blocks and memory layers in the backward;
the memory layers' table gradients (added by their ops' backwards) and usage counters must
still be added exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TINY_MODEL
from torch._dynamo.utils import counters

from ultramem.train.config import load_config
from ultramem.train.parallelize import apply_ac, checkpointed_blocks, parallelize
from ultramem.train.trainer import DistInfo, build_training_model

TINY = [
    *TINY_MODEL,
    "--model.n_layers=3",
    "--train.batch_size=2",
    "--optim.warmup_steps=1",
]


def _one_backward(ac: str, extra=()):
    torch._dynamo.reset()
    cfg = load_config("debug", TINY + [f"--train.ac={ac}", "--train.ac_every=2", *extra])
    model = build_training_model(cfg, torch.device("cpu"))
    par = parallelize(model, cfg, DistInfo(), torch.device("cpu"))
    calls = []
    for layer in model.memory_layers:
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        inner.register_forward_pre_hook(lambda *_: calls.append(1))
    model.refresh_rank1()
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 300, size=(2, 17)))
    for _ in range(2):  # two micro-batches: the buffers accumulate
        loss, _ = par.forward(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    model.memory_tables.flush_grad_staging()
    grads = {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    stats = {
        f"{l}.{n}": b.clone() for l, layer in enumerate(model.memory_layers) for n, b in layer.stats.named_buffers()
    }
    return grads, stats, len(calls), par


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("ac", ["full", "selective"])
def test_recompute_adds_table_gradients_and_counters_once(ac, early_stop):
    # without early stop the recompute runs each forward to its end, counters included
    ref_grads, ref_stats, ref_calls, _ = _one_backward("none")
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        grads, stats, calls, par = _one_backward(ac)
    assert par.checkpointed == ([0, 1, 2] if ac == "full" else [0, 2])
    assert calls > ref_calls  # the checkpointed memory layers really ran their forward again
    assert grads.keys() == ref_grads.keys()
    assert "memory_tables.values" in grads and "memory_tables.pre_values" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    for name in stats:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_recompute_under_compile_adds_once():
    ref_grads, ref_stats, _, _ = _one_backward("none", ["--train.compile=true"])
    grads, stats, _, _ = _one_backward("full", ["--train.compile=true"])
    torch._dynamo.reset()
    # compiled with and without recompute, the kernels fuse differently: fp32 rounding apart,
    # every gradient and counter is the same (a second add of the tables' would double them)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    for name in stats:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=1e-5, atol=0, msg=name)


def test_selective_picks_every_nth_block():
    cfg = load_config("debug", ["--train.ac=selective", "--train.ac_every=3"])
    assert checkpointed_blocks(cfg) == [0, 3]
    assert checkpointed_blocks(load_config("debug", ["--train.ac=none"])) == []


def test_whole_model_compiles_as_one_graph_on_deep_skip_placements_with_recompute():
    # as the trainer compiles it without FSDP: one graph per grad mode, whatever the placement and
    # the recompute (per-block regions had more variants than Dynamo's default limit of 8)
    cfg = load_config(
        "debug",
        [
            "--model.n_layers=12",
            "--model.memory.type=ultramem_v1",
            "--model.memory.insert=0:1/2:3/2:3/4:6/5:5/7:10",
            "--train.ac=selective",
            "--train.ac_every=3",
        ],
    )
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        model = build_training_model(cfg, torch.device("cpu"))
        apply_ac(model, checkpointed_blocks(cfg))
        model.compile(backend="aot_eager", fullgraph=True)
        counters.clear()
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            loss, _ = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        model.eval()
        with torch.no_grad():
            model(tokens[:, :-1], tokens[:, 1:])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()


def test_refresh_of_recomputed_memory_layers_finds_every_layer(monkeypatch):
    # the model refreshes its Tucker layers in one batch, found through the recompute wrappers
    from ultramem.layers import tucker

    cfg = load_config("debug", TINY + ["--train.ac=full"])
    model = build_training_model(cfg, torch.device("cpu"))
    apply_ac(model, checkpointed_blocks(cfg))
    assert all(hasattr(layer, "_checkpoint_wrapped_module") for layer in model.memory_layers)
    batches = []
    orig = tucker.refresh_rank1_all
    monkeypatch.setattr(tucker, "refresh_rank1_all", lambda layers: (batches.append(len(layers)), orig(layers))[1])
    model.refresh_rank1()
    assert batches == [len(model.memory_layers)]
