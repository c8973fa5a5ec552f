"""Which pointer arguments Inductor's access analysis counts as written in each Triton launch
(`perf.diagnostics.kernel_access`, on a CPU with an sm_90 target declared), and the CUDA bodies
of the triton_ops (retrieval, weighted_lookup, pre_value_gate, gate_lookup, layer_stats_accumulate,
normed_keys) as AOTAutograd traces them.

Under `torch.compile`, a kernel launched through `wrap_triton` has every tensor the analysis
counts as written cloned before the launch, and every tensor when the analysis fails. So each
launch here must write exactly the tensors listed in CASES, also as torch < 2.12 runs the
analysis (scalars as constexprs): its outputs and scratch, and the caller's buffers it adds into
(gradient buffers, a staging area), never an input of the op. A pitfall: a store address made
from a `@triton.jit` helper's result counts as a write to every pointer passed to that helper.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")
wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")

import ultramem.ops as ops  # noqa: E402
from perf.diagnostics import kernel_access as ka  # noqa: E402

# (the interpreter's kernels are no JITFunctions: nothing to capture, no TTIR to analyse)
analysed = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not ka.analysis_available(),
    reason="needs Triton's compiler and Inductor's analysis of Triton kernels",
)

FWD_WRITES = {"ids_ptr", "scores_ptr", "ws_ptr"}
TILED_WRITES = FWD_WRITES  # k > 64: staged factors and candidates in the same scratch
BWD_WRITES = {"ga_ptr", "gb_ptr", "gc_part_ptr"}
STACKED_BWD_WRITES = {"ga_ptr", "gc_part_ptr"}  # both sides' gradients in the one tensor at ga_ptr

# (family of kernel_access.FAMILIES, launch, the pointer arguments it writes); every launch of
# every family must be listed.
CASES = [
    ("retrieval", "227M forward: _retrieval_fwd_kernel", FWD_WRITES),
    ("retrieval", "227M backward: _retrieval_bwd_kernel", STACKED_BWD_WRITES),
    ("retrieval", "227M rows forward: _retrieval_fwd_kernel", FWD_WRITES),
    ("retrieval", "k=64 forward: _retrieval_fwd_kernel", FWD_WRITES),
    ("retrieval", "k=64 backward: _retrieval_bwd_kernel", BWD_WRITES),
    ("retrieval", "k=128 forward: _retrieval_fwd_kernel", TILED_WRITES),
    ("retrieval", "k=128 backward: _retrieval_bwd_kernel", BWD_WRITES),
    ("retrieval", "strided out forward: _retrieval_fwd_kernel", FWD_WRITES),
    ("retrieval", "strided out backward: _retrieval_bwd_kernel", BWD_WRITES),
    ("weighted_lookup", "forward: _weighted_gather_kernel", {"out_ptr"}),
    ("weighted_lookup", "backward: _gather_dot_scatter_kernel", {"dots_ptr", "gt_ptr"}),
    ("weighted_lookup", "backward, deterministic: _gather_dot_scatter_kernel", {"dots_ptr"}),
    ("weighted_lookup", "backward, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("weighted_lookup", "backward, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("pre_value_gate", "forward: _gather_dot_scatter_kernel", {"dots_ptr"}),
    ("pre_value_gate", "backward: _weighted_gather_kernel", {"out_ptr"}),
    ("pre_value_gate", "backward: _gather_dot_scatter_kernel", {"gt_ptr"}),
    ("pre_value_gate", "backward, deterministic: _weighted_gather_kernel", {"out_ptr"}),
    ("pre_value_gate", "backward, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("pre_value_gate", "backward, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("gate_lookup", "forward: _gate_lookup_fwd_chunks_kernel", {"gate_ptr", "out_ptr"}),
    ("gate_lookup", "forward, entry blocks: _gate_lookup_fwd_kernel", {"gate_ptr", "out_ptr"}),
    ("gate_lookup", "backward: _gate_lookup_bwd_kernel", {"gp_ptr", "gs_ptr", "gv_ptr", "gx_ptr"}),
    ("gate_lookup", "backward, deterministic: _gate_lookup_bwd_kernel", {"ef_ptr", "gg_out_ptr", "gs_ptr", "gx_ptr"}),
    # (the deterministic gate_lookup backward adds into the caller's gradient buffers)
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel (3)", {"part_ptr"}),
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel (4)", {"gt_ptr"}),
    ("table_grad", "weighted_lookup: _gather_dot_scatter_kernel", {"dots_ptr", "gt_ptr"}),
    ("table_grad", "weighted_lookup, deterministic: _gather_dot_scatter_kernel", {"dots_ptr"}),
    ("table_grad", "weighted_lookup, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("table_grad", "weighted_lookup, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("table_grad", "pre_value_gate: _weighted_gather_kernel", {"out_ptr"}),
    ("table_grad", "pre_value_gate: _gather_dot_scatter_kernel", {"gt_ptr"}),
    ("table_grad", "pre_value_gate, deterministic: _weighted_gather_kernel", {"out_ptr"}),
    ("table_grad", "pre_value_gate, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("table_grad", "pre_value_gate, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    (
        "staged_grad",
        "gate_lookup backward: _gate_lookup_bwd_kernel",
        {"ef_ptr", "fill_ptr", "gg_out_ptr", "gp_ptr", "gs_ptr", "gv_ptr", "gx_ptr", "sgo_ptr", "sr_ptr", "sx_ptr"},
    ),
    (
        "staged_grad",
        "weighted_lookup backward: _gate_lookup_bwd_kernel",
        {"ef_ptr", "fill_ptr", "gs_ptr", "gv_ptr", "sgo_ptr", "sr_ptr"},
    ),
    (
        "staged_grad",
        "pre_value_gate backward: _gate_lookup_bwd_kernel",
        {"fill_ptr", "gg_out_ptr", "gp_ptr", "gx_ptr", "sr_ptr", "sx_ptr"},
    ),
    ("staged_grad", "flush: _sorted_block_add_kernel", {"gt_ptr"}),
    ("staged_grad", "flush: _sorted_block_add_kernel (2)", {"gt_ptr"}),
    ("layer_stats", "forward: _layer_stats_kernel", {"hits_ptr", "sums_ptr"}),
    ("normed_keys", "forward: _normed_keys_fwd_kernel", {"out_ptr"}),
    ("normed_keys", "backward: _normed_keys_bwd_kernel", {"dkeys_ptr"}),
]


@pytest.fixture(scope="module")
def launches():
    """family -> its launches, captured once per family for this module."""
    return functools.cache(lambda family: ka.FAMILIES[family]())


@analysed
@pytest.mark.parametrize("scalars_as_constexprs", [False, True], ids=["torch", "torch<2.12"])
@pytest.mark.parametrize("family, launch, written", CASES, ids=[f"{f}: {launch}" for f, launch, _ in CASES])
def test_kernel_writes_only_its_outputs(launches, family, launch, written, scalars_as_constexprs):
    launch = launches(family)[launch]
    with ka.declared_cuda_target():
        _, writes = ka.accesses(launch, scalars_as_constexprs)  # raises AnalysisFailed if it failed
    assert writes == written
    assert not writes & launch.inputs


@analysed
@pytest.mark.parametrize("family", list(ka.FAMILIES))
def test_every_launch_is_listed(launches, family):
    assert set(launches(family)) == {launch for f, launch, _ in CASES if f == family}


@analysed
@pytest.mark.parametrize("scalars_as_constexprs", [False, True], ids=["torch", "torch<2.12"])
def test_a_failed_analysis_raises(launches, monkeypatch, scalars_as_constexprs):
    def fail(*args, **kwargs):
        raise RuntimeError("no TTIR")

    monkeypatch.setattr(wrap, "generate_ttir", fail)
    launch = launches("weighted_lookup")["forward: _weighted_gather_kernel"]
    with ka.declared_cuda_target(), pytest.raises(ka.AnalysisFailed, match="_weighted_gather_kernel"):
        ka.accesses(launch, scalars_as_constexprs)


@analysed
def test_exit_status(launches, monkeypatch, capsys):
    monkeypatch.setitem(ka.FAMILIES, "retrieval", lambda: launches("retrieval"))
    assert ka.main(["--only", "retrieval"]) == 0
    monkeypatch.setattr(ka, "accesses", lambda launch, *_: (set(), {"a_ptr"}))  # an input written
    assert ka.main(["--only", "retrieval"]) == 1
    assert "inputs counted as written (cloned per traced call): a_ptr" in capsys.readouterr().out


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


@pytest.fixture
def inline_launches(monkeypatch):
    from ultramem.ops._triton import _launch

    monkeypatch.setattr(_launch, "INLINE_TRITON", True)


def _retrieval_launches(gm, bwd_writes):
    """(forward launch, backward launch, the graph's placeholders) of a traced retrieval
    forward + backward: one launch each, no ultramem:: call left, and every tensor a launch
    writes allocated in the body, none an input of the graph."""
    nodes = list(gm.graph.nodes)
    launches = [n for n in nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(launches) == 2, gm.code
    assert not [n for n in nodes if getattr(n.target, "namespace", None) == "ultramem"], gm.code
    fwd, bwd = launches
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for launch, writes in ((fwd, FWD_WRITES), (bwd, bwd_writes)):
        assert set(launch.kwargs["tensors_to_clone"]) == writes
        for name in writes:
            assert launch.kwargs["kwargs"][name] not in placeholders
    return fwd, bwd, placeholders


def _graph_outputs(gm):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


@analysed
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
def test_cuda_bodies_trace_to_launches_of_outputs_only(dynamic, inline_launches, monkeypatch):
    # The CUDA path as AOTAutograd traces it (fake CUDA tensors, functionalized): one launch per
    # op, cloning nothing but the launchers' own allocations, and the backward's padded
    # gradients are the launch's outputs as they are.
    n_keys, n_rows, knn = 10, 16, 4

    def f(a, b, c, u, v):
        ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, knn, n_keys)
        ga, gb, gc = ops.tdqkr_retrieval_backward(torch.ones_like(scores), a, b, c, ids, n_keys)
        return ids, scores, ga, gb, gc

    gm = _trace_cuda_body(f, None, dynamic, monkeypatch, lambda mode, tokens: _fake_cuda_inputs(mode, tokens, n_rows))
    fwd, bwd, placeholders = _retrieval_launches(gm, BWD_WRITES)
    ga, gb = _graph_outputs(gm)[2:4]
    for grad, name in ((ga, "ga_ptr"), (gb, "gb_ptr")):
        assert grad.target.__name__ == "getitem" and grad.args == (bwd, name), gm.code
        assert grad.meta["val"].shape[2] == n_rows  # padded rows included
    # the backward reads the forward's ids and the graph inputs as they are (no clones)
    assert bwd.kwargs["kwargs"]["ids_ptr"].args == (fwd, "ids_ptr")
    assert bwd.kwargs["kwargs"]["a_ptr"] in placeholders


def _reinplace(gm):
    """Inductor's reinplacing pass on a traced graph (its signature, and that of the fake-tensor
    updater it takes, differ across torch versions: 2.11's updater takes the graph, 2.13's the
    module)."""
    import inspect

    from torch._inductor.fx_passes import reinplace
    from torch._inductor.fx_utils import FakeTensorUpdater

    if len(inspect.signature(reinplace.reinplace_inplaceable_ops).parameters) == 1:
        reinplace.reinplace_inplaceable_ops(gm.graph)
        return
    takes_module = "gm" in inspect.signature(FakeTensorUpdater.__init__).parameters
    reinplace.reinplace_inplaceable_ops(FakeTensorUpdater(gm if takes_module else gm.graph), gm.graph)


@analysed
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
@pytest.mark.parametrize("knn, n_rows", [(4, 16), (128, 300)], ids=["register-grid", "tiled-grid"])
def test_inductor_writes_every_retrieval_tensor_in_place(knn, n_rows, dynamic, inline_launches, monkeypatch):
    # What reinplacing leaves in tensors_to_clone, Inductor copies before each launch. Every
    # tensor the launches write must go in place: the scratch too, which is therefore one tensor,
    # not views of one buffer (of those, the pass clones all but the first).
    def f(a, b, c, u, v):
        ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, knn, -1)
        return ids, scores, *ops.tdqkr_retrieval_backward(torch.ones_like(scores), a, b, c, ids, -1)

    gm = _trace_cuda_body(f, None, dynamic, monkeypatch, lambda mode, tokens: _fake_cuda_inputs(mode, tokens, n_rows))
    _reinplace(gm)
    launches = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(launches) == 2, gm.code
    assert [list(n.kwargs["tensors_to_clone"]) for n in launches] == [[], []], gm.code


@analysed
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
def test_stacked_bodies_trace_to_one_launch_each_whose_gradient_is_the_output(dynamic, inline_launches, monkeypatch):
    # The stacked op's backward hands the kernel its one gradient tensor once (B's half through
    # A's pointer): the traced gradient is that launch's output as it is, no copy into a stack.
    n_keys, n_rows, knn = 10, 16, 4

    def inputs(mode, tokens):
        a, b, c, u, v = _fake_cuda_inputs(mode, tokens, n_rows)
        with mode:  # laid out [H, 2, T, n, r], as the layer's batched GEMM writes it
            sub = torch.empty(1, 2, tokens, n_rows, 2, dtype=torch.bfloat16, device="cuda").permute(2, 0, 1, 3, 4)
        return sub, c, u, v

    def f(sub, c, u, v):
        ids, scores = ops.tdqkr_retrieval_stacked(sub, c, u, v, knn, n_keys)
        g_sub, gc = ops.tdqkr_retrieval_stacked_backward(torch.ones_like(scores), sub, c, ids, n_keys)
        return ids, scores, g_sub, gc

    gm = _trace_cuda_body(f, None, dynamic, monkeypatch, inputs)
    _, bwd, placeholders = _retrieval_launches(gm, STACKED_BWD_WRITES)
    assert "gb_ptr" not in bwd.kwargs["kwargs"]  # (None: a constant of the launch)
    g_sub = _graph_outputs(gm)[2]
    assert g_sub.target.__name__ == "getitem" and g_sub.args == (bwd, "ga_ptr"), gm.code
    assert g_sub.meta["val"].shape[2:] == (2, n_rows, 2)
    # the layout the batched GEMM's backward reads: the input's
    assert g_sub.meta["val"].stride() == placeholders[0].meta["val"].stride()


def test_with_inline_launches_off_the_cuda_bodies_trace_to_the_opaque_twins(monkeypatch):
    from ultramem.ops._triton import _launch

    monkeypatch.setattr(_launch, "INLINE_TRITON", False)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b, c, u, v):
        ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, 4, 10)
        return ops.tdqkr_retrieval_backward(torch.ones_like(scores), a, b, c, ids, 10)

    mode = FakeTensorMode()
    inputs = _fake_cuda_inputs(mode, 6, 16)
    with ka.declared_cuda_target():
        gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*inputs)
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "ultramem.tdqkr_retrieval_opaque.default" in called, gm.code
    assert "ultramem.tdqkr_retrieval_backward_opaque.default" in called, gm.code
    assert not [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)], gm.code


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


# ------------------------------------------------------------------ the lookup ops' CUDA bodies

GATHER, DOTS, SEGMENT = "_weighted_gather_kernel", "_gather_dot_scatter_kernel", "_segment_scatter_kernel"
GATE_LOOKUP_WRITES = {"gate_ptr", "out_ptr"}


def _lookup_fake_cuda_inputs(mode, tokens):
    """rows, values, pre-values, x, scores, grad_out, grad_gate: 4 entries from 16-row tables of 12
    and 8 columns, 2 cores."""
    t, e, n, dv, dp, m = tokens, 4, 16, 12, 8, 2
    with mode:
        bf16 = {"dtype": torch.bfloat16, "device": "cuda"}
        return (
            torch.empty(t, e, dtype=torch.int64, device="cuda"),
            torch.empty(n, dv, **bf16),
            torch.empty(n, dp, **bf16),
            torch.empty(t, dp, **bf16),
            torch.empty(t, e, m, **bf16),
            torch.empty(t, dv, **bf16),
            torch.empty(t, e, **bf16),
        )


def _weighted_lookup_fwd_bwd(rows, values, pre, x, scores, grad_out, grad_gate):
    return ops.weighted_lookup(rows, values, scores), *ops.weighted_lookup_backward(grad_out, rows, values, scores)


def _pre_value_gate_fwd_bwd(rows, values, pre, x, scores, grad_out, grad_gate):
    return ops.pre_value_gate(rows, pre, x), *ops.pre_value_gate_backward(grad_gate, rows, pre, x)


def _gate_lookup_fwd(rows, values, pre, x, scores, grad_out, grad_gate):
    return ops.gate_lookup(rows, values, pre, x, scores, True)


def _gate_lookup_composed_backward(rows, values, pre, x, scores, grad_out, grad_gate):
    # gate_lookup's backward without gradient buffers: the lookup's and the gate's backward ops
    # (the gradients of the tables and of x; that of the scores is computed around them)
    from ultramem.ops.gate_lookup import _composed_backward

    return _composed_backward(grad_out, grad_gate, rows, values, pre, x, scores, grad_gate, True, -1, -1)[:3]


# (name, the ops called, mode: None, "deterministic" or "entry blocks", the launches in order as
# (kernel, the arguments it writes), the twins called with inline launches off)
LOOKUP_BODIES = [
    (
        "weighted_lookup",
        _weighted_lookup_fwd_bwd,
        None,
        [(GATHER, {"out_ptr"}), (DOTS, {"dots_ptr", "gt_ptr"})],
        {"weighted_lookup_opaque", "weighted_lookup_backward_opaque"},
    ),
    (
        "weighted_lookup, deterministic",
        _weighted_lookup_fwd_bwd,
        "deterministic",
        [(GATHER, {"out_ptr"}), (DOTS, {"dots_ptr"}), (SEGMENT, {"part_ptr"}), (SEGMENT, {"gt_ptr"})],
        {"weighted_lookup_opaque", "weighted_lookup_backward_opaque"},
    ),
    (
        "pre_value_gate",
        _pre_value_gate_fwd_bwd,
        None,
        [(DOTS, {"dots_ptr"}), (GATHER, {"out_ptr"}), (DOTS, {"gt_ptr"})],
        {"pre_value_gate_opaque", "pre_value_gate_backward_opaque"},
    ),
    (
        "pre_value_gate, deterministic",
        _pre_value_gate_fwd_bwd,
        "deterministic",
        [(DOTS, {"dots_ptr"}), (GATHER, {"out_ptr"}), (SEGMENT, {"part_ptr"}), (SEGMENT, {"gt_ptr"})],
        {"pre_value_gate_opaque", "pre_value_gate_backward_opaque"},
    ),
    (
        "gate_lookup",
        _gate_lookup_fwd,
        None,
        [("_gate_lookup_fwd_chunks_kernel", GATE_LOOKUP_WRITES)],
        {"gate_lookup_opaque"},
    ),
    (
        "gate_lookup, entry blocks",
        _gate_lookup_fwd,
        "entry blocks",
        [("_gate_lookup_fwd_kernel", GATE_LOOKUP_WRITES)],
        {"gate_lookup_opaque"},
    ),
    (
        "gate_lookup backward without buffers",
        _gate_lookup_composed_backward,
        None,
        [(DOTS, {"dots_ptr", "gt_ptr"}), (GATHER, {"out_ptr"}), (DOTS, {"gt_ptr"})],
        {"weighted_lookup_backward_opaque", "pre_value_gate_backward_opaque"},
    ),
]


def _trace_cuda_body(f, mode_name, dynamic, monkeypatch, make_inputs=None):
    """f traced on fake CUDA tensors (make_inputs(mode, tokens); the lookups' by default) as
    AOTAutograd traces it (functionalized), in `mode_name`."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from ultramem.ops import determinism
    from ultramem.ops._triton import gate_lookup as tgl

    if mode_name == "deterministic":
        monkeypatch.setattr(determinism, "_deterministic", True)
    if mode_name == "entry blocks":
        monkeypatch.setattr(tgl, "CHUNKS_MAX_ENTRIES", 0)
    mode = FakeTensorMode(shape_env=ShapeEnv() if dynamic else None)
    tokens = 6
    if dynamic:
        env = mode.shape_env
        tokens = env.create_symintnode(env.create_symbol(6, ConstantSource("tokens")), hint=6)
    inputs = (make_inputs or _lookup_fake_cuda_inputs)(mode, tokens)
    with ka.declared_cuda_target():
        return make_fx(dispatch_functionalize(f), tracing_mode="symbolic" if dynamic else "fake")(*inputs)


@analysed
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
@pytest.mark.parametrize("f, mode_name, expected", [c[1:4] for c in LOOKUP_BODIES], ids=[c[0] for c in LOOKUP_BODIES])
def test_lookup_cuda_bodies_trace_to_launches_of_outputs_only(
    f, mode_name, expected, dynamic, inline_launches, monkeypatch
):
    # As the retrieval's: each op's body is its launches alone, which write only tensors the body
    # allocated (cloned by the functional launch, as Inductor then reinplaces), and the ops'
    # outputs are the launches' outputs as they are.
    gm = _trace_cuda_body(f, mode_name, dynamic, monkeypatch)
    _, inputs_written = _launches_writing(gm, expected)
    assert not inputs_written, gm.code
    nodes = list(gm.graph.nodes)
    launches = [n for n in nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    for out in next(n for n in nodes if n.op == "output").args[0]:
        assert out.target.__name__ == "getitem" and out.args[0] in launches, gm.code
        assert out.args[1] in out.args[0].kwargs["tensors_to_clone"]


@pytest.mark.parametrize(
    "f, mode_name, twins", [(c[1], c[2], c[4]) for c in LOOKUP_BODIES], ids=[c[0] for c in LOOKUP_BODIES]
)
def test_with_inline_launches_off_the_lookup_bodies_trace_to_the_opaque_twins(f, mode_name, twins, monkeypatch):
    from ultramem.ops._triton import _launch

    monkeypatch.setattr(_launch, "INLINE_TRITON", False)
    gm = _trace_cuda_body(f, mode_name, False, monkeypatch)
    called = {n.target._opname for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "ultramem"}
    assert called == twins, gm.code
    assert not [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)], gm.code


@pytest.mark.parametrize(
    "twin",
    sorted(
        {t for c in LOOKUP_BODIES for t in c[4]}
        | {"tdqkr_retrieval_opaque", "tdqkr_retrieval_backward_opaque", "layer_stats_accumulate_opaque"}
        | {"normed_keys_opaque", "normed_keys_backward_opaque"}
    ),
)
def test_the_twins_hold_the_cuda_launchers(twin):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ultramem::{twin}", "CUDA"), twin
    public = twin.removesuffix("_opaque")  # a triton_op: its body, for every device, calls the twin
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"ultramem::{public}", "CUDA"), public


# ------------------------------------------------------------------ the statistics op's CUDA body


def _stats_fake_cuda_inputs(mode, tokens):
    with mode:
        return (
            torch.zeros(40, dtype=torch.float64, device="cuda"),  # hits
            torch.zeros(6, dtype=torch.float64, device="cuda"),  # sums
            torch.zeros(tokens, 2, 5, dtype=torch.int64, device="cuda"),  # ids
            torch.empty(tokens, 12, dtype=torch.bfloat16, device="cuda"),  # y
            torch.empty(tokens * 2, 5, 2, dtype=torch.bfloat16, device="cuda"),  # scores
        )


def _stats(hits, sums, ids, y, scores):
    ops.layer_stats_accumulate(hits, sums, ids, y, scores)
    return hits, sums  # the counters' new values


def _copy_counters_back(gm):
    """The graph ending as AOTAutograd ends one that mutates its inputs: the new values copied
    back into them (copy_), nothing returned."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    counters = [n for n in graph.nodes if n.op == "placeholder"][:2]
    with graph.inserting_before(out):
        for counter, new in zip(counters, out.args[0]):
            graph.call_function(torch.ops.aten.copy_.default, (counter, new))
    out.args = ((),)
    gm.recompile()


@analysed
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
def test_stats_body_is_one_launch_that_writes_the_counters_in_place(dynamic, inline_launches, monkeypatch):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

    gm = _trace_cuda_body(_stats, None, dynamic, monkeypatch, _stats_fake_cuda_inputs)
    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    launches = [n for n in gm.graph.nodes if n.target is wrapper]
    got = [
        (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, n.kwargs["tensors_to_clone"])
        for n in launches
    ]
    assert got == [("_layer_stats_kernel", ["hits_ptr", "sums_ptr"])], gm.code
    assert not [n for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "ultramem"], gm.code
    # Inductor's reinplacing then has the launch write the counters (graph inputs) in place:
    # nothing cloned, nothing copied back
    _copy_counters_back(gm)
    reinplace_inplaceable_ops_core(gm.graph)
    gm.recompile()
    assert [n.kwargs["tensors_to_clone"] for n in gm.graph.nodes if n.target is wrapper] == [[]], gm.code
    copies = (torch.ops.aten.copy_.default, torch.ops.aten.clone.default)
    assert not [n for n in gm.graph.nodes if n.target in copies], gm.code


@analysed
def test_stats_body_in_deterministic_mode_is_the_reference(inline_launches, monkeypatch):
    gm = _trace_cuda_body(_stats, "deterministic", False, monkeypatch, _stats_fake_cuda_inputs)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.index_add.default" in called, gm.code
    assert not [c for c in called if "triton_kernel_wrapper" in c], gm.code


def test_with_inline_launches_off_the_stats_body_calls_the_twin(monkeypatch):
    from ultramem.ops._triton import _launch

    monkeypatch.setattr(_launch, "INLINE_TRITON", False)
    gm = _trace_cuda_body(_stats, None, False, monkeypatch, _stats_fake_cuda_inputs)
    twins = [n.args[0] for n in gm.graph.nodes if "auto_functionalized" in str(n.target)]
    assert twins == [torch.ops.ultramem.layer_stats_accumulate_opaque.default], gm.code
    assert not [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)], gm.code


def _accumulate_fake_cuda_inputs(mode, tokens):
    """The lookups' fake inputs, then fp32 gradient buffers for both tables, a bf16 staging area
    of 32 tokens (rows, eff, grad_out, grad_g, x, fill) and the gate."""
    rows, values, pre, x, scores, grad_out, grad_gate = _lookup_fake_cuda_inputs(mode, tokens)
    e, m = scores.shape[1], scores.shape[2]
    with mode:
        f32 = {"dtype": torch.float32, "device": "cuda"}
        buffers = (torch.empty(values.shape, **f32), torch.empty(pre.shape, **f32))
        stage = (
            torch.empty(32, e, dtype=torch.int32, device="cuda"),
            torch.empty(32, e, m, **f32),
            torch.empty(32, values.shape[1], dtype=torch.bfloat16, device="cuda"),
            torch.empty(32, e, **f32),
            torch.empty(32, pre.shape[1], dtype=torch.bfloat16, device="cuda"),
            torch.empty(2, dtype=torch.int64, device="cuda"),
        )
        gate = torch.empty(rows.shape, dtype=torch.bfloat16, device="cuda")
    return rows, values, pre, x, scores, grad_out, grad_gate, gate, *buffers, *stage


def _launches_writing(gm, expected):
    """Checks that traced graph gm calls no ultramem:: op and launches `expected` ([(kernel, the
    arguments it writes)]); returns (its placeholders, those of them the launches write)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    nodes = list(gm.graph.nodes)
    assert not [n for n in nodes if getattr(n.target, "namespace", None) == "ultramem"], gm.code
    launches = [n for n in nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    got = [
        (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, set(n.kwargs["tensors_to_clone"]))
        for n in launches
    ]
    assert got == expected, gm.code
    placeholders = [n for n in nodes if n.op == "placeholder"]
    written = {n.kwargs["kwargs"][name] for n in launches for name in n.kwargs["tensors_to_clone"]}
    return placeholders, written & set(placeholders)


BWD_STAGED_WRITES = {
    "ef_ptr",
    "fill_ptr",
    "gg_out_ptr",
    "gp_ptr",
    "gs_ptr",
    "gv_ptr",
    "gx_ptr",
    "sgo_ptr",
    "sr_ptr",
    "sx_ptr",
}


@analysed
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-tokens"])
@pytest.mark.parametrize(
    "staged, expected",
    [
        (False, [("_gate_lookup_bwd_kernel", {"gp_ptr", "gs_ptr", "gv_ptr", "gx_ptr"})]),
        (
            True,
            [("_gate_lookup_bwd_kernel", BWD_STAGED_WRITES)],
        ),
    ],
    ids=["atomics", "staged"],
)
def test_backward_into_tensors_traces_to_launches_that_write_the_buffers_in_place(
    staged, expected, dynamic, inline_launches, monkeypatch
):
    # gate_lookup_into's backward, the buffers (and staging area) handed over as tensors: its
    # launches write exactly those inputs and their own outputs (AOTAutograd copies the written
    # inputs back, which Inductor turns into writes in place); no ultramem:: call is left.
    def f(rows, values, pre, x, scores, grad_out, grad_gate, gate, gv, gp, *stage):
        stage = stage if staged else (None,) * 6
        return ops.gate_lookup_into_backward(
            gv, gp, *stage, grad_out, grad_gate, rows, values, pre, x, scores, gate, True
        )

    gm = _trace_cuda_body(f, None, dynamic, monkeypatch, _accumulate_fake_cuda_inputs)
    placeholders, inputs_written = _launches_writing(gm, expected)
    # the buffers, and staged the staging area
    assert inputs_written == set(placeholders[8:10] + (placeholders[10:] if staged else [])), gm.code


@analysed
@pytest.mark.parametrize(
    "staged, expected",
    [
        (False, [(DOTS, {"dots_ptr", "gt_ptr"})]),
        (
            True,
            [("_gate_lookup_bwd_kernel", {"ef_ptr", "fill_ptr", "gs_ptr", "gv_ptr", "sgo_ptr", "sr_ptr"})],
        ),
    ],
    ids=["atomics", "staged"],
)
def test_lookup_backward_into_tensors_traces_to_launches_that_write_the_buffer(
    staged, expected, inline_launches, monkeypatch
):
    # weighted_lookup_into's backward: as gate_lookup_into's, one table
    def inputs(mode, tokens):
        rows, values, pre, x, scores, grad_out, grad_gate, gate, gv, gp, *stage = _accumulate_fake_cuda_inputs(
            mode, tokens
        )
        with mode:  # a values-only staging area: rows, eff, grad_out, fill
            fill = torch.empty(2, dtype=torch.int64, device="cuda")
        return rows, values, scores, grad_out, gv, stage[0], stage[1], stage[2], fill

    def f(rows, values, scores, grad_out, gv, *stage):
        stage = stage if staged else (None,) * 4
        return ops.weighted_lookup_into_backward(gv, *stage, grad_out, rows, values, scores)

    gm = _trace_cuda_body(f, None, False, monkeypatch, inputs)
    placeholders, inputs_written = _launches_writing(gm, expected)
    assert inputs_written == set(placeholders[4:] if staged else placeholders[4:5]), gm.code


# ------------------------------------------------------------------ the keys' normalization


def _keys_fake_cuda_inputs(mode, tokens):
    with mode:
        keys = torch.empty(1, 2, 10, 8, 2, device="cuda")
        return keys, torch.empty(1, 2, 12, 2, 8, dtype=torch.bfloat16, device="cuda")


def _kernel_name(launch) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return kernel_side_table.get_kernel(launch.kwargs["kernel_idx"]).fn.__name__


def _normed_keys_both_ways(keys, grad_out):
    return ops.normed_keys(keys, 1e-6, 12, torch.bfloat16), ops.normed_keys_backward(grad_out, keys, 1e-6)


@analysed
def test_normed_keys_bodies_are_one_launch_each_of_their_outputs(inline_launches, monkeypatch):
    gm = _trace_cuda_body(_normed_keys_both_ways, None, False, monkeypatch, _keys_fake_cuda_inputs)
    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    nodes = list(gm.graph.nodes)
    launches = [n for n in nodes if n.target is wrapper]
    got = [(_kernel_name(n), n.kwargs["tensors_to_clone"]) for n in launches]
    assert got == [("_normed_keys_fwd_kernel", ["out_ptr"]), ("_normed_keys_bwd_kernel", ["dkeys_ptr"])], gm.code
    assert not [n for n in nodes if getattr(n.target, "namespace", None) == "ultramem"], gm.code
    out, grad = next(n for n in nodes if n.op == "output").args[0]
    assert out.args == (launches[0], "out_ptr") and grad.args == (launches[1], "dkeys_ptr"), gm.code


def test_with_inline_launches_off_the_normed_keys_bodies_call_the_twins(monkeypatch):
    from ultramem.ops._triton import _launch

    monkeypatch.setattr(_launch, "INLINE_TRITON", False)
    gm = _trace_cuda_body(_normed_keys_both_ways, None, False, monkeypatch, _keys_fake_cuda_inputs)
    called = {n.target._opname for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "ultramem"}
    assert called == {"normed_keys_opaque", "normed_keys_backward_opaque"}, gm.code


def test_normed_keys_launchers_trace_with_the_keys_a_parameter(monkeypatch):
    # Dynamo hands the layers' keys over as a fake Parameter, which `_launch.traced` takes for a
    # real tensor: the launches must go by another argument (their outputs) to reach wrap_triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ultramem.ops._triton import _launch
    from ultramem.ops._triton import normed_keys as tnk

    wrapped = []

    class Wrap:
        def __init__(self, kernel):
            wrapped.append(kernel.fn.__name__)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(_launch, "wrap_triton", Wrap)
    with ka.declared_cuda_target(), FakeTensorMode():
        keys = torch.nn.Parameter(torch.empty(1, 2, 10, 8, 2, device="cuda"))
        assert not _launch.traced(keys)
        tnk.normed_keys_cuda(keys, 1e-6, 12, torch.bfloat16)
        tnk.normed_keys_backward_cuda(torch.empty(1, 2, 12, 2, 8, device="cuda"), keys, 1e-6)
    assert wrapped == ["_normed_keys_fwd_kernel", "_normed_keys_bwd_kernel"]
