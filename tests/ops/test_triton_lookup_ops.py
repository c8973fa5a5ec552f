"""The ops added with the lookup kernels, on CPU: ultramem::gate_lookup (fused gate + lookup), the
accumulate-style backwards, and the deterministic-mode flag. Oracles are explicit loops in float64."""

from __future__ import annotations

import pytest
import torch
from op_oracles import gate_lookup_oracle, lookup_backward_oracle

from ultramem.ops import determinism
from ultramem.ops.gate_lookup import gate_lookup
from ultramem.ops.table_grad import pre_value_gate_backward_accumulate, weighted_lookup_backward_accumulate


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(t, e, n, g, dtype=torch.int64):
    rows = torch.randint(0, n, (t, e), generator=g)
    rows[0, 1] = rows[0, 0]
    rows[1, :] = rows[0, 0]
    return rows.to(dtype)


def _rand(shape, g, dtype=torch.float64, requires_grad=False):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("cores,index_dtype", [(1, torch.int64), (2, torch.int32), (3, torch.int64)])
def test_gate_lookup_matches_oracle(gelu, cores, index_dtype):
    g = _gen(cores + 10 * gelu)
    t, e, n, dv, dp = 5, 4, 9, 12, 7
    rows = _rows(t, e, n, g, index_dtype)
    values, pre_values, x = _rand((n, dv), g), _rand((n, dp), g), _rand((t, dp), g)
    scores = _rand((t, e, cores), g)
    out, gate = gate_lookup(rows, values, pre_values, x, scores, gelu)
    ref_out, ref_gate = gate_lookup_oracle(rows, values, pre_values, x, scores, gelu)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gate, ref_gate, rtol=1e-12, atol=1e-12)


def test_gate_lookup_bf16_returns_input_dtypes():
    g = _gen(1)
    rows = _rows(4, 3, 6, g)
    out, gate = gate_lookup(
        rows,
        _rand((6, 8), g, torch.bfloat16),
        _rand((6, 4), g, torch.bfloat16),
        _rand((4, 4), g, torch.float32),
        _rand((4, 3, 2), g, torch.bfloat16),
        True,
    )
    assert out.dtype == torch.bfloat16 and gate.dtype == torch.float32


@pytest.mark.parametrize("gelu", [True, False])
def test_gate_lookup_gradcheck(gelu):
    g = _gen(2 + gelu)
    t, e, n, dv, dp, m = 3, 3, 5, 4, 3, 2
    rows = _rows(t, e, n, g)
    args = (
        _rand((n, dv), g, requires_grad=True),
        _rand((n, dp), g, requires_grad=True),
        _rand((t, dp), g, requires_grad=True),
        _rand((t, e, m), g, requires_grad=True),
    )

    def both_outputs(values, pre_values, x, scores):
        out, gate = gate_lookup(rows, values, pre_values, x, scores, gelu)
        return out, gate.sin()  # the gate output carries gradient too

    assert torch.autograd.gradcheck(both_outputs, args)


def test_gate_lookup_opcheck():
    g = _gen(4)
    t, e, n = 4, 3, 6
    args = (
        _rows(t, e, n, g),
        _rand((n, 6), g, torch.float32, True),
        _rand((n, 5), g, torch.float32, True),
        _rand((t, 5), g, torch.float32, True),
        _rand((t, e, 2), g, torch.float32, True),
        True,
    )
    torch.library.opcheck(torch.ops.ultramem.gate_lookup.default, args)


def test_gate_lookup_grad_buffers_accumulate_what_autograd_returns():
    """With buffer ids the table gradients are added into the registered buffers (twice: two
    micro-batches) and the op returns none for the tables; x and scores get the same gradients."""
    from ultramem.ops.table_grad import register_grad_buffer, release_grad_buffer  # noqa: PLC0415

    g = _gen(6)
    t, e, n, dv, dp, m = 4, 3, 6, 6, 5, 2
    rows = _rows(t, e, n, g)
    values, pre_values = _rand((n, dv), g, requires_grad=True), _rand((n, dp), g, requires_grad=True)
    x, scores = _rand((t, dp), g, requires_grad=True), _rand((t, e, m), g, requires_grad=True)
    grad_out, grad_gate = _rand((t, dv), g), _rand((t, e), g)

    def backward(ids):
        out, gate = gate_lookup(rows, values, pre_values, x, scores, True, *ids)
        return torch.autograd.grad(
            (out * grad_out).sum() + (gate * grad_gate).sum(), (values, pre_values, x, scores), allow_unused=True
        )

    dense = backward((-1, -1))
    bufs = torch.zeros(n, dv, dtype=torch.float64), torch.zeros(n, dp, dtype=torch.float64)
    ids = [register_grad_buffer(b) for b in bufs]
    try:
        for step in (1, 2):
            got = backward(ids)
            assert got[0] is None and got[1] is None
            torch.testing.assert_close(got[2], dense[2], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[3], dense[3], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(bufs[0], step * dense[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(bufs[1], step * dense[1], rtol=1e-12, atol=1e-12)
        torch.library.opcheck(
            torch.ops.ultramem.gate_lookup.default, (rows, values.detach(), pre_values.detach(), x, scores, False, *ids)
        )
        with pytest.raises(ValueError, match="grad_table shape"):  # the forward checks the ids, not only the backward
            gate_lookup(rows, values, pre_values, x, scores, True, ids[1], ids[0])
    finally:
        for i in ids:
            release_grad_buffer(i)


@pytest.mark.parametrize("with_grad_gate", [True, False])
def test_gate_lookup_backward_into_matches_the_loops(with_grad_gate):
    """The backward op the layer's training path uses (both tables into buffers): opcheck, and the
    buffers and outputs against the float64 loops."""
    from op_oracles import gate_lookup_backward_oracle  # noqa: PLC0415

    from ultramem.ops.gate_lookup import gate_lookup_backward_into  # noqa: PLC0415
    from ultramem.ops.table_grad import register_grad_buffer, release_grad_buffer  # noqa: PLC0415

    g = _gen(8)
    t, e, n, dv, dp, m = 4, 3, 6, 6, 5, 3
    rows = _rows(t, e, n, g, torch.int32)
    values, pre_values, x = _rand((n, dv), g), _rand((n, dp), g), _rand((t, dp), g)
    scores, gate, grad_out = _rand((t, e, m), g), _rand((t, e), g), _rand((t, dv), g)
    grad_gate = _rand((t, e), g) if with_grad_gate else None
    bufs = torch.zeros(n, dv, dtype=torch.float64), torch.zeros(n, dp, dtype=torch.float64)
    ids = [register_grad_buffer(b) for b in bufs]
    try:
        args = (grad_out, grad_gate, rows, values, pre_values, x, scores, gate, True, *ids)
        grad_scores, grad_x = gate_lookup_backward_into(*args)
        want = gate_lookup_backward_oracle(grad_out, grad_gate, rows, values, pre_values, x, scores, gate, True)
        for got, ref in zip((*bufs, grad_x, grad_scores), want):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        torch.library.opcheck(torch.ops.ultramem.gate_lookup_backward_into.default, args)
        with pytest.raises(ValueError, match="grad_gate shape"):
            gate_lookup_backward_into(grad_out, gate[:, :2], *args[2:])
        with pytest.raises(ValueError, match="pre_values_grad_buffer=-1"):
            gate_lookup_backward_into(*args[:-1], -1)
        with pytest.raises(ValueError, match="pre_values has 5 rows"):  # rows index both tables
            gate_lookup_backward_into(*args[:4], pre_values[:5], *args[5:])
    finally:
        for i in ids:
            release_grad_buffer(i)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_buffers_filled_under_compile_when_only_tables_need_grad(backend):
    """The backward ops that add into registered buffers return nothing anybody uses when x and
    scores need no gradient (a frozen network around the tables): compiled graphs must still run them."""
    from ultramem.ops.table_grad import register_grad_buffer, release_grad_buffer  # noqa: PLC0415
    from ultramem.ops.weighted_lookup import weighted_lookup  # noqa: PLC0415

    g = _gen(12)
    t, e, n, dv, dp, m = 4, 3, 6, 6, 5, 2
    rows = _rows(t, e, n, g)
    values, pre_values = _rand((n, dv), g, torch.float32, True), _rand((n, dp), g, torch.float32, True)
    x, scores = _rand((t, dp), g, torch.float32), _rand((t, e, m), g, torch.float32)
    bufs = [torch.zeros(n, dv), torch.zeros(n, dp), torch.zeros(n, dv)]
    ids = [register_grad_buffer(b) for b in bufs]

    def loss(values, pre_values, x, scores):
        out, _ = gate_lookup(rows, values, pre_values, x, scores, True, ids[0], ids[1])
        return out.square().sum() + weighted_lookup(rows, values, scores, ids[2]).sum()

    torch._dynamo.reset()  # fresh ids: compile this function from scratch (no dynamic-int recompile)
    try:
        loss(values, pre_values, x, scores).backward()
        eager = [b.clone() for b in bufs]
        assert all(float(b.abs().sum()) > 0 for b in eager)
        for b in bufs:
            b.zero_()
        torch.compile(loss, fullgraph=True, backend=backend)(values, pre_values, x, scores).backward()
        for got, want in zip(bufs, eager):
            torch.testing.assert_close(got, want)
    finally:
        for i in ids:
            release_grad_buffer(i)


def test_compiled_function_takes_new_buffer_ids():
    """A compiled function called again with the ids of freshly registered buffers (a new model in
    the same process): Dynamo retraces with the ids as symbolic ints; every round fills its buffers."""
    from ultramem.ops.table_grad import register_grad_buffer, release_grad_buffer  # noqa: PLC0415

    g = _gen(13)
    t, e, n, dv, dp, m = 4, 3, 6, 6, 5, 2
    rows = _rows(t, e, n, g)
    values, pre_values = _rand((n, dv), g, torch.float32, True), _rand((n, dp), g, torch.float32, True)
    x, scores = _rand((t, dp), g, torch.float32, True), _rand((t, e, m), g, torch.float32)
    ids = [-1, -1]

    def loss(values, pre_values, x, scores):
        return gate_lookup(rows, values, pre_values, x, scores, True, ids[0], ids[1])[0].square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    sums = []
    for _ in range(3):
        bufs = [torch.zeros(n, dv), torch.zeros(n, dp)]
        ids[:] = [register_grad_buffer(b) for b in bufs]
        try:
            compiled(values, pre_values, x, scores).backward()
        finally:
            for i in ids:
                release_grad_buffer(i)
        sums.append([float(b.abs().sum()) for b in bufs])
    assert sums[0][0] > 0 and sums[0][1] > 0 and sums[1] == sums[0] and sums[2] == sums[0]


def test_gate_lookup_compiles_fullgraph():
    g = _gen(5)
    t, e, n = 4, 3, 6
    rows = _rows(t, e, n, g)
    base = [
        _rand((n, 6), g, torch.float32),
        _rand((n, 5), g, torch.float32),
        _rand((t, 5), g, torch.float32),
        _rand((t, e, 2), g, torch.float32),
    ]

    def loss(values, pre_values, x, scores):
        out, gate = gate_lookup(rows, values, pre_values, x, scores, True)
        return (out * out).sum() + gate.sum()

    eager = [b.clone().requires_grad_() for b in base]
    compiled = [b.clone().requires_grad_() for b in base]
    loss(*eager).backward()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a.grad, b.grad)


def test_gate_lookup_bad_inputs_name_the_argument():
    rows = torch.zeros(3, 2, dtype=torch.int64)
    v, p, x, s = torch.zeros(5, 8), torch.zeros(5, 4), torch.zeros(3, 4), torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match="pre_values has 4 rows"):
        gate_lookup(rows, v, torch.zeros(4, 4), x, s, True)
    with pytest.raises(ValueError, match="x dim 3"):
        gate_lookup(rows, v, p, torch.zeros(3, 3), s, True)
    with pytest.raises(ValueError, match="cores 3"):
        gate_lookup(rows, v, p, x, torch.zeros(3, 2, 3), True)
    with pytest.raises(ValueError, match="outside the valid range"):
        gate_lookup(rows + 7, v, p, x, s, True)


# ----------------------------------------------------------------------------- accumulate ops


def test_weighted_lookup_backward_accumulate_adds_into_buffer():
    g = _gen(6)
    t, e, n, d, m = 4, 3, 5, 6, 2
    rows, table, scores, grad_out = _rows(t, e, n, g), _rand((n, d), g), _rand((t, e, m), g), _rand((t, d), g)
    buf = _rand((n, d), g)
    start = buf.clone()
    grad_scores = weighted_lookup_backward_accumulate(buf, grad_out, rows, table, scores)
    ref_table, ref_scores = lookup_backward_oracle(grad_out, rows, table, scores)
    torch.testing.assert_close(buf, start + ref_table)
    torch.testing.assert_close(grad_scores, ref_scores)


def test_pre_value_gate_backward_accumulate_adds_into_buffer():
    g = _gen(7)
    t, e, n, d = 4, 3, 5, 6
    rows, table, x, grad_gate = _rows(t, e, n, g), _rand((n, d), g), _rand((t, d), g), _rand((t, e), g)
    buf = _rand((n, d), g)
    start = buf.clone()
    grad_x = pre_value_gate_backward_accumulate(buf, grad_gate, rows, table, x)
    ref_table = torch.zeros(n, d, dtype=torch.float64)
    ref_x = torch.zeros(t, d, dtype=torch.float64)
    for ti in range(t):
        for ei in range(e):
            ref_table[int(rows[ti, ei])] += grad_gate[ti, ei] * x[ti]
            ref_x[ti] += grad_gate[ti, ei] * table[int(rows[ti, ei])]
    torch.testing.assert_close(buf, start + ref_table)
    torch.testing.assert_close(grad_x, ref_x)


def test_accumulate_ops_opcheck_and_buffer_checks():
    g = _gen(8)
    t, e, n, d = 4, 3, 5, 6
    rows, table = _rows(t, e, n, g), _rand((n, d), g, torch.bfloat16)
    torch.library.opcheck(
        torch.ops.ultramem.weighted_lookup_backward_accumulate.default,
        (torch.zeros(n, d), _rand((t, d), g, torch.float32), rows, table, _rand((t, e, 2), g, torch.float32)),
    )
    torch.library.opcheck(
        torch.ops.ultramem.pre_value_gate_backward_accumulate.default,
        (torch.zeros(n, d), _rand((t, e), g, torch.float32), rows, table, _rand((t, d), g, torch.float32)),
    )
    with pytest.raises(ValueError, match="grad_table must be float32 or float64"):
        weighted_lookup_backward_accumulate(
            torch.zeros(n, d, dtype=torch.bfloat16), torch.zeros(t, d), rows, table, torch.zeros(t, e, 2)
        )
    with pytest.raises(ValueError, match="grad_table shape"):
        pre_value_gate_backward_accumulate(torch.zeros(n + 1, d), torch.zeros(t, e), rows, table, torch.zeros(t, d))


def test_deterministic_flag(monkeypatch):
    monkeypatch.setattr(determinism, "_deterministic", False)
    assert not determinism.deterministic_enabled()
    determinism.set_deterministic(True)
    assert determinism.deterministic_enabled()
    determinism.set_deterministic(False)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert determinism.deterministic_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not determinism.deterministic_enabled()
