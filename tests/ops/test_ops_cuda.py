"""The table-gradient backwards on a CUDA device (skipped without one): what the interpreter cannot
show. The op's dispatch (atomics, sorted in deterministic mode, the separate backwards above
BWD_MAX_ENTRIES), bit-reproducibility of the sorted path, hot rows (runs longer than a
segment piece), and the staged path with its overflow and flush, against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from op_oracles import gate_lookup_backward_oracle

from ultramem.ops import determinism
from ultramem.ops._triton import gate_lookup as tgl
from ultramem.ops.gate_lookup import gate_lookup_backward_into
from ultramem.ops.table_grad import register_grad_buffer, release_grad_buffer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(t, e, n, dv, dp, m, hot: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n, (t, e), generator=g)
    if hot:  # a share of all picks on two rows: runs far longer than a segment piece
        rows = torch.where(torch.rand(t, e, generator=g) < hot, torch.randint(0, 2, (t, e), generator=g), rows)
    values, pre_values = torch.randn(n, dv, generator=g), torch.randn(n, dp, generator=g) / dp**0.5
    x, scores, gate = torch.randn(t, dp, generator=g), torch.randn(t, e, m, generator=g), torch.randn(t, e, generator=g)
    grad_out, grad_gate = torch.randn(t, dv, generator=g), torch.randn(t, e, generator=g)
    return grad_out, grad_gate, rows, values, pre_values, x, scores, gate


def _run(args, deterministic: bool, monkeypatch):
    monkeypatch.setattr(determinism, "_deterministic", deterministic)
    dev = [a.cuda() for a in args]
    bufs = [torch.zeros(args[3].shape, device="cuda"), torch.zeros(args[4].shape, device="cuda")]
    ids = [register_grad_buffer(b) for b in bufs]
    try:
        grad_scores, grad_x = gate_lookup_backward_into(*dev[:8], True, *ids)
    finally:
        for i in ids:
            release_grad_buffer(i)
    return [b.cpu() for b in bufs] + [grad_x.cpu(), grad_scores.cpu()]


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("hot", [0.0, 0.6])
@pytest.mark.parametrize("entries", [8, 160])  # 160: above BWD_MAX_ENTRIES, the separate backwards
def test_gate_lookup_backward_into_on_cuda(hot, entries, monkeypatch):
    assert 160 > tgl.BWD_MAX_ENTRIES >= 8
    args = _inputs(64, entries, 50, 24, 16, 2, hot, seed=entries + int(hot * 10))
    want = gate_lookup_backward_oracle(*args, True)
    atomics = _run(args, False, monkeypatch)
    sorted_1 = _run(args, True, monkeypatch)
    sorted_2 = _run(args, True, monkeypatch)
    for got in (atomics, sorted_1):
        for g, w in zip(got, want):
            assert _rel(g, w) < 1e-5
    for a, b in zip(sorted_1, sorted_2):  # the sorted path is bit-reproducible
        assert torch.equal(a, b)


@pytest.mark.parametrize("hot", [0.0, 0.6])
def test_gate_lookup_backward_staged_on_cuda(hot, monkeypatch):
    """Through the op with a registered staging area (room for one call and a half): the first
    call stages, the second adds with atomics (overflow), the flush adds the first; both buffers
    then hold the sum of both calls' gradients (float64 oracle), the other outputs are as usual."""
    from ultramem.ops.staged_grad import GradStaging, register_staging

    monkeypatch.setattr(determinism, "_deterministic", False)
    t, e, n, dv, dp, m = 96, 8, 50, 24, 16, 2
    calls = [_inputs(t, e, n, dv, dp, m, hot, seed=40 + i) for i in range(2)]
    bufs = [torch.zeros(n, dv, device="cuda"), torch.zeros(n, dp, device="cuda")]
    ids = [register_grad_buffer(b) for b in bufs]
    staging = GradStaging(t + t // 2, e, m, dv, dp, torch.float32, "cuda")
    register_staging(ids[0], staging)
    try:
        for i, args in enumerate(calls):
            want = gate_lookup_backward_oracle(*args, True)
            grad_scores, grad_x = gate_lookup_backward_into(*[a.cuda() for a in args], True, *ids)
            assert _rel(grad_x.cpu(), want[2]) < 1e-5 and _rel(grad_scores.cpu(), want[3]) < 1e-5
            assert staging.staged_tokens() == t and staging.fill[1] == 0  # the programs' count, reset
            if i == 0:
                assert not bufs[0].any() and not bufs[1].any()
        total = [gate_lookup_backward_oracle(*a, True) for a in calls]
        assert staging.flush(*bufs) == t and staging.staged_tokens() == 0
        for k in range(2):
            assert _rel(bufs[k].cpu(), total[0][k] + total[1][k]) < 1e-5
    finally:
        register_staging(ids[0], None)
        for i in ids:
            release_grad_buffer(i)


@pytest.mark.parametrize("op", ["lookup", "gate"])
@pytest.mark.parametrize("hot", [0.0, 0.6])
def test_one_table_backward_staged_on_cuda(op, hot, monkeypatch):
    """weighted_lookup's / pre_value_gate's backward into a registered buffer with a one-table
    staging area (room for one call and a half): the first call stages, the second adds with
    atomics, the flush adds the first; the buffer then holds both calls' gradients (float64
    oracle), grad_scores / grad_x as usual. bf16 inputs, as in training."""
    from op_oracles import gate_backward_oracle, lookup_backward_oracle

    from ultramem.ops.staged_grad import GradStaging, register_staging
    from ultramem.ops.table_grad import pre_value_gate_backward_into, weighted_lookup_backward_into

    monkeypatch.setattr(determinism, "_deterministic", False)
    t, e, n, d, m = 96, 8, 50, 24, 2 if op == "lookup" else 1
    bf = torch.bfloat16
    buf = torch.zeros(n, d, device="cuda")
    handle = register_grad_buffer(buf)
    staging = GradStaging(t + t // 2, e, m, d if op == "lookup" else 0, 0 if op == "lookup" else d, bf, "cuda")
    register_staging(handle, staging)
    total = torch.zeros(n, d, dtype=torch.float64)
    try:
        for i in range(2):
            grad_out, _, rows, table, _, x, scores, _ = _inputs(t, e, n, d, d, m, hot, seed=60 + i)
            table, x, scores, grad_out = table.to(bf), x.to(bf), scores.to(bf), grad_out.to(bf)
            if op == "lookup":
                want = lookup_backward_oracle(grad_out, rows, table, scores)
                got = weighted_lookup_backward_into(grad_out.cuda(), rows.cuda(), table.cuda(), scores.cuda(), handle)
            else:
                grad_gate = scores[:, :, 0].contiguous()
                want = gate_backward_oracle(grad_gate, rows, table, x)
                got = pre_value_gate_backward_into(grad_gate.cuda(), rows.cuda(), table.cuda(), x.cuda(), handle)
            assert got.dtype == bf and _rel(got.cpu(), want[1]) < 1e-2  # (rounded to bf16)
            assert staging.staged_tokens() == t and staging.fill[1] == 0
            if i == 0:
                assert not buf.any()
            total += want[0]
        assert staging.flush(buf if op == "lookup" else None, None if op == "lookup" else buf) == t
        assert _rel(buf.cpu(), total) < 1e-5
    finally:
        register_staging(handle, None)
        release_grad_buffer(handle)


def test_staged_fill_level_with_every_multiprocessor_busy(monkeypatch):
    """The staged backward's last program to finish moves the fill level (a count of the
    programs done, in fill[1]): with calls of 8,192 tokens, whose programs run on every
    multiprocessor at once and finish in any order, each call moves the level by exactly its
    tokens while they fit and leaves it once they do not; the count is 0 after every call. What
    the interpreter, running programs one by one, cannot show."""
    from ultramem.ops._triton import staged_grad as tsg
    from ultramem.ops.staged_grad import GradStaging

    monkeypatch.setattr(determinism, "_deterministic", False)
    t, e, n, dv, dp, m = 8192, 8, 5000, 32, 32, 2
    args = [a.cuda() for a in _inputs(t, e, n, dv, dp, m, 0.0, seed=70)]
    grad_out, _, rows, values, pre_values, x, scores, gate = args
    bufs = [torch.zeros(n, dv, device="cuda"), torch.zeros(n, dp, device="cuda")]
    staging = GradStaging(10 * t + t // 2, e, m, dv, dp, torch.float32, "cuda")
    for call in range(12):
        tsg.staged_gate_lookup_backward_cuda(
            grad_out, None, rows, values, pre_values, x, scores, gate, True, *bufs, staging
        )
        assert staging.fill.tolist() == [min(call + 1, 10) * t, 0], call
    assert bufs[0].any() and bufs[1].any()  # the last two calls' atomics
