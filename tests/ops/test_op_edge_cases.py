"""The reference ops at their edges: no tokens (or no entries), ids out of range in the backward
ops (refused before anything is written), and tdqkr_retrieval's NaN / Inf rule."""

from __future__ import annotations

import re

import pytest
import torch

from ultramem import ops
from ultramem.ops.gate_lookup import gate_lookup_backward_into
from ultramem.ops.staged_grad import GradStaging, register_staging
from ultramem.ops.table_grad import (
    pre_value_gate_backward_accumulate,
    pre_value_gate_backward_into,
    register_grad_buffer,
    release_grad_buffer,
    weighted_lookup_backward_accumulate,
    weighted_lookup_backward_into,
)

N, DV, DP, M = 7, 6, 4, 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tensors(t, e, g, index_dtype=torch.int64, dtype=torch.float32):
    rows = torch.randint(0, N, (t, e), generator=g).to(index_dtype)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return dict(
        rows=rows,
        values=rand(N, DV),
        pre_values=rand(N, DP),
        x=rand(t, DP),
        scores=rand(t, e, M),
        grad_out=rand(t, DV),
        grad_gate=rand(t, e),
    )


class _Buffers:
    """Registered fp32 buffers for both tables (and optional staging areas), released on exit."""

    def __init__(self, staging: str | None = None, entries: int = 1):
        self.values, self.pre_values = torch.zeros(N, DV), torch.zeros(N, DP)
        self.ids = register_grad_buffer(self.values), register_grad_buffer(self.pre_values)
        self.staging = None
        if staging == "both":
            self.staging = GradStaging(16, entries, M, DV, DP, torch.float32, "cpu")
            register_staging(self.ids[0], self.staging)
        elif staging == "lookup":
            self.staging = GradStaging(16, entries, M, DV, 0, torch.float32, "cpu")
            register_staging(self.ids[0], self.staging)
        elif staging == "gate":
            self.staging = GradStaging(16, entries, 1, 0, DP, torch.float32, "cpu")
            register_staging(self.ids[1], self.staging)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for i in self.ids:
            register_staging(i, None)
            release_grad_buffer(i)

    def untouched(self) -> bool:
        staged = 0 if self.staging is None else self.staging.staged_tokens()
        return not self.values.any() and not self.pre_values.any() and staged == 0


# ------------------------------------------------------------------------------------ no tokens

SHAPES = [(0, 3), (3, 0), (0, 0)]


@pytest.mark.parametrize("t,e", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_empty_forward_and_backward_dense(t, e, index_dtype):
    a = _tensors(t, e, _gen(0), index_dtype)
    values, pre_values = a["values"].requires_grad_(), a["pre_values"].requires_grad_()
    x, scores = a["x"].requires_grad_(), a["scores"].requires_grad_()
    rows = a["rows"]

    out = ops.weighted_lookup(rows, values, scores)
    assert out.shape == (t, DV) and not out.any()
    gv, gs = torch.autograd.grad(out.sum(), (values, scores))
    assert gv.shape == (N, DV) and not gv.any() and gs.shape == (t, e, M)

    gate = ops.pre_value_gate(rows, pre_values, x)
    assert gate.shape == (t, e)
    gp, gx = torch.autograd.grad(gate.sum(), (pre_values, x))
    assert gp.shape == (N, DP) and not gp.any() and gx.shape == (t, DP) and not gx.any()

    for gelu in (True, False):
        out, gate = ops.gate_lookup(rows, values, pre_values, x, scores, gelu)
        assert out.shape == (t, DV) and not out.any() and gate.shape == (t, e)
        grads = torch.autograd.grad(out.sum() + gate.sum(), (values, pre_values, x, scores))
        assert [tuple(g.shape) for g in grads] == [(N, DV), (N, DP), (t, DP), (t, e, M)]
        assert not any(g.any() for g in grads[:3])

    # the backward ops called directly
    gt, gs = ops.weighted_lookup_backward(a["grad_out"], rows, values.detach(), scores.detach())
    assert gt.shape == (N, DV) and not gt.any() and gs.shape == (t, e, M)
    gt, gx = ops.pre_value_gate_backward(a["grad_gate"], rows, pre_values.detach(), x.detach())
    assert gt.shape == (N, DP) and not gt.any() and gx.shape == (t, DP) and not gx.any()


@pytest.mark.parametrize("t,e", SHAPES)
@pytest.mark.parametrize("staging", [None, "both", "lookup", "gate"])
def test_empty_backward_into_buffers(t, e, staging):
    a = _tensors(t, e, _gen(1))
    rows = a["rows"]
    with _Buffers(staging, entries=max(e, 1)) as bufs:
        vid, pid = bufs.ids
        x, scores = a["x"].requires_grad_(), a["scores"].requires_grad_()
        out, gate = ops.gate_lookup(rows, a["values"], a["pre_values"], x, scores, True, vid, pid)
        gx, gs = torch.autograd.grad(out.sum() + gate.sum(), (x, scores))
        assert gx.shape == (t, DP) and not gx.any() and gs.shape == (t, e, M)
        (gs,) = torch.autograd.grad(ops.weighted_lookup(rows, a["values"], scores, vid).sum(), (scores,))
        assert gs.shape == (t, e, M)
        (gx,) = torch.autograd.grad(ops.pre_value_gate(rows, a["pre_values"], x, pid).sum(), (x,))
        assert gx.shape == (t, DP) and not gx.any()
        # the accumulate ops and the buffer-id backwards called directly
        s, x0 = scores.detach(), x.detach()
        assert weighted_lookup_backward_accumulate(bufs.values, a["grad_out"], rows, a["values"], s).shape == (t, e, M)
        assert pre_value_gate_backward_accumulate(bufs.pre_values, a["grad_gate"], rows, a["pre_values"], x0).shape == (
            t,
            DP,
        )
        assert weighted_lookup_backward_into(a["grad_out"], rows, a["values"], s, vid).shape == (t, e, M)
        assert pre_value_gate_backward_into(a["grad_gate"], rows, a["pre_values"], x0, pid).shape == (t, DP)
        gs, gx = gate_lookup_backward_into(
            a["grad_out"], a["grad_gate"], rows, a["values"], a["pre_values"], x0, s, a["grad_gate"], True, vid, pid
        )
        assert gs.shape == (t, e, M) and gx.shape == (t, DP)
        assert not bufs.values.any() and not bufs.pre_values.any()
        if bufs.staging is not None:
            bufs.staging.flush(
                *(
                    (bufs.values, bufs.pre_values)
                    if staging == "both"
                    else (bufs.values,)
                    if staging == "lookup"
                    else (None, bufs.pre_values)
                )
            )
            assert bufs.untouched()


def test_empty_retrieval():
    a = torch.randn(0, 2, 6, 2, requires_grad=True)
    c = torch.rand(2, 2, 2, 2, requires_grad=True)
    u = torch.randn(2, 2)
    ids, scores = ops.tdqkr_retrieval(a, a, c, u, u, 3)
    assert ids.shape == (0, 2, 3) and scores.shape == (0, 2, 3, 2)
    ga, gc = torch.autograd.grad(scores.sum(), (a, c))
    assert ga.shape == a.shape and not gc.any()


def test_empty_ops_opcheck():
    g = _gen(2)
    for t, e in SHAPES:
        a = _tensors(t, e, g)
        torch.library.opcheck(
            torch.ops.ultramem.weighted_lookup.default,
            (a["rows"], a["values"], a["scores"]),
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            torch.ops.ultramem.gate_lookup.default,
            (a["rows"], a["values"], a["pre_values"], a["x"], a["scores"], True),
            test_utils=("test_schema", "test_faketensor"),
        )


# ------------------------------------------------------------------------- ids out of range

BAD_ROWS = [
    (torch.tensor([[0, N, 1], [2, 3, 4]]), rf"\[0, {N}\]"),
    (torch.tensor([[0, 1, 1], [-1, 3, 4]], dtype=torch.int32), r"\[-1, 4\]"),
]


def _range_error(op, arg, span, upper):
    return re.compile(rf"^ultramem::{op}: {arg} has values in {span}, outside the valid range \[0, {upper}\)$")


@pytest.mark.parametrize("bad,span", BAD_ROWS)
def test_backward_ops_refuse_bad_rows_before_writing(bad, span):
    a = _tensors(2, 3, _gen(3))
    v, p, x, s, go, gg = (a[k] for k in ("values", "pre_values", "x", "scores", "grad_out", "grad_gate"))
    plain = [
        ("weighted_lookup_backward", lambda: ops.weighted_lookup_backward(go, bad, v, s)),
        ("pre_value_gate_backward", lambda: ops.pre_value_gate_backward(gg, bad, p, x)),
    ]
    for op, call in plain:
        with pytest.raises(ValueError, match=_range_error(op, "rows", span, N)):
            call()
    for staging in (None, "both", "lookup", "gate"):
        with _Buffers(staging, entries=3) as bufs:
            vid, pid = bufs.ids
            calls = [
                (
                    "weighted_lookup_backward_accumulate",
                    lambda: weighted_lookup_backward_accumulate(bufs.values, go, bad, v, s),
                ),
                (
                    "pre_value_gate_backward_accumulate",
                    lambda: pre_value_gate_backward_accumulate(bufs.pre_values, gg, bad, p, x),
                ),
                ("weighted_lookup_backward_into", lambda: weighted_lookup_backward_into(go, bad, v, s, vid)),
                ("pre_value_gate_backward_into", lambda: pre_value_gate_backward_into(gg, bad, p, x, pid)),
                (
                    "gate_lookup_backward_into",
                    lambda: gate_lookup_backward_into(go, gg, bad, v, p, x, s, gg, True, vid, pid),
                ),
            ]
            for op, call in calls:
                with pytest.raises(ValueError, match=_range_error(op, "rows", span, N)):
                    call()
                assert bufs.untouched(), (op, staging)


def test_gate_lookup_backward_checks_both_buffer_ids_before_writing():
    a = _tensors(2, 3, _gen(4))
    with _Buffers() as bufs:
        vid, pid = bufs.ids
        args = (
            a["grad_out"],
            a["grad_gate"],
            a["rows"],
            a["values"],
            a["pre_values"],
            a["x"],
            a["scores"],
            a["grad_gate"],
            True,
        )
        release_grad_buffer(pid)
        with pytest.raises(ValueError, match=rf"gate_lookup_backward_into: grad_buffer={pid} is not a registered"):
            gate_lookup_backward_into(*args, vid, pid)
        assert bufs.untouched()


def test_autograd_backward_refuses_bad_rows_without_touching_buffers():
    """rows that went out of range after the forward (or a forward run on another device)
    reach the backward through autograd: the buffers stay as they were."""
    a = _tensors(2, 3, _gen(5))
    rows = a["rows"].clone()
    rows[0, 0] = 0
    with _Buffers() as bufs:
        vid, pid = bufs.ids
        scores = a["scores"].requires_grad_()
        out, _ = ops.gate_lookup(rows, a["values"], a["pre_values"], a["x"], scores, True, vid, pid)
        rows.data[1, 2] = N + 5  # the saved tensor itself (.data: past the version check)
        with pytest.raises(ValueError, match=_range_error("gate_lookup_backward_into", "rows", rf"\[0, {N + 5}\]", N)):
            out.sum().backward()
        assert bufs.untouched()


def test_retrieval_backward_refuses_bad_ids():
    g = _gen(6)
    a = torch.randn(2, 1, 6, 2, generator=g)
    b = torch.randn(2, 1, 5, 2, generator=g)
    c = torch.rand(1, 2, 2, 2, generator=g)
    grad = torch.randn(2, 1, 3, 2, generator=g)
    ids = torch.tensor([[[0, 29, 3]], [[4, 5, 6]]])
    op = "tdqkr_retrieval_backward"
    ops.tdqkr_retrieval_backward(grad, a, b, c, ids)  # 29 = 6·5 − 1 is the last id
    for bad, span in ((30, r"\[3, 30\]"), (-2, r"\[-2, 29\]")):
        ids[0, 0, 0] = bad
        with pytest.raises(ValueError, match=_range_error(op, "ids", span, 30)):
            ops.tdqkr_retrieval_backward(grad, a, b, c, ids)
        ids[0, 0, 0] = 0
    # with n_keys the ids address the real keys only: [0, n_keys²)
    with pytest.raises(ValueError, match=_range_error(op, "ids", r"\[0, 29\]", 16)):
        ops.tdqkr_retrieval_backward(grad, a, b, c, ids, 4)
    with pytest.raises(ValueError, match=rf"^ultramem::{op}: ids must be int32 or int64"):
        ops.tdqkr_retrieval_backward(grad, a, b, c, ids.float())
    with pytest.raises(ValueError, match=rf"^ultramem::{op}: grad_scores shape \(2, 1, 3, 3\) must be"):
        ops.tdqkr_retrieval_backward(torch.randn(2, 1, 3, 3), a, b, c, ids)


def test_backward_ops_name_themselves_in_shape_errors():
    a = _tensors(2, 3, _gen(7))
    with pytest.raises(ValueError, match=r"^ultramem::weighted_lookup_backward: grad_out shape \(2, 5\)"):
        ops.weighted_lookup_backward(a["grad_out"][:, :5], a["rows"], a["values"], a["scores"])
    with pytest.raises(ValueError, match=r"^ultramem::pre_value_gate_backward: grad_gate shape \(2, 2\)"):
        ops.pre_value_gate_backward(a["grad_gate"][:, :2], a["rows"], a["pre_values"], a["x"])
    with pytest.raises(ValueError, match=r"^ultramem::weighted_lookup_backward_accumulate: scores shape"):
        weighted_lookup_backward_accumulate(torch.zeros(N, DV), a["grad_out"], a["rows"], a["values"], a["scores"][:1])


# ------------------------------------------------------------------------- retrieval NaN / Inf


def _retrieval_inputs(seed, t=3, h=2, n=9, r=2, m=2):
    g = _gen(seed)
    return (
        torch.randn(t, h, n, r, generator=g),
        torch.randn(t, h, n, r, generator=g),
        torch.rand(h, m, r, r, generator=g),
        torch.randn(h, r, generator=g),
        torch.randn(h, r, generator=g),
    )


def _assert_ids_valid(ids, n_ids):
    assert ((ids >= 0) & (ids < n_ids)).all()
    flat = ids.reshape(-1, ids.shape[-1])
    assert all(len(set(row.tolist())) == ids.shape[-1] for row in flat)


@pytest.mark.parametrize("where", ["u", "v", "row_scores", "col_scores", "cores"])
def test_retrieval_nan_inputs_poison_their_tokens(where):
    a, b, c, u, v = _retrieval_inputs(8)
    knn = 4
    want_nan = torch.zeros(3, 2, dtype=torch.bool)
    if where == "u":
        u[1, 0] = float("nan")
        want_nan[:, 1] = True
    elif where == "v":
        v[0] = float("nan")
        want_nan[:, 0] = True
    elif where == "row_scores":
        a[2, 0, 5, 1] = float("nan")  # one key of one token: that (token, head) only
        want_nan[2, 0] = True
    elif where == "col_scores":
        b[0, 1, :, 0] = float("nan")
        want_nan[0, 1] = True
    else:
        c[0, 1, 1, 0] = float("nan")
        want_nan[:, 0] = True
    ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, knn)
    _assert_ids_valid(ids, 81)
    assert torch.equal(scores.isnan().all(-1).all(-1), want_nan)
    assert torch.isfinite(scores[~want_nan]).all()


def test_retrieval_nan_in_padding_keys_is_not_read():
    a, b, c, u, v = _retrieval_inputs(9)
    a[:, :, 7:] = float("nan")  # the 2 padding keys of n_keys = 7
    ids, scores = ops.tdqkr_retrieval(a, b, c, u, v, 3, 7)
    assert torch.isfinite(scores).all()
    _assert_ids_valid(ids, 49)


def test_retrieval_infinite_scores_rank_first_and_last():
    # rank 1, positive u / v / cores and positive col keys: no ∞ − ∞ anywhere
    g = _gen(10)
    t, n, knn = 2, 8, 3
    a = torch.randn(t, 1, n, 1, generator=g)
    b = torch.rand(t, 1, n, 1, generator=g) + 0.1
    c, u = torch.rand(1, 2, 1, 1, generator=g) + 0.1, torch.ones(1, 1)
    a[0, 0, 5] = float("inf")  # one +inf key: kept first, its pairs' totals +inf
    a[1, 0, :] = float("-inf")
    a[1, 0, 2] = 0.5  # one finite key; -inf keys fill the kept rows,
    ids, scores = ops.tdqkr_retrieval(a, b, c, u, u, knn)  # their -inf totals rank last
    _assert_ids_valid(ids, n * n)
    assert (ids[0, 0] // n == 5).all() and torch.isposinf(scores[0]).all()
    assert (ids[1, 0] // n == 2).all() and torch.isfinite(scores[1]).all()
