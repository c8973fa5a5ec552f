"""The retrieval kernels as torch.compile sees them, on a CPU (a CUDA target declared for Triton).

Inductor clones every tensor that its TTIR analysis counts as written around a traced launch, so
only the tensors a launcher allocates (outputs and scratch) may count as written, on each of the
kernels' code paths and also as torch < 2.12 runs the analysis (scalars as constexprs). And the
ops' CUDA bodies must trace into launches whose outputs reach the caller as the kernels wrote
them (the padded key gradients included: nothing is zeroed after a launch)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import ultramem.ops as ops  # noqa: E402
from perf.diagnostics import kernel_access as ka  # noqa: E402

pytestmark = pytest.mark.skipif(not ka.analysis_available(), reason="this torch has no Triton kernel analysis")

FWD_WRITES = {"ids_ptr", "scores_ptr", "keys_ws_ptr", "pairs_ws_ptr", "vals_ws_ptr"}
TILED_WRITES = FWD_WRITES | {"cand_pos_ptr", "cand_val_ptr", "fac_ws_ptr"}
BWD_WRITES = {"ga_ptr", "gb_ptr", "gc_part_ptr"}

CASES = {
    # the 227M layer's launch at a few tokens: 2 warps, register caps, padded keys, bf16
    "k32": dict(t=4, n=1138, pad=14, k=32),
    # 8 warps, grid in registers; several heads, rank 3, 3 cores
    "k64": dict(t=4, h=2, n=300, pad=4, r=3, m=3, k=64, dtype=torch.float32),
    # tiled grid: staged factors, candidates, the bisection fallback; backward in chunks
    "k128": dict(t=2, n=200, pad=0, k=128, dtype=torch.float16),
    # backward into rank-strided views: the element-wise zero fill
    "strided_out": dict(t=2, n=50, pad=6, k=8, dtype=torch.float32, strided_out=True),
}


@pytest.mark.parametrize("scalars_as_constexprs", [False, True], ids=["torch", "torch<2.12"])
@pytest.mark.parametrize("case", list(CASES))
def test_only_outputs_count_as_written(case, scalars_as_constexprs):
    with ka.declared_cuda_target():
        for label, kernel, args, kwargs, given in ka.retrieval_case(**CASES[case]):
            _, writes = ka.accesses(kernel, args, kwargs, scalars_as_constexprs)  # raises if it failed
            assert not writes & given, f"{label}: inputs counted as written: {sorted(writes & given)}"
            if kernel.fn.__name__ == "_retrieval_bwd_kernel":
                want = BWD_WRITES
            else:
                want = TILED_WRITES if case == "k128" else FWD_WRITES
            assert writes == want, label


def _fake_cuda_inputs(mode, tokens, n_rows):
    with mode:
        a, b = (torch.empty(tokens, 1, n_rows, 2, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        return (
            a,
            b,
            torch.empty(1, 2, 2, 2, device="cuda"),
            torch.empty(1, 2, device="cuda"),
            torch.empty(1, 2, device="cuda"),
        )


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
def test_cuda_bodies_trace_to_launches_of_outputs_only(dynamic):
    # The CUDA path as AOTAutograd traces it (fake CUDA tensors, functionalized): one launch per
    # op, cloning nothing but the launchers' own allocations, and the backward's padded
    # gradients are the launch's outputs as they are.
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    n_keys, n_rows, knn = 10, 16, 4

    def f(a, b, c, u, v):
        ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, knn, n_keys)
        ga, gb, gc = ops.tdqkr_retrieval_backward(torch.ones_like(scores), a, b, c, ids, n_keys)
        return ids, scores, ga, gb, gc

    mode = FakeTensorMode(shape_env=ShapeEnv() if dynamic else None)
    tokens = 6
    if dynamic:
        env = mode.shape_env
        tokens = env.create_symintnode(env.create_symbol(6, ConstantSource("tokens")), hint=6)
    inputs = _fake_cuda_inputs(mode, tokens, n_rows)
    with ka.declared_cuda_target():
        gm = make_fx(dispatch_functionalize(f), tracing_mode="symbolic" if dynamic else "fake")(*inputs)
    nodes = list(gm.graph.nodes)
    launches = [n for n in nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(launches) == 2, gm.code
    assert not [n for n in nodes if getattr(n.target, "namespace", None) == "ultramem"], gm.code
    fwd, bwd = launches
    placeholders = {n for n in nodes if n.op == "placeholder"}
    for launch, writes in ((fwd, FWD_WRITES), (bwd, BWD_WRITES)):
        assert set(launch.kwargs["tensors_to_clone"]) == writes
        for name in writes:  # all allocated in the body, none an input of the graph
            assert launch.kwargs["kwargs"][name] not in placeholders
    outputs = next(n for n in nodes if n.op == "output").args[0]
    ga, gb = outputs[2], outputs[3]
    for grad, name in ((ga, "ga_ptr"), (gb, "gb_ptr")):
        assert grad.target.__name__ == "getitem" and grad.args == (bwd, name), gm.code
        assert grad.meta["val"].shape[2] == n_rows  # padded rows included
    # the backward reads the forward's ids and the graph inputs as they are (no clones)
    assert bwd.kwargs["kwargs"]["ids_ptr"].args == (fwd, "ids_ptr")
    assert bwd.kwargs["kwargs"]["a_ptr"] in placeholders


def test_opaque_twins_hold_the_cuda_launchers_and_cpu_goes_through_them():
    from ultramem.ops import retrieval

    counts = {}

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] = counts.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 9, 2, generator=g), torch.randn(3, 1, 9, 2, generator=g)
    c, u = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, generator=g)
    with Count():
        retrieval._forward_opaque(a, b, c, u, u, 3)
    assert counts == {"ultramem.tdqkr_retrieval_opaque.default": 1}
    assert not retrieval._inline_triton(a)
