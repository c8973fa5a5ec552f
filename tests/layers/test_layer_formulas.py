"""Each memory layer against the step-by-step formulas of docs/layers.md (tests/layers/memory_layer_oracle.py)
in float64: same output and same gradients for every parameter, on tiny shapes."""

from __future__ import annotations

import pytest
import torch
from memory_layer_oracle import memory_plus_oracle, tucker_oracle, window_n
from memory_layer_setup import build_random, make_cfg, make_input
from torch.utils._python_dispatch import TorchDispatchMode

from ultramem.layers import build_memory, inference_cache, ultramem_v2


def check_against_oracle(layer, tables, x, g, oracle):
    params = [p for p in list(layer.parameters()) + (list(tables.parameters()) if tables is not None else [])]
    names = [n for n, _ in layer.named_parameters()] + (
        [f"tables.{n}" for n, _ in tables.named_parameters()] if tables is not None else []
    )
    y, aux = layer(x, tables)
    y_ref, trace = oracle()
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert float(aux) == 0.0
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * gy).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), params, allow_unused=True)
    for name, got, want in zip(names, grads, grads_ref):
        assert want is not None, name
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    return trace


V2_CASES = [
    # (heads, q_per_rank, pre_vdim, glu_act, key_expand, share_ratio as (num, den), layer, L, shape, cores, rank)
    (1, False, 0, True, 1, (1, 2), 0, 2, (7,), 2, 2),
    (2, True, 4, True, 1, (3, 4), 1, 2, (2, 4), 2, 2),
    (2, False, 4, False, 2, (1, 1), 1, 2, (6,), 2, 2),
    (1, True, 4, True, 1, (1, 1), 2, 3, (3, 2), 1, 3),
]


def _v2_cfg(heads, per_rank, pre_vdim, glu, expand, ratio, cores, rank):
    return make_cfg(
        type="ultramem_v2",
        heads=heads,
        q_per_rank=per_rank,
        pre_vdim=pre_vdim,
        glu_act=glu,
        key_expand=expand,
        share_ratio=ratio[0] / ratio[1],
        tucker_cores=cores,
        tucker_rank=rank,
    )


@pytest.mark.parametrize("heads,per_rank,pre_vdim,glu,expand,ratio,index,L,shape,cores,rank", V2_CASES)
def test_ultramem_v2_matches_formula(heads, per_rank, pre_vdim, glu, expand, ratio, index, L, shape, cores, rank):
    cfg = _v2_cfg(heads, per_rank, pre_vdim, glu, expand, ratio, cores, rank)
    tables, layers, g = build_random(cfg, L, seed=11 + index)
    layer = layers[index]
    n = window_n(6, L, *ratio)
    assert layer.n == n and layer.n_side == expand * n
    num_rows = 36 * L
    x = make_input(shape, g)
    trace = check_against_oracle(
        layer,
        tables,
        x,
        g,
        lambda: tucker_oracle(layer, x, tables, kind="v2", n=n, offset=index * 36, num_rows=num_rows),
    )
    if ratio == (1, 1):  # windows overlap: this layer reaches rows beyond its own knum² slice
        rows = {(lg + index * 36) % num_rows for kept in trace["kept"] for (_, _, lg, _, _) in kept}
        assert n * n > 36 and rows  # the window is larger than the layer's slice


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("heads,per_rank,pre_vdim,glu,expand,ratio,index,L,shape,cores,rank", V2_CASES[:3])
def test_ultramem_v2_without_autograd_takes_rows_from_the_retrieval(
    heads, per_rank, pre_vdim, glu, expand, ratio, index, L, shape, cores, rank, monkeypatch
):
    # eval without autograd on CUDA (patched here): the rows op maps the ids, so no remainder
    # runs, and (one query per side) normalizes the queries, so no rsqrt runs; the output is the
    # formula's. On the CPU, and with the key balance on (the ids are needed), the stacked op runs
    # on normalized queries: the same output up to rounding (bit for bit where the queries are
    # per rank, normalized first)
    cfg = _v2_cfg(heads, per_rank, pre_vdim, glu, expand, ratio, cores, rank)
    tables, layers, g = build_random(cfg, L, seed=21 + index)
    layer = layers[index].eval()
    x = make_input(shape, g)
    n = window_n(6, L, *ratio)
    with torch.no_grad(), _OpNames() as seen:  # on the CPU: the stacked op, fused by Inductor if compiled
        y_cpu, _ = layer(x, tables)
    assert "ultramem.tdqkr_retrieval_stacked" in seen.names and "ultramem.tdqkr_retrieval_rows" not in seen.names
    monkeypatch.setattr(ultramem_v2, "retrieval_writes_rows", lambda x: True)  # as on CUDA
    with torch.no_grad(), _OpNames() as seen:
        y, aux = layer(x, tables)
    y_ref, _ = tucker_oracle(layer, x, tables, kind="v2", n=n, offset=index * 36, num_rows=36 * L)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert float(aux) == 0.0
    assert "ultramem.tdqkr_retrieval_rows" in seen.names and "aten.remainder" not in seen.names, seen.names
    assert ("aten.rsqrt" in seen.names) == per_rank, seen.names
    assert "aten.bmm" in seen.names  # the sub-key scores' batched GEMM
    with torch.no_grad(), inference_cache(layer, decode=True), _OpNames() as seen:
        y_decode, _ = layer(x, tables)
    torch.testing.assert_close(y_decode, y_ref, rtol=1e-10, atol=1e-12)
    # one query per side: the keys folded into the projection, whose one GEMM yields the scores
    assert ("aten.bmm" in seen.names) == per_rank, seen.names
    layer.key_balance_coef = 0.5
    with torch.no_grad(), _OpNames() as seen:
        y_kb, aux = layer(x, tables)
    assert "ultramem.tdqkr_retrieval_stacked" in seen.names and "ultramem.tdqkr_retrieval_rows" not in seen.names
    assert float(aux) > 0.0
    assert torch.equal(y_kb, y_cpu)
    if per_rank:
        assert torch.equal(y_kb, y)
    else:
        torch.testing.assert_close(y_kb, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "heads,per_rank,expand,shape", [(1, False, 1, (5,)), (2, True, 2, (2, 3)), (2, False, 2, (6,))]
)
def test_ultramem_v1_matches_formula(heads, per_rank, expand, shape):
    cfg = make_cfg(
        type="ultramem_v1", knum=4, heads=heads, q_per_rank=per_rank, key_expand=expand, tucker_rank_penalty=0.0
    )
    tables, layers, g = build_random(cfg, 2, seed=5)
    assert tables is None
    layer = layers[1]
    x = make_input(shape, g)
    trace = check_against_oracle(layer, None, x, g, lambda: tucker_oracle(layer, x, kind="v1", n=4))
    if expand == 2:
        groups = {grp for kept in trace["kept"] for (_, _, _, grp, _) in kept}
        assert len(groups) > 1  # several output groups are exercised


@pytest.mark.parametrize("heads,shape", [(1, (6,)), (2, (2, 3))])
def test_memory_plus_matches_formula(heads, shape):
    cfg = make_cfg(type="memory_plus", heads=heads, vdim=12)
    tables, layers, g = build_random(cfg, 2, seed=3)
    layer = layers[0]
    x = make_input(shape, g)
    check_against_oracle(layer, tables, x, g, lambda: memory_plus_oracle(layer, x, tables))


def test_eval_and_train_give_the_same_output():
    cfg = make_cfg(type="ultramem_v2", heads=2)
    tables, layers, g = build_random(cfg, 2, seed=2)
    x = make_input((4,), g)
    layers[0].train()
    y_train, _ = layers[0](x, tables)
    layers[0].eval()
    y_eval, _ = layers[0](x, tables)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ultramem_v2", "ultramem_v1", "memory_plus"])
def test_bf16_autocast_forward_backward(kind):
    """Under autocast the ops get consistent inputs: output in bf16, fp32 gradients everywhere."""
    cfg = make_cfg(type=kind, heads=2, key_balance_coef=0.1, key_expand=2 if kind == "ultramem_v1" else 1)
    tables, layers = build_memory(cfg, 2)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.reset_parameters(g, tables)
    layer = layers[1].train()
    x = torch.randn(4, 5, 16, generator=g)
    y32, _ = layer(x, tables)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x, tables)
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32
    (y.float().sum() + aux).backward()
    params = list(layer.parameters()) + (list(tables.parameters()) if tables is not None else [])
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
    y, y32 = y.detach().float(), y32.detach()
    assert float((y - y32).abs().mean()) < 0.02 * float(y32.abs().mean()) + 1e-3
