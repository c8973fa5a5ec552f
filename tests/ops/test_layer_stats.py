"""ultramem::layer_stats_accumulate: the reference against float64 sums written here, opcheck,
compile, bad inputs; its Triton kernel under the interpreter (in a subprocess, as the other
kernel tests); and its CUDA body as torch.compile traces it (fake CUDA tensors on a CPU), one
launch that adds into the counters in place."""

from __future__ import annotations

import os
import sys

import pytest
import subproc
import torch

import ultramem.ops as ops
from ultramem.ops import determinism
from ultramem.ops import layer_stats as stats_mod

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (see test_interpreter_suite)")


def _case(seed, n=40, ids_shape=(7, 2, 5), y_shape=(7, 12), rows=14, k=5, m=2, dtype=torch.float32, index=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, ids_shape, generator=g).to(index)
    if ids.numel() > 2:
        ids.view(-1)[:3] = ids.view(-1)[0]  # repeats within a block
    y = (torch.randn(y_shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    scores = torch.randn(rows, k, m, generator=g, dtype=torch.float64).to(dtype)
    # counters that already hold something: the op adds
    hits = torch.randint(0, 3, (n,), generator=g).double()
    sums = torch.randn(6, generator=g, dtype=torch.float64)
    return hits, sums, ids, y, scores


def _oracle(hits, sums, ids, y, scores):
    """The new counters, in float64 with explicit loops over the ids and rows."""
    hits, sums = hits.clone(), sums.clone()
    for i in ids.reshape(-1).tolist():
        hits[i] += 1
    y64, s64 = y.double().reshape(-1), scores.double()
    first = sum(float(s64[r, 0, :].sum()) for r in range(s64.shape[0]))
    last = sum(float(s64[r, -1, :].sum()) for r in range(s64.shape[0]))
    add = [float(y64.sum()), float((y64 * y64).sum()), y.numel(), first, last, scores.shape[0]]
    return hits, sums + torch.tensor(add, dtype=torch.float64)


def _check(got, want, dtype):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # counts are exact
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}[dtype]
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)


SHAPES = [
    dict(),
    dict(index=torch.int32, m=1, k=1),  # first and last entry the same
    dict(ids_shape=(3, 1, 4), y_shape=(3, 5), rows=3, k=4, m=3),
    dict(ids_shape=(0,), y_shape=(0, 4), rows=0),  # no tokens: only the counts' zero adds
    dict(ids_shape=(1,), y_shape=(1,), rows=1, k=1, m=1),  # counts of 1
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=range(len(SHAPES)))
def test_reference_matches_float64(shape, dtype):
    hits, sums, ids, y, scores = _case(1, dtype=dtype, **shape)
    want = _oracle(hits, sums, ids, y, scores)
    ops.layer_stats_accumulate(hits, sums, ids, y, scores)
    _check((hits, sums), want, dtype)


def test_opcheck():
    for shape in SHAPES[:3]:
        torch.library.opcheck(torch.ops.ultramem.layer_stats_accumulate.default, _case(2, **shape))


def test_compiles_fullgraph_into_module_buffers():
    torch._dynamo.reset()
    stats = torch.nn.Module()
    hits, sums, ids, y, scores = _case(3)
    stats.register_buffer("hits", hits)
    stats.register_buffer("sums", sums)

    def step(ids, y, scores):
        ops.layer_stats_accumulate(stats.hits, stats.sums, ids, y, scores)
        return y * 2

    want = _oracle(hits, sums, ids, y, scores)
    want = _oracle(*want, ids, y, scores)
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        compiled(ids, y, scores)
    _check((stats.hits, stats.sums), want, torch.float32)
    torch._dynamo.reset()


BAD = [
    (lambda a: {**a, "hits": a["hits"].float()}, "hits must be float64"),
    (lambda a: {**a, "sums": a["sums"][:5]}, "sums must have 6 entries, got 5"),
    (lambda a: {**a, "hits": a["hits"].view(2, -1)}, r"hits must be 1-D"),
    (lambda a: {**a, "hits": torch.zeros(80, dtype=torch.float64)[::2]}, r"hits must be contiguous"),
    (lambda a: {**a, "ids": a["ids"].float()}, "ids must be int32 or int64, got torch.float32"),
    (
        lambda a: {**a, "ids": a["ids"].clone().fill_(40)},
        r"ids has values in \[40, 40\], outside the valid range \[0, 40\)",
    ),
    (lambda a: {**a, "ids": a["ids"].clone().fill_(-2)}, r"ids has values in \[-2, -2\]"),
    (lambda a: {**a, "y": a["y"].long()}, "y must be a floating tensor"),
    (lambda a: {**a, "scores": a["scores"][:, :, 0]}, r"scores must be 3-D \[rows, ranked entries, cores\]"),
    (lambda a: {**a, "scores": a["scores"][:, :0]}, r"scores shape \(14, 0, 2\) must have at least one ranked entry"),
    (lambda a: {**a, "y": a["y"].to("meta")}, "all tensors must be on one device"),
]


@pytest.mark.parametrize("bad, match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_are_refused_and_change_nothing(bad, match):
    hits, sums, ids, y, scores = _case(4)
    args = bad(dict(hits=hits, sums=sums, ids=ids, y=y, scores=scores))
    before = (args["hits"].clone(), args["sums"].clone())
    with pytest.raises(ValueError, match=match):
        ops.layer_stats_accumulate(**args)
    assert torch.equal(args["hits"], before[0]) and torch.equal(args["sums"], before[1])


# ------------------------------------------------------------------ the Triton kernel


def test_interpreter_suite():
    if INTERPRET:
        pytest.skip("already running under the interpreter")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "kernel", __file__]
    proc = subproc.run(cmd, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout and " skipped" not in proc.stdout


@pytest.fixture
def small_blocks(monkeypatch):
    """Launch constants small enough that every kind of program runs several times, with masked
    edges."""
    from triton_interpreter import patch_index

    patch_index()
    from ultramem.ops._triton import layer_stats as tls

    monkeypatch.setitem(tls.LAUNCH, "Y_BLOCK", 8)
    monkeypatch.setitem(tls.LAUNCH, "Y_TILES", 2)
    monkeypatch.setitem(tls.LAUNCH, "R_BLOCK", 8)
    monkeypatch.setitem(tls.LAUNCH, "ID_BLOCK", 16)
    monkeypatch.setitem(tls.LAUNCH, "num_warps", 1)
    return tls


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=range(len(SHAPES)))
def test_kernel_matches_float64(small_blocks, shape, dtype):
    hits, sums, ids, y, scores = _case(5, dtype=dtype, **shape)
    want = _oracle(hits, sums, ids, y, scores)
    small_blocks.layer_stats_accumulate_cuda(hits, sums, ids, y, scores)
    _check((hits, sums), want, dtype)


@needs_interpreter
def test_kernel_reads_strided_scores_and_skips_ids_out_of_range(small_blocks, monkeypatch):
    # unchecked on CUDA (no debug mode), an id outside [0, N) counts nowhere
    hits, sums, ids, y, scores = _case(6, rows=9, k=6, m=3)
    wide = torch.zeros(9, 6, 6, dtype=torch.float32)
    wide[:, :, ::2] = scores
    strided = wide[:, :, ::2]  # [R, k, M] with a core stride of 2
    assert strided.stride() == (36, 6, 2)
    bad = ids.clone()
    bad.view(-1)[[1, 4]] = torch.tensor([-1, 40])
    kept = torch.ones(ids.numel(), dtype=torch.bool)
    kept[[1, 4]] = False
    want = _oracle(hits, sums, ids.reshape(-1)[kept], y, scores)
    monkeypatch.setattr(small_blocks, "check_index_range", lambda *a: None)
    small_blocks.layer_stats_accumulate_cuda(hits, sums, bad, y, strided)
    _check((hits, sums), want, torch.float32)


# ------------------------------------------------------------------ the traced CUDA body


def _trace_cuda_body(deterministic, monkeypatch):
    """The op as AOTAutograd traces it on CUDA: fake CUDA tensors, functionalized, with inline
    launches (a CPU declares an sm_90 target for Triton's compiler); at its end the counters' new
    values are copied back into them, as AOTAutograd keeps a mutation of a graph input."""
    pytest.importorskip("triton")
    if INTERPRET:
        pytest.skip("the interpreter's kernels are not JITFunctions")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from perf.diagnostics import kernel_access as ka
    from ultramem.ops._triton import _launch

    if not ka.analysis_available():
        pytest.skip("needs Inductor's analysis of Triton kernels")
    monkeypatch.setattr(_launch, "INLINE_TRITON", True)
    monkeypatch.setattr(determinism, "_deterministic", deterministic)
    with FakeTensorMode():
        hits = torch.zeros(40, dtype=torch.float64, device="cuda")
        sums = torch.zeros(6, dtype=torch.float64, device="cuda")
        ids = torch.zeros(7, 2, 5, dtype=torch.int64, device="cuda")
        y = torch.empty(7, 12, dtype=torch.bfloat16, device="cuda")
        scores = torch.empty(14, 5, 2, dtype=torch.bfloat16, device="cuda")

    def f(hits, sums, ids, y, scores):
        ops.layer_stats_accumulate(hits, sums, ids, y, scores)
        return hits, sums  # (the counters' new values, which the graph below copies back)

    with ka.declared_cuda_target():
        gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(hits, sums, ids, y, scores)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    counters = [n for n in graph.nodes if n.op == "placeholder"][:2]
    with graph.inserting_before(out):
        for counter, new in zip(counters, out.args[0]):
            graph.call_function(torch.ops.aten.copy_.default, (counter, new))
    out.args = ((),)
    gm.recompile()
    return gm


def test_cuda_body_is_one_launch_that_writes_the_counters_in_place(monkeypatch):
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

    gm = _trace_cuda_body(False, monkeypatch)
    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    launches = [n for n in gm.graph.nodes if n.target is wrapper]
    assert len(launches) == 1, gm.code
    assert set(launches[0].kwargs["tensors_to_clone"]) == {"hits_ptr", "sums_ptr"}
    assert not [n for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "ultramem"], gm.code
    # Inductor's reinplacing then has the launch write the counters (graph inputs) in place:
    # nothing cloned, nothing copied back
    reinplace_inplaceable_ops_core(gm.graph)
    gm.recompile()
    (launch,) = [n for n in gm.graph.nodes if n.target is wrapper]
    assert launch.kwargs["tensors_to_clone"] == [], gm.code
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default)]


def test_cuda_body_in_deterministic_mode_is_the_reference(monkeypatch):
    gm = _trace_cuda_body(True, monkeypatch)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.index_add.default" in called, gm.code
    assert not [c for c in called if "triton_kernel_wrapper" in c], gm.code


def test_cuda_kernel_registered_on_the_opaque_twin():
    pytest.importorskip("triton")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ultramem::layer_stats_accumulate_opaque", "CUDA")
    assert not stats_mod._inline_triton(torch.zeros(1))  # CPU calls go through the twin


# ------------------------------------------------------------------ on a GPU


def _layer_case(seed):
    """A 227M layer's statistics: 12,288 tokens of 32 ids among 1138² values, bf16 output and
    scores of 2 cores, on the GPU, with the float64 result."""
    g = torch.Generator().manual_seed(seed)
    n = 1138 * 1138
    ids = torch.randint(0, n, (12288, 1, 32), generator=g)
    y = torch.randn(12288, 768, generator=g).bfloat16()
    scores = torch.randn(12288, 32, 2, generator=g).bfloat16()
    hits, sums = torch.zeros(n, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    y64, s64 = y.double(), scores.double()
    want_hits = torch.bincount(ids.reshape(-1), minlength=n).double()
    want_sums = torch.stack(
        [y64.sum(), y64.square().sum(), torch.tensor(y.numel()), s64[:, 0].sum(), s64[:, -1].sum(), torch.tensor(12288)]
    ).double()
    dev = [t.cuda() for t in (hits, sums, ids, y, scores)]
    return dev, (want_hits, want_sums)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_on_cuda_matches_float64(compiled, deterministic, monkeypatch):
    monkeypatch.setattr(determinism, "_deterministic", deterministic)
    torch._dynamo.reset()
    dev, want = _layer_case(7)
    call = torch.compile(ops.layer_stats_accumulate, fullgraph=True) if compiled else ops.layer_stats_accumulate
    for _ in range(2):
        call(*dev)
    _check((dev[0].cpu(), dev[1].cpu()), (2 * want[0], 2 * want[1]), torch.bfloat16)
    if deterministic:  # bit-identical on a second run
        again, _ = _layer_case(7)
        for _ in range(2):
            call(*again)
        assert torch.equal(again[1], dev[1])
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_opcheck_on_cuda():
    args = [t.cuda() for t in _case(8, dtype=torch.bfloat16)]
    torch.library.opcheck(torch.ops.ultramem.layer_stats_accumulate.default, args)
