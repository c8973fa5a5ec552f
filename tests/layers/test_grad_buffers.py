"""Table gradients accumulated in persistent buffers (ValueTables.use_grad_buffers) equal the
dense autograd gradients: several layers sharing one table, several micro-batches, compiled."""

from __future__ import annotations

import pytest
import torch
from memory_layer_setup import build_random, make_cfg, make_input
from tiny import tiny_cfg
from torch.utils.checkpoint import checkpoint

from ultramem import ops
from ultramem.model import build_model


def _table_grads(tables, layers, inputs, buffers: bool, compile_backend: str | None = None):
    tables.use_grad_buffers(buffers)
    for p in tables.parameters():
        if not buffers:
            p.grad = None
    fns = [
        torch.compile(layer, fullgraph=True, backend=compile_backend) if compile_backend else layer for layer in layers
    ]
    for x in inputs:  # micro-batches
        loss = sum((fn(x, tables)[0] ** 2).sum() for fn in fns)
        loss.backward()
    return [p.grad.clone() for p in tables.value_parameters()]


@pytest.mark.parametrize("mem_type,pre_vdim", [("ultramem_v2", 4), ("ultramem_v2", 0), ("memory_plus", 0)])
def test_buffers_match_dense_gradients(mem_type, pre_vdim):
    cfg = make_cfg(type=mem_type, pre_vdim=pre_vdim, share_ratio=1.0)  # windows overlap: shared rows
    tables, layers, g = build_random(cfg, 3, seed=11)
    inputs = [make_input((2, 5), g) for _ in range(2)]
    dense = _table_grads(tables, layers, inputs, buffers=False)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    buffered = _table_grads(tables, layers, inputs, buffers=True)
    assert tables.values_grad is not None and tables.values.grad is tables.values_grad
    for d, b in zip(dense, buffered):
        assert d.abs().sum() > 0
        torch.testing.assert_close(b, d, rtol=1e-12, atol=1e-12)
    tables.zero_grad_buffers()
    assert torch.all(tables.values.grad == 0) and tables.values.grad is tables.values_grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_buffers_under_compile_match_eager(backend):
    cfg = make_cfg(share_ratio=1.0)
    tables, layers, g = build_random(cfg, 2, seed=12)
    inputs = [make_input((3, 4), g) for _ in range(2)]
    eager = _table_grads(tables, layers, inputs, buffers=True)
    torch._dynamo.reset()
    compiled = _table_grads(tables, layers, inputs, buffers=True, compile_backend=backend)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-10)


def test_survives_zero_grad_set_to_none():
    cfg = make_cfg()
    tables, layers, g = build_random(cfg, 1, seed=13)
    tables.use_grad_buffers()
    opt = torch.optim.SGD(tables.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    assert tables.values.grad is None
    tables.zero_grad_buffers()
    assert tables.values.grad is tables.values_grad


def _sgd_steps(tables, forward, inputs, buffers: bool):
    """Three steps of the loop a user writes: forward, backward, step, zero_grad() (set_to_none)."""
    tables.use_grad_buffers(buffers)
    opt = torch.optim.SGD(tables.parameters(), lr=0.5)
    opt.zero_grad()
    for x in inputs:
        forward(x).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in tables.value_parameters()]


def _trains_as_autograd_does(tables, forward, inputs, tol):
    start = [p.detach().clone() for p in tables.value_parameters()]
    dense = _sgd_steps(tables, forward, inputs, buffers=False)
    with torch.no_grad():
        for p, s in zip(tables.value_parameters(), start):
            p.copy_(s)
    buffered = _sgd_steps(tables, forward, inputs, buffers=True)
    for d, b, s in zip(dense, buffered, start):
        assert not torch.equal(d, s)
        torch.testing.assert_close(b, d, rtol=tol, atol=tol)


def _layers_loss(layers, tables, checkpointed=()):
    def forward(x):
        total = 0
        for i, layer in enumerate(layers):
            y = checkpoint(layer, x, tables, use_reentrant=False)[0] if i in checkpointed else layer(x, tables)[0]
            total = total + (y**2).sum()
        return total

    return forward


@pytest.mark.parametrize("checkpointed", [(), (0,)])
@pytest.mark.parametrize("mem_type,pre_vdim", [("ultramem_v2", 4), ("memory_plus", 0)])
def test_a_plain_zero_grad_loop_trains_the_tables_as_autograd_does(mem_type, pre_vdim, checkpointed):
    """zero_grad() drops `.grad`, which the buffers stand behind: the next forward clears and
    attaches them again, so the optimizer sees each step's own gradient. A layer recomputed
    inside the backward (activation checkpointing) clears nothing."""
    cfg = make_cfg(type=mem_type, pre_vdim=pre_vdim, share_ratio=1.0)
    tables, layers, g = build_random(cfg, 2, seed=16)
    inputs = [make_input((2, 4), g) for _ in range(3)]
    _trains_as_autograd_does(tables, _layers_loss(layers, tables, checkpointed), inputs, tol=1e-10)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_a_plain_zero_grad_loop_trains_a_models_tables(backend):
    """The model follows zero_grad() before its blocks, compiled whole too."""
    model = build_model(tiny_cfg(n_layers=2), seed=3)
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randint(0, 97, (2, 9), generator=gen) for _ in range(3)]
    torch._dynamo.reset()
    fn = torch.compile(model, fullgraph=True, backend=backend) if backend else model
    _trains_as_autograd_does(model.memory_tables, lambda t: fn(t[:, :-1], t[:, 1:])[0], inputs, tol=1e-5)


def test_a_backward_never_clears_the_buffers():
    """zero_grad() between the forward and the backward: the checkpointed layer's recompute
    (after the other layer's backward added its rows) must not clear them."""
    tables, layers, g = build_random(make_cfg(share_ratio=1.0), 2, seed=21)
    forward, x = _layers_loss(layers, tables, checkpointed=(0,)), make_input((2, 4), g)
    forward(x).backward()
    dense = tables.values.grad.clone()
    tables.use_grad_buffers()
    loss = forward(x)
    tables.values.grad = None
    loss.backward()
    torch.testing.assert_close(tables.values_grad, dense, rtol=1e-10, atol=1e-12)


def test_a_replaced_table_is_refused_while_buffers_are_on():
    cfg = make_cfg()
    tables, layers, g = build_random(cfg, 1, seed=17)
    x = make_input((2, 3), g)
    tables.use_grad_buffers()
    both = torch.nn.ModuleDict({"layer": layers[0], "tables": tables})
    both.forward = lambda x: both["layer"](x, both["tables"])
    new = torch.nn.Parameter(tables.values.detach().clone())
    with pytest.raises(RuntimeError, match="table was replaced .* functional_call"):
        torch.func.functional_call(both, {"tables.values": new}, (x,))
    tables.values = new
    with pytest.raises(RuntimeError, match=r"call use_grad_buffers\(\) after replacing a table"):
        layers[0](x, tables)
    tables.use_grad_buffers()  # as the message says: buffers for the new table
    layers[0](x, tables)[0].sum().backward()
    assert tables.values.grad is tables.values_grad and tables.values_grad.abs().sum() > 0
    with torch.no_grad():  # no gradient to misplace: swapped tables are fine
        torch.func.functional_call(both, {"tables.values": new * 2}, (x,))
    tables.load_state_dict({k: v.clone() for k, v in tables.state_dict().items()}, assign=True)
    assert tables.values is not new and tables.values.grad is tables.values_grad  # buffers for the loaded tables
    layers[0](x, tables)[0].sum().backward()


def test_a_compute_copy_of_a_replaced_table_is_stale():
    """A new table may have the old one's version count: the check sees its identity."""
    cfg = make_cfg()
    tables, layers, g = build_random(cfg, 1, seed=18)
    x = make_input((2, 3), g)
    tables.use_grad_buffers()
    tables.use_compute_copy(torch.float32)
    new = torch.nn.Parameter(torch.zeros_like(tables.values))
    with torch.no_grad():
        while new._version < tables.values._version:  # as after a deepcopy, where both restart at 0
            new.mul_(1.0)
    tables.values = new
    tables.use_grad_buffers()
    with pytest.raises(RuntimeError, match="refresh_compute_copy"):
        layers[0](x, tables)
    tables.refresh_compute_copy()
    assert torch.equal(tables.gather_tables()[0], tables.values)


def test_buffers_cast_with_the_module_are_refused_by_name():
    tables, layers, g = build_random(make_cfg(), 1, seed=20)
    tables.use_grad_buffers()
    tables.to(torch.bfloat16), layers[0].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"buffers were cast to torch.bfloat16 .* use_grad_buffers\(False\)"):
        layers[0](make_input((2, 3), g).to(torch.bfloat16), tables)


def test_sharded_tables_get_no_buffers():
    from torch.testing._internal.two_tensor import TwoTensor

    tables, _, _ = build_random(make_cfg(), 1, seed=19)
    v = tables.values.detach()
    tables.values = torch.nn.Parameter(TwoTensor(v, v.clone()))
    with pytest.raises(ValueError, match="ValueTables.values is a TwoTensor: .* ignored_params"):
        tables.use_grad_buffers()


def test_bad_buffer_is_rejected():
    rows = torch.zeros(2, 3, dtype=torch.int64)
    table = torch.randn(5, 4)
    keep = [torch.zeros(5, 3), torch.zeros(5, 4, dtype=torch.bfloat16)]  # the registry holds weak references
    bad_shape, bad_dtype = (ops.register_grad_buffer(b) for b in keep)
    try:
        with pytest.raises(ValueError, match=r"grad_table shape \(5, 3\) must equal table shape \(5, 4\)"):
            ops.weighted_lookup(rows, table, torch.randn(2, 3, 1), bad_shape)
        with pytest.raises(ValueError, match="grad_table must be float32 or float64"):
            ops.pre_value_gate(rows, table, torch.randn(2, 4), bad_dtype)
    finally:
        ops.release_grad_buffer(bad_shape)
        ops.release_grad_buffer(bad_dtype)
    with pytest.raises(ValueError, match="grad_buffer=123456 is not a registered buffer id"):
        ops.weighted_lookup(rows, table, torch.randn(2, 3, 1), 123456)
    freed = ops.register_grad_buffer(torch.zeros(5, 4))  # nothing else holds it
    with pytest.raises(ValueError, match=f"grad_buffer={freed} is not a registered buffer id, or its buffer was freed"):
        ops.weighted_lookup(rows, table, torch.randn(2, 3, 1), freed)
    cfg = make_cfg()
    tables, _, _ = build_random(cfg, 1, seed=14)
    tables.bfloat16()
    with pytest.raises(ValueError, match="ValueTables.values is torch.bfloat16"):
        tables.use_grad_buffers()


def test_opcheck_with_buffer():
    g = torch.Generator().manual_seed(15)
    rows = torch.randint(0, 7, (4, 3), generator=g)
    table = torch.randn(7, 6, generator=g, requires_grad=True)
    buf = torch.zeros(7, 6)
    handle = ops.register_grad_buffer(buf)
    try:
        torch.library.opcheck(
            torch.ops.ultramem.weighted_lookup.default,
            (rows, table, torch.randn(4, 3, 2, generator=g, requires_grad=True), handle),
        )
        torch.library.opcheck(
            torch.ops.ultramem.pre_value_gate.default,
            (rows, table, torch.randn(4, 6, generator=g, requires_grad=True), handle),
        )
    finally:
        ops.release_grad_buffer(handle)


@pytest.mark.parametrize("mem_type,pre_vdim", [("ultramem_v2", 4), ("memory_plus", 0)])
def test_compute_copy_gathers_from_the_copy_and_grads_reach_the_tables(mem_type, pre_vdim):
    cfg = make_cfg(type=mem_type, pre_vdim=pre_vdim, share_ratio=1.0)
    tables, layers, g = build_random(cfg, 2, seed=14)
    inputs = [make_input((2, 5), g) for _ in range(2)]
    exact = _table_grads(tables, layers, inputs, buffers=True)
    out_exact = layers[0](inputs[0], tables)[0]
    tables.zero_grad_buffers()
    tables.use_compute_copy(torch.float32)  # float64 tables, float32 copy: the copy is what is read
    assert tables.values_compute.dtype == torch.float32
    assert tables.gather_tables()[0] is tables.values_compute
    copied = _table_grads(tables, layers, inputs, buffers=True)
    out_copy = layers[0](inputs[0], tables)[0]
    assert not torch.equal(out_copy, out_exact)  # rounded tables ...
    torch.testing.assert_close(out_copy, out_exact, rtol=1e-5, atol=1e-5)  # ... within fp32 rounding
    for e, c in zip(exact, copied):
        assert c.dtype == torch.float64 and c.abs().sum() > 0
        assert (c - e).norm() / e.norm() < 1e-5  # float32 rounding of the gathered rows


def test_stale_compute_copy_raises_and_refresh_follows_the_tables():
    cfg = make_cfg()
    tables, layers, g = build_random(cfg, 1, seed=15)
    x = make_input((2, 3), g)
    with pytest.raises(ValueError, match="use_grad_buffers"):
        tables.use_compute_copy(torch.float32)
    tables.use_grad_buffers()
    tables.use_compute_copy(torch.float32)
    layers[0](x, tables)
    with torch.no_grad():
        tables.values.mul_(2.0)  # what an optimizer step does: an in-place update
    with pytest.raises(RuntimeError, match="refresh_compute_copy"):
        layers[0](x, tables)
    tables.refresh_compute_copy()
    torch.testing.assert_close(tables.values_compute, tables.values.float())
    layers[0](x, tables)
    tables.use_compute_copy(None)
    assert tables.values_compute is None and tables.gather_tables()[0] is tables.values


def test_compute_copy_under_compile_matches_eager():
    cfg = make_cfg(share_ratio=1.0)
    tables, layers, g = build_random(cfg, 2, seed=16)
    inputs = [make_input((3, 4), g) for _ in range(2)]
    tables.use_grad_buffers()
    tables.use_compute_copy(torch.float32)
    eager = _table_grads(tables, layers, inputs, buffers=True)
    tables.zero_grad_buffers()
    torch._dynamo.reset()
    compiled = _table_grads(tables, layers, inputs, buffers=True, compile_backend="aot_eager")
    for e, c in zip(eager, compiled):
        assert e.abs().sum() > 0
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-10)


def test_compute_copy_refreshes_after_optimizer_steps_and_state_dict_loads():
    cfg = make_cfg()
    tables, layers, g = build_random(cfg, 1, seed=17)
    tables.float()
    tables.use_grad_buffers()
    tables.use_compute_copy(torch.bfloat16)
    # fused AdamW updates in place without moving the version counter: the hook must refresh
    opt = torch.optim.AdamW(tables.parameters(), lr=0.1, fused=True)
    handle = tables.refresh_after_steps(opt)
    for p in tables.value_parameters():
        p.grad.normal_(generator=g)
    before = tables.values_compute.clone()
    opt.step()
    assert not torch.equal(tables.values_compute, before)
    torch.testing.assert_close(tables.values_compute, tables.values.to(torch.bfloat16), rtol=0, atol=0)
    handle.remove()
    state = {k: v * 2 for k, v in tables.state_dict().items()}
    holder = torch.nn.ModuleDict({"tables": tables})  # loading through a parent module refreshes too
    holder.load_state_dict({f"tables.{k}": v for k, v in state.items()})
    torch.testing.assert_close(tables.values_compute, tables.values.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(tables.values, state["values"])


def test_compute_copy_trains_the_tables_of_a_frozen_layer():
    # Nothing of the layer needs a gradient: the ops' backwards must still run for the tables.
    cfg = make_cfg(share_ratio=1.0)
    tables, layers, g = build_random(cfg, 1, seed=18)
    layers[0].requires_grad_(False)
    x = make_input((2, 5), g).detach()
    grads = []
    for copy in (None, torch.float32):
        tables.use_grad_buffers()
        tables.use_compute_copy(copy)
        (layers[0](x, tables)[0] ** 2).sum().backward()
        grads.append([p.grad.clone() for p in tables.value_parameters()])
        assert tables.values_compute is None or tables.values_compute.grad is None
    for exact, copied in zip(*grads):
        assert exact.abs().sum() > 0
        assert (copied - exact).norm() / exact.norm() < 1e-5


@pytest.mark.parametrize(
    "mem_type,pre_vdim,as_inputs", [("ultramem_v2", 4, False), ("ultramem_v2", 4, True), ("memory_plus", 0, False)]
)
def test_a_forward_without_grad_names_no_buffer(mem_type, pre_vdim, as_inputs):
    # an inference forward (no_grad, inference_mode, an export for inference) hands the ops no
    # buffer id and no buffer: its graph then runs where the ids are not registered (an
    # AOTInductor package in a fresh process) and holds no fp32 copy of the tables
    cfg = make_cfg(type=mem_type, pre_vdim=pre_vdim)
    tables, layers, g = build_random(cfg, 1, seed=13)
    tables.grads_as_inputs = as_inputs
    tables.use_grad_buffers()
    x = make_input((2, 3), g)
    with torch.no_grad():
        want = layers[0](x, tables)[0]
    assert tables.grad_ids() != (-1, -1) and (tables.grad_targets() is not None) == as_inputs
    ids = [i for i in (tables.values_grad_id, tables.pre_values_grad_id) if i != -1]
    for i in ids:  # as in a process that never registered them
        ops.release_grad_buffer(i)
    try:
        with torch.no_grad():
            assert tables.grad_ids() == (-1, -1) and tables.grad_targets() is None
            torch.testing.assert_close(layers[0](x, tables)[0], want, rtol=0, atol=0)
        with torch.inference_mode():
            torch.testing.assert_close(layers[0](x, tables)[0], want, rtol=0, atol=0)
    finally:
        tables.use_grad_buffers(False)
