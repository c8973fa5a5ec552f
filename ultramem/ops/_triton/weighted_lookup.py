"""Triton kernels for ultramem::weighted_lookup, and the gather kernels it shares with
pre_value_gate.

Three kernels cover both ops (a gate is a lookup with one core whose "grad_out" is x):

- `_weighted_gather_kernel`: out[t, d] = Σ_e w[t, e, core(d)] · table[rows[t, e], d]
  (lookup forward; the gate's grad_x).
- `_gather_dot_scatter_kernel`: per entry, dots[t, e, m] = <table[row] chunk m, g[t] chunk m>
  (lookup grad_scores; the gate forward) and/or grad_table[row, d] += w[t, e, core(d)] · g[t, d]
  with fp32 atomics (lookup and gate table gradients).
- `_segment_scatter_kernel`: the same table gradient with one writer per row, over entries sorted
  by row (deterministic mode; the dots then come from `_gather_dot_scatter_kernel`). A row's
  run of entries is cut into pieces of at most SEGMENT_PIECE, summed in parallel and added in
  order, so a hot row picked by many tokens does not leave one lane walking its whole run.

All loads are upcast to the accumulation dtype (fp32, or fp64 for fp64 inputs) right away;
columns are split into `M` chunks of `D / M`, core(d) = d // (D / M). Index values outside
[0, N) contribute nothing and are never dereferenced (the range check itself runs in debug
mode only, as it needs a host sync).

The launchers launch through `_launch.launch` and fill outputs by allocation or by kernel only,
so that the ops' triton_op bodies trace to launches (see `ultramem/ops/retrieval.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import acc_dtype, check, check_index_range, check_lookup_args, check_once
from ..determinism import deterministic_enabled
from ._launch import cdiv, launch, next_pow2

_OP = "weighted_lookup"

# Launch shapes, chosen by timing at the reference shapes (perf/history/weighted_lookup.md); any
# value is correct, and the launchers read them on every call (sweeps and tests patch them).
# BLOCK_T tokens x BLOCK_E entries x BLOCK_D columns are gathered per loop step. D_FASTEST puts a
# token's column blocks next to each other in the grid (no faster at the reference shapes).
FWD_CONFIG = {"BLOCK_T": 1, "BLOCK_E": 32, "BLOCK_D": 64, "num_warps": 1, "EVICT_FIRST": True, "D_FASTEST": False}
BWD_CONFIG = {"BLOCK_T": 1, "BLOCK_E": 8, "BLOCK_D": 256, "num_warps": 4}
DOTS_CONFIG = {"BLOCK_T": 1, "BLOCK_E": 4, "BLOCK_D": 256, "num_warps": 1}
SEGMENT_CONFIG = {"BLOCK_J": 4, "BLOCK_D": 256, "num_warps": 1}
# Longest stretch of one row's sorted entries a lane of the segment kernel sums alone (see
# `_segment_scatter_kernel`); longer runs (hot rows) are cut into pieces summed in parallel.
SEGMENT_PIECE = 64


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(requested: int, d: int) -> int:
    return max(8, min(int(requested), next_pow2(d)))


# ------------------------------------------------------------------------------------ kernels


@triton.jit
def _load_core_scores(s_ptrs, s_sm, mask, M: tl.constexpr, ACC: tl.constexpr):
    """Each entry's M core scores: a tuple of M tensors shaped like s_ptrs (0 where masked)."""
    out = ()
    for mm in tl.static_range(M):
        out = out + (tl.load(s_ptrs + mm * s_sm, mask=mask, other=0.0).to(ACC),)
    return out


@triton.jit
def _select_core(scores, chunk, M: tl.constexpr):
    """[..., BD] weights: scores[chunk[d]] for every column (0 past the last core)."""
    w = tl.where(chunk == 0, tl.expand_dims(scores[0], -1), 0.0)
    for mm in tl.static_range(1, M):
        w = tl.where(chunk == mm, tl.expand_dims(scores[mm], -1), w)
    return w


@triton.jit
def _core_weights(s_ptrs, s_sm, mask, chunk, M: tl.constexpr, ACC: tl.constexpr):
    """[..., BD] weights: the score of core chunk[d] for every column (0 past the last core)."""
    return _select_core(_load_core_scores(s_ptrs, s_sm, mask, M, ACC), chunk, M)


@triton.jit
def _weighted_gather_kernel(
    rows_ptr,
    r_st,
    r_se,
    table_ptr,
    tb_sn,
    tb_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    out_ptr,
    o_st,
    o_sd,
    T,
    E,
    N,
    D,
    DM,
    M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_FASTEST: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    ACC: tl.constexpr,
):
    if D_FASTEST:  # a token's column blocks run next to each other: its ids and rows are hot
        n_d = tl.cdiv(D, BLOCK_D)
        pid_t = tl.program_id(0) // n_d
        pid_d = tl.program_id(0) % n_d
    else:
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    chunk = (d // DM)[None, None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        te_ok = t_ok[:, None] & (e < E)[None, :]
        ids = tl.load(rows_ptr + t[:, None] * r_st + e[None, :] * r_se, mask=te_ok, other=0).to(tl.int64)
        ok = te_ok & (ids >= 0) & (ids < N)
        v_ptrs = table_ptr + ids[:, :, None] * tb_sn + d[None, None, :] * tb_sd
        v_mask = ok[:, :, None] & d_ok[None, None, :]
        if EVICT_FIRST:  # gathered rows are read once: keep them from pushing ids/scores out of L2
            vals = tl.load(v_ptrs, mask=v_mask, other=0.0, eviction_policy="evict_first").to(ACC)
        else:
            vals = tl.load(v_ptrs, mask=v_mask, other=0.0).to(ACC)
        w = _core_weights(s_ptr + t[:, None] * s_st + e[None, :] * s_se, s_sm, ok, chunk, M, ACC)
        acc += tl.sum(vals * w, axis=1)
    tl.store(
        out_ptr + t[:, None] * o_st + d[None, :] * o_sd,
        acc.to(out_ptr.dtype.element_ty),
        mask=t_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _gather_dot_scatter_kernel(
    rows_ptr,
    r_st,
    r_se,
    table_ptr,
    tb_sn,
    tb_sd,
    g_ptr,
    g_st,
    g_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    dots_ptr,
    dt_st,
    dt_se,
    dt_sm,
    gt_ptr,
    gt_sn,
    gt_sd,
    T,
    E,
    N,
    D,
    DM,
    M: tl.constexpr,
    MP: tl.constexpr,
    COMPUTE_DOTS: tl.constexpr,
    SCATTER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUM_ONCE: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    core = tl.arange(0, MP)[None, None, :]
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        te_ok = t_ok[:, None] & (e < E)[None, :]
        ids = tl.load(rows_ptr + t[:, None] * r_st + e[None, :] * r_se, mask=te_ok, other=0).to(tl.int64)
        ok = te_ok & (ids >= 0) & (ids < N)
        dots = tl.zeros((BLOCK_T, BLOCK_E, MP), dtype=ACC)
        if SUM_ONCE:  # one core, several column blocks: add products elementwise, reduce once
            prod_acc = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_D), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            chunk = (d // DM)[None, None, :]
            gv = tl.load(
                g_ptr + t[:, None] * g_st + d[None, :] * g_sd, mask=t_ok[:, None] & d_ok[None, :], other=0.0
            ).to(ACC)[:, None, :]
            vd_mask = ok[:, :, None] & d_ok[None, None, :]
            if COMPUTE_DOTS:
                vals = tl.load(
                    table_ptr + ids[:, :, None] * tb_sn + d[None, None, :] * tb_sd, mask=vd_mask, other=0.0
                ).to(ACC)
                if SUM_ONCE:
                    prod_acc += vals * gv
                else:
                    prod = vals * gv
                    for mm in tl.static_range(M):
                        part = tl.sum(tl.where(chunk == mm, prod, 0.0), axis=2)
                        dots = tl.where(core == mm, dots + part[:, :, None], dots)
            if SCATTER:
                w = _core_weights(s_ptr + t[:, None] * s_st + e[None, :] * s_se, s_sm, ok, chunk, M, ACC)
                tl.atomic_add(
                    gt_ptr + ids[:, :, None] * gt_sn + d[None, None, :] * gt_sd,
                    (w * gv).to(gt_ptr.dtype.element_ty),
                    mask=vd_mask,
                    sem="relaxed",
                )
        if COMPUTE_DOTS:
            if SUM_ONCE:
                dots = tl.sum(prod_acc, axis=2)[:, :, None]
            tl.store(
                dots_ptr + t[:, None, None] * dt_st + e[None, :, None] * dt_se + core * dt_sm,
                dots.to(dots_ptr.dtype.element_ty),
                mask=te_ok[:, :, None] & (core < M),
            )


@triton.jit
def _walk_piece(
    start,
    row,
    L,
    sorted_ptr,
    perm_ptr,
    g_ptr,
    g_st,
    g_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    acc,
    d,
    d_ok,
    chunk,
    E,
    M: tl.constexpr,
    PIECE: tl.constexpr,
    ACC: tl.constexpr,
):
    """acc + Σ scores · g[token] over the entries of `row` from sorted position `start` (lanes where
    start >= 0) up to the row's end or the next multiple of PIECE, in order."""
    active = start >= 0
    pos = tl.maximum(start, 0)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        ent = tl.load(perm_ptr + pos, mask=active, other=0).to(tl.int64)
        tok = ent // E
        en = ent - tok * E
        gv = tl.load(
            g_ptr + tok[:, None] * g_st + d[None, :] * g_sd, mask=active[:, None] & d_ok[None, :], other=0.0
        ).to(ACC)
        w = _core_weights(s_ptr + tok * s_st + en * s_se, s_sm, active, chunk, M, ACC)
        acc += w * gv
        pos += 1
        more = active & (pos < L) & (pos % PIECE != 0)
        nxt = tl.load(sorted_ptr + pos, mask=more, other=-1).to(tl.int64)
        active = more & (nxt == row)
    return acc


@triton.jit
def _segment_scatter_kernel(
    sorted_ptr,
    perm_ptr,
    L,
    g_ptr,
    g_st,
    g_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    gt_ptr,
    gt_sn,
    gt_sd,
    part_ptr,
    pa_sp,
    pa_sd,
    E,
    N,
    D,
    DM,
    M: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PIECES_PASS: tl.constexpr,
    PIECE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """One writer per row over the row-sorted entries, in a fixed order, with no lane walking more
    than PIECE entries: a row's run is cut at the multiples of PIECE of the sorted positions.

    PIECES_PASS: lane p sums the piece starting at position p·PIECE into part[p] when that
    position continues a run (is not its row's first entry).
    Otherwise: lanes at a row's first entry sum up to the next cut, then add the part of every
    later piece of the same row in order, and write the row once (added to it if ACCUMULATE).
    So a hot row picked by many entries costs its lane PIECE entries plus one part per piece,
    not the whole run."""
    pid_d = tl.program_id(1)
    lane = (tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    if PIECES_PASS:
        j = lane * PIECE
    else:
        j = lane
    j_ok = j < L
    row = tl.load(sorted_ptr + j, mask=j_ok, other=-1).to(tl.int64)
    prev = tl.load(sorted_ptr + j - 1, mask=j_ok & (j > 0), other=-1).to(tl.int64)
    real = j_ok & (row >= 0) & (row < N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    chunk = (d // DM)[None, :]
    if PIECES_PASS:
        starts = real & (row == prev)
    else:
        starts = real & (row != prev)
        # whether the run goes on past the next cut: loaded now, beside the row ids, so that
        # it adds no round trip after the walk when (as usual) runs are short
        cut = (j // PIECE + 1) * PIECE
        at_cut = tl.load(sorted_ptr + cut, mask=starts & (cut < L), other=-1).to(tl.int64)
    row_mask = starts[:, None] & d_ok[None, :]
    # The row read depends only on the row id: issue it before walking the run.
    out_ptrs = gt_ptr + row[:, None] * gt_sn + d[None, :] * gt_sd
    if ACCUMULATE and not PIECES_PASS:
        acc = tl.load(out_ptrs, mask=row_mask, other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=ACC)
    acc = _walk_piece(
        tl.where(starts, j, -1),
        row,
        L,
        sorted_ptr,
        perm_ptr,
        g_ptr,
        g_st,
        g_sd,
        s_ptr,
        s_st,
        s_se,
        s_sm,
        acc,
        d,
        d_ok,
        chunk,
        E,
        M,
        PIECE,
        ACC,
    )
    if PIECES_PASS:
        tl.store(part_ptr + lane[:, None] * pa_sp + d[None, :] * pa_sd, acc, mask=row_mask)
    else:
        active = starts & (at_cut == row)  # the run continues into later pieces
        while tl.max(active.to(tl.int32), axis=0) > 0:
            acc += tl.load(
                part_ptr + (cut // PIECE)[:, None] * pa_sp + d[None, :] * pa_sd,
                mask=active[:, None] & d_ok[None, :],
                other=0.0,
            )
            cut += PIECE
            more = active & (cut < L)
            nxt = tl.load(sorted_ptr + cut, mask=more, other=-1).to(tl.int64)
            active = more & (nxt == row)
        tl.store(out_ptrs, acc.to(gt_ptr.dtype.element_ty), mask=row_mask)


# ------------------------------------------------------------------------- generic launchers


def _scores3(s: Tensor) -> tuple[Tensor, tuple[int, int, int], int]:
    """Scores as [T, E, M] strides; a [T, E] tensor is one core (stride 0)."""
    if s.dim() == 2:
        return s, (s.stride(0), s.stride(1), 0), 1
    return s, (s.stride(0), s.stride(1), s.stride(2)), s.shape[2]


def weighted_gather(rows: Tensor, table: Tensor, scores: Tensor, out: Tensor, acc: torch.dtype) -> Tensor:
    """out[t, chunk m] = Σ_e scores[t, e, m] · table[rows[t, e], chunk m]; scores [T, E] = one core."""
    cfg = FWD_CONFIG
    t, e = rows.shape
    n, d = table.shape
    s, s_strides, m = _scores3(scores)
    if out.numel() == 0:
        return out
    bt, be, bd = cfg["BLOCK_T"], cfg["BLOCK_E"], _block_d(cfg["BLOCK_D"], d)
    d_fastest = bool(cfg["D_FASTEST"])
    grid = (cdiv(t, bt) * cdiv(d, bd), 1) if d_fastest else (cdiv(t, bt), cdiv(d, bd))
    launch(
        _weighted_gather_kernel,
        grid,
        rows,
        rows.stride(0),
        rows.stride(1),
        table,
        table.stride(0),
        table.stride(1),
        s,
        *s_strides,
        out,
        out.stride(0),
        out.stride(1),
        t,
        e,
        n,
        d,
        d // m,
        M=m,
        BLOCK_T=bt,
        BLOCK_E=be,
        BLOCK_D=bd,
        D_FASTEST=d_fastest,
        EVICT_FIRST=bool(cfg["EVICT_FIRST"]),
        ACC=_tl_acc(acc),
        num_warps=cfg["num_warps"],
    )
    return out


def gather_dots_scatter(
    rows: Tensor,
    g: Tensor,
    m: int,
    acc: torch.dtype,
    *,
    table: Tensor | None = None,
    dots: Tensor | None = None,
    scores: Tensor | None = None,
    grad_table: Tensor | None = None,
) -> None:
    """dots[t, e, m] = <table[rows[t, e]] chunk m, g[t] chunk m> when `dots` is given (a [T, E]
    tensor for one core); grad_table[rows[t, e], chunk m] += scores[t, e, m] · g[t, chunk m]
    (fp32 atomics) when `grad_table` is given."""
    cfg = BWD_CONFIG if grad_table is not None else DOTS_CONFIG
    t, e = rows.shape
    d = g.shape[1]
    n = table.shape[0] if table is not None else grad_table.shape[0]
    if t == 0 or e == 0 or d == 0:
        return
    compute_dots, scatter = dots is not None, grad_table is not None
    tab = table if compute_dots else g
    dts, dt_strides, _ = _scores3(dots) if compute_dots else (g, (0, 0, 0), m)
    sc, s_strides, _ = _scores3(scores) if scatter else (g, (0, 0, 0), m)
    gt = grad_table if scatter else g
    bt, be, bd = cfg["BLOCK_T"], cfg["BLOCK_E"], _block_d(cfg["BLOCK_D"], d)
    launch(
        _gather_dot_scatter_kernel,
        (cdiv(t, bt),),
        rows,
        rows.stride(0),
        rows.stride(1),
        tab,
        tab.stride(0),
        tab.stride(1),
        g,
        g.stride(0),
        g.stride(1),
        sc,
        *s_strides,
        dts,
        *dt_strides,
        gt,
        gt.stride(0),
        gt.stride(1),
        t,
        e,
        n,
        d,
        d // m,
        M=m,
        MP=next_pow2(m),
        COMPUTE_DOTS=compute_dots,
        SCATTER=scatter,
        BLOCK_T=bt,
        BLOCK_E=be,
        BLOCK_D=bd,
        SUM_ONCE=compute_dots and m == 1 and d > bd,
        ACC=_tl_acc(acc),
        num_warps=cfg["num_warps"],
    )


def sort_rows(rows: Tensor, num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Entries sorted by row (stable): (sorted row ids, flat entry index t*E + e). Keys go
    through int32 when the ids fit (a 32-bit radix sort takes about 60% of the 64-bit one)."""
    flat = rows.reshape(-1)
    if flat.dtype == torch.int64 and num_rows is not None and num_rows < 2**31:
        flat = flat.to(torch.int32)
    return torch.sort(flat, stable=True)


def segment_scatter(
    rows: Tensor,
    g: Tensor,
    scores: Tensor,
    grad_table: Tensor,
    acc: torch.dtype,
    *,
    accumulate: bool,
    order: tuple[Tensor, Tensor] | None = None,
) -> None:
    """grad_table[row] (+)= Σ over the row's entries of scores · g[token], one writer per row, in
    a fixed order."""
    cfg, piece = SEGMENT_CONFIG, SEGMENT_PIECE
    t, e = rows.shape
    n, d = grad_table.shape
    if t == 0 or e == 0 or d == 0:
        return
    (sc, s_strides, m), (sorted_ids, perm) = _scores3(scores), order or sort_rows(rows, n)
    bd = _block_d(cfg["BLOCK_D"], d)
    bj = cfg["BLOCK_J"]
    n_pieces = cdiv(t * e, piece)
    # part[p]: the sum over piece p when it continues a run (written by the pieces pass only there)
    part = torch.empty(
        (n_pieces, d), dtype=torch.float64 if acc == torch.float64 else torch.float32, device=grad_table.device
    )
    common = dict(
        M=m,
        ACCUMULATE=accumulate,
        PIECE=piece,
        BLOCK_J=bj,
        BLOCK_D=bd,
        ACC=_tl_acc(acc),
        num_warps=cfg["num_warps"],
    )
    args = [
        sorted_ids,
        perm,
        t * e,
        g,
        g.stride(0),
        g.stride(1),
        sc,
        *s_strides,
        grad_table,
        grad_table.stride(0),
        grad_table.stride(1),
        part,
        part.stride(0),
        part.stride(1),
        e,
        n,
        d,
        d // m,
    ]
    launch(_segment_scatter_kernel, (cdiv(n_pieces, bj), cdiv(d, bd)), *args, PIECES_PASS=True, **common)
    launch(_segment_scatter_kernel, (cdiv(t * e, bj), cdiv(d, bd)), *args, PIECES_PASS=False, **common)


def lookup_table_grad(
    grad_out: Tensor,
    rows: Tensor,
    table: Tensor,
    scores: Tensor,
    grad_table: Tensor,
    *,
    accumulate: bool,
    deterministic: bool | None = None,
    order: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Adds the table gradient into grad_table (pre-zeroed when not `accumulate`) and returns
    grad_scores in scores' dtype. `order` is a precomputed `sort_rows(rows)` for the
    deterministic path (the gate's and the lookup's backward share their rows)."""
    if deterministic is None:
        deterministic = deterministic_enabled()
    acc = acc_dtype(table, scores, grad_out)
    m = scores.shape[2]
    if table.shape[1] == 0:  # no columns: every dot is an empty sum (the kernels launch nothing)
        return torch.zeros_like(scores, memory_format=torch.contiguous_format)
    if not deterministic:
        grad_scores = torch.empty_like(scores, memory_format=torch.contiguous_format)
        gather_dots_scatter(
            rows,
            grad_out,
            m,
            acc,
            table=table,
            dots=grad_scores,
            scores=scores,
            grad_table=grad_table,
        )
        return grad_scores
    # Deterministic: the dots in token order beside the one-writer-per-row scatter (a lighter
    # segment kernel than one that also computes them; perf/history/weighted_lookup.md).
    grad_scores = torch.empty_like(scores, memory_format=torch.contiguous_format)
    gather_dots_scatter(rows, grad_out, m, acc, table=table, dots=grad_scores)
    segment_scatter(rows, grad_out, scores, grad_table, acc, accumulate=accumulate, order=order)
    return grad_scores


# ------------------------------------------------------------------------ the op's launchers


def weighted_lookup_cuda(rows: Tensor, table: Tensor, scores: Tensor) -> Tensor:
    check_once(_OP, check_lookup_args, _OP, rows, table, scores)
    check_index_range(rows, table.shape[0], _OP, "rows")
    if rows.shape[1] == 0:
        return scores.new_zeros((rows.shape[0], table.shape[1]))
    out = scores.new_empty((rows.shape[0], table.shape[1]))
    return weighted_gather(rows, table, scores, out, acc_dtype(table, scores))


def weighted_lookup_backward_cuda(
    grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor
) -> tuple[Tensor, Tensor]:
    """The dense contract of the reference: a zero-filled [N, D] gradient per call."""
    op = "weighted_lookup_backward"
    check_once(op, check_lookup_args, op, rows, table, scores, grad_out)
    check_index_range(rows, table.shape[0], op, "rows")
    acc = acc_dtype(table, scores, grad_out)
    grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
    grad_scores = lookup_table_grad(grad_out, rows, table, scores, grad_table, accumulate=False)
    return grad_table, grad_scores


def weighted_lookup_backward_accumulate_cuda(
    grad_table: Tensor, grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor
) -> Tensor:
    """Adds the table gradient into the persistent `grad_table` buffer; returns grad_scores.
    Arguments and the range are checked first (the op checks the buffer): nothing is written
    when they are refused."""
    op = "weighted_lookup_backward_accumulate"
    check_once(op, check_lookup_args, op, rows, table, scores, grad_out)
    check_index_range(rows, table.shape[0], op, "rows")
    check(
        tuple(grad_table.shape) == tuple(table.shape),
        op,
        f"grad_table shape {tuple(grad_table.shape)} must equal table shape {tuple(table.shape)}",
    )
    return lookup_table_grad(grad_out, rows, table, scores, grad_table, accumulate=True)
