"""The Triton kernels of weighted_lookup, pre_value_gate and gate_lookup under the Triton
interpreter, on CPU tensors, against float64 oracles written here with explicit loops.

The kernel tests run only when TRITON_INTERPRET=1 is set before Triton is imported;
`test_interpreter_suite` starts this module that way in a subprocess, so a plain `pytest` run
covers them too.
"""

from __future__ import annotations

import os
import sys

import pytest
import subproc
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def test_interpreter_suite():
    if INTERPRET:
        pytest.skip("already running under the interpreter")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subproc.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__], timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (see test_interpreter_suite)")


if INTERPRET:
    from triton_interpreter import patch_index

    patch_index()
    from ultramem.ops._triton import gate_lookup as tgl
    from ultramem.ops._triton import pre_value_gate as tpg
    from ultramem.ops._triton import staged_grad as tsg
    from ultramem.ops._triton import weighted_lookup as twl

# Launch shapes the tests run the kernels on, over the launchers' module constants (patched by
# the helpers below), so that the masked edges and several blocks per program run too.
SMALL_BLOCKS = {"BLOCK_T": 2, "BLOCK_E": 2, "BLOCK_D": 8, "num_warps": 1}
SMALL_BLOCKS_DFAST = {**SMALL_BLOCKS, "D_FASTEST": True, "EVICT_FIRST": True}
SMALL_SEGMENT = {"BLOCK_J": 4, "BLOCK_D": 8, "num_warps": 1}
# gate_lookup's forward: D_CHUNKS names the kernel (the column-chunk kernel is the default).
ENTRY_BLOCKS = {**SMALL_BLOCKS, "BLOCK_DP": 8, "D_CHUNKS": False}
CHUNKS = {"BLOCK_D": 16, "BLOCK_DP": 8, "num_warps": 1, "D_CHUNKS": True, "HOIST_V": 0, "EVICT_FIRST": True}
# gate_lookup's backward kernel (also the staged one's)
SMALL_BWD = {"BLOCK_D": 16, "BLOCK_DP": 8, "num_warps": 1}


def launch_shape(mp, module, name: str, keys: dict | None) -> None:
    """`module.name`, a launcher's launch-shape constant, with `keys` over it (None: as it is)."""
    if keys:
        mp.setattr(module, name, {**getattr(module, name), **keys})


def lookup_blocks(mp, blocks: dict | None) -> None:
    """The gather kernels of weighted_lookup's module on `blocks`, and its segment kernel on
    SMALL_SEGMENT with runs cut every 2 entries (None: the launchers' own shapes)."""
    if blocks:
        for name in ("FWD_CONFIG", "BWD_CONFIG", "DOTS_CONFIG"):
            launch_shape(mp, twl, name, blocks)
        launch_shape(mp, twl, "SEGMENT_CONFIG", SMALL_SEGMENT)
        mp.setattr(twl, "SEGMENT_PIECE", 2)


def gate_kernel(mp, blocks: dict | None) -> None:
    """gate_lookup's forward on the kernel `blocks["D_CHUNKS"]` names, with the other keys over
    its launch shape ("CHUNK_GROUP" sets that constant); None: the launcher's choice."""
    if blocks is None:
        return
    keys = dict(blocks)
    chunks = keys.pop("D_CHUNKS")
    if "CHUNK_GROUP" in keys:
        mp.setattr(tgl, "CHUNK_GROUP", keys.pop("CHUNK_GROUP"))
    mp.setattr(tgl, "_use_chunks", lambda *_: chunks)
    launch_shape(mp, tgl, "CHUNKS_CONFIG" if chunks else "ENTRY_BLOCK_CONFIG", keys)


from op_oracles import (  # noqa: E402  (after the interpreter is set up)
    gate_backward_oracle,
    gate_lookup_backward_oracle,
    gate_lookup_oracle,
    gate_oracle,
    lookup_backward_oracle,
    lookup_oracle,
)  # noqa: E402

# ----------------------------------------------------------------------------- inputs


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(t, e, n, g, dtype):
    rows = torch.randint(0, n, (t, e), generator=g)
    if t > 1 and e > 1:
        rows[0, 1] = rows[0, 0]  # a row twice within one token
        rows[1, :] = rows[0, 0]  # and across tokens
    return rows.to(dtype)


def _rand(shape, g, dtype):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (an output element was not written?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _tol(*dtypes):
    if any(d == torch.float16 for d in dtypes):
        return 3e-3
    if all(d == torch.float64 for d in dtypes):
        return 1e-12
    return 1e-5


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last dim is not contiguous in memory."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan") if t.is_floating_point() else 7, dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


# ----------------------------------------------------------------------------- weighted_lookup

LOOKUP_CASES = [
    # (tokens, entries, rows, dim, cores, table dtype, index dtype, blocks)
    (6, 5, 23, 24, 2, torch.float32, torch.int64, None),
    (6, 5, 23, 24, 3, torch.float16, torch.int32, SMALL_BLOCKS),
    (5, 7, 11, 20, 2, torch.float32, torch.int32, SMALL_BLOCKS_DFAST),  # dim not a multiple of 8
    (4, 3, 9, 16, 1, torch.float64, torch.int64, SMALL_BLOCKS),
    (3, 4, 13, 32, 4, torch.float16, torch.int64, None),
]


@needs_interpreter
@pytest.mark.parametrize("case", LOOKUP_CASES)
def test_lookup_forward(case, monkeypatch):
    t, e, n, d, m, dtype, idx, blocks = case
    lookup_blocks(monkeypatch, blocks)
    g = _gen(t * 100 + d + m)
    rows, table, scores = _rows(t, e, n, g, idx), _rand((n, d), g, dtype), _rand((t, e, m), g, dtype)
    ref = lookup_oracle(rows, table, scores)
    out = torch.full((t, d), float("nan"), dtype=dtype)
    twl.weighted_gather(rows, table, scores, out, torch.float64 if dtype == torch.float64 else torch.float32)
    assert _rel(out, ref) < _tol(dtype)
    # The registered launcher: validation, output dtype, non-contiguous inputs.
    out2 = twl.weighted_lookup_cuda(
        rows.t().contiguous().t(), _noncontig(table), scores.transpose(1, 2).contiguous().transpose(1, 2)
    )
    assert out2.dtype == dtype and out2.shape == (t, d)
    assert _rel(out2, ref) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("mode", ["atomic", "sorted"])
@pytest.mark.parametrize("case", LOOKUP_CASES)
def test_lookup_backward(case, mode, monkeypatch):
    t, e, n, d, m, dtype, idx, blocks = case
    lookup_blocks(monkeypatch, blocks)
    deterministic = mode != "atomic"
    g = _gen(t * 10 + e + d + m + len(mode))
    rows, table, scores = _rows(t, e, n, g, idx), _rand((n, d), g, dtype), _rand((t, e, m), g, dtype)
    grad_out = _rand((t, d), g, dtype)
    ref_table, ref_scores = lookup_backward_oracle(grad_out, rows, table, scores)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_table = torch.zeros(n, d, dtype=acc)
    grad_scores = twl.lookup_table_grad(
        grad_out, rows, table, scores, grad_table, accumulate=False, deterministic=deterministic
    )
    assert grad_table.dtype == acc and grad_scores.dtype == dtype
    assert _rel(grad_table, ref_table) < _tol(dtype)
    assert _rel(grad_scores, ref_scores) < _tol(dtype)
    # Accumulating into a persistent buffer adds to what is there.
    start = _rand((n, d), g, acc)
    buf = start.clone()
    grad_scores2 = twl.lookup_table_grad(
        grad_out, rows, table, scores, buf, accumulate=True, deterministic=deterministic
    )
    assert _rel(buf, start.double() + ref_table) < _tol(dtype)
    assert _rel(grad_scores2, ref_scores) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_lookup_backward_launchers(deterministic, monkeypatch):
    from ultramem.ops import determinism

    monkeypatch.setattr(determinism, "_deterministic", deterministic)
    g = _gen(5)
    t, e, n, d, m = 5, 6, 17, 24, 2
    rows, table = _rows(t, e, n, g, torch.int64), _rand((n, d), g, torch.float16)
    scores, grad_out = _rand((t, e, m), g, torch.float16), _rand((t, d), g, torch.float16)
    ref_table, ref_scores = lookup_backward_oracle(grad_out, rows, table, scores)
    grad_table, grad_scores = twl.weighted_lookup_backward_cuda(grad_out, rows, _noncontig(table), scores)
    assert grad_table.dtype == torch.float32 and grad_scores.dtype == torch.float16
    assert _rel(grad_table, ref_table) < 3e-3 and _rel(grad_scores, ref_scores) < 3e-3
    buf = torch.ones(n, d)
    grad_scores = twl.weighted_lookup_backward_accumulate_cuda(buf, grad_out, rows, table, scores)
    assert _rel(buf, ref_table + 1) < 3e-3 and _rel(grad_scores, ref_scores) < 3e-3


@needs_interpreter
@pytest.mark.parametrize("piece", [3, None])
def test_sorted_backward_hot_rows(piece, monkeypatch):
    """Most entries on two rows (runs longer than a piece, the default 64 too): the pieces are
    summed in parallel and added in order; same result as the loops. (Bit-reproducibility needs
    a GPU to be tested: the interpreter runs programs one after another.)"""
    g = _gen(31)
    t, e, n, d, m = 30, 5, 9, 16, 2
    rows = torch.randint(0, n, (t, e), generator=g)
    rows[:, :4] = torch.where(torch.rand(t, 4, generator=g) < 0.7, 2, 5)
    table, scores = _rand((n, d), g, torch.float32), _rand((t, e, m), g, torch.float32)
    grad_out = _rand((t, d), g, torch.float32)
    ref_table, ref_scores = lookup_backward_oracle(grad_out, rows, table, scores)
    launch_shape(monkeypatch, twl, "SEGMENT_CONFIG", {"BLOCK_J": 4, "BLOCK_D": 16, "num_warps": 1})
    if piece:
        monkeypatch.setattr(twl, "SEGMENT_PIECE", piece)
    buf = torch.ones(n, d)
    grad_scores = twl.lookup_table_grad(grad_out, rows, table, scores, buf, accumulate=True, deterministic=True)
    assert _rel(buf, ref_table + 1) < 1e-5 and _rel(grad_scores, ref_scores) < 1e-5


@needs_interpreter
def test_out_of_range_rows_contribute_nothing():
    """Range checks are off on CUDA outside debug mode: bad ids must be skipped, not followed."""
    g = _gen(3)
    t, e, n, d, m = 4, 3, 10, 16, 2
    rows = _rows(t, e, n, g, torch.int64)
    bad = rows.clone()
    bad[0, 0], bad[2, 1] = n + 3, -1
    table, scores = _rand((n, d), g, torch.float32), _rand((t, e, m), g, torch.float32)
    keep = scores.clone()
    keep[0, 0], keep[2, 1] = 0, 0
    out = torch.full((t, d), float("nan"))
    twl.weighted_gather(bad, table, scores, out, torch.float32)
    assert _rel(out, lookup_oracle(rows, table, keep)) < 1e-5
    grad_out = _rand((t, d), g, torch.float32)
    ref_table, _ = lookup_backward_oracle(grad_out, rows, table, keep)
    for deterministic in (False, True):
        grad_table = torch.zeros(n, d)
        twl.lookup_table_grad(grad_out, bad, table, scores, grad_table, accumulate=False, deterministic=deterministic)
        assert _rel(grad_table, ref_table) < 1e-5


@needs_interpreter
def test_empty_inputs():
    table, rows = torch.randn(5, 8), torch.zeros(3, 0, dtype=torch.int64)
    out = twl.weighted_lookup_cuda(rows, table, torch.zeros(3, 0, 2))
    assert out.shape == (3, 8) and (out == 0).all()
    out = twl.weighted_lookup_cuda(torch.zeros(0, 4, dtype=torch.int64), table, torch.zeros(0, 4, 2))
    assert out.shape == (0, 8)
    grad_table, grad_scores = twl.weighted_lookup_backward_cuda(torch.zeros(3, 8), rows, table, torch.zeros(3, 0, 2))
    assert (grad_table == 0).all() and grad_scores.shape == (3, 0, 2)


@pytest.fixture
def launched_grids(monkeypatch):
    """The grids of every interpreted kernel launch."""
    from triton.runtime.interpreter import InterpretedFunction

    grids = []
    run = InterpretedFunction.run

    def recording(self, *args, grid, **kwargs):
        grids.append((self.__name__, tuple(grid) if isinstance(grid, (tuple, list)) else grid))
        return run(self, *args, grid=grid, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    return grids


@needs_interpreter
@pytest.mark.parametrize("t,e", [(0, 3), (3, 0), (0, 0)])
def test_no_tokens_or_entries_launch_no_empty_grid(t, e, launched_grids, monkeypatch):
    """Every launcher on T = 0 or E = 0: outputs of the right shape (zero where they have
    elements), buffers untouched, and no kernel launched on an empty grid."""
    from ultramem.ops.staged_grad import GradStaging

    n, dv, dp, m = 5, 8, 4, 2
    rows = torch.zeros(t, e, dtype=torch.int64)
    values, pre_values, x = torch.randn(n, dv), torch.randn(n, dp), torch.randn(t, dp)
    scores, grad_out, grad_gate = torch.randn(t, e, m), torch.randn(t, dv), torch.randn(t, e)
    buf_v, buf_p = torch.zeros(n, dv), torch.zeros(n, dp)
    out = twl.weighted_lookup_cuda(rows, values, scores)
    assert out.shape == (t, dv) and not out.any()
    grad_table, grad_scores = twl.weighted_lookup_backward_cuda(grad_out, rows, values, scores)
    assert not grad_table.any() and grad_scores.shape == (t, e, m)
    for det in (False, True):
        grad_scores = twl.lookup_table_grad(grad_out, rows, values, scores, buf_v, accumulate=True, deterministic=det)
        assert grad_scores.shape == (t, e, m)
        grad_x = tpg.gate_table_grad(grad_gate, rows, pre_values, x, buf_p, accumulate=True, deterministic=det)
        assert grad_x.shape == (t, dp) and not grad_x.any()
    assert twl.weighted_lookup_backward_accumulate_cuda(buf_v, grad_out, rows, values, scores).shape == (t, e, m)
    gate = tpg.pre_value_gate_cuda(rows, pre_values, x)
    assert gate.shape == (t, e)
    grad_table, grad_x = tpg.pre_value_gate_backward_cuda(grad_gate, rows, pre_values, x)
    assert not grad_table.any() and not grad_x.any()
    assert tpg.pre_value_gate_backward_accumulate_cuda(buf_p, grad_gate, rows, pre_values, x).shape == (t, dp)
    for blocks in (None, ENTRY_BLOCKS, CHUNKS):
        with monkeypatch.context() as mp:
            gate_kernel(mp, blocks)
            out, gate = tgl.gate_lookup_cuda(rows, values, pre_values, x, scores, True)
        assert out.shape == (t, dv) and not out.any() and gate.shape == (t, e)
    for det in (False, True):
        grad_scores, grad_x = tgl.gate_lookup_backward_cuda(
            grad_out, grad_gate, rows, values, pre_values, x, scores, grad_gate, True, buf_v, buf_p, deterministic=det
        )
        assert grad_scores.shape == (t, e, m) and grad_x.shape == (t, dp) and not grad_x.any()
    staging = GradStaging(4, max(e, 1), m, dv, dp, torch.float32, "cpu")
    tsg.staged_gate_lookup_backward_cuda(
        grad_out, None, rows, values, pre_values, x, scores, grad_gate, True, buf_v, buf_p, staging
    )
    lookup_staging = GradStaging(4, max(e, 1), m, dv, 0, torch.float32, "cpu")
    assert tsg.staged_lookup_backward_cuda(grad_out, rows, values, scores, buf_v, lookup_staging).shape == (t, e, m)
    gate_staging = GradStaging(4, max(e, 1), 1, 0, dp, torch.float32, "cpu")
    assert not tsg.staged_gate_backward_cuda(grad_gate, rows, pre_values, x, buf_p, gate_staging).any()
    tsg.sorted_block_add(rows, grad_out, scores, buf_v, torch.float32)
    twl.segment_scatter(rows, grad_out, scores, buf_v, torch.float32, accumulate=True)
    assert staging.flush(buf_v, buf_p, kernels=True) == 0
    assert not buf_v.any() and not buf_p.any()
    empty = [(name, grid) for name, grid in launched_grids if not callable(grid) and 0 in grid]
    assert not empty, empty
    assert t == 0 or launched_grids  # (the recording works: with tokens, some kernels do run)


@needs_interpreter
def test_accumulate_launchers_refuse_bad_rows_before_writing():
    g = _gen(41)
    t, e, n, d = 3, 4, 6, 8
    rows = _rows(t, e, n, g, torch.int64)
    rows[1, 2] = n
    table, x = _rand((n, d), g, torch.float32), _rand((t, d), g, torch.float32)
    scores, grad_out, grad_gate = (
        _rand((t, e, 2), g, torch.float32),
        _rand((t, d), g, torch.float32),
        _rand((t, e), g, torch.float32),
    )
    buf = torch.zeros(n, d)
    match = rf"^ultramem::weighted_lookup_backward_accumulate: rows has values in \[0, {n}\], outside the valid range"
    with pytest.raises(ValueError, match=match):
        twl.weighted_lookup_backward_accumulate_cuda(buf, grad_out, rows, table, scores)
    with pytest.raises(ValueError, match=r"^ultramem::pre_value_gate_backward_accumulate: rows has values"):
        tpg.pre_value_gate_backward_accumulate_cuda(buf, grad_gate, rows, table, x)
    with pytest.raises(ValueError, match=r"^ultramem::weighted_lookup_backward: rows has values"):
        twl.weighted_lookup_backward_cuda(grad_out, rows, table, scores)
    with pytest.raises(ValueError, match=r"^ultramem::pre_value_gate_backward: rows has values"):
        tpg.pre_value_gate_backward_cuda(grad_gate, rows, table, x)
    assert not buf.any()


@needs_interpreter
def test_launchers_validate_like_the_reference():
    with pytest.raises(ValueError, match="scores"):
        twl.weighted_lookup_cuda(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(5, 8), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="rows"):
        twl.weighted_lookup_cuda(torch.zeros(3, 4), torch.zeros(5, 8), torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="x"):
        tpg.pre_value_gate_cuda(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(5, 8), torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"outside the valid range"):
        twl.weighted_lookup_cuda(torch.full((3, 4), 9), torch.zeros(5, 8), torch.zeros(3, 4, 2))


# ----------------------------------------------------------------------------- pre_value_gate

GATE_CASES = [
    (6, 5, 23, 24, torch.float32, torch.int64, None),
    (5, 7, 11, 20, torch.float16, torch.int32, SMALL_BLOCKS),
    (4, 3, 9, 16, torch.float64, torch.int32, SMALL_BLOCKS),
]


@needs_interpreter
@pytest.mark.parametrize("case", GATE_CASES)
def test_gate_forward(case, monkeypatch):
    t, e, n, d, dtype, idx, blocks = case
    lookup_blocks(monkeypatch, blocks)
    g = _gen(t + e + d)
    rows, table, x = _rows(t, e, n, g, idx), _rand((n, d), g, dtype), _rand((t, d), g, dtype)
    gate = tpg.pre_value_gate_cuda(rows, _noncontig(table), x)
    assert gate.dtype == dtype and gate.shape == (t, e)
    assert _rel(gate, gate_oracle(rows, table, x)) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", GATE_CASES)
def test_gate_backward(case, deterministic, monkeypatch):
    t, e, n, d, dtype, idx, blocks = case
    lookup_blocks(monkeypatch, blocks)
    g = _gen(t + 2 * e + d)
    rows, table, x = _rows(t, e, n, g, idx), _rand((n, d), g, dtype), _rand((t, d), g, dtype)
    grad_gate = _rand((t, e), g, dtype)
    ref_table, ref_x = gate_backward_oracle(grad_gate, rows, table, x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    start = _rand((n, d), g, acc)
    buf = start.clone()
    grad_x = tpg.gate_table_grad(grad_gate, rows, table, x, buf, accumulate=True, deterministic=deterministic)
    assert grad_x.dtype == dtype
    assert _rel(buf, start.double() + ref_table) < _tol(dtype)
    assert _rel(grad_x, ref_x) < _tol(dtype)
    grad_table, grad_x = tpg.pre_value_gate_backward_cuda(grad_gate, rows, table, x)
    assert grad_table.dtype == acc
    assert _rel(grad_table, ref_table) < _tol(dtype) and _rel(grad_x, ref_x) < _tol(dtype)


# ----------------------------------------------------------------------------- gate_lookup (fused)

FUSED_CASES = [
    # (tokens, entries, rows, vdim, pre_dim, cores, gelu, dtype, index dtype, blocks)
    (6, 5, 23, 24, 16, 2, True, torch.float32, torch.int64, None),
    (5, 7, 11, 24, 20, 3, False, torch.float16, torch.int32, ENTRY_BLOCKS),
    (
        4,
        3,
        9,
        16,
        24,
        1,
        True,
        torch.float64,
        torch.int64,
        {**SMALL_BLOCKS_DFAST, "BLOCK_DP": 8, "HOIST_V": False, "D_CHUNKS": False},
    ),
    # The column-chunk kernel: entries not a power of 2, dims not multiples of the chunk (a masked
    # last chunk), chunks within one core and chunks straddling two, several groups of chunks
    # (CHUNK_GROUP 0: one chunk per group), V chunks hoisted before the gate, fp16, int32 ids.
    (6, 5, 23, 40, 24, 2, True, torch.float32, torch.int64, CHUNKS),
    (6, 5, 23, 40, 24, 2, True, torch.float32, torch.int32, {**CHUNKS, "CHUNK_GROUP": 0, "HOIST_V": 3}),
    (5, 7, 11, 24, 20, 3, False, torch.float16, torch.int32, {**CHUNKS, "HOIST_V": 1}),
    (
        3,
        12,
        9,
        48,
        40,
        4,
        True,
        torch.float16,
        torch.int32,
        {**CHUNKS, "BLOCK_DP": 16, "CHUNK_GROUP": 2 * 16 * 16, "HOIST_V": 1},  # two 16 x 16 chunks per group
    ),
    (4, 3, 9, 16, 24, 1, True, torch.float64, torch.int64, {**CHUNKS, "EVICT_FIRST": False}),
    (3, 1, 5, 8, 8, 1, True, torch.float32, torch.int64, CHUNKS),
    (2, 200, 300, 24, 16, 2, True, torch.float32, torch.int64, CHUNKS),  # 256 x 16 > CHUNK_TILE: 8 columns
    # The default's choice by shape: many entries, narrow rows -> entry-block; wide rows -> chunks.
    (2, 40, 50, 16, 8, 2, True, torch.float32, torch.int64, None),
    (2, 40, 50, 264, 8, 2, True, torch.float32, torch.int32, None),
]


@needs_interpreter
def test_gate_lookup_default_kernel_by_shape(monkeypatch):
    picked = []
    real = tgl._launch_chunks
    monkeypatch.setattr(tgl, "_launch_chunks", lambda *a: (picked.append("chunks"), real(*a)))
    for e, dv in ((32, 16), (33, 16), (33, 264), (129, 264)):
        picked.clear()
        g = _gen(e + dv)
        rows = _rows(2, e, 50, g, torch.int64)
        tgl.gate_lookup_cuda(
            rows,
            _rand((50, dv), g, torch.float32),
            _rand((50, 8), g, torch.float32),
            _rand((2, 8), g, torch.float32),
            _rand((2, e, 2), g, torch.float32),
            True,
        )
        assert (picked == ["chunks"]) == tgl._use_chunks(e, dv, 8) == (e <= 32 or (dv > 256 and e <= 128))


@needs_interpreter
@pytest.mark.parametrize("case", FUSED_CASES)
def test_gate_lookup_forward(case, monkeypatch):
    t, e, n, dv, dp, m, gelu, dtype, idx, blocks = case
    gate_kernel(monkeypatch, blocks)
    g = _gen(t + e + dv + dp)
    rows = _rows(t, e, n, g, idx)
    values, pre_values = _rand((n, dv), g, dtype), _rand((n, dp), g, dtype)
    x, scores = _rand((t, dp), g, dtype), _rand((t, e, m), g, dtype)
    ref_out, ref_gate = gate_lookup_oracle(rows, values, pre_values, x, scores, gelu)
    out, gate = tgl.gate_lookup_cuda(rows, values, _noncontig(pre_values), x, scores, gelu)
    assert out.dtype == dtype and gate.dtype == dtype
    assert _rel(out, ref_out) < _tol(dtype)
    assert _rel(gate, ref_gate) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("blocks", [ENTRY_BLOCKS, CHUNKS])
def test_gate_lookup_out_of_range_rows_contribute_nothing(blocks, monkeypatch):
    """Bad ids give a gate of 0 and no output contribution; they are never dereferenced. (The
    launcher's range check runs on CPU tensors; on CUDA it is off outside debug mode.)"""
    monkeypatch.setattr(tgl, "check_index_range", lambda *args: None)
    gate_kernel(monkeypatch, blocks)
    g = _gen(17)
    t, e, n, dv, dp, m = 4, 5, 10, 24, 16, 2
    rows = _rows(t, e, n, g, torch.int64)
    bad = rows.clone()
    bad[0, 0], bad[2, 4], bad[3, 1] = n, -1, n + 1000
    values, pre_values = _rand((n, dv), g, torch.float32), _rand((n, dp), g, torch.float32)
    x, scores = _rand((t, dp), g, torch.float32), _rand((t, e, m), g, torch.float32)
    keep = scores.clone()
    for ti, ei in ((0, 0), (2, 4), (3, 1)):
        keep[ti, ei] = 0
        scores[ti, ei] = float("inf")  # not even a bad score may leak in
    ref_out, ref_gate = gate_lookup_oracle(rows, values, pre_values, x, keep, True)
    for ti, ei in ((0, 0), (2, 4), (3, 1)):
        ref_gate[ti, ei] = 0
    out, gate = tgl.gate_lookup_cuda(bad, values, pre_values, x, scores, True)
    assert _rel(out, ref_out) < 1e-5 and _rel(gate, ref_gate) < 1e-5


@needs_interpreter
def test_gate_lookup_chunks_mixed_dtypes_and_layouts(monkeypatch):
    """bf16 tables, fp32 activations (the layers' compute copy), transposed ids and scores."""
    gate_kernel(monkeypatch, CHUNKS)
    g = _gen(23)
    t, e, n, dv, dp, m = 5, 6, 19, 32, 24, 2
    rows = _rows(t, e, n, g, torch.int32)
    values, pre_values = _rand((n, dv), g, torch.bfloat16), _rand((n, dp), g, torch.bfloat16)
    x, scores = _rand((t, dp), g, torch.float32), _rand((t, e, m), g, torch.float32)
    ref_out, ref_gate = gate_lookup_oracle(rows, values, pre_values, x, scores, True)
    out, gate = tgl.gate_lookup_cuda(
        rows.t().contiguous().t(),
        _noncontig(values),
        pre_values,
        _noncontig(x),
        scores.transpose(1, 2).contiguous().transpose(1, 2),
        True,
    )
    assert out.dtype == torch.float32 and gate.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-5 and _rel(gate, ref_gate) < 1e-5


@needs_interpreter
def test_gate_lookup_chunks_no_entries(monkeypatch):
    gate_kernel(monkeypatch, CHUNKS)
    rows = torch.zeros(3, 0, dtype=torch.int64)
    out, gate = tgl.gate_lookup_cuda(
        rows, torch.randn(5, 8), torch.randn(5, 4), torch.randn(3, 4), torch.zeros(3, 0, 2), True
    )
    assert out.shape == (3, 8) and (out == 0).all() and gate.shape == (3, 0)


# ----------------------------------------------------------------------------- gate_lookup backward

FUSED_BWD_CASES = [
    # (tokens, entries, rows, vdim, pre_vdim, cores, gelu, dtype, index dtype, grad_gate, launch shape:
    # keys over BWD_CONFIG, or "CHUNK_GROUP", or "segment" over weighted_lookup's SEGMENT_CONFIG)
    (5, 6, 13, 24, 16, 2, True, torch.float32, torch.int64, True, {"BLOCK_D": 8, "BLOCK_DP": 8}),
    (4, 7, 9, 24, 20, 3, False, torch.float32, torch.int32, False, {"BLOCK_D": 16, "BLOCK_DP": 8}),  # chunks span cores
    (3, 5, 11, 32, 24, 4, True, torch.float16, torch.int64, True, None),
    (6, 3, 8, 16, 8, 1, True, torch.float32, torch.int32, True, {"BLOCK_D": 8, "CHUNK_GROUP": 0}),
    # sorted path: two positions per segment program, split columns
    (
        5,
        4,
        7,
        24,
        16,
        3,
        True,
        torch.float32,
        torch.int32,
        False,
        {"segment": {"BLOCK_J": 2, "BLOCK_D": 8, "num_warps": 1}},
    ),
]


@needs_interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", FUSED_BWD_CASES)
def test_gate_lookup_backward(case, deterministic, monkeypatch):
    """Both tables' gradients added into buffers that already hold something, grad_x and
    grad_scores returned, all against the float64 loops; atomics, or sorted (deterministic)."""
    t, e, n, dv, dp, m, gelu, dtype, idx, with_grad_gate, config = case
    keys = dict(config or {})
    launch_shape(monkeypatch, twl, "SEGMENT_CONFIG", keys.pop("segment", None))
    if "CHUNK_GROUP" in keys:
        monkeypatch.setattr(tgl, "CHUNK_GROUP", keys.pop("CHUNK_GROUP"))
    launch_shape(monkeypatch, tgl, "BWD_CONFIG", keys)
    g = _gen(t * e + dv + m)
    rows = _rows(t, e, n, g, idx)
    values, pre_values = _rand((n, dv), g, dtype), _rand((n, dp), g, dtype)
    x, scores = _noncontig(_rand((t, dp), g, dtype)), _rand((t, e, m), g, dtype)
    gate = _rand((t, e), g, dtype)
    grad_out = _rand((t, dv), g, dtype)
    grad_gate = _rand((t, e), g, dtype) if with_grad_gate else None
    start_v, start_p = _rand((n, dv), g, torch.float32), _rand((n, dp), g, torch.float32)
    buf_v, buf_p = start_v.clone(), start_p.clone()
    grad_scores, grad_x = tgl.gate_lookup_backward_cuda(
        grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, buf_v, buf_p, deterministic
    )
    want = gate_lookup_backward_oracle(grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu)
    assert grad_scores.dtype == dtype and grad_x.dtype == dtype
    assert _rel(buf_v - start_v, want[0]) < _tol(dtype)
    assert _rel(buf_p - start_p, want[1]) < _tol(dtype)
    assert _rel(grad_x, want[2]) < _tol(dtype)
    assert _rel(grad_scores, want[3]) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("mode", ["atomics", "deterministic", "staged"])
def test_gate_lookup_backward_out_of_range_rows_contribute_nothing(mode):
    from ultramem.ops.staged_grad import GradStaging

    g = _gen(29)
    t, e, n, dv, dp, m = 4, 5, 10, 16, 8, 2
    rows = _rows(t, e, n, g, torch.int64)
    bad = rows.clone()
    bad[0, 0], bad[2, 4] = n, -1
    values, pre_values = _rand((n, dv), g, torch.float32), _rand((n, dp), g, torch.float32)
    x, scores, gate = (
        _rand((t, dp), g, torch.float32),
        _rand((t, e, m), g, torch.float32),
        _rand((t, e), g, torch.float32),
    )
    grad_out, grad_gate = _rand((t, dv), g, torch.float32), _rand((t, e), g, torch.float32)
    keep_scores, keep_gate, keep_grad_gate = scores.clone(), gate.clone(), grad_gate.clone()
    for ti, ei in ((0, 0), (2, 4)):
        keep_scores[ti, ei] = keep_gate[ti, ei] = keep_grad_gate[ti, ei] = 0
        scores[ti, ei] = gate[ti, ei] = float("inf")  # not even a bad score may leak in
    want = gate_lookup_backward_oracle(
        grad_out, keep_grad_gate, rows, values, pre_values, x, keep_scores, keep_gate, True
    )
    buf_v, buf_p = torch.zeros(n, dv), torch.zeros(n, dp)
    args = (grad_out, grad_gate, bad, values, pre_values, x, scores, gate, True, buf_v, buf_p)
    staging = None
    if mode == "staged":
        staging = GradStaging(t, e, m, dv, dp, torch.float32, "cpu")
        grad_scores, grad_x = tsg.staged_gate_lookup_backward_cuda(*args, staging)
    else:
        grad_scores, grad_x = tgl.gate_lookup_backward_cuda(*args, deterministic=mode == "deterministic")
    if staging is not None:  # the bad ids are staged as they are; the flush skips them
        assert staging.flush(buf_v, buf_p, kernels=True) == t
    assert _rel(buf_v, want[0]) < 1e-5 and _rel(buf_p, want[1]) < 1e-5 and _rel(grad_x, want[2]) < 1e-5
    for ti, ei in ((0, 0), (2, 4)):
        want[3][ti, ei] = 0
    assert _rel(grad_scores, want[3]) < 1e-5


@needs_interpreter
def test_gate_lookup_backward_no_entries():
    grad_scores, grad_x = tgl.gate_lookup_backward_cuda(
        torch.randn(3, 8),
        None,
        torch.zeros(3, 0, dtype=torch.int64),
        torch.randn(5, 8),
        torch.randn(5, 4),
        torch.randn(3, 4),
        torch.zeros(3, 0, 2),
        torch.zeros(3, 0),
        True,
        torch.zeros(5, 8),
        torch.zeros(5, 4),
    )
    assert grad_scores.shape == (3, 0, 2) and grad_x.shape == (3, 4) and (grad_x == 0).all()


# ----------------------------------------------------------------------------- staged table gradients


@needs_interpreter
@pytest.mark.parametrize(
    "case",
    [
        (37, 5, 11, 24, 2, torch.float32, 16, 8, 1),
        (20, 7, 200, 16, 1, torch.float32, 8, 16, 1),
        (30, 4, 3, 32, 4, torch.float16, 64, 8, 3),
        (25, 3, 17, 40, 2, torch.float32, 8, 16, 2),
    ],
)
def test_sorted_block_add(case, monkeypatch):
    """grad_table[row] += Σ scores · g[token] over row-sorted blocks (runs crossing blocks, a
    few hot rows, ids out of range skipped, several column chunks per program, one past the
    last column) against float64 loops."""
    t, e, n, d, m, dtype, bj, bd, chunks = case
    g = _gen(t + e + n)
    rows = _rows(t, e, n, g, torch.int32)
    rows[2, 0], rows[3, 1] = n + 3, -1  # out of range: contribute nothing
    src = _rand((t, d), g, dtype)
    scores = _rand((t, e, m), g, torch.float32) if m > 1 else _rand((t, e), g, torch.float32)
    start = _rand((n, d), g, torch.float32)
    want = start.double().clone()
    s3 = scores.double().reshape(t, e, m)
    for ti in range(t):
        for ei in range(e):
            r = int(rows[ti, ei])
            if 0 <= r < n:
                want[r] += s3[ti, ei].repeat_interleave(d // m) * src[ti].double()
    buf = start.clone()
    # programs looping over blocks (3 under the interpreter), and one program per block (chunks 2)
    shape = {"BLOCK_J": bj, "BLOCK_D": bd, "CHUNKS": chunks, "num_warps": 1, "PROGRAMS_PER_SM": 0 if chunks == 2 else 1}
    launch_shape(monkeypatch, tsg, "BLOCK_ADD_CONFIG", shape)
    tsg.sorted_block_add(rows, src, scores, buf, torch.float32)
    assert _rel(buf - start, want - start.double()) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize(
    "case",
    [
        (torch.float32, 5, 24, 16, 2, True),
        (torch.float16, 5, 24, 16, 2, True),
        (torch.float32, 7, 16, 8, 1, False),
        (torch.float32, 3, 24, 40, 3, True),
    ],
)
def test_gate_lookup_backward_staged_then_flushed(case, monkeypatch):
    """Three backwards into a staging area with room for two: the first two are staged (no
    table writes), the third adds with atomics; after the flush (sort + block adds) both
    buffers hold the sum of all three, grad_x and grad_scores come out as without staging."""
    from ultramem.ops.staged_grad import GradStaging

    dtype, e, dv, dp, m, gelu = case
    launch_shape(monkeypatch, tgl, "BWD_CONFIG", SMALL_BWD)
    t, n = 6, 9
    g = _gen(17 + e + m)
    values, pre_values = _rand((n, dv), g, dtype), _rand((n, dp), g, dtype)
    staging = GradStaging(2 * t + 1, e, m, dv, dp, dtype, "cpu")
    start_v, start_p = _rand((n, dv), g, torch.float32), _rand((n, dp), g, torch.float32)
    buf_v, buf_p = start_v.clone(), start_p.clone()
    want_v, want_p = torch.zeros(n, dv, dtype=torch.float64), torch.zeros(n, dp, dtype=torch.float64)
    for call in range(3):
        rows = _rows(t, e, n, g, torch.int64 if call else torch.int32)
        x, scores = _rand((t, dp), g, dtype), _rand((t, e, m), g, dtype)
        gate, grad_out = _rand((t, e), g, dtype), _rand((t, dv), g, dtype)
        grad_gate = _rand((t, e), g, dtype) if call == 1 else None
        want = gate_lookup_backward_oracle(grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu)
        want_v += want[0]
        want_p += want[1]
        grad_scores, grad_x = tsg.staged_gate_lookup_backward_cuda(
            grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, buf_v, buf_p, staging
        )
        assert _rel(grad_x, want[2]) < _tol(dtype) and _rel(grad_scores, want[3]) < _tol(dtype)
        assert staging.staged_tokens() == min(call + 1, 2) * t
        assert staging.fill[1] == 0  # the programs' count, reset by the last of them
        if call < 2:  # staged: the buffers are untouched so far
            assert torch.equal(buf_v, start_v) and torch.equal(buf_p, start_p)
            assert torch.equal(staging.rows[call * t : (call + 1) * t], rows.to(torch.int32))
    assert _rel(buf_v - start_v, want[0]) < _tol(dtype)  # the third call's atomics
    # without waiting for the fill level: the whole area is sorted, the stale slot past the
    # fill is skipped on the device
    staging.rows[2 * t] = 0
    staging.eff[2 * t] = 1e6
    staging.grad_g[2 * t] = 1e6
    assert staging.flush(buf_v, buf_p, kernels=True, wait=False) is None
    assert staging.staged_tokens() == 0
    assert _rel(buf_v - start_v, want_v) < _tol(dtype) and _rel(buf_p - start_p, want_p) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("op", ["lookup", "gate"])
@pytest.mark.parametrize("case", [(torch.float32, 5, 24, 2), (torch.float16, 7, 16, 1), (torch.float32, 3, 40, 4)])
def test_one_table_backward_staged_then_flushed(op, case, monkeypatch):
    """`weighted_lookup`'s and `pre_value_gate`'s staged backwards (the fused backward kernel
    with one table): three calls into a staging area with room for two, the third added with
    atomics; after the flush the buffer holds all three, and grad_scores / grad_x are those of
    the float64 oracle."""
    from ultramem.ops.staged_grad import GradStaging

    dtype, e, d, m = case
    launch_shape(monkeypatch, tgl, "BWD_CONFIG", SMALL_BWD)
    m = m if op == "lookup" else 1
    t, n = 6, 9
    g = _gen(31 + e + d + m + len(op))
    table = _rand((n, d), g, dtype)
    staging = GradStaging(2 * t + 1, e, m, d if op == "lookup" else 0, 0 if op == "lookup" else d, dtype, "cpu")
    start = _rand((n, d), g, torch.float32)
    buf = start.clone()
    want_table = torch.zeros(n, d, dtype=torch.float64)
    for call in range(3):
        rows = _rows(t, e, n, g, torch.int64 if call else torch.int32)
        if call == 1:
            rows[2, 0] = n + 1  # out of range: staged as it is, skipped by the flush
        src = _rand((t, d), g, dtype)  # grad_out (lookup) or x (gate)
        if op == "lookup":
            scores = _rand((t, e, m), g, dtype)
            want = lookup_backward_oracle(src, rows.clamp(max=n - 1), table, scores * (rows < n)[..., None])
            grad = tsg.staged_lookup_backward_cuda(src, rows, table, scores, buf, staging)
        else:
            grad_gate = _rand((t, e), g, dtype)
            want = gate_backward_oracle(grad_gate * (rows < n), rows.clamp(max=n - 1), table, src)
            grad = tsg.staged_gate_backward_cuda(grad_gate, rows, table, src, buf, staging)
        want_table += want[0]
        if op == "lookup":  # an out-of-range entry's dots are 0
            oor = (rows >= n)[..., None]
            assert not grad.masked_select(oor).any()
            assert _rel(grad.masked_fill(oor, 0), want[1].masked_fill(oor, 0)) < _tol(dtype)
        else:
            assert _rel(grad, want[1]) < _tol(dtype)
        assert grad.dtype == dtype
        assert staging.staged_tokens() == min(call + 1, 2) * t
        assert staging.fill[1] == 0
        if call < 2:
            assert torch.equal(buf, start) and torch.equal(
                staging.rows[call * t : (call + 1) * t], rows.to(torch.int32)
            )
    assert _rel(buf - start, want[0]) < _tol(dtype)  # the third call's atomics
    staging.rows[2 * t] = 0  # a stale slot past the fill level: skipped
    (staging.eff if op == "lookup" else staging.grad_g)[2 * t] = 1e6
    assert (
        staging.flush(buf if op == "lookup" else None, None if op == "lookup" else buf, kernels=True, wait=False)
        is None
    )
    assert staging.staged_tokens() == 0
    assert _rel(buf - start, want_table) < _tol(dtype)


@needs_interpreter
@pytest.mark.parametrize("staged", [False, True])
def test_gate_lookup_into_cuda_body(staged, monkeypatch):
    """gate_lookup_into's CUDA backward (`gate_lookup_into._cuda`, what its traced body launches)
    with the buffers and the staging area handed over as tensors: two calls, the second finding
    no room when staged; after the flush the buffers gain both calls' table gradients."""
    import importlib

    from ultramem.ops.staged_grad import GradStaging

    body = importlib.import_module("ultramem.ops.gate_lookup_into")._cuda
    launch_shape(monkeypatch, tgl, "BWD_CONFIG", SMALL_BWD)
    t, e, n, dv, dp, m = 6, 5, 9, 24, 16, 2
    g = _gen(29)
    values, pre_values = _rand((n, dv), g, torch.float32), _rand((n, dp), g, torch.float32)
    staging = GradStaging(t + 2, e, m, dv, dp, torch.float32, "cpu") if staged else None
    stage = staging.tensors() if staged else (None,) * 6
    bufs = [torch.zeros(n, dv), torch.zeros(n, dp)]
    want_v, want_p = torch.zeros(n, dv, dtype=torch.float64), torch.zeros(n, dp, dtype=torch.float64)
    for call in range(2):
        rows = _rows(t, e, n, g, torch.int64)
        x, scores = _rand((t, dp), g, torch.float32), _rand((t, e, m), g, torch.float32)
        gate, grad_out = _rand((t, e), g, torch.float32), _rand((t, dv), g, torch.float32)
        want = gate_lookup_backward_oracle(grad_out, None, rows, values, pre_values, x, scores, gate, True)
        want_v += want[0]
        want_p += want[1]
        grad_scores, grad_x = body(grad_out, None, rows, values, pre_values, x, scores, gate, True, *bufs, stage)
        assert _rel(grad_x, want[2]) < _tol(torch.float32) and _rel(grad_scores, want[3]) < _tol(torch.float32)
        if staged and call == 0:
            assert staging.staged_tokens() == t and not bufs[0].any()  # staged, nothing added yet
    if staged:
        assert staging.staged_tokens() == t  # the second call found no room: added at once
        staging.flush(*bufs)
    assert _rel(bufs[0], want_v) < _tol(torch.float32) and _rel(bufs[1], want_p) < _tol(torch.float32)


@needs_interpreter
@pytest.mark.parametrize("staged", [False, True])
def test_weighted_lookup_into_cuda_body(staged, monkeypatch):
    """The same for weighted_lookup_into's CUDA backward (one table, a values-only staging area)."""
    import importlib

    from ultramem.ops.staged_grad import GradStaging

    body = importlib.import_module("ultramem.ops.weighted_lookup_into")._cuda
    launch_shape(monkeypatch, tgl, "BWD_CONFIG", SMALL_BWD)
    t, e, n, d, m = 6, 5, 9, 24, 2
    g = _gen(31)
    table = _rand((n, d), g, torch.float32)
    staging = GradStaging(t + 2, e, m, d, 0, torch.float32, "cpu") if staged else None
    stage = (staging.rows, staging.eff, staging.grad_out, staging.fill) if staged else (None,) * 4
    buf = torch.zeros(n, d)
    want = torch.zeros(n, d, dtype=torch.float64)
    for call in range(2):
        rows = _rows(t, e, n, g, torch.int64)
        scores, grad_out = _rand((t, e, m), g, torch.float32), _rand((t, d), g, torch.float32)
        g_table, g_scores = lookup_backward_oracle(grad_out, rows, table, scores)
        want += g_table
        grad_scores = body(grad_out, rows, table, scores, buf, stage)
        assert _rel(grad_scores, g_scores) < _tol(torch.float32)
        if staged and call == 0:
            assert staging.staged_tokens() == t and not buf.any()
    if staged:
        assert staging.staged_tokens() == t
        staging.flush(buf)
    assert _rel(buf, want) < _tol(torch.float32)
