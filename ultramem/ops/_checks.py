"""Argument checks shared by the ops: each error names the argument and the rule it broke.

The op modules and their Triton launchers both take their checks from here, so that a launcher
never imports its op module (the op module imports the launcher to register it)."""

from __future__ import annotations

import math
import os

import torch

from ._trace_state import record

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Range checks on indices read the data, which costs a host sync on CUDA; they always run
# on CPU and run on CUDA only in debug mode (ULTRAMEM_DEBUG=1 or set_debug(True)). Backward ops
# check before they write anything (a registered gradient buffer is left as it was). Without
# the check on CUDA, the Triton kernels mask ids outside [0, N): such an entry reads and writes
# nothing (its gathered row counts as zero); the PyTorch fallbacks (float64, no Triton) stop on
# PyTorch's device-side index assert. Neither writes out of bounds.
_debug = os.environ.get("ULTRAMEM_DEBUG", "0") not in ("", "0")
record("debug", _debug)


def set_debug(enabled: bool) -> None:
    """Turn on the index range checks on every device (they cost a host sync on CUDA)."""
    global _debug
    _debug = bool(enabled)
    record("debug", _debug)


def debug_enabled() -> bool:
    return _debug


# Argument signatures whose checks passed, with what the checks returned. A call repeating one
# skips its checks, which otherwise take a good part of an op call's host time on CUDA (a training
# step repeats a few signatures).
_passed: dict[tuple, object] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def signature(*args) -> tuple | None:
    """What argument checks can see: each tensor's shape, strides, dtype and device, other values
    as they are; None if a tensor is a trace's (fake, functional: its shapes may be symbolic)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return None
            key.append((a.shape, a.stride(), a.dtype, a.device))
        else:
            key.append(a)
    return tuple(key)


def check_once(op: str, checks, *args):
    """checks(*args), unless the same checks passed on arguments of the same signature before: then
    what they returned that time. For checks that read nothing but the signature. In debug mode,
    and on a trace's tensors, they always run."""
    sig = None if _debug else signature(*args)
    if sig is None:
        return checks(*args)
    key = (op, checks, sig)
    if key in _passed:
        return _passed[key]
    result = checks(*args)
    if len(_passed) >= 4096:
        _passed.clear()
    _passed[key] = result
    return result


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"ultramem::{op}: {msg}")


def check_dim(t: torch.Tensor, ndim: int, op: str, name: str, layout: str) -> None:
    check(t.dim() == ndim, op, f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_index(t: torch.Tensor, op: str, name: str) -> None:
    check(t.dtype in INDEX_DTYPES, op, f"{name} must be int32 or int64, got {t.dtype}")


def check_float(t: torch.Tensor, op: str, name: str) -> None:
    check(t.dtype in FLOAT_DTYPES, op, f"{name} must be a floating tensor (bf16/fp16/fp32/fp64), got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) == 1, op, f"all tensors must be on one device, got {devices}")


def check_index_range(idx: torch.Tensor, upper: int, op: str, name: str) -> None:
    """Raise if any index lies outside [0, upper). Skipped for fake/meta tensors."""
    if idx.numel() == 0 or idx.device.type == "meta":
        return
    if idx.device.type != "cpu" and not _debug:
        return
    lo, hi = int(idx.min()), int(idx.max())
    check(lo >= 0 and hi < upper, op, f"{name} has values in [{lo}, {hi}], outside the valid range [0, {upper})")


def _check_scores_fit(op: str, rows: torch.Tensor, scores: torch.Tensor, table: torch.Tensor, name: str) -> None:
    """scores [T, E, M] beside rows [T, E], with M cores splitting the looked-up table's rows."""
    check(
        tuple(scores.shape[:2]) == tuple(rows.shape),
        op,
        f"scores shape {tuple(scores.shape)} must start with rows shape {tuple(rows.shape)}",
    )
    m = scores.shape[2]
    check(
        m >= 1 and table.shape[1] % m == 0,
        op,
        f"{name} dim {table.shape[1]} must be divisible by the number of cores {m} (scores.shape[2])",
    )


def check_lookup_args(
    op: str, rows: torch.Tensor, table: torch.Tensor, scores: torch.Tensor, grad_out: torch.Tensor | None = None
) -> None:
    """The arguments of `weighted_lookup` (and of its backwards, with grad_out [T, D])."""
    check_dim(rows, 2, op, "rows", "[tokens, entries]")
    check_dim(table, 2, op, "table", "[num_rows, dim]")
    check_dim(scores, 3, op, "scores", "[tokens, entries, cores]")
    check_index(rows, op, "rows")
    check_float(table, op, "table")
    check_float(scores, op, "scores")
    check_same_device(op, rows=rows, table=table, scores=scores)
    _check_scores_fit(op, rows, scores, table, "table")
    if grad_out is not None:
        check_float(grad_out, op, "grad_out")
        check_same_device(op, grad_out=grad_out, rows=rows)
        check(
            tuple(grad_out.shape) == (rows.shape[0], table.shape[1]),
            op,
            f"grad_out shape {tuple(grad_out.shape)} must be (tokens, dim) = ({rows.shape[0]}, {table.shape[1]})",
        )


def check_gate_args(
    op: str, rows: torch.Tensor, table: torch.Tensor, x: torch.Tensor, grad_gate: torch.Tensor | None = None
) -> None:
    """The arguments of `pre_value_gate` (and of its backwards, with grad_gate [T, E])."""
    check_dim(rows, 2, op, "rows", "[tokens, entries]")
    check_dim(table, 2, op, "table", "[num_rows, dim]")
    check_dim(x, 2, op, "x", "[tokens, dim]")
    check_index(rows, op, "rows")
    check_float(table, op, "table")
    check_float(x, op, "x")
    check_same_device(op, rows=rows, table=table, x=x)
    check(x.shape[0] == rows.shape[0], op, f"x has {x.shape[0]} tokens but rows has {rows.shape[0]}")
    check(x.shape[1] == table.shape[1], op, f"x dim {x.shape[1]} must equal table dim {table.shape[1]}")
    if grad_gate is not None:
        check_float(grad_gate, op, "grad_gate")
        check_same_device(op, grad_gate=grad_gate, rows=rows)
        check(
            tuple(grad_gate.shape) == tuple(rows.shape),
            op,
            f"grad_gate shape {tuple(grad_gate.shape)} must equal rows shape {tuple(rows.shape)}",
        )


def check_gate_lookup_args(
    op: str, rows: torch.Tensor, values: torch.Tensor, pre_values: torch.Tensor, x: torch.Tensor, scores: torch.Tensor
) -> None:
    """The tensor arguments of `gate_lookup` (its buffer ids are checked by the op)."""
    check_dim(rows, 2, op, "rows", "[tokens, entries]")
    check_dim(values, 2, op, "values", "[num_rows, dim]")
    check_dim(pre_values, 2, op, "pre_values", "[num_rows, pre_dim]")
    check_dim(x, 2, op, "x", "[tokens, pre_dim]")
    check_dim(scores, 3, op, "scores", "[tokens, entries, cores]")
    check_index(rows, op, "rows")
    for name, t in (("values", values), ("pre_values", pre_values), ("x", x), ("scores", scores)):
        check_float(t, op, name)
    check_same_device(op, rows=rows, values=values, pre_values=pre_values, x=x, scores=scores)
    check(
        pre_values.shape[0] == values.shape[0],
        op,
        f"pre_values has {pre_values.shape[0]} rows but values has {values.shape[0]}; rows index both",
    )
    check(x.shape[0] == rows.shape[0], op, f"x has {x.shape[0]} tokens but rows has {rows.shape[0]}")
    check(x.shape[1] == pre_values.shape[1], op, f"x dim {x.shape[1]} must equal pre_values dim {pre_values.shape[1]}")
    _check_scores_fit(op, rows, scores, values, "values")


def check_retrieval_args(
    op: str,
    row_scores: torch.Tensor,
    col_scores: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    knn: int,
    n_keys: int = -1,
) -> None:
    """The arguments of `tdqkr_retrieval`."""
    check_dim(row_scores, 4, op, "row_scores", "[tokens, heads, row_keys, rank]")
    check_dim(col_scores, 4, op, "col_scores", "[tokens, heads, col_keys, rank]")
    check_dim(cores, 4, op, "cores", "[heads, cores, rank, rank]")
    check_dim(u, 2, op, "u", "[heads, rank]")
    check_dim(v, 2, op, "v", "[heads, rank]")
    for name, t in (("row_scores", row_scores), ("col_scores", col_scores), ("cores", cores), ("u", u), ("v", v)):
        check_float(t, op, name)
    check_same_device(op, row_scores=row_scores, col_scores=col_scores, cores=cores, u=u, v=v)
    t, h, n_row, r = row_scores.shape
    check(
        col_scores.shape[0] == t and col_scores.shape[1] == h and col_scores.shape[3] == r,
        op,
        f"col_scores shape {tuple(col_scores.shape)} must agree with row_scores shape "
        f"{tuple(row_scores.shape)} in tokens, heads and rank",
    )
    check(
        cores.shape[0] == h and cores.shape[2] == r and cores.shape[3] == r,
        op,
        f"cores shape {tuple(cores.shape)} must be (heads={h}, cores, rank={r}, rank={r})",
    )
    check(
        tuple(u.shape) == (h, r) and tuple(v.shape) == (h, r),
        op,
        f"u {tuple(u.shape)} and v {tuple(v.shape)} must both be (heads={h}, rank={r})",
    )
    n_col = col_scores.shape[2]
    check(
        n_keys == -1 or 1 <= n_keys <= min(n_row, n_col),
        op,
        f"n_keys={n_keys} must be -1 (all keys) or in [1, min(row_keys={n_row}, col_keys={n_col})]",
    )
    if n_keys != -1:
        n_row = n_col = n_keys
    check(1 <= knn <= min(n_row, n_col), op, f"knn={knn} must be in [1, min(row_keys={n_row}, col_keys={n_col})]")


def stacked_sides(op: str, sub_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked retrieval's sub_scores [T, H, 2, n, r] as (row_scores, col_scores) views."""
    check_dim(sub_scores, 5, op, "sub_scores", "[tokens, heads, 2 (row, col), keys, rank]")
    check(
        sub_scores.shape[2] == 2,
        op,
        f"sub_scores shape {tuple(sub_scores.shape)}: dim 2 holds the row and the column scores, so it must be 2",
    )
    return sub_scores.unbind(2)


def check_stacked_retrieval_args(
    op: str, sub_scores: torch.Tensor, cores: torch.Tensor, u: torch.Tensor, v: torch.Tensor, knn: int, n_keys: int = -1
) -> None:
    """The arguments of `tdqkr_retrieval_stacked`."""
    check_retrieval_args(op, *stacked_sides(op, sub_scores), cores, u, v, knn, n_keys)


def check_retrieval_rows_args(
    op: str,
    sub_scores: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    knn: int,
    n_keys: int,
    perm: torch.Tensor,
    num_logical: int,
    row_window: torch.Tensor,
    q: torch.Tensor | None = None,
    q_eps: float = 0.0,
) -> None:
    """The arguments of `tdqkr_retrieval_rows`: the stacked retrieval's, its row map, then the
    queries whose norms scale the scores (when given)."""
    check_stacked_retrieval_args(op, sub_scores, cores, u, v, knn, n_keys)
    n = sub_scores.shape[3] if n_keys == -1 else n_keys
    n_ids = n * n
    check_dim(perm, 1, op, "perm", "[virtual ids]")
    check_index(perm, op, "perm")
    check(
        perm.numel() >= n_ids,
        op,
        f"perm has {perm.numel()} entries, fewer than the {n_ids} virtual ids the keys address",
    )
    check(num_logical >= 1, op, f"num_logical={num_logical} must be at least 1")
    check(
        row_window.numel() == 2 and row_window.is_contiguous(),
        op,
        f"row_window must be 2 contiguous values (offset, num_rows), got shape {tuple(row_window.shape)} "
        f"and strides {tuple(row_window.stride())}",
    )
    check_index(row_window, op, "row_window")
    check_same_device(op, sub_scores=sub_scores, perm=perm, row_window=row_window)
    if q is None:
        return
    t, h = sub_scores.shape[:2]
    check_dim(q, 4, op, "q", "[T, H, 2, d]")
    check_float(q, op, "q")
    check(
        tuple(q.shape[:3]) == (t, h, 2) and q.shape[3] >= 1,
        op,
        f"q must be [T={t}, H={h}, 2, d ≥ 1] (one query per side), got {tuple(q.shape)}",
    )
    check(q.stride(3) == 1, op, f"q's last dim must be contiguous, got strides {tuple(q.stride())}")
    check(q_eps >= 0, op, f"q_eps={q_eps} must be at least 0")
    check_same_device(op, sub_scores=sub_scores, q=q)


def check_row_window(op: str, row_window: torch.Tensor) -> None:
    """row_window's values: a number of rows of at least 1 (reads them: CPU, or debug mode)."""
    if row_window.device.type == "meta" or (row_window.device.type != "cpu" and not _debug):
        return
    num_rows = int(row_window.reshape(-1)[1])
    check(num_rows >= 1, op, f"row_window's num_rows={num_rows} must be at least 1")


def check_stacked_retrieval_backward_args(
    op: str,
    grad_scores: torch.Tensor,
    sub_scores: torch.Tensor,
    cores: torch.Tensor,
    ids: torch.Tensor,
    n_keys: int = -1,
) -> int:
    """The arguments of `tdqkr_retrieval_stacked_backward`; returns the number of virtual ids."""
    return check_retrieval_backward_args(op, grad_scores, *stacked_sides(op, sub_scores), cores, ids, n_keys)


def check_retrieval_backward_args(
    op: str,
    grad_scores: torch.Tensor,
    row_scores: torch.Tensor,
    col_scores: torch.Tensor,
    cores: torch.Tensor,
    ids: torch.Tensor,
    n_keys: int = -1,
) -> int:
    """The arguments of `tdqkr_retrieval_backward`; returns the number of virtual ids (ids must lie
    in [0, that))."""
    check_dim(row_scores, 4, op, "row_scores", "[tokens, heads, row_keys, rank]")
    check_dim(col_scores, 4, op, "col_scores", "[tokens, heads, col_keys, rank]")
    check_dim(cores, 4, op, "cores", "[heads, cores, rank, rank]")
    check_dim(ids, 3, op, "ids", "[tokens, heads, knn]")
    check_dim(grad_scores, 4, op, "grad_scores", "[tokens, heads, knn, cores]")
    for name, t in (
        ("grad_scores", grad_scores),
        ("row_scores", row_scores),
        ("col_scores", col_scores),
        ("cores", cores),
    ):
        check_float(t, op, name)
    check_index(ids, op, "ids")
    check_same_device(op, grad_scores=grad_scores, row_scores=row_scores, col_scores=col_scores, cores=cores, ids=ids)
    t, h, n_row, r = row_scores.shape
    n_col = col_scores.shape[2]
    check(
        tuple(col_scores.shape[:2]) == (t, h) and col_scores.shape[3] == r,
        op,
        f"col_scores shape {tuple(col_scores.shape)} must agree with row_scores shape "
        f"{tuple(row_scores.shape)} in tokens, heads and rank",
    )
    check(
        cores.shape[0] == h and tuple(cores.shape[2:]) == (r, r),
        op,
        f"cores shape {tuple(cores.shape)} must be (heads={h}, cores, rank={r}, rank={r})",
    )
    check(
        n_keys == -1 or 1 <= n_keys <= min(n_row, n_col),
        op,
        f"n_keys={n_keys} must be -1 (all keys) or in [1, min(row_keys={n_row}, col_keys={n_col})]",
    )
    check(tuple(ids.shape[:2]) == (t, h), op, f"ids shape {tuple(ids.shape)} must be (tokens={t}, heads={h}, knn)")
    knn, m = ids.shape[2], cores.shape[1]
    check(
        tuple(grad_scores.shape) == (t, h, knn, m),
        op,
        f"grad_scores shape {tuple(grad_scores.shape)} must be (tokens={t}, heads={h}, knn={knn}, cores={m})",
    )
    if n_keys != -1:
        n_row = n_col = n_keys
    return n_row * n_col


def check_stats_args(
    hits: torch.Tensor, sums: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, scores: torch.Tensor
) -> None:
    """The arguments of `layer_stats_accumulate`."""
    op = "layer_stats_accumulate"
    for name, t, layout in (("hits", hits, "[values]"), ("sums", sums, "[6]")):
        check_dim(t, 1, op, name, layout)
        check(t.dtype == torch.float64, op, f"{name} must be float64 (exact counts), got {t.dtype}")
        check(t.is_contiguous(), op, f"{name} must be contiguous, got stride {t.stride()}")
    check(sums.shape[0] == 6, op, f"sums must have 6 entries, got {sums.shape[0]}")
    check_index(ids, op, "ids")
    check_float(y, op, "y")
    check_dim(scores, 3, op, "scores", "[rows, ranked entries, cores]")
    check_float(scores, op, "scores")
    check(
        scores.shape[1] >= 1 and scores.shape[2] >= 1,
        op,
        f"scores shape {tuple(scores.shape)} must have at least one ranked entry and one core",
    )
    check_same_device(op, hits=hits, sums=sums, ids=ids, y=y, scores=scores)


def check_normed_keys_args(
    op: str, keys: torch.Tensor, eps: float, n_pad: int | None = None, out_dtype: torch.dtype | None = None
) -> None:
    """The arguments of `normed_keys` (n_pad, out_dtype None: not given, as in its backward)."""
    check_dim(keys, 5, op, "keys", "[heads, sides, keys, kdim, rank]")
    check_float(keys, op, "keys")
    check(math.isfinite(eps) and eps >= 0, op, f"eps must be finite and >= 0, got {eps}")
    if n_pad is not None:
        n = keys.shape[2]
        check(n_pad >= n, op, f"n_pad must be at least the number of keys {n}, got {n_pad}")
    if out_dtype is not None:
        check(out_dtype in FLOAT_DTYPES, op, f"out_dtype must be bf16, fp16, fp32 or fp64, got {out_dtype}")


def check_normed_keys_backward_args(op: str, grad_out: torch.Tensor, keys: torch.Tensor, eps: float) -> None:
    """The arguments of `normed_keys_backward`."""
    check_normed_keys_args(op, keys, eps)
    check_float(grad_out, op, "grad_out")
    h, s, n, kd, r = keys.shape
    check(
        grad_out.dim() == 5
        and tuple(grad_out.shape[:2]) == (h, s)
        and tuple(grad_out.shape[3:]) == (r, kd)
        and grad_out.shape[2] >= n,
        op,
        f"grad_out must have shape (H={h}, S={s}, n_pad>={n}, r={r}, kdim={kd}), got {tuple(grad_out.shape)}",
    )
    check_same_device(op, grad_out=grad_out, keys=keys)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64 (the test oracle), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
