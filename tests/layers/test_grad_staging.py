"""Staged table gradients (ValueTables.use_grad_staging, ultramem.ops.staged_grad): after a
flush the buffers hold what the unstaged backward adds, over several layers sharing rows and
several micro-batches, eager and compiled, also when the staging area fills up; the trainer's
staged runs match its unstaged ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_layer_setup import build_random, make_cfg, make_input
from tiny import TINY_MODEL

from ultramem.data import TokenWindows
from ultramem.train.config import load_config
from ultramem.train.optim import build_optimizer
from ultramem.train.trainer import DistInfo, Trainer, build_training_model


def _fp32(tables, layers, g, inputs: int):
    """The float64 test layers in float32 (staging holds fp32 and the layers' activation dtype)."""
    tables.float()
    for layer in layers:
        layer.float()
    return [make_input((2, 5), g).float() for _ in range(inputs)]


def _grads(tables, layers, inputs, staging_tokens: int | None, backend: str | None = None):
    tables.use_grad_buffers()
    tables.use_grad_staging(staging_tokens or 0, *layers[0].cfg.memory.lookup_shape, torch.float32)
    fns = [torch.compile(layer, fullgraph=True, backend=backend) if backend else layer for layer in layers]
    for x in inputs:  # micro-batches
        sum((fn(x, tables)[0] ** 2).sum() for fn in fns).backward()
    staged = tables.grad_staging.staged_tokens() if staging_tokens else 0
    buffers = [b for b in (tables.values_grad, tables.pre_values_grad) if b is not None]
    before = [b.clone() for b in buffers]
    flushed = tables.flush_grad_staging()
    assert flushed == staged
    out = [b.clone() for b in buffers]
    tables.use_grad_buffers(False)
    return out, before, staged


@pytest.mark.parametrize(
    "capacity,backend,memory",
    [
        ("all", None, {}),
        ("part", None, {}),
        ("all", "inductor", {}),
        ("part", "inductor", {}),
        ("all", None, {"heads": 2, "tucker_cores": 4, "glu_act": False}),
        # weighted_lookup's staged backward
        ("all", None, {"type": "memory_plus", "heads": 2}),
        ("part", "inductor", {"type": "memory_plus"}),
        ("part", None, {"pre_vdim": 0}),
    ],
)
def test_staged_equals_unstaged(capacity, backend, memory):
    cfg = make_cfg(share_ratio=1.0, **memory)  # windows overlap: the layers share rows
    tables, layers, g = build_random(cfg, 3, seed=21)
    inputs = _fp32(tables, layers, g, 2)
    calls = len(inputs) * len(layers)
    tokens = 10 * calls if capacity == "all" else 10 * (calls - 2)  # "part": the last two backwards add at once
    torch._dynamo.reset()
    want, _, _ = _grads(tables, layers, inputs, None, backend)
    torch._dynamo.reset()
    got, before, staged = _grads(tables, layers, inputs, tokens, backend)
    assert staged == tokens
    for w, b, gt in zip(want, before, got):
        assert w.abs().sum() > 0
        # fp32 sums in another order: rounding relative to the largest terms (these layers' reach 1e6)
        torch.testing.assert_close(gt, w, rtol=1e-5, atol=1e-7 * float(w.abs().max()))
        if capacity == "all":  # nothing reached the buffers before the flush
            assert not b.any()
        else:  # the backwards without room added straight away
            assert b.any() and not torch.allclose(b, w)


def test_zero_grad_drops_what_is_staged_and_bad_setups_are_refused():
    cfg = make_cfg()
    tables, layers, g = build_random(cfg, 1, seed=22)
    x = _fp32(tables, layers, g, 1)[0]
    m = cfg.memory
    with pytest.raises(ValueError, match="use_grad_staging needs use_grad_buffers"):
        tables.use_grad_staging(16, m.heads * m.knn, m.tucker_cores, torch.float32)
    tables.use_grad_buffers()
    tables.use_grad_staging(64, m.heads * m.knn, m.tucker_cores, torch.float32)
    # per token: E row ids, E·M effective scores and E gate gradients (4 bytes each), vdim + pre_vdim values
    assert tables.grad_staging.nbytes == 64 * (
        m.heads * m.knn * (4 + 4 * m.tucker_cores + 4) + 4 * (m.vdim + m.pre_vdim)
    )
    (layers[0](x, tables)[0] ** 2).sum().backward()
    assert tables.grad_staging.staged_tokens() == 10
    tables.zero_grad_buffers()
    assert tables.flush_grad_staging() == 0 and not tables.values_grad.any()
    from ultramem.ops import GradStaging

    with pytest.raises(ValueError, match="capacity=0 tokens must be > 0"):
        GradStaging(0, 4, 2, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="vdim=0, pre_vdim=0"):
        GradStaging(8, 4, 1, 0, 0, torch.float32, "cpu")
    tables.use_grad_buffers(False)  # turns staging off too
    assert tables.grad_staging is None


TINY = [
    *TINY_MODEL,
    "--train.batch_size=2",
    "--optim.warmup_steps=2",
    "--train.max_steps=3",
    "--train.grad_accum=4",
    "--metrics.tensorboard_dir=",
]


def _train(flush: int, pre_vdim: int = 8):
    cfg = load_config("debug", TINY + [f"--train.table_grad_flush={flush}", f"--model.memory.pre_vdim={pre_vdim}"])
    model = build_training_model(cfg, torch.device("cpu"))
    assert (model.memory_tables.grad_staging is not None) == (flush > 0)
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    batches = TokenWindows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    tables, flushed = model.memory_tables, []
    flush_method = tables.flush_grad_staging
    tables.flush_grad_staging = lambda wait=True: flushed.append(flush_method(wait)) or flushed[-1]
    history = Trainer(cfg, model, opt, sched, batches, torch.device("cpu"), DistInfo()).train()
    # every flush found each layer's tokens of the micro-batches since the last one staged (the
    # CPU path reads the count even when not asked to wait)
    per_micro_batch = len(model.memory_layers) * cfg.train.batch_size * cfg.train.seq_len
    want = {1: [per_micro_batch] * 4, 3: [3 * per_micro_batch, per_micro_batch]}.get(flush, [])
    assert flushed == want * cfg.train.max_steps
    return history, model


@pytest.mark.parametrize("pre_vdim", [8, 0])  # 0: weighted_lookup's staged backward
def test_trainer_staged_matches_unstaged(pre_vdim):
    ref, ref_model = _train(0, pre_vdim)
    for flush in (1, 3):  # 3: flushes after micro-batches 3 and 4 (the step's end) of 4
        got, model = _train(flush, pre_vdim)
        assert [r.loss for r in got] == pytest.approx([r.loss for r in ref], rel=1e-5)
        assert [r.grad_norm for r in got] == pytest.approx([r.grad_norm for r in ref], rel=1e-4)
        torch.testing.assert_close(model.memory_tables.values, ref_model.memory_tables.values, rtol=1e-4, atol=1e-6)
        assert model.memory_tables.grad_staging.staged_tokens() == 0


@pytest.mark.parametrize("op", ["weighted_lookup", "pre_value_gate"])
def test_one_table_ops_stage_through_their_buffer_id(op):
    """weighted_lookup / pre_value_gate called with a buffer id that has a staging area of its
    one table: the backward stages (the buffer untouched) and returns the same input gradient;
    a call that finds no room adds at once; the flush brings the buffer to the unstaged sum.
    A staging area of the wrong kind, or deterministic mode, leaves the backward unstaged."""
    from ultramem.ops import (
        GradStaging,
        pre_value_gate,
        register_grad_buffer,
        register_staging,
        release_grad_buffer,
        set_deterministic,
        weighted_lookup,
    )

    g = torch.Generator().manual_seed(5)
    lookup = op == "weighted_lookup"
    t, e, n, d, m = 7, 4, 13, 8, 2 if lookup else 1
    table = torch.randn(n, d, generator=g)
    rows = torch.randint(0, n, (t, e), generator=g)
    rows[1] = rows[0, 0]  # a hot row
    arg = torch.randn((t, e, m) if lookup else (t, d), generator=g).requires_grad_()
    cot = torch.randn((t, d) if lookup else (t, e), generator=g)
    buf = torch.zeros(n, d)
    handle = register_grad_buffer(buf)

    def backward():
        arg.grad = None
        out = weighted_lookup(rows, table, arg, handle) if lookup else pre_value_gate(rows, table, arg, handle)
        (out * cot).sum().backward()
        return arg.grad.clone()

    try:
        want_arg = backward()
        want = buf.clone()
        assert want.abs().sum() > 0
        buf.zero_()
        staging = GradStaging(t + 2, e, m, d if lookup else 0, 0 if lookup else d, torch.float32, "cpu")
        register_staging(handle, staging)
        torch.testing.assert_close(backward(), want_arg)
        assert staging.staged_tokens() == t and not buf.any()
        torch.testing.assert_close(backward(), want_arg)  # no room left: added at once
        torch.testing.assert_close(buf, want)
        assert staging.flush(buf if lookup else None, None if lookup else buf) == t
        torch.testing.assert_close(buf, 2 * want)
        set_deterministic(True)
        try:
            backward()
        finally:
            set_deterministic(False)
        assert staging.staged_tokens() == 0
        torch.testing.assert_close(buf, 3 * want)
        # the other one-table kind (or both halves) does not match this op: unstaged
        register_staging(handle, GradStaging(t, e, m, 0 if lookup else d, d if lookup else 0, torch.float32, "cpu"))
        backward()
        torch.testing.assert_close(buf, 4 * want)
    finally:
        register_staging(handle, None)
        release_grad_buffer(handle)


def test_trainer_stages_ultramem_v2_only():
    from ultramem.train.trainer import staged_flush_interval

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    compiled = ["--train.compile=true"]
    assert staged_flush_interval(load_config("debug", TINY), cpu) == 4
    assert staged_flush_interval(load_config("debug", TINY + ["--model.memory.pre_vdim=0"]), cpu) == 4
    assert staged_flush_interval(load_config("debug", TINY + ["--model.memory.type=memory_plus"]), cpu) == 0
    # on CUDA when compiled with CUDA graphs or without, not eager nor under FSDP
    assert staged_flush_interval(load_config("debug", TINY + compiled), cuda) == 4
    graphs = compiled + ["--train.compile_mode=reduce-overhead"]
    assert staged_flush_interval(load_config("debug", TINY + graphs), cuda) == 4
    assert staged_flush_interval(load_config("debug", TINY), cuda) == 0
    assert staged_flush_interval(load_config("debug", TINY + compiled + ["--parallel.mode=fsdp"]), cuda) == 0
    assert staged_flush_interval(load_config("debug", TINY + ["--train.table_grad_flush=0"]), cpu) == 0
    # train.table_grad_staging overrides where, not what can stage
    on, off = ["--train.table_grad_staging=true"], ["--train.table_grad_staging=false"]
    assert staged_flush_interval(load_config("debug", TINY + compiled + ["--parallel.mode=fsdp"] + on), cuda) == 4
    assert staged_flush_interval(load_config("debug", TINY + on), cuda) == 4
    assert staged_flush_interval(load_config("debug", TINY + off), cpu) == 0
    assert staged_flush_interval(load_config("debug", TINY + on + ["--model.memory.type=memory_plus"]), cpu) == 0
    with pytest.raises(ValueError, match="table_grad_staging=true needs train.table_grad_flush > 0"):
        load_config("debug", TINY + on + ["--train.table_grad_flush=0"])
