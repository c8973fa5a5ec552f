"""The ultramem:: ops (reference kernels) against independent float64 formulas, opcheck, gradcheck,
and bad input. The oracles below are written with explicit loops, not with the ops' own helpers."""

from __future__ import annotations

import itertools

import pytest
import torch
from op_oracles import gate_backward_oracle, gate_oracle, lookup_backward_oracle, lookup_oracle, retrieval_oracle

from ultramem import ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows_with_duplicates(t: int, e: int, n: int, g: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    rows = torch.randint(0, n, (t, e), generator=g)
    rows[0, 1] = rows[0, 0]  # the same row twice within one token
    rows[1, :] = rows[0, 0]  # and across tokens
    return rows.to(dtype)


# ---------------------------------------------------------------- forward vs oracle


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cores", [1, 2, 4])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_weighted_lookup_matches_oracle(seed, cores, index_dtype):
    g = _gen(seed)
    rows = _rows_with_duplicates(5, 6, 11, g, index_dtype)
    table = torch.randn(11, 8, generator=g, dtype=torch.float64)
    scores = torch.randn(5, 6, cores, generator=g, dtype=torch.float64)
    out = ops.weighted_lookup(rows, table, scores)
    torch.testing.assert_close(out, lookup_oracle(rows, table, scores), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_pre_value_gate_matches_oracle(seed, index_dtype):
    g = _gen(seed)
    rows = _rows_with_duplicates(5, 6, 11, g, index_dtype)
    table = torch.randn(11, 8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops.pre_value_gate(rows, table, x), gate_oracle(rows, table, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "heads,rank,cores,knn,n_row,n_col", [(1, 2, 2, 3, 7, 7), (2, 1, 1, 4, 6, 9), (2, 3, 3, 1, 5, 5)]
)
def test_retrieval_matches_oracle(seed, heads, rank, cores, knn, n_row, n_col):
    g = _gen(seed)
    a = torch.randn(4, heads, n_row, rank, generator=g, dtype=torch.float64)
    b = torch.randn(4, heads, n_col, rank, generator=g, dtype=torch.float64)
    c = torch.rand(heads, cores, rank, rank, generator=g, dtype=torch.float64)
    u = torch.randn(heads, rank, generator=g, dtype=torch.float64)
    v = torch.randn(heads, rank, generator=g, dtype=torch.float64)
    ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, knn)
    ref_ids, ref_scores = retrieval_oracle(a, b, c, u, v, knn)
    assert ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- backward vs oracle


def test_weighted_lookup_backward_matches_oracle():
    g = _gen(3)
    rows = _rows_with_duplicates(4, 5, 9, g)
    table = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 6, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(ops.weighted_lookup(rows, table, scores), (table, scores), grad_out)
    want = lookup_backward_oracle(grad_out, rows, table.detach(), scores.detach())
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # rows never picked get exactly zero gradient
    unused = sorted(set(range(9)) - set(rows.flatten().tolist()))
    assert unused and torch.all(got[0][unused] == 0)


def test_pre_value_gate_backward_matches_oracle():
    g = _gen(4)
    rows = _rows_with_duplicates(4, 5, 9, g)
    table = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(ops.pre_value_gate(rows, table, x), (table, x), grad)
    want = gate_backward_oracle(grad, rows, table.detach(), x.detach())
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_retrieval_backward_matches_oracle():
    g = _gen(5)
    a = torch.randn(3, 2, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.rand(2, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 2, 3, 2, generator=g, dtype=torch.float64)
    _, scores = ops.tdqkr_retrieval(a, b, c, u, v, 3)
    got = torch.autograd.grad(scores, (a, b, c), grad)
    # oracle: the same selection, scores recomputed differentiably pair by pair
    ref_ids, _ = retrieval_oracle(a.detach(), b.detach(), c.detach(), u, v, 3)
    ref = torch.zeros(3, 2, 3, 2, dtype=torch.float64)
    ref_list = []
    for ti, hi, e, m in itertools.product(range(3), range(2), range(3), range(2)):
        i, j = divmod(int(ref_ids[ti, hi, e]), 7)
        ref_list.append(a[ti, hi, i] @ c[hi, m] @ b[ti, hi, j])
    ref = torch.stack(ref_list).view(3, 2, 3, 2)
    want = torch.autograd.grad(ref, (a, b, c), grad)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- gradcheck and opcheck


def test_gradcheck_tiny():
    g = _gen(6)
    rows = _rows_with_duplicates(3, 4, 6, g)
    table = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: ops.weighted_lookup(rows, t, s), (table, scores))
    assert torch.autograd.gradcheck(lambda t, y: ops.pre_value_gate(rows, t, y), (table, x))
    a = torch.randn(2, 1, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(1, 2, generator=g, dtype=torch.float64), torch.randn(1, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, q, r: ops.tdqkr_retrieval(p, q, r, u, v, 2)[1], (a, b, c))


def _opcheck_cases():
    g = _gen(7)
    rows = _rows_with_duplicates(5, 4, 10, g)
    for dtype in (torch.float32, torch.float64):
        table = torch.randn(10, 8, generator=g, dtype=dtype, requires_grad=True)
        scores = torch.randn(5, 4, 2, generator=g, dtype=dtype, requires_grad=True)
        x = torch.randn(5, 8, generator=g, dtype=dtype, requires_grad=True)
        yield torch.ops.ultramem.weighted_lookup.default, (rows, table, scores)
        yield torch.ops.ultramem.weighted_lookup.default, (rows.int(), table, scores)
        yield torch.ops.ultramem.pre_value_gate.default, (rows, table, x)
        go, gg = torch.randn(5, 8, generator=g, dtype=dtype), torch.randn(5, 4, generator=g, dtype=dtype)
        tb, sc, xd = table.detach(), scores.detach(), x.detach()
        yield torch.ops.ultramem.pre_value_gate_backward.default, (gg, rows, tb, xd)
        # the opaque twins the lookup ops' bodies call on CPU and in debug mode
        yield torch.ops.ultramem.weighted_lookup_opaque.default, (rows, tb, sc)
        yield torch.ops.ultramem.weighted_lookup_backward_opaque.default, (go, rows.int(), tb, sc)
        yield torch.ops.ultramem.pre_value_gate_opaque.default, (rows, tb, xd)
        yield torch.ops.ultramem.pre_value_gate_backward_opaque.default, (gg, rows, tb, xd)
        yield torch.ops.ultramem.gate_lookup_opaque.default, (rows, tb, tb[:, :6], xd[:, :6], sc, True)
        yield torch.ops.ultramem.gate_lookup_opaque.default, (rows.int(), tb, tb, xd, sc, False)
        a = torch.randn(3, 2, 6, 2, generator=g, dtype=dtype, requires_grad=True)
        b = torch.randn(3, 2, 6, 2, generator=g, dtype=dtype, requires_grad=True)
        c = torch.rand(2, 2, 2, 2, generator=g, dtype=dtype, requires_grad=True)
        u, v = torch.randn(2, 2, generator=g, dtype=dtype), torch.randn(2, 2, generator=g, dtype=dtype)
        yield torch.ops.ultramem.tdqkr_retrieval.default, (a, b, c, u, v, 3)
        yield torch.ops.ultramem.tdqkr_retrieval.default, (a, b, c, u, v, 3, 4)  # 2 padding keys per side
        # the opaque twins the public ops' bodies call on CPU and in debug mode
        yield torch.ops.ultramem.tdqkr_retrieval_opaque.default, (a.detach(), b.detach(), c.detach(), u, v, 3, 4)
        ids = ops.tdqkr_retrieval(a.detach(), b.detach(), c.detach(), u, v, 3, 4)[0]
        grad = torch.randn(3, 2, 3, 2, generator=g, dtype=dtype)
        yield torch.ops.ultramem.tdqkr_retrieval_backward.default, (grad, a.detach(), b.detach(), c.detach(), ids, 4)
        yield (
            torch.ops.ultramem.tdqkr_retrieval_backward_opaque.default,
            (grad, a.detach(), b.detach(), c.detach(), ids, 4),
        )
    # non-contiguous inputs: the fake kernels must report the real kernels' (contiguous) strides
    yield (
        torch.ops.ultramem.weighted_lookup.default,
        (
            rows,
            torch.randn(8, 10, generator=g).t().requires_grad_(),
            torch.randn(2, 4, 5, generator=g).permute(2, 1, 0),
        ),
    )
    yield (
        torch.ops.ultramem.pre_value_gate.default,
        (rows, torch.randn(10, 8, generator=g), torch.randn(8, 5, generator=g).t().requires_grad_()),
    )
    yield (
        torch.ops.ultramem.tdqkr_retrieval.default,
        (
            torch.randn(3, 2, 2, 6, generator=g).transpose(2, 3).requires_grad_(),
            torch.randn(3, 2, 2, 6, generator=g).transpose(2, 3).requires_grad_(),
            torch.rand(2, 2, 2, 2, generator=g).requires_grad_(),
            torch.randn(2, 2, generator=g),
            torch.randn(2, 2, generator=g),
            3,
        ),
    )
    a_nc = torch.randn(3, 2, 2, 6, generator=g).transpose(2, 3)
    ids = ops.tdqkr_retrieval(a_nc, a_nc, torch.rand(2, 2, 2, 2), torch.randn(2, 2), torch.randn(2, 2), 3)[0]
    yield (
        torch.ops.ultramem.tdqkr_retrieval_backward.default,
        (torch.randn(3, 2, 3, 2, generator=g), a_nc, a_nc, torch.rand(2, 2, 2, 2, generator=g), ids),
    )
    yield (
        torch.ops.ultramem.weighted_lookup_backward.default,
        (torch.randn(5, 8, generator=g), rows, torch.randn(10, 8, generator=g), torch.randn(5, 4, 2, generator=g)),
    )


@pytest.mark.parametrize("case", list(_opcheck_cases()), ids=lambda c: str(c) if isinstance(c, str) else None)
def test_opcheck(case):
    op, args = case
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if op in (torch.ops.ultramem.tdqkr_retrieval.default, torch.ops.ultramem.tdqkr_retrieval_opaque.default):
        # opcheck's aot_dispatch test sums the outputs in order into one accumulator, which fails
        # when an int64 output (ids) comes before a float one; test_retrieval_compiles covers it.
        utils = utils[:3]
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retrieval_padded_keys_equal_the_real_keys_alone(dtype):
    # n_keys: A/B rows past n_keys are padding (here huge values, which would win every top-k if
    # read); results equal the op on the real rows, gradients keep the padded shape, zero there.
    g = _gen(10)
    t, h, n, pad, r, m, k = 5, 2, 9, 3, 2, 2, 4
    a = torch.randn(t, h, n + pad, r, generator=g, dtype=dtype)
    b = torch.randn(t, h, n + pad, r, generator=g, dtype=dtype)
    a[:, :, n:] = b[:, :, n:] = 1e4
    c = torch.rand(h, m, r, r, generator=g, dtype=dtype)
    u, v = torch.rand(h, r, generator=g, dtype=dtype), torch.rand(h, r, generator=g, dtype=dtype)
    grad = torch.randn(t, h, k, m, generator=g, dtype=dtype)
    want = ops.tdqkr_retrieval(a[:, :, :n].contiguous(), b[:, :, :n].contiguous(), c, u, v, k)
    got = ops.tdqkr_retrieval(a, b, c, u, v, k, n)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    want_g = ops.tdqkr_retrieval_backward(grad, a[:, :, :n].contiguous(), b[:, :, :n].contiguous(), c, want[0])
    got_g = ops.tdqkr_retrieval_backward(grad, a, b, c, got[0], n)
    for w, x in zip(want_g[:2], got_g[:2]):
        assert x.shape == (t, h, n + pad, r) and torch.equal(x[:, :, :n], w) and not x[:, :, n:].any()
    torch.testing.assert_close(got_g[2], want_g[2])
    with pytest.raises(ValueError, match=r"n_keys=0 must be -1 \(all keys\) or in \[1, min"):
        ops.tdqkr_retrieval(a, b, c, u, v, k, 0)
    with pytest.raises(ValueError, match=r"knn=5 must be in \[1, min\(row_keys=4"):
        ops.tdqkr_retrieval(a, b, c, u, v, 5, 4)


def test_retrieval_compiles_fullgraph_and_matches_eager():
    g = _gen(9)
    a = torch.randn(4, 2, 7, 2, generator=g, requires_grad=True)
    b = torch.randn(4, 2, 6, 2, generator=g, requires_grad=True)
    c = torch.rand(2, 2, 2, 2, generator=g, requires_grad=True)
    u, v = torch.randn(2, 2, generator=g), torch.randn(2, 2, generator=g)

    def f(a, b, c):
        ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, 3)
        return ids, (scores * scores).sum()

    torch._dynamo.reset()
    ids_c, loss_c = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)(a, b, c)
    grads_c = torch.autograd.grad(loss_c, (a, b, c))
    ids_e, loss_e = f(a, b, c)
    grads_e = torch.autograd.grad(loss_e, (a, b, c))
    assert torch.equal(ids_c, ids_e)
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(grads_c, grads_e):
        torch.testing.assert_close(x, y)


def test_bf16_table_fp32_accumulation():
    g = _gen(8)
    rows = _rows_with_duplicates(6, 8, 20, g)
    table = torch.randn(20, 16, generator=g).bfloat16()
    scores = torch.randn(6, 8, 2, generator=g).bfloat16()
    out = ops.weighted_lookup(rows, table, scores)
    assert out.dtype == torch.bfloat16
    ref = lookup_oracle(rows, table, scores)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-2


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    rows = torch.zeros(4, 3, dtype=torch.int64)
    table = torch.randn(10, 8)
    scores = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="rows must be int32 or int64"):
        ops.weighted_lookup(rows.float(), table, scores)
    with pytest.raises(ValueError, match="scores shape"):
        ops.weighted_lookup(rows, table, torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="table dim 8 must be divisible by the number of cores 3"):
        ops.weighted_lookup(rows, table, torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="values dim 8 must be divisible by the number of cores 3"):
        ops.gate_lookup(rows, table, table, torch.randn(4, 8), torch.randn(4, 3, 3), True)
    with pytest.raises(ValueError, match=r"scores shape \(4, 2, 2\) must start with rows shape \(4, 3\)"):
        ops.gate_lookup(rows, table, table, torch.randn(4, 8), torch.randn(4, 2, 2), True)
    with pytest.raises(ValueError, match=r"table must be 2-D"):
        ops.weighted_lookup(rows, table.view(10, 2, 4), scores)
    with pytest.raises(ValueError, match=r"rows has values in \[0, 10\], outside the valid range \[0, 10\)"):
        ops.weighted_lookup(torch.tensor([[0, 10, 1]] * 4), table, scores)
    with pytest.raises(ValueError, match=r"rows has values in \[-1, "):
        ops.pre_value_gate(torch.tensor([[-1, 2, 1]] * 4), table, torch.randn(4, 8))
    with pytest.raises(ValueError, match="x dim 7 must equal table dim 8"):
        ops.pre_value_gate(rows, table, torch.randn(4, 7))
    with pytest.raises(ValueError, match="x has 5 tokens"):
        ops.pre_value_gate(rows, table, torch.randn(5, 8))
    with pytest.raises(ValueError, match="table must be a floating tensor"):
        ops.pre_value_gate(rows, table.long(), torch.randn(4, 8))
    a, b = torch.randn(2, 1, 5, 2), torch.randn(2, 1, 5, 2)
    c, u = torch.rand(1, 2, 2, 2), torch.randn(1, 2)
    with pytest.raises(ValueError, match=r"knn=6 must be in \[1, min\(row_keys=5, col_keys=5\)\]"):
        ops.tdqkr_retrieval(a, b, c, u, u, 6)
    with pytest.raises(ValueError, match="cores shape"):
        ops.tdqkr_retrieval(a, b, torch.rand(1, 2, 3, 3), u, u, 2)
    with pytest.raises(ValueError, match="col_scores shape"):
        ops.tdqkr_retrieval(a, torch.randn(3, 1, 5, 2), c, u, u, 2)


def test_debug_flag_roundtrip():
    assert not ops.debug_enabled()
    ops.set_debug(True)
    try:
        assert ops.debug_enabled()
    finally:
        ops.set_debug(False)
