"""ultramem::tdqkr_retrieval_stacked (A and B stacked along dim 2 of one tensor) against float64
oracles written with explicit loops, gradcheck, opcheck, torch.compile and bad input. Its Triton
launches are tested under the interpreter in test_triton_retrieval.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from op_oracles import retrieval_oracle

from ultramem import ops


def _sub_scores(seed, t, h, n, r, layout="tokens", dtype=torch.float64):
    """[T, H, 2, n, r]: "tokens" contiguous; "sides" laid out [2, H, T, n, r] in memory, as a
    batched GEMM over (head, side) writes it."""
    g = torch.Generator().manual_seed(seed)
    if layout == "tokens":
        return torch.randn(t, h, 2, n, r, generator=g, dtype=dtype)
    return torch.randn(h, 2, t, n, r, generator=g, dtype=dtype).permute(2, 0, 1, 3, 4)


def _tucker(seed, h, m, r, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(h, m, r, r, generator=g, dtype=dtype),
        torch.randn(h, r, generator=g, dtype=dtype),
        torch.randn(h, r, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("layout", ["tokens", "sides"])
@pytest.mark.parametrize("seed,h,r,m,knn,n", [(0, 1, 2, 2, 3, 7), (1, 2, 1, 1, 4, 6), (2, 2, 3, 3, 2, 5)])
def test_matches_oracle(layout, seed, h, r, m, knn, n):
    sub = _sub_scores(seed, 4, h, n, r, layout)
    c, u, v = _tucker(seed + 10, h, m, r)
    ids, scores = ops.tdqkr_retrieval_stacked(sub, c, u, v, knn)
    want_ids, want_scores = retrieval_oracle(sub[:, :, 0], sub[:, :, 1], c, u, v, knn)
    assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["tokens", "sides"])
def test_backward_matches_pairwise_oracle_in_the_input_layout(layout):
    # padded: 2 rows per side past n_keys, which get exactly zero gradient
    t, h, n, pad, r, m, k = 3, 2, 6, 2, 2, 2, 3
    sub = _sub_scores(5, t, h, n + pad, r, layout).requires_grad_()
    c, u, v = _tucker(6, h, m, r)
    c.requires_grad_()
    grad = torch.randn(t, h, k, m, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ids, scores = ops.tdqkr_retrieval_stacked(sub, c, u, v, k, n)
    got = torch.autograd.grad(scores, (sub, c), grad)
    assert got[0].stride() == sub.stride()  # the layout a batched GEMM's backward reads in place
    # oracle: the oracle's selection on the real keys, scores recomputed differentiably pair by pair
    a, b = sub[:, :, 0, :n], sub[:, :, 1, :n]
    want_ids, _ = retrieval_oracle(a.detach(), b.detach(), c.detach(), u, v, k)
    assert torch.equal(ids, want_ids)
    pairs = []
    for ti, hi, e, mi in itertools.product(range(t), range(h), range(k), range(m)):
        i, j = divmod(int(want_ids[ti, hi, e]), n)
        pairs.append(a[ti, hi, i] @ c[hi, mi] @ b[ti, hi, j])
    want = torch.autograd.grad(torch.stack(pairs).view(t, h, k, m), (sub, c), grad)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert not got[0][:, :, :, n:].any()


def test_gradcheck():
    sub = _sub_scores(8, 2, 1, 5, 2, "sides").requires_grad_()
    c, u, v = _tucker(9, 1, 2, 2)
    c.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, cc: ops.tdqkr_retrieval_stacked(s, cc, u, v, 2, 4)[1], (sub, c))


def _opcheck_cases():
    for dtype, layout in ((torch.float32, "tokens"), (torch.float64, "sides")):
        sub = _sub_scores(11, 3, 2, 6, 2, layout, dtype)
        c, u, v = _tucker(12, 2, 2, 2, dtype)
        for n_keys in (-1, 4):
            yield torch.ops.ultramem.tdqkr_retrieval_stacked.default, (sub.requires_grad_(), c, u, v, 3, n_keys)
            yield torch.ops.ultramem.tdqkr_retrieval_stacked_opaque.default, (sub.detach(), c, u, v, 3, n_keys)
            ids = ops.tdqkr_retrieval_stacked(sub.detach(), c, u, v, 3, n_keys)[0]
            grad = torch.randn(3, 2, 3, 2, dtype=dtype)
            args = (grad, sub.detach(), c, ids, n_keys)
            yield torch.ops.ultramem.tdqkr_retrieval_stacked_backward.default, args
            yield torch.ops.ultramem.tdqkr_retrieval_stacked_backward_opaque.default, args


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = case
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if "backward" not in str(op):
        utils = utils[:3]  # int64 ids before the scores: see test_reference_ops.test_opcheck
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_and_matches_eager(backend):
    sub = _sub_scores(13, 4, 2, 7, 2, "sides", torch.float32).requires_grad_()
    c, u, v = _tucker(14, 2, 2, 2, torch.float32)
    c.requires_grad_()

    def f(s, cc):
        ids, scores = ops.tdqkr_retrieval_stacked(s, cc, u, v, 3, 6)
        return ids, (scores * scores).sum()

    torch._dynamo.reset()
    ids_c, loss_c = torch.compile(f, fullgraph=True, backend=backend)(sub, c)
    grads_c = torch.autograd.grad(loss_c, (sub, c))
    ids_e, loss_e = f(sub, c)
    grads_e = torch.autograd.grad(loss_e, (sub, c))
    assert torch.equal(ids_c, ids_e)
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(grads_c, grads_e):
        torch.testing.assert_close(x, y)


def test_bad_inputs_are_refused_by_name():
    c, u, v = _tucker(15, 1, 2, 2, torch.float32)
    sub = torch.randn(3, 1, 2, 5, 2)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_stacked: sub_scores must be 5-D"):
        ops.tdqkr_retrieval_stacked(sub[:, :, 0], c, u, v, 2)
    with pytest.raises(ValueError, match=r"sub_scores shape \(3, 1, 3, 5, 2\): dim 2 .* must be 2"):
        ops.tdqkr_retrieval_stacked(torch.randn(3, 1, 3, 5, 2), c, u, v, 2)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_stacked: knn=6 must be in \[1, min\(row_keys=5"):
        ops.tdqkr_retrieval_stacked(sub, c, u, v, 6)
    ids = ops.tdqkr_retrieval_stacked(sub, c, u, v, 2)[0]
    grad = torch.randn(3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_stacked_backward: sub_scores shape \(3, 1, 1, 5, 2\)"):
        ops.tdqkr_retrieval_stacked_backward(grad, sub[:, :, :1], c, ids)
    with pytest.raises(
        ValueError, match=r"tdqkr_retrieval_stacked_backward: ids has values in .* outside the valid range \[0, 25\)"
    ):
        ops.tdqkr_retrieval_stacked_backward(grad, sub, c, ids + 25)


# -- tdqkr_retrieval_rows: the stacked forward writing table rows --------------------------------


def _perm(seed, n, virtual_factor=4):
    return torch.randperm(virtual_factor * n * n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_keys", [-1, 5])
def test_rows_are_the_oracle_ids_mapped(n_keys):
    # rows = (perm[id] mod n² + offset) mod N, computed here id by id from the oracle's selection
    t, h, n, r, m, k = 4, 2, 7, 2, 2, 3
    sub = _sub_scores(20, t, h, n, r, "sides")
    c, u, v = _tucker(21, h, m, r)
    n_real = n if n_keys == -1 else n_keys
    perm = _perm(22, n_real)
    num_logical, offset, num_rows = n_real * n_real, 3 * n_real * n_real + 2, 4 * n_real * n_real + 1
    window = torch.tensor([offset, num_rows])
    rows, scores = ops.tdqkr_retrieval_rows(sub, c, u, v, k, n_keys, perm, num_logical, window)
    want_ids, want_scores = retrieval_oracle(sub[:, :, 0, :n_real], sub[:, :, 1, :n_real], c, u, v, k)
    want = [[[(int(perm[i]) % num_logical + offset) % num_rows for i in hs] for hs in ts] for ts in want_ids.tolist()]
    assert rows.dtype == torch.int64 and rows.tolist() == want
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_rows_opcheck(index_dtype):
    sub = _sub_scores(23, 3, 2, 6, 2, "tokens", torch.float32)
    c, u, v = _tucker(24, 2, 2, 2, torch.float32)
    args = (sub, c, u, v, 3, -1, _perm(25, 6).to(index_dtype), 36, torch.tensor([110, 150], dtype=index_dtype))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op in (torch.ops.ultramem.tdqkr_retrieval_rows.default, torch.ops.ultramem.tdqkr_retrieval_rows_opaque.default):
        torch.library.opcheck(op, args, test_utils=utils)


def test_rows_compile_fullgraph_shares_one_graph_across_offsets():
    # the window is a tensor: two layers' offsets run through one compiled graph
    sub = _sub_scores(26, 4, 1, 7, 2, "sides", torch.float32)
    c, u, v = _tucker(27, 1, 2, 2, torch.float32)
    perm = _perm(28, 7)

    def f(s, window):
        return ops.tdqkr_retrieval_rows(s, c, u, v, 3, -1, perm, 49, window)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for offset in (0, 150):
            window = torch.tensor([offset, 200])
            got, want = compiled(sub, window), f(sub, window)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n_keys", [-1, 5])
def test_rows_of_raw_queries_are_those_of_normalized_queries(n_keys):
    # sub-key scores of raw queries q plus q: the rows and scores the oracle gives for the scores
    # of q / sqrt(mean(q²) + eps), normalized here per (token, head, side)
    t, h, n, r, m, k, d, eps = 5, 2, 7, 2, 2, 3, 6, 1e-3
    g = torch.Generator().manual_seed(40)
    q = 3 * torch.randn(t, h, 2, d, generator=g, dtype=torch.float64)
    keys = torch.randn(h, 2, n, r, d, generator=g, dtype=torch.float64)
    c, u, v = _tucker(41, h, m, r)
    n_real = n if n_keys == -1 else n_keys
    perm, window = _perm(42, n_real), torch.tensor([5, 4 * n_real * n_real])
    q_normed = q / (q.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    raw, normed = (torch.einsum("thsd,hsnrd->thsnr", x, keys) for x in (q, q_normed))
    rows, scores = ops.tdqkr_retrieval_rows(raw, c, u, v, k, n_keys, perm, n_real * n_real, window, q, eps)
    want_ids, want_scores = retrieval_oracle(normed[:, :, 0, :n_real], normed[:, :, 1, :n_real], c, u, v, k)
    assert torch.equal(rows, ops.retrieval.map_rows(want_ids, perm, n_real * n_real, window))
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)


def test_rows_opcheck_with_queries():
    sub = _sub_scores(43, 3, 2, 6, 2, "tokens", torch.float32)
    c, u, v = _tucker(44, 2, 2, 2, torch.float32)
    q = torch.randn(3, 2, 2, 5)
    args = (sub, c, u, v, 3, -1, _perm(45, 6), 36, torch.tensor([110, 150]), q, 1e-6)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op in (torch.ops.ultramem.tdqkr_retrieval_rows.default, torch.ops.ultramem.tdqkr_retrieval_rows_opaque.default):
        torch.library.opcheck(op, args, test_utils=utils)


def test_rows_refuse_bad_queries_by_name():
    c, u, v = _tucker(46, 1, 2, 2, torch.float32)
    sub, q = torch.randn(3, 1, 2, 5, 2), torch.randn(3, 1, 2, 4)
    args = (sub, c, u, v, 2, -1, _perm(47, 5), 25, torch.tensor([75, 100]))
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: q must be \[T=3, H=1, 2, d ≥ 1\].*\(3, 1, 3, 4\)"):
        ops.tdqkr_retrieval_rows(*args, torch.randn(3, 1, 3, 4), 1e-6)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: q's last dim must be contiguous"):
        ops.tdqkr_retrieval_rows(*args, torch.randn(3, 1, 4, 2).transpose(2, 3), 1e-6)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: q must be a floating tensor"):
        ops.tdqkr_retrieval_rows(*args, q.long(), 1e-6)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: q_eps=-1.0 must be at least 0"):
        ops.tdqkr_retrieval_rows(*args, q, -1.0)


def test_rows_refuse_autograd_and_bad_maps_by_name():
    c, u, v = _tucker(29, 1, 2, 2, torch.float32)
    sub = torch.randn(3, 1, 2, 5, 2)
    perm, window = _perm(30, 5), torch.tensor([75, 100])
    with pytest.raises(RuntimeError, match=r"tdqkr_retrieval_rows has no backward"):
        ops.tdqkr_retrieval_rows(sub.requires_grad_(), c, u, v, 2, -1, perm, 25, window)
    sub = sub.detach()
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: perm has 24 entries, fewer than the 25"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 2, -1, perm[:24], 25, window)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: perm must be int32 or int64"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 2, -1, perm.float(), 25, window)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: row_window must be 2 contiguous values"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 2, -1, perm, 25, window[:1])
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: row_window must be 2 contiguous values"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 2, -1, perm, 25, torch.tensor([[75, 0], [100, 0]])[:, 0])
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: row_window's num_rows=0 must be at least 1"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 2, -1, perm, 25, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: num_logical=0 must be at least 1"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 2, -1, perm, 0, window)
    with pytest.raises(ValueError, match=r"tdqkr_retrieval_rows: knn=6 must be in"):
        ops.tdqkr_retrieval_rows(sub, c, u, v, 6, -1, perm, 25, window)
