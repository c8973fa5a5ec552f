"""ultramem::layer_stats_accumulate on CPU: the reference against float64 sums written here,
opcheck, compile, bad inputs; and its Triton kernel under the interpreter (in a subprocess, as the
other kernel tests). Its CUDA body as torch.compile traces it is in test_kernel_access.py, the
kernel on a GPU in test_inline_triton_cuda.py."""

from __future__ import annotations

import os

import pytest
import torch
from triton_interpreter import assert_kernel_tests_pass_interpreted

import ultramem.ops as ops
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
    dict(ids_shape=(0,), y_shape=(0, 4), rows=0),  # nothing at all: no launch
    dict(ids_shape=(0,), y_shape=(0, 4), rows=3),  # no y but rows: their count still added
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
    assert_kernel_tests_pass_interpreted(__file__, timeout=600)


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
    # unchecked on CUDA (no debug mode), an id outside [0, N) counts nowhere: not in the counters,
    # not in the cells either side of them
    hits, sums, ids, y, scores = _case(6, rows=9, k=6, m=3)
    wide = torch.zeros(9, 6, 6, dtype=torch.float32)
    wide[:, :, ::2] = scores
    strided = wide[:, :, ::2]  # [R, k, M] with a core stride of 2
    assert strided.stride() == (36, 6, 2)
    bad = ids.clone()
    bad.view(-1)[[1, 4, 7]] = torch.tensor([-1, 40, 41])
    kept = torch.ones(ids.numel(), dtype=torch.bool)
    kept[[1, 4, 7]] = False
    want = _oracle(hits, sums, ids.reshape(-1)[kept], y, scores)
    guarded = torch.zeros(hits.numel() + 2, dtype=torch.float64)
    guarded[1:-1] = hits
    monkeypatch.setattr(small_blocks, "check_index_range", lambda *a: None)
    small_blocks.layer_stats_accumulate_cuda(guarded[1:-1], sums, bad, y, strided)
    _check((guarded[1:-1], sums), want, torch.float32)
    assert guarded[0] == 0 and guarded[-1] == 0


def test_reference_unchecked_skips_ids_out_of_range(monkeypatch):
    # the reference as deterministic mode runs it on CUDA (no range check): as the kernel
    monkeypatch.setattr(stats_mod, "check_index_range", lambda *a: None)
    hits, sums, ids, y, scores = _case(9)
    bad = ids.clone()
    bad.view(-1)[[1, 4]] = torch.tensor([-3, 40])
    kept = torch.ones(ids.numel(), dtype=torch.bool)
    kept[[1, 4]] = False
    want = _oracle(hits, sums, ids.reshape(-1)[kept], y, scores)
    stats_mod.accumulate_reference(hits, sums, bad, y, scores)
    _check((hits, sums), want, torch.float32)
