"""Gradient buffers handed to the ops as tensors (`ValueTables.grads_as_inputs`, `gate_lookup_into`,
`weighted_lookup_into`):
the buffers (and, staged, the flushed buffers) hold what the id-based backward adds, eager and
compiled (one region per layer, and all layers in one region), and the backward leaves the
buffers' version counters alone."""

from __future__ import annotations

import pytest
import torch
from memory_layer_setup import build_random, make_cfg, make_input


def _grads(tables, layers, inputs, as_inputs: bool, regions: str | None, staging: int = 0):
    tables.use_grad_buffers()
    tables.grads_as_inputs = as_inputs
    if staging:
        tables.use_grad_staging(staging, *layers[0].cfg.memory.lookup_shape, inputs[0].dtype)
    assert (tables.grad_targets() is not None) == as_inputs

    def run(x):
        return sum((layer(x, tables)[0] ** 2).sum() for layer in layers)

    if regions == "layer":
        fns = [torch.compile(layer, fullgraph=True) for layer in layers]

        def run(x):  # noqa: F811
            return sum((fn(x, tables)[0] ** 2).sum() for fn in fns)

    elif regions in ("model", "model_aot_eager"):
        run = torch.compile(run, fullgraph=True, backend="aot_eager" if regions == "model_aot_eager" else "inductor")
    buffers = [b for b in (tables.values_grad, tables.pre_values_grad) if b is not None]
    versions = [b._version for b in buffers]
    for x in inputs:  # micro-batches
        run(x).backward()
    if as_inputs and regions != "model_aot_eager":  # (aot_eager's own copy into them counts)
        assert [b._version for b in buffers] == versions
    staged = tables.grad_staging.staged_tokens() if staging else 0
    tables.flush_grad_staging()
    out = [b.clone() for b in buffers]
    tables.use_grad_buffers(False)
    return out, staged


# 50 tokens: the last backward finds the staging area full; 1000: all are staged
@pytest.mark.parametrize("regions, staging", [(None, 0), (None, 50), ("layer", 50), ("model", 0), ("model", 1000)])
def test_buffers_as_inputs_match_ids(regions, staging):
    cfg = make_cfg(share_ratio=1.0)  # windows overlap: the layers share rows
    tables, layers, g = build_random(cfg, 2, seed=31)
    dtype = torch.float32 if staging else torch.float64  # staging holds fp32
    tables.to(dtype)
    for layer in layers:
        layer.to(dtype)
    inputs = [make_input((2, 5), g).to(dtype) for _ in range(3)]
    torch._dynamo.reset()
    want, want_staged = _grads(tables, layers, inputs, False, regions, staging)
    torch._dynamo.reset()
    got, staged = _grads(tables, layers, inputs, True, regions, staging)
    assert staged == want_staged == min(staging // 10 * 10, 60)
    tol = dict(rtol=1e-5, atol=1e-6) if staging else dict(rtol=1e-12, atol=1e-12)
    for w, gt in zip(want, got):
        assert w.abs().sum() > 0
        torch.testing.assert_close(gt, w, **tol)


@pytest.mark.parametrize(
    "memory, regions, staging",
    [
        ({"pre_vdim": 0}, "layer", 50),
        ({"type": "memory_plus"}, None, 50),
        ({"type": "memory_plus"}, "layer", 0),
    ],
)
def test_one_table_layers_match_ids(memory, regions, staging):
    # UltraMemV2 without pre-values and Memory+: weighted_lookup_into, one buffer
    cfg = make_cfg(share_ratio=1.0, **memory)
    tables, layers, g = build_random(cfg, 2, seed=35)
    tables.float()
    for layer in layers:
        layer.float()
    inputs = [make_input((2, 5), g).float() for _ in range(3)]
    torch._dynamo.reset()
    want, want_staged = _grads(tables, layers, inputs, False, regions, staging)
    torch._dynamo.reset()
    got, staged = _grads(tables, layers, inputs, True, regions, staging)
    assert len(got) == 1 and staged == want_staged == min(staging // 10 * 10, 60)
    assert want[0].abs().sum() > 0
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6 * float(want[0].abs().max()))


def test_whole_model_region_under_aot_eager():
    # (one region per layer under aot_eager is the documented exception: docs/table-gradients.md)
    cfg = make_cfg(share_ratio=1.0)
    tables, layers, g = build_random(cfg, 2, seed=34)
    inputs = [make_input((2, 5), g) for _ in range(2)]
    torch._dynamo.reset()
    want, _ = _grads(tables, layers, inputs, False, None)
    got, _ = _grads(tables, layers, inputs, True, "model_aot_eager")
    for w, gt in zip(want, got):
        torch.testing.assert_close(gt, w, rtol=1e-12, atol=1e-12)


def test_ids_by_default_off_cuda_and_what_the_layers_get():
    tables, _, _ = build_random(make_cfg(), 1, seed=32)
    tables.use_grad_buffers()
    assert tables.grads_as_inputs is None and tables.grad_targets() is None  # CPU tables: ids
    tables.grads_as_inputs = True
    values_grad, pre_values_grad, *stage = tables.grad_targets()
    assert values_grad is tables.values_grad and pre_values_grad is tables.pre_values_grad
    assert stage == [None] * 6
    tables.use_grad_staging(16, 3, 1, torch.float64)
    assert tables.grad_targets()[2:] == tables.grad_staging.tensors()
    # one table (no pre-values): the buffer and the staging area's rows, eff, grad_out, fill
    tables, _, _ = build_random(make_cfg(pre_vdim=0), 1, seed=32)
    tables.use_grad_buffers()
    tables.grads_as_inputs = True
    assert tables.grad_targets() == (tables.values_grad, None, None, None, None)
    tables.use_grad_staging(16, 3, 1, torch.float64)
    st = tables.grad_staging
    assert tables.grad_targets() == (tables.values_grad, st.rows, st.eff, st.grad_out, st.fill)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("regions", [None, "layer", "model"])
@pytest.mark.parametrize("staging", [0, 50])
def test_buffers_as_inputs_match_ids_on_cuda(regions, staging):
    # float32: the Triton kernels, launched from Inductor's code when compiled
    cfg = make_cfg(share_ratio=1.0)
    tables, layers, g = build_random(cfg, 2, seed=33)
    tables.to("cuda", torch.float32)
    for layer in layers:
        layer.to("cuda", torch.float32)
    tables.use_grad_buffers()
    assert tables.grads_as_inputs is None and tables.grad_targets() is not None  # on by default on CUDA
    tables.use_grad_buffers(False)
    inputs = [make_input((2, 5), g).to("cuda", torch.float32) for _ in range(3)]
    torch._dynamo.reset()
    want, want_staged = _grads(tables, layers, inputs, False, regions, staging)
    torch._dynamo.reset()
    got, staged = _grads(tables, layers, inputs, True, regions, staging)
    assert staged == want_staged == min(staging // 10 * 10, 60)
    for w, gt in zip(want, got):
        assert w.abs().sum() > 0
        torch.testing.assert_close(gt, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


@pytest.mark.parametrize("memory", ["ultramem_v2", "memory_plus"])
def test_trainer_option_matches_ids(memory):
    import numpy as np
    from tiny import TINY_MODEL

    from ultramem.data import TokenWindows
    from ultramem.train.config import load_config
    from ultramem.train.optim import build_optimizer
    from ultramem.train.trainer import DistInfo, Trainer, build_training_model

    def train(as_inputs: bool):
        args = [*TINY_MODEL, "--train.batch_size=2", "--optim.warmup_steps=2", "--train.max_steps=3"]
        args += ["--train.grad_accum=4", "--train.table_grad_flush=3", "--metrics.tensorboard_dir="]
        args += [f"--model.memory.type={memory}"]
        cfg = load_config("debug", args + [f"--train.table_grads_as_inputs={str(as_inputs).lower()}"])
        model = build_training_model(cfg, torch.device("cpu"))
        assert (model.memory_tables.grad_targets() is not None) == as_inputs
        opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_steps)
        tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
        batches = TokenWindows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
        return Trainer(cfg, model, opt, sched, batches, torch.device("cpu"), DistInfo()).train()

    ids, inputs = train(False), train(True)
    assert [r.loss for r in inputs] == pytest.approx([r.loss for r in ids], rel=1e-6)
