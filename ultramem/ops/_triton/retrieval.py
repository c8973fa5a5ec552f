"""Triton kernels for ultramem::tdqkr_retrieval (forward and backward).

Forward (`_retrieval_fwd_kernel`), one program per (token, head), everything on chip except
small scratch rows in one allocation (kept rows | kept columns, kept pairs, their grid totals;
the candidates of a grid walked in row tiles):
  1. coarse scores a = A·u, b = B·v of all sub-keys (u, v folded into the load), held as [P, G]
     blocks, G = the program's threads (one key per thread in each register row);
  2. per side, the k-th largest coarse score by a search on counts (`_kth_threshold`): value
     halving from [least of more than k group maxima, the float above the maximum], then halving
     of the floats' order-preserving integer keys (capped at 40 more steps, so it ends on any
     input); the kept keys take scratch slots from one exclusive scan over per-thread counts;
  3. the k×k grid S = A_I (Σ_m C_m) B_Jᵀ, its k-th largest entry and the kept pairs the same way
     (in registers up to k = 64 at the default GRID_TILE). Larger grids are walked in row tiles
     (`_grid_select_candidates`) over factors staged in scratch (`_stage_factors`: A_I·ΣC and
     B_J, 2·R·k floats per program): each tile appends its entries at or above a running
     floor to a candidate scratch row, raising the floor first when more than CAND_TILE of them
     are (so each tile appends at most CAND_TILE); the exact selection then runs on the
     candidates in registers. The floor is at most the k-th largest total whenever at least k
     candidates reach it, so the kept set is the whole grid's; when they do not, or ties
     overflow the slots, the bisection that recomputes every tile on each pass
     (`_grid_select_tiled`) decides;
  4. the kept pairs sorted (bitonic, k entries), their per-core scores recomputed and written
     with the ids.
Every selection keeps all scores above the k-th and, of those equal to it, the lowest positions:
the reference's set whenever scores are distinct. A NaN coarse score or grid total ranks last
(so k distinct pairs are always kept) and makes all of its (token, head)'s scores NaN: the op's
NaN rule (ultramem.ops.retrieval); ±inf are ordinary values. No atomics: kept entries land in scratch in a
fixed order, so the outputs are deterministic also among exactly tied grid totals.
Launch: FWD_NUM_WARPS_SMALL_K warps with at most FWD_MAXNREG_SMALL_K registers per thread for
k <= 32, FWD_NUM_WARPS above (at most FWD_MAXNREG_TILED registers per thread for the candidate
selection: two programs per SM). Measurements: perf/history/tdqkr_retrieval.md.

Backward (`_retrieval_bwd_kernel`), one single-warp program per (token, head): zero the program's
whole block of grad_row / grad_col, padding rows included (16-byte stores when the [n, r] block
is one contiguous range, element by element otherwise), then (after a CTA barrier) write the
gradient of each kept row/column once, duplicates summed in registers; per-program partial
grad_cores sums are reduced by a small deterministic sum. No atomics: results are
bit-reproducible. Every output element is written by the launch itself.

Inductor. When torch.compile traces a launch (the op is a triton_op), Inductor reads the kernel's
TTIR to find the tensors it writes, and clones each of them around the launch. Its analysis
follows a store's address back through the values it depends on, stops at loads, and takes a
helper's results as derived from all of the helper's arguments. So no value that a store address
depends on comes out of a helper called with an input pointer: the inputs are loaded in the
function whose stores depend on them (`_coarse_select`, `_grid_select`, the backward kernel's ids),
or staged to scratch first (`_stage_factors`). Scalars must also work as constexprs (older torch
passes them so): no methods on scalar arguments (tl.cast, not .to).
`python -m perf.diagnostics.kernel_access` prints the analysis; tests/ops/test_kernel_access.py
checks that only outputs and scratch count as written.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import (
    check,
    check_index_range,
    check_once,
    check_retrieval_args,
    check_retrieval_backward_args,
    check_retrieval_rows_args,
    check_row_window,
    check_stacked_retrieval_args,
    check_stacked_retrieval_backward_args,
)
from ._launch import cdiv, launch, next_pow2

_log = logging.getLogger(__name__)
_OP = "tdqkr_retrieval"
_BWD = "tdqkr_retrieval_backward"
_STACKED = "tdqkr_retrieval_stacked"
_ROWS = "tdqkr_retrieval_rows"
_STACKED_BWD = "tdqkr_retrieval_stacked_backward"

# Sub-keys per side held in registers by one program; larger sides use the reference.
MAX_KEYS = 16384
# Largest k (kept pairs per token and head) handled by the kernels.
MAX_KNN = 256
# Largest Tucker rank unrolled in the kernels.
MAX_RANK = 8
# Grid entries held at once; larger k×k grids are walked in row tiles of this many entries.
GRID_TILE = 4096  # 16 per thread at 8 warps
# Value-halving steps of a threshold search before it switches to integer-key halving.
VALUE_STEPS = 16
# Candidate slots per row tile of a tiled grid (_grid_select_candidates), in units of BLOCK_K, up
# to BLOCK_K = 128 and above it: a tile's floor is raised once more than this many of its entries
# lie at or above it. Fewer slots mean a longer search in the tiles that raise the floor, more
# slots a larger final selection (perf/history/tdqkr_retrieval.md).
CAND_TILE_FACTOR = (1, 2)
# Forward warps for k > 32 (one key per thread in each register row).
FWD_NUM_WARPS = 8
# Register cap of the candidate selection at FWD_NUM_WARPS: without one, ptxas takes enough
# registers per thread that one program fills an SM; this lets two share it, for a handful of
# spilled values.
FWD_MAXNREG_TILED = 128
# Forward launch for k <= 32: 2 warps with at most 64 registers per thread issue fewer
# instructions per program than 4 warps and keep as many warps per SM
# (perf/history/tdqkr_retrieval.md).
FWD_NUM_WARPS_SMALL_K = 2
FWD_MAXNREG_SMALL_K = 64
# Backward warps, for any k: one lane per entry for k <= 32 (no replicated [k] vectors), and
# chunks of 32 entries with no more threads than elements, so that Triton converts the chunk's
# values to the broadcast layout instead of reloading them there on every lane.
BWD_NUM_WARPS = 1

_warned: set[str] = set()


def _fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        _log.warning("ultramem::%s: Triton kernel skipped (%s); using the reference kernel", _OP, reason)


# ------------------------------------------------------------------------------------ helpers


@triton.jit
def _key32(x):
    """int32 whose signed order is the float order of x (non-NaN; -0.0 sorts just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey32(key):
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bisect_step(lo, hi, step, VALUE_STEPS: tl.constexpr):
    """Next probe in (lo, hi) and whether lo, hi are adjacent floats (nothing left to probe)."""
    klo = _key32(lo)
    khi = _key32(hi)
    adjacent = klo + 1 >= khi
    vmid = lo * 0.5 + hi * 0.5
    kmid = (klo >> 1) + (khi >> 1) + (klo & khi & 1)  # floor((klo + khi) / 2) without overflow
    use_key = (step >= VALUE_STEPS) | (vmid <= lo) | (vmid >= hi) | (vmid != vmid)
    mid = tl.where(use_key, _unkey32(kmid), vmid)
    return mid, adjacent


@triton.jit
def _kept_slots_2d(x, valid, thr, n_gt, knn, gt_base, eq_base):
    """Slot in [0, knn) of every kept element of a row-major 2-D tile (all x > thr, then the
    first x == thr), after gt_base / eq_base such entries of earlier tiles. Also returns the
    tile's own gt and eq counts."""
    gt = valid & (x > thr)
    eq = valid & (x == thr)
    packed = gt.to(tl.int32) + eq.to(tl.int32) * 65536
    row_total = tl.sum(packed, axis=1)
    row_before = tl.cumsum(row_total, axis=0) - row_total
    before = row_before[:, None] + tl.cumsum(packed, axis=1) - packed
    slot = tl.where(gt, gt_base + (before & 0xFFFF), n_gt + eq_base + (before >> 16))
    keep = (gt | eq) & (slot < knn)
    tile_total = tl.sum(row_total)
    return slot, keep, tile_total & 0xFFFF, tile_total >> 16


@triton.jit
def _load_kept(ws_ptr, slots, mask, n):
    """Kept key positions from scratch (L2 path: they were written by other threads of this
    program), clamped so that garbage (NaN inputs) can never address outside the row."""
    idx = tl.load(ws_ptr + slots, mask=mask, other=0, cache_modifier=".cg")
    return tl.minimum(tl.maximum(idx, 0), n - 1)


@triton.jit
def _rank_row_factor(
    a_base, sa_n, sa_r, rows, i_ok, c_base, sc_m, sc_r, sc_s, q: tl.constexpr, R: tl.constexpr, M: tl.constexpr
):
    """Σ_p A[rows, p] · (Σ_m C_m)[p, q] in fp32: the row factor of the grid's rank term q (the
    grid is Σ_q this · B[cols, q]). The staged factors of a tiled grid (_stage_factors) and the
    grid in registers (_grid_select, written out there) use this order of operations."""
    p_q = tl.zeros(rows.shape, dtype=tl.float32)
    for p in tl.static_range(R):
        c_pq = tl.load(c_base + p * sc_r + q * sc_s).to(tl.float32)
        for m in tl.static_range(1, M):
            c_pq += tl.load(c_base + m * sc_m + p * sc_r + q * sc_s).to(tl.float32)
        a_p = tl.load(a_base + rows * sa_n + p * sa_r, mask=i_ok, other=0.0).to(tl.float32)
        p_q += a_p * c_pq
    return p_q


@triton.jit
def _stage_factors(
    a_base,
    sa_n,
    sa_r,
    b_base,
    sb_n,
    sb_r,
    c_base,
    sc_m,
    sc_r,
    sc_s,
    keys_ws,
    fac_ws,
    knn,
    n_row,
    n_col,
    R: tl.constexpr,
    M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The factors of a tiled grid to fac_ws, [2R, BLOCK_K] fp32: rows q < R hold the row factor
    of rank term q of each kept row slot (_rank_row_factor), rows R + q the kept columns' B[·, q];
    zero past knn, as the grid's masked loads read them. The tiles then read inputs only from
    scratch: no grid pass needs A, B or C (see "Inductor" in the module doc)."""
    e = tl.arange(0, BLOCK_K)
    ok = e < knn
    rows = _load_kept(keys_ws, e, ok, n_row)
    cols = _load_kept(keys_ws + BLOCK_K, e, ok, n_col)
    for q in tl.static_range(R):
        p_q = _rank_row_factor(a_base, sa_n, sa_r, rows, ok, c_base, sc_m, sc_r, sc_s, q, R, M)
        tl.store(fac_ws + q * BLOCK_K + e, p_q)
        b_q = tl.load(b_base + cols * sb_n + q * sb_r, mask=ok, other=0.0).to(tl.float32)
        tl.store(fac_ws + (R + q) * BLOCK_K + e, b_q)


@triton.jit
def _grid_tile(
    fac_ws,
    i0,
    knn,
    R: tl.constexpr,
    TILE_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows i0..i0+TILE_I of the grid S[i, j] = A[I_i] (Σ_m C_m) B[J_j]ᵀ from the staged factors,
    -inf outside k×k and for NaN totals; also the valid mask, the flat grid position
    i * BLOCK_K + j and the number of NaN totals."""
    ii = i0 + tl.arange(0, TILE_I)
    jj = tl.arange(0, BLOCK_K)
    i_ok = ii < knn
    j_ok = jj < knn
    s = tl.zeros((TILE_I, BLOCK_K), dtype=tl.float32)
    for q in tl.static_range(R):
        b_q = tl.load(fac_ws + (R + q) * BLOCK_K + jj, cache_modifier=".cg")
        p_q = tl.load(fac_ws + q * BLOCK_K + ii, cache_modifier=".cg")
        s += p_q[:, None] * b_q[None, :]
    valid = i_ok[:, None] & j_ok[None, :]
    nan = valid & (s != s)
    s = tl.where(valid & ~nan, s, float("-inf"))
    flat = ii[:, None] * BLOCK_K + jj[None, :]
    return s, valid, flat, tl.sum(nan.to(tl.int32))


@triton.jit
def _grid_select_tiled(
    fac_ws,
    pairs_ws,
    vals_ws,
    knn,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_I: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    """Phase 3 of the forward for grids too large for registers: the knn best pairs of the k×k
    grid of kept keys (from their staged factors) to pairs_ws / vals_ws, the grid recomputed tile
    by tile (TILE_I rows) on every pass. Returns the number of NaN totals (ranked last)."""
    lo = tl.full((), float("inf"), tl.float32)
    hi = tl.full((), float("-inf"), tl.float32)
    n_nan = knn * 0
    for i0 in range(0, BLOCK_K, TILE_I):
        s, valid, _, nan_tile = _grid_tile(fac_ws, i0, knn, R, TILE_I, BLOCK_K)
        lo = tl.minimum(lo, tl.min(tl.where(valid, s, float("inf"))))
        hi = tl.maximum(hi, tl.max(s))
        n_nan += nan_tile
    n_at_hi = knn * 0
    for i0 in range(0, BLOCK_K, TILE_I):
        s, valid, _, _ = _grid_tile(fac_ws, i0, knn, R, TILE_I, BLOCK_K)
        n_at_hi += tl.sum((valid & (s >= hi)).to(tl.int32))
    todo = n_at_hi < knn
    lo = tl.where(todo, lo, hi)
    step = n_at_hi * 0
    while todo:
        mid, adjacent = _bisect_step(lo, hi, step, VALUE_STEPS)
        cnt = knn * 0
        for i0 in range(0, BLOCK_K, TILE_I):
            s, valid, _, _ = _grid_tile(fac_ws, i0, knn, R, TILE_I, BLOCK_K)
            cnt += tl.sum((s >= mid).to(tl.int32))
        ge = cnt >= knn
        lo = tl.where(ge & ~adjacent, mid, lo)
        hi = tl.where(ge | adjacent, hi, mid)
        step += 1
        todo = (cnt != knn) & ~adjacent & (step < VALUE_STEPS + 40)
    thr = lo
    n_gt = knn * 0
    for i0 in range(0, BLOCK_K, TILE_I):
        s, valid, _, _ = _grid_tile(fac_ws, i0, knn, R, TILE_I, BLOCK_K)
        n_gt += tl.sum((valid & (s > thr)).to(tl.int32))
    gt_base = knn * 0
    eq_base = knn * 0
    for i0 in range(0, BLOCK_K, TILE_I):
        s, valid, flat, _ = _grid_tile(fac_ws, i0, knn, R, TILE_I, BLOCK_K)
        slot, keep, n_gt_tile, n_eq_tile = _kept_slots_2d(s, valid, thr, n_gt, knn, gt_base, eq_base)
        tl.store(pairs_ws + slot, flat, mask=keep)
        tl.store(vals_ws + slot, s, mask=keep)
        gt_base += n_gt_tile
        eq_base += n_eq_tile
    return n_nan


@triton.jit
def _sort_and_write(
    a_base,
    sa_n,
    sa_r,
    b_base,
    sb_n,
    sb_r,
    c_base,
    sc_m,
    sc_r,
    sc_s,
    keys_ws,
    pairs_ws,
    vals_ws,
    ids_ptr,
    scores_ptr,
    perm_ptr,
    window_ptr,
    num_logical,
    q_base,
    sq_s,
    q_eps,
    pid,
    knn,
    n_row,
    n_col,
    poisoned,
    R: tl.constexpr,
    M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_MAP: tl.constexpr,
    KD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    Q_NORM: tl.constexpr,
):
    """Phase 4 of the forward: sort the kept pairs by descending grid score; write ids (with
    ROW_MAP their table rows, (perm[id] mod num_logical + offset) mod num_rows, with (offset,
    num_rows) at window_ptr) and per-core scores (all NaN when `poisoned`: a NaN coarse score
    or grid total was seen), with Q_NORM times 1/rms of each side's raw query at q_base."""
    e = tl.arange(0, BLOCK_K)
    e_ok = e < knn
    pair = tl.load(pairs_ws + e, mask=e_ok, other=0, cache_modifier=".cg")
    val = tl.load(vals_ws + e, mask=e_ok, other=0.0, cache_modifier=".cg")
    key = tl.where(e_ok, _key32(val), -2147483648).to(tl.int64)
    packed = tl.sort((key << 32) | pair.to(tl.int64), descending=True)
    pair = (packed & 0x7FFFFFFF).to(tl.int32)
    # (NaN totals rank last, so knn pairs are always kept; the clamp only guards the scratch read)
    pair = tl.minimum(pair, BLOCK_K * BLOCK_K - 1)
    rows = _load_kept(keys_ws, pair // BLOCK_K, e_ok, n_row)
    cols = _load_kept(keys_ws + BLOCK_K, pair % BLOCK_K, e_ok, n_col)
    out_row = pid * knn + e
    ids = rows.to(tl.int64) * n_col + cols
    if ROW_MAP:  # floor modulo, as torch's % (the remainder of a negative value is negative here)
        logical = tl.load(perm_ptr + ids, mask=e_ok, other=0).to(tl.int64) % num_logical
        logical = tl.where(logical < 0, logical + num_logical, logical)
        num_rows = tl.load(window_ptr + 1).to(tl.int64)
        ids = (logical + tl.load(window_ptr).to(tl.int64)) % num_rows
        ids = tl.where(ids < 0, ids + num_rows, ids)
    tl.store(ids_ptr + out_row, ids, mask=e_ok)
    if Q_NORM:  # the queries' RMS normalization, which the sub-key GEMM skipped, as one factor
        d = tl.arange(0, BLOCK_D)
        q_a = tl.load(q_base + d, mask=d < KD, other=0.0).to(tl.float32)
        q_b = tl.load(q_base + sq_s + d, mask=d < KD, other=0.0).to(tl.float32)
        q_scale = tl.rsqrt(tl.sum(q_a * q_a, 0) / KD + q_eps) * tl.rsqrt(tl.sum(q_b * q_b, 0) / KD + q_eps)
    for m in tl.static_range(M):
        score = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for p in tl.static_range(R):
            a_p = tl.load(a_base + rows * sa_n + p * sa_r, mask=e_ok, other=0.0).to(tl.float32)
            ca = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for q in tl.static_range(R):
                b_q = tl.load(b_base + cols * sb_n + q * sb_r, mask=e_ok, other=0.0).to(tl.float32)
                ca += tl.load(c_base + m * sc_m + p * sc_r + q * sc_s).to(tl.float32) * b_q
            score += a_p * ca
        if Q_NORM:
            score = score * q_scale
        score = tl.where(poisoned, float("nan"), score)
        tl.store(scores_ptr + out_row * M + m, score.to(scores_ptr.dtype.element_ty), mask=e_ok)


# ------------------------------------------------------------------------------------ forward
# How the forward keeps its passes cheap (SASS counts for sm_90 in perf/history/tdqkr_retrieval.md):
#  - a side's keys are 1-D blocks ([P1·G] and a [P2·G] remainder, G = threads of the program)
#    viewed as [P, G] with axis 0 in each thread's registers: every count sums a thread's entries
#    first and both blocks then share one reduction across threads;
#  - padding is -inf, never counted (every probe lies above the bracket's low end); masks only in
#    blocks that have padding and only in one-time code;
#  - the bracket starts at [least of > k group maxima, the float above the maximum]: no count
#    needed at either end, ~1.2 passes fewer than from the minimum (see _kth_threshold);
#  - value halving and integer-key halving are two loops, so the common passes carry no key math;
#  - kept slots from one exclusive scan over per-thread counts (no atomics, no counters);
#  - a constant key stride when a side's rows are contiguous (row stride R): immediate offsets;
#    heads == 1 as a constant (no 64-bit division of the program id);
#  - the k×k grid as [k·k / G, G] with the row fixed per thread: one row of A·ΣC per thread,
#    column loads per entry.


@triton.jit
def _min_max(lo_a, hi_a, lo_b, hi_b):
    # minnum/maxnum on the GPU (NaN ignored); the interpreter's generic reduce propagates NaN
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _count_true(m1, m2, HAS2: tl.constexpr):
    """Number of true entries of the [P, G] masks m1 and (if HAS2) m2: per-thread sums along
    axis 0, then one reduction across threads."""
    c = tl.sum(m1.to(tl.int32), axis=0)
    if HAS2:
        c += tl.sum(m2.to(tl.int32), axis=0)
    return tl.sum(c)


@triton.jit
def _kth_threshold(
    x1,
    v1,
    x2,
    v2,
    knn,
    n_all,
    HAS2: tl.constexpr,
    MASK1: tl.constexpr,
    MASK2: tl.constexpr,
    GS: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    """(thr, exact): thr = the knn-th largest real entry of x1 (and x2), or a value with exactly knn
    entries >= thr (then exact is true). Padding is -inf (v false); n_all real entries.

    GS > 0: the search starts at lo = the least of the maxima of groups of GS threads' entries:
    there are more than knn groups and each has a real entry (the launcher checks), so more than
    knn entries are >= lo, and lo lies below the knn-th largest unless values tie (simulated at the
    PERF shape: 1.0-1.3 passes fewer than from the minimum). GS = 0: lo = the least real entry."""
    hi_g = tl.max(x1, axis=0)
    if HAS2:
        hi_g = tl.maximum(hi_g, tl.max(x2, axis=0))
    if GS > 0:
        G: tl.constexpr = hi_g.shape[0]
        lo_g = tl.max(tl.reshape(hi_g, (G // GS, GS)), axis=1)
        lo, vmax = tl.reduce((lo_g, lo_g), 0, _min_max)
    else:
        if MASK1:
            lo_g = tl.min(tl.where(v1, x1, float("inf")), axis=0)
        else:
            lo_g = tl.min(x1, axis=0)
        if HAS2:
            if MASK2:
                lo_g = tl.minimum(lo_g, tl.min(tl.where(v2, x2, float("inf")), axis=0))
            else:
                lo_g = tl.minimum(lo_g, tl.min(x2, axis=0))
        lo = tl.min(lo_g)
        vmax = tl.max(hi_g)
    # hi = the float just above the maximum: count(x >= hi) = 0 without a pass (±0 -> +denormal)
    kmax = tl.where(vmax == 0.0, 0, _key32(vmax))
    hi = tl.where(vmax < float("inf"), _unkey32(kmax + 1), vmax)
    if GS > 0:
        c_lo = knn * 0 - 1  # count(x >= lo) > knn, not measured
    else:
        c_lo = n_all + knn * 0  # count(x >= lo)
    step = knn * 0
    # value halving needs a finite low end: from lo = -inf the midpoint is -inf (counting the
    # padding) or NaN (with hi = inf; its sign, and so its key, differs between GPU and interpreter)
    todo = (c_lo != knn) & (lo > float("-inf"))
    while todo:  # value halving: count(x >= lo) >= knn > count(x >= hi)
        mid = lo * 0.5 + hi * 0.5
        cnt = _count_true(x1 >= mid, x2 >= mid, HAS2)
        # mid = lo or hi once they are (nearly) adjacent floats: then stop (updating with such a
        # mid changes nothing: count(x >= hi) < knn)
        inside = (mid > lo) & (mid < hi)
        up = cnt >= knn
        lo = tl.where(up, mid, lo)
        c_lo = tl.where(up, cnt, c_lo)
        hi = tl.where(up, hi, mid)
        step += 1
        todo = (cnt != knn) & inside & (step < VALUE_STEPS)
    # integer-key halving (ties, or values too close for value halving): ends on any input
    klo = _key32(lo)
    # hi = +inf not yet probed may have k or more entries at it: search up to the key above it
    khi = _key32(hi) + (hi == float("inf")).to(tl.int32)
    todo = (c_lo != knn) & (klo + 1 < khi)
    while todo:
        kmid = (klo >> 1) + (khi >> 1) + (klo & khi & 1)  # floor((klo + khi) / 2) without overflow
        mid = _unkey32(kmid)
        cnt = _count_true(x1 >= mid, x2 >= mid, HAS2)
        ge = cnt >= knn
        klo = tl.where(ge, kmid, klo)
        khi = tl.where(ge, khi, kmid)
        lo = tl.where(ge, mid, lo)
        c_lo = tl.where(ge, cnt, c_lo)
        step += 1
        todo = (cnt != knn) & (klo + 1 < khi) & (step < VALUE_STEPS + 40)
    return lo, c_lo == knn


@triton.jit
def _kept_masks(
    x1, v1, p1, x2, v2, p2, thr, exact, knn, n_idx, HAS2: tl.constexpr, MASK1: tl.constexpr, MASK2: tl.constexpr
):
    """Masks of the kept entries: all x > thr, and of those equal to thr the lowest positions p
    (distinct, in [0, n_idx)) up to knn in all. Padding (v false, -inf) is never kept."""
    if exact:
        keep1 = x1 >= thr
        keep2 = x2 >= thr
    else:
        # ties at thr: a bisection on a position cut, only when there are more than needed
        eq1 = x1 == thr
        eq2 = x2 == thr
        need = knn - _count_true(x1 > thr, x2 > thr, HAS2)
        cut_lo = need * 0  # count(eq & p < cut_lo) < need
        cut_hi = cut_lo + n_idx  # count(eq & p < cut_hi) >= need
        if _count_true(eq1 & v1, eq2 & v2, HAS2) <= need:
            cut_lo = cut_hi - 1
        while cut_hi - cut_lo > 1:
            cut_mid = (cut_lo + cut_hi) // 2
            enough = _count_true(eq1 & v1 & (p1 < cut_mid), eq2 & v2 & (p2 < cut_mid), HAS2) >= need
            cut_lo = tl.where(enough, cut_lo, cut_mid)
            cut_hi = tl.where(enough, cut_mid, cut_hi)
        keep1 = (x1 > thr) | (eq1 & (p1 < cut_hi))
        keep2 = (x2 > thr) | (eq2 & (p2 < cut_hi))
    if MASK1:
        keep1 = keep1 & v1
    if MASK2:
        keep2 = keep2 & v2
    return keep1, keep2


@triton.jit
def _as_1d(x):
    """[P, G] -> [P·G] (same registers: 1-D memory accesses get Triton's 1-D layout, which is
    this one; 2-D ones with data-dependent addresses would be moved to another layout)."""
    return tl.reshape(x, (x.shape[0] * x.shape[1],))


@triton.jit
def _store_kept(keep1, p1, x1, keep2, p2, x2, knn, dst_idx, dst_val, HAS2: tl.constexpr, STORE_VALS: tl.constexpr):
    """Write p (and x, if STORE_VALS) of the kept entries to dst[0:knn]: slots from an exclusive
    scan over the threads' kept counts, then in register order within a thread."""
    k1 = keep1.to(tl.int32)
    c1 = tl.sum(k1, axis=0)
    c = c1
    if HAS2:
        k2 = keep2.to(tl.int32)
        c += tl.sum(k2, axis=0)
    last = tl.cumsum(c, axis=0) - c - 1  # the slot before this thread's first
    s1 = last[None, :] + tl.cumsum(k1, axis=0)
    ok1 = _as_1d(keep1 & (s1 < knn))
    s1 = _as_1d(s1)
    tl.store(dst_idx + s1, _as_1d(p1), mask=ok1)
    if STORE_VALS:
        tl.store(dst_val + s1, _as_1d(x1), mask=ok1)
    if HAS2:
        s2 = (last + c1)[None, :] + tl.cumsum(k2, axis=0)
        ok2 = _as_1d(keep2 & (s2 < knn))
        s2 = _as_1d(s2)
        tl.store(dst_idx + s2, _as_1d(p2), mask=ok2)
        if STORE_VALS:
            tl.store(dst_val + s2, _as_1d(x2), mask=ok2)


@triton.jit
def _block_keys(n, p0, P: tl.constexpr, G: tl.constexpr):
    """Positions p0 + e (e < P·G) of a block of keys and the mask of the real ones (< n)."""
    pos = p0 + tl.arange(0, P * G)
    return pos, pos < n


@triton.jit
def _block_ptrs(base, s_n, p0, P: tl.constexpr, G: tl.constexpr):
    """Row pointers of keys p0 + e (e < P·G): one address per thread plus an offset per register
    row (an immediate for a constant s_n)."""
    e = tl.arange(0, P * G)
    return (base + (e % G) * s_n) + (p0 + e // G * G) * s_n


@triton.jit
def _coarse_finish(x, valid, pos, P: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr):
    """Coarse scores x of a block of keys as [P, G] (entry [p, g] = key p0 + p·G + g), -inf past
    n and for NaN, with the mask of real keys, the positions and the NaN mask."""
    if MASKED:
        x = tl.where(valid, x, float("-inf"))
    # a NaN score ranks last (its token's scores become NaN: see _sort_and_write)
    nan = x != x
    x = tl.where(nan, float("-inf"), x)
    return tl.reshape(x, (P, G)), tl.reshape(valid, (P, G)), tl.reshape(pos, (P, G)), tl.reshape(nan, (P, G))


@triton.jit
def _coarse_select(
    base,
    s_n,
    s_r,
    w_ptr,
    s_w,
    n,
    knn,
    dst_ptr,
    R: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    HAS_REM: tl.constexpr,
    MASK1: tl.constexpr,
    MASK2: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    """Write the positions of the knn largest <key, w> of one [n, R] score block to dst[0:knn];
    returns the number of NaN scores (ranked last). The scores are loaded here, not in a helper
    (see "Inductor" in the module doc)."""
    p1, v1 = _block_keys(n, 0, P1, G)
    ptr1 = _block_ptrs(base, s_n, 0, P1, G)
    x1 = tl.zeros((P1 * G,), dtype=tl.float32)
    for q in tl.static_range(R):
        w_q = tl.load(w_ptr + q * s_w).to(tl.float32)
        a_q = tl.load(ptr1 + q * s_r, mask=v1 if MASK1 else None, other=0.0 if MASK1 else None)
        x1 += w_q * a_q.to(tl.float32)
    x1, v1, p1, nan1 = _coarse_finish(x1, v1, p1, P1, G, MASK1)
    if HAS_REM:
        p2, v2 = _block_keys(n, P1 * G, P2, G)
        ptr2 = _block_ptrs(base, s_n, P1 * G, P2, G)
        x2 = tl.zeros((P2 * G,), dtype=tl.float32)
        for q in tl.static_range(R):
            w_q = tl.load(w_ptr + q * s_w).to(tl.float32)
            a_q = tl.load(ptr2 + q * s_r, mask=v2 if MASK2 else None, other=0.0 if MASK2 else None)
            x2 += w_q * a_q.to(tl.float32)
        x2, v2, p2, nan2 = _coarse_finish(x2, v2, p2, P2, G, MASK2)
    else:  # unused placeholders
        p2 = tl.reshape(tl.arange(0, P2 * G), (P2, G))
        v2 = p2 < 0
        nan2 = v2
        x2 = tl.full((P2, G), float("-inf"), tl.float32)
    n_nan = _count_true(nan1, nan2, HAS_REM)  # (one reduction across threads for both blocks)
    thr, exact = _kth_threshold(x1, v1, x2, v2, knn, n, HAS_REM, MASK1, MASK2, GS, VALUE_STEPS)
    keep1, keep2 = _kept_masks(x1, v1, p1, x2, v2, p2, thr, exact, knn, n, HAS_REM, MASK1, MASK2)
    _store_kept(keep1, p1, x1, keep2, p2, x2, knn, dst_ptr, dst_ptr, HAS_REM, False)
    return n_nan


@triton.jit
def _grid_slots(i0, knn, TILE_I: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr):
    """Entries e < TILE_I·BLOCK_K of grid rows i0..i0+TILE_I in _grid_rows' layout (row slot
    i0 + e % TILE_I, column slot e // TILE_I): e, the column mask and the row slots (one per
    thread when all of a thread's entries share a row)."""
    e = tl.arange(0, TILE_I * BLOCK_K)
    j_ok = e // TILE_I < knn
    if G % TILE_I == 0:  # the row slot is the same for all of a thread's entries: one row per thread
        ii = i0 + tl.arange(0, G) % TILE_I
    else:
        ii = i0 + e % TILE_I
    return e, j_ok, ii


@triton.jit
def _grid_add_term(s, p_q, b_q, TILE_I: tl.constexpr, G: tl.constexpr):
    """s + the rank term p_q (per row slot, as _grid_slots' ii) times b_q (per entry)."""
    PG: tl.constexpr = s.shape[0]
    if G % TILE_I == 0:
        s += p_q[None, :] * tl.reshape(b_q, (PG, G))
    else:
        s += tl.reshape(p_q * b_q, (PG, G))
    return s


@triton.jit
def _grid_finish(s, e, ii, i0, knn, TILE_I: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, FULL_K: tl.constexpr):
    """Grid totals s in _grid_rows' layout with -inf outside k×k and for NaN totals; the valid
    mask, the flat grid positions i·BLOCK_K + j and the number of NaN totals."""
    PG: tl.constexpr = TILE_I * BLOCK_K // G
    e = tl.reshape(e, (PG, G))
    jj = e // TILE_I
    if G % TILE_I == 0:
        ii = ii[None, :]
    else:
        ii = i0 + e % TILE_I
    valid = (ii < knn) & (jj < knn)
    if not FULL_K:
        s = tl.where(valid, s, float("-inf"))
    nan = s != s
    return tl.where(nan, float("-inf"), s), valid, ii * BLOCK_K + jj, _count_true(nan, nan, False)


@triton.jit
def _grid_rows(
    fac_ws,
    i0,
    knn,
    R: tl.constexpr,
    TILE_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    FULL_K: tl.constexpr,
):
    """Rows i0..i0+TILE_I of the k×k grid from the staged factors (_stage_factors) as
    [TILE_I·BLOCK_K / G, G] (entry e = p·G + g holds row slot i0 + e % TILE_I, column slot
    e // TILE_I; -inf outside k×k, and for NaN totals), the valid mask, the flat grid positions
    i·BLOCK_K + j and the number of NaN totals. Loads are 1-D (see _as_1d)."""
    e, _, ii = _grid_slots(i0, knn, TILE_I, BLOCK_K, G)
    # s starts as a reshape, not as a 2-D constant, so that it gets the layout of the reshaped loads
    s = tl.reshape(tl.zeros((TILE_I * BLOCK_K,), dtype=tl.float32), (TILE_I * BLOCK_K // G, G))
    for q in tl.static_range(R):
        # (L2 path: staged by other threads of this program; zero past knn, no masks needed)
        b_q = tl.load(fac_ws + (R + q) * BLOCK_K + e // TILE_I, cache_modifier=".cg")
        p_q = tl.load(fac_ws + q * BLOCK_K + ii, cache_modifier=".cg")
        s = _grid_add_term(s, p_q, b_q, TILE_I, G)
    return _grid_finish(s, e, ii, i0, knn, TILE_I, BLOCK_K, G, FULL_K)


@triton.jit
def _grid_select(
    a_base,
    sa_n,
    sa_r,
    b_base,
    sb_n,
    sb_r,
    c_base,
    sc_m,
    sc_r,
    sc_s,
    keys_ws,
    pairs_ws,
    vals_ws,
    knn,
    n_row,
    n_col,
    R: tl.constexpr,
    M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    FULL_K: tl.constexpr,
    GS: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    """Phase 3 of the forward with the k×k grid in registers as [BLOCK_K² / G, G] (_grid_rows'
    layout, one row tile): the knn best pairs (i·BLOCK_K + j) and their totals to pairs_ws /
    vals_ws, in no fixed order. Returns the number of NaN totals (ranked last). The grid is
    computed here from A, B and C, not in a helper (see "Inductor" in the module doc)."""
    e, j_ok, ii = _grid_slots(0, knn, BLOCK_K, BLOCK_K, G)
    cols = _load_kept(keys_ws + BLOCK_K, e // BLOCK_K, j_ok, n_col)
    i_ok = ii < knn
    rows = _load_kept(keys_ws, ii, i_ok, n_row)
    s = tl.reshape(tl.zeros((BLOCK_K * BLOCK_K,), dtype=tl.float32), (BLOCK_K * BLOCK_K // G, G))
    for q in tl.static_range(R):
        b_q = tl.load(b_base + cols * sb_n + q * sb_r, mask=j_ok, other=0.0).to(tl.float32)
        p_q = tl.zeros(rows.shape, dtype=tl.float32)  # _rank_row_factor, written out
        for p in tl.static_range(R):
            c_pq = tl.load(c_base + p * sc_r + q * sc_s).to(tl.float32)
            for m in tl.static_range(1, M):
                c_pq += tl.load(c_base + m * sc_m + p * sc_r + q * sc_s).to(tl.float32)
            a_p = tl.load(a_base + rows * sa_n + p * sa_r, mask=i_ok, other=0.0).to(tl.float32)
            p_q += a_p * c_pq
        s = _grid_add_term(s, p_q, b_q, BLOCK_K, G)
    s, valid, flat, n_nan = _grid_finish(s, e, ii, 0, knn, BLOCK_K, BLOCK_K, G, FULL_K)
    thr, exact = _kth_threshold(s, valid, s, valid, knn, knn * knn, False, not FULL_K, False, GS, VALUE_STEPS)
    keep, _ = _kept_masks(s, valid, flat, s, valid, flat, thr, exact, knn, BLOCK_K * BLOCK_K, False, not FULL_K, False)
    _store_kept(keep, flat, s, keep, flat, s, knn, pairs_ws, vals_ws, False, True)
    return n_nan


@triton.jit
def _raise_floor(s, valid, floor, knn, cap, VALUE_STEPS: tl.constexpr):
    """A floor >= `floor` with knn <= count(s >= floor) <= cap in this tile, found by halving from
    [max(floor, least entry), the float above the largest] (value halving, then integer keys, as
    in _bisect_step); `floor` itself when no probe has knn entries at or above it. Ties can leave
    more than cap entries at the floor found (the caller falls back then)."""
    vmax = tl.max(s)
    kmax = tl.where(vmax == 0.0, 0, _key32(vmax))
    hi = tl.where(vmax < float("inf"), _unkey32(kmax + 1), vmax)
    lo = tl.maximum(floor, tl.min(tl.where(valid, s, float("inf"))))
    step = knn * 0
    todo = step == 0
    while todo:
        mid, adjacent = _bisect_step(lo, hi, step, VALUE_STEPS)
        cnt = _count_true(s >= mid, s >= mid, False)  # mid > lo >= -inf: padding never counted
        up = (cnt >= knn) & ~adjacent
        lo = tl.where(up, mid, lo)
        floor = tl.where(up, mid, floor)
        hi = tl.where(up | adjacent, hi, mid)
        step += 1
        todo = ((cnt < knn) | (cnt > cap)) & ~adjacent & (step < VALUE_STEPS + 40)
    return floor


@triton.jit
def _grid_candidates(
    fac_ws,
    cand_pos,
    cand_val,
    knn,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_I: tl.constexpr,
    G: tl.constexpr,
    FULL_K: tl.constexpr,
    CAND: tl.constexpr,
    CAND_TILE: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    """One pass over the row tiles of the grid: a running floor, raised in a tile (_raise_floor)
    when more than CAND_TILE of its entries are at or above it, and every entry at or above the
    floor (value, flat position) appended to cand_pos / cand_val (slots from a scan over the
    threads, in tile order: deterministic). Returns (floor, entries appended, NaN totals seen).
    Each tile appends at most CAND_TILE entries unless ties stop _raise_floor, and every entry at
    or above the final floor was appended (the floor only rises)."""
    floor = tl.full((), float("-inf"), tl.float32)
    n_cand = knn * 0
    n_nan = knn * 0
    i0 = knn * 0
    while i0 < knn:  # the tiles with a real row
        s, valid, flat, nan_tile = _grid_rows(fac_ws, i0, knn, R, TILE_I, BLOCK_K, G, FULL_K)
        n_nan += nan_tile
        ge = valid & (s >= floor)
        if _count_true(ge, ge, False) > CAND_TILE:
            floor = _raise_floor(s, valid, floor, knn, CAND_TILE, VALUE_STEPS)
            ge = valid & (s >= floor)
        k1 = ge.to(tl.int32)
        c = tl.sum(k1, axis=0)
        slot = (n_cand + tl.cumsum(c, axis=0) - c - 1)[None, :] + tl.cumsum(k1, axis=0)
        ok = _as_1d(ge & (slot < CAND))
        slot = _as_1d(slot)
        tl.store(cand_pos + slot, _as_1d(flat), mask=ok)
        tl.store(cand_val + slot, _as_1d(s), mask=ok)
        n_cand += tl.sum(c)
        i0 += TILE_I
    return floor, n_cand, n_nan


@triton.jit
def _grid_select_candidates(
    fac_ws,
    pairs_ws,
    vals_ws,
    cand_pos,
    cand_val,
    knn,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_I: tl.constexpr,
    TILE_G: tl.constexpr,
    FULL_K: tl.constexpr,
    CAND: tl.constexpr,
    CAND_TILE: tl.constexpr,
    CAND_G: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    """Phase 3 of the forward for grids walked in row tiles: candidates at or above a floor
    (_grid_candidates), then the exact selection among those in registers. The selection is the
    grid's own (all totals above the k-th, then the lowest positions among those equal to it)
    whenever the candidates hold every entry at or above the floor (no slot overflow) and at least
    knn of them are at or above it: then the floor is at most the k-th largest total, so every
    entry the grid's selection keeps is a candidate. Otherwise (ties at the floor beyond the
    slots) the bisection over the whole grid (_grid_select_tiled) decides. Returns the number of
    NaN totals (ranked last; every tile is visited once by the candidates pass)."""
    floor, n_cand, n_nan = _grid_candidates(
        fac_ws, cand_pos, cand_val, knn, R, BLOCK_K, TILE_I, TILE_G, FULL_K, CAND, CAND_TILE, VALUE_STEPS
    )
    tl.debug_barrier()  # the candidates were written by other threads of this program
    e = tl.arange(0, CAND)
    stored = e < n_cand
    x = tl.load(cand_val + e, mask=stored, other=float("-inf"), cache_modifier=".cg")
    p = tl.load(cand_pos + e, mask=stored, other=0, cache_modifier=".cg")
    ok = stored & (x >= floor)
    x = tl.reshape(tl.where(ok, x, float("-inf")), (CAND // CAND_G, CAND_G))
    p = tl.reshape(p, (CAND // CAND_G, CAND_G))
    ok = tl.reshape(ok, (CAND // CAND_G, CAND_G))
    n_ok = _count_true(ok, ok, False)
    if (n_cand <= CAND) & (n_ok >= knn):
        thr, exact = _kth_threshold(x, ok, x, ok, knn, n_ok, False, True, False, 0, VALUE_STEPS)
        keep, _ = _kept_masks(x, ok, p, x, ok, p, thr, exact, knn, BLOCK_K * BLOCK_K, False, True, False)
        _store_kept(keep, p, x, keep, p, x, knn, pairs_ws, vals_ws, False, True)
    else:
        _grid_select_tiled(fac_ws, pairs_ws, vals_ws, knn, R, BLOCK_K, TILE_I, VALUE_STEPS)
    return n_nan


@triton.jit(do_not_specialize=["heads", "n_row", "n_col", "knn", "num_logical"])
def _retrieval_fwd_kernel(
    a_ptr,
    sa_t,
    sa_h,
    sa_n,
    sa_r,
    b_ptr,
    sb_t,
    sb_h,
    sb_n,
    sb_r,
    c_ptr,
    sc_h,
    sc_m,
    sc_r,
    sc_s,
    u_ptr,
    su_h,
    su_r,
    v_ptr,
    sv_h,
    sv_r,
    ids_ptr,
    scores_ptr,
    ws_ptr,
    perm_ptr,
    window_ptr,
    num_logical,
    q_ptr,
    sq_t,
    sq_h,
    sq_s,
    q_eps,
    heads,
    n_row,
    n_col,
    knn,
    R: tl.constexpr,
    M: tl.constexpr,
    G: tl.constexpr,
    P1_R: tl.constexpr,
    P2_R: tl.constexpr,
    REM_R: tl.constexpr,
    MASK1_R: tl.constexpr,
    MASK2_R: tl.constexpr,
    P1_C: tl.constexpr,
    P2_C: tl.constexpr,
    REM_C: tl.constexpr,
    MASK1_C: tl.constexpr,
    MASK2_C: tl.constexpr,
    KEY_STRIDE_A: tl.constexpr,
    KEY_STRIDE_B: tl.constexpr,
    GS_R: tl.constexpr,
    GS_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_I: tl.constexpr,
    GRID_G: tl.constexpr,
    FULL_K: tl.constexpr,
    GS_K: tl.constexpr,
    TILE_G: tl.constexpr,
    CAND: tl.constexpr,
    CAND_TILE: tl.constexpr,
    CAND_G: tl.constexpr,
    ONE_HEAD: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
    ROW_MAP: tl.constexpr,
    KD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    Q_NORM: tl.constexpr,
):
    # KEY_STRIDE_A/B > 0: the key stride of that side as a constant (rows are contiguous);
    # ONE_HEAD: heads == 1 (no 64-bit division of the program id); a tiled grid (TILE_I < BLOCK_K)
    # is selected through CAND candidate slots per program. The scratch is one allocation (one
    # tensor: Inductor reinplaces it, where it clones views of one buffer), part after part, each
    # a row per program (`_scratch_words`); every part's pointer is formed where it is used.
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    if ONE_HEAD:
        t = pid
        h = pid * 0
    else:
        t = pid // heads
        h = pid % heads
    a_base = a_ptr + t * sa_t + h * sa_h
    b_base = b_ptr + t * sb_t + h * sb_h
    c_base = c_ptr + h * sc_h
    q_base = q_ptr
    if Q_NORM:
        q_base += t * sq_t + h * sq_h
    keys_ws = ws_ptr + pid * (2 * BLOCK_K)
    pairs_ws = ws_ptr + programs * (2 * BLOCK_K) + pid * BLOCK_K
    vals_ws = (pairs_ws + programs * BLOCK_K).to(tl.pointer_type(tl.float32), bitcast=True)
    if KEY_STRIDE_A > 0:
        ka_n = KEY_STRIDE_A
    else:
        ka_n = sa_n
    if KEY_STRIDE_B > 0:
        kb_n = KEY_STRIDE_B
    else:
        kb_n = sb_n

    # NaN coarse scores and grid totals rank last; any of them makes this (token, head)'s scores NaN
    n_nan = _coarse_select(
        a_base,
        ka_n,
        sa_r,
        u_ptr + h * su_h,
        su_r,
        n_row,
        knn,
        keys_ws,
        R,
        P1_R,
        P2_R,
        REM_R,
        MASK1_R,
        MASK2_R,
        G,
        GS_R,
        VALUE_STEPS,
    )
    n_nan += _coarse_select(
        b_base,
        kb_n,
        sb_r,
        v_ptr + h * sv_h,
        sv_r,
        n_col,
        knn,
        keys_ws + BLOCK_K,
        R,
        P1_C,
        P2_C,
        REM_C,
        MASK1_C,
        MASK2_C,
        G,
        GS_C,
        VALUE_STEPS,
    )
    tl.debug_barrier()
    if TILE_I == BLOCK_K:
        n_grid_nan = _grid_select(
            a_base,
            ka_n,
            sa_r,
            b_base,
            kb_n,
            sb_r,
            c_base,
            sc_m,
            sc_r,
            sc_s,
            keys_ws,
            pairs_ws,
            vals_ws,
            knn,
            n_row,
            n_col,
            R,
            M,
            BLOCK_K,
            GRID_G,
            FULL_K,
            GS_K,
            VALUE_STEPS,
        )
    else:  # grid too large for registers: factors staged, row tiles, candidates above a floor
        fac_ws = ws_ptr + programs * (4 * BLOCK_K + 2 * CAND) + pid * (2 * R * BLOCK_K)
        fac_ws = fac_ws.to(tl.pointer_type(tl.float32), bitcast=True)
        _stage_factors(
            a_base,
            ka_n,
            sa_r,
            b_base,
            kb_n,
            sb_r,
            c_base,
            sc_m,
            sc_r,
            sc_s,
            keys_ws,
            fac_ws,
            knn,
            n_row,
            n_col,
            R,
            M,
            BLOCK_K,
        )
        tl.debug_barrier()
        n_grid_nan = _grid_select_candidates(
            fac_ws,
            pairs_ws,
            vals_ws,
            ws_ptr + programs * (4 * BLOCK_K) + pid * CAND,
            (ws_ptr + programs * (4 * BLOCK_K + CAND) + pid * CAND).to(tl.pointer_type(tl.float32), bitcast=True),
            knn,
            R,
            BLOCK_K,
            TILE_I,
            TILE_G,
            FULL_K,
            CAND,
            CAND_TILE,
            CAND_G,
            VALUE_STEPS,
        )
    n_nan += n_grid_nan
    tl.debug_barrier()
    _sort_and_write(
        a_base,
        ka_n,
        sa_r,
        b_base,
        kb_n,
        sb_r,
        c_base,
        sc_m,
        sc_r,
        sc_s,
        keys_ws,
        pairs_ws,
        vals_ws,
        ids_ptr,
        scores_ptr,
        perm_ptr,
        window_ptr,
        num_logical,
        q_base,
        sq_s,
        q_eps,
        pid,
        knn,
        n_row,
        n_col,
        n_nan > 0,
        R,
        M,
        BLOCK_K,
        ROW_MAP,
        KD,
        BLOCK_D,
        Q_NORM,
    )


# ------------------------------------------------------------------------------------ backward
# Instruction issue, not bytes, bounds this kernel: one warp per 32 entries, a 32-bit id split,
# the [chunk, k] duplicate matrix reduced along the axis each lane holds whole, and the zero-fill
# as 16-byte stores over the program's [n·r] slab when it is one contiguous range (row stride r,
# rank stride 1). Design and measurements: perf/history/tdqkr_retrieval.md.


@triton.jit
def _bwd_split_ids(vid, n_row, n_col):
    """(i, j, ok) of ids vid (int64): ok = an id in [0, n_row·n_col); i = j = -1 where not ok.
    (tl.cast, not .to: the scalars are constexprs in some torch versions' kernel analysis.)"""
    ok = (vid >= 0) & (vid < tl.cast(n_row, tl.int64) * n_col)
    v32 = tl.where(ok, vid, 0).to(tl.int32)  # n_row·n_col <= MAX_KEYS² < 2³¹
    i = v32 // n_col
    j = v32 - i * n_col
    return tl.where(ok, i, -1), tl.where(ok, j, -1), ok


@triton.jit
def _bwd_entry_grads(
    g_base,
    sg_k,
    sg_m,
    a_base,
    sa_n,
    sa_r,
    b_base,
    sb_n,
    sb_r,
    c_base,
    sc_m,
    sc_r,
    sc_s,
    f,
    i_f,
    j_f,
    ok_f,
    p,
    R: tl.constexpr,
    M: tl.constexpr,
):
    """d/dA[i_f, p] and d/dB[j_f, p] of entries f: Σ_m g[f,m] (C_m B[j_f]ᵀ)_p, Σ_m g[f,m] (A[i_f] C_m)_p."""
    da = tl.zeros(f.shape, dtype=tl.float32)
    db = tl.zeros(f.shape, dtype=tl.float32)
    for m in tl.static_range(M):
        g_fm = tl.load(g_base + f * sg_k + m * sg_m, mask=ok_f, other=0.0).to(tl.float32)
        c_b = tl.zeros(f.shape, dtype=tl.float32)
        c_a = tl.zeros(f.shape, dtype=tl.float32)
        for q in tl.static_range(R):
            b_fq = tl.load(b_base + j_f * sb_n + q * sb_r, mask=ok_f, other=0.0).to(tl.float32)
            a_fq = tl.load(a_base + i_f * sa_n + q * sa_r, mask=ok_f, other=0.0).to(tl.float32)
            c_b += tl.load(c_base + m * sc_m + p * sc_r + q * sc_s).to(tl.float32) * b_fq
            c_a += tl.load(c_base + m * sc_m + q * sc_r + p * sc_s).to(tl.float32) * a_fq
        da += g_fm * c_b
        db += g_fm * c_a
    return da, db


@triton.jit
def _zero_span_flat(ptr, start, length, ZBLOCK: tl.constexpr, VEC: tl.constexpr):
    """Zero ptr[start : start + length]. VEC elements are 16 bytes; when ptr is 16-byte aligned
    (Triton specializes on that) the VEC-aligned interior goes out as full 16-byte stores (offsets
    and mask bounds provably multiples of VEC); the ragged ends (< VEC elements each) as one
    small masked store. Correct for any ptr, only slower."""
    end = start + length
    a0 = (start + VEC - 1) // VEC * VEC
    a1 = end // VEC * VEC
    zeros = tl.zeros((ZBLOCK,), dtype=ptr.dtype.element_ty)
    o = a0
    while o < a1:
        offs = o + tl.arange(0, ZBLOCK)
        tl.store(ptr + offs, zeros, mask=offs < a1)
        o += ZBLOCK
    lane = tl.arange(0, 2 * VEC)
    edge = tl.where(lane < VEC, start + lane, a1 + lane - VEC)
    # head [start, min(a0, end)); tail [a1, end) when a1 >= a0 (else the head covered it all)
    edge_ok = tl.where(lane < VEC, edge < tl.minimum(a0, end), (edge >= a0) & (edge < end))
    tl.store(ptr + edge, tl.zeros((2 * VEC,), dtype=ptr.dtype.element_ty), mask=edge_ok)


@triton.jit
def _zero_rows_strided(base, s_n, s_r, n, R: tl.constexpr, ZBLOCK: tl.constexpr):
    """Zero an [n, R] block with any strides (element by element)."""
    z = tl.arange(0, ZBLOCK)
    z0 = n * 0
    while z0 < n * R:
        flat = z0 + z
        tl.store(
            base + (flat // R) * s_n + (flat % R) * s_r,
            tl.zeros((ZBLOCK,), dtype=base.dtype.element_ty),
            mask=flat < n * R,
        )
        z0 += ZBLOCK


@triton.jit
def _zero_rows(ptr, off, s_n, s_r, n, R: tl.constexpr, FLAT: tl.constexpr, ZBLOCK: tl.constexpr, VEC: tl.constexpr):
    if FLAT:
        _zero_span_flat(ptr, off, n * R, ZBLOCK, VEC)
    else:
        _zero_rows_strided(ptr + off, s_n, s_r, n, R, ZBLOCK)


@triton.jit(do_not_specialize=["gb_shift", "tokens", "heads", "n_row", "n_col", "zero_row", "zero_col", "knn"])
def _retrieval_bwd_kernel(
    g_ptr,
    sg_t,
    sg_h,
    sg_k,
    sg_m,
    a_ptr,
    sa_t,
    sa_h,
    sa_n,
    sa_r,
    b_ptr,
    sb_t,
    sb_h,
    sb_n,
    sb_r,
    c_ptr,
    sc_h,
    sc_m,
    sc_r,
    sc_s,
    ids_ptr,
    si_t,
    si_h,
    si_k,
    ga_ptr,
    sga_t,
    sga_h,
    sga_n,
    sga_r,
    gb_ptr,
    sgb_t,
    sgb_h,
    sgb_n,
    sgb_r,
    gb_shift,
    gc_part_ptr,
    tokens,
    heads,
    n_row,
    n_col,
    zero_row,
    zero_col,
    knn,
    R: tl.constexpr,
    M: tl.constexpr,
    MRRP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    FLAT_A: tl.constexpr,
    FLAT_B: tl.constexpr,
    ZBLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    # One program per (token, head): zero this program's zero_row / zero_col rows of grad_row /
    # grad_col (the n_row / n_col real keys and any padding after them), then after one CTA
    # barrier write each kept row once, duplicates summed in registers; no atomics,
    # bit-reproducible. The ids are loaded here, not in a helper: see "Inductor" in the module doc.
    pid = tl.program_id(0).to(tl.int64)
    t = pid // heads
    h = pid % heads
    g_base = g_ptr + t * sg_t + h * sg_h
    a_base = a_ptr + t * sa_t + h * sa_h
    b_base = b_ptr + t * sb_t + h * sb_h
    c_base = c_ptr + h * sc_h
    id_base = ids_ptr + t * si_t + h * si_h
    ga_off = t * sga_t + h * sga_h
    gb_off = t * sgb_t + h * sgb_h
    if gb_ptr is None:  # both gradients in one tensor (the stacked op): B's starts gb_shift after A's
        gb_ptr = ga_ptr
        gb_off += gb_shift

    e = tl.arange(0, BLOCK_K)
    vid = tl.load(id_base + e * si_k, mask=e < knn, other=-1).to(tl.int64)
    i_e, j_e, ok_e = _bwd_split_ids(vid, n_row, n_col)
    # (the stores issue while the ids above are in flight)
    _zero_rows(ga_ptr, ga_off, sga_n, sga_r, zero_row, R, FLAT_A, ZBLOCK, VEC)
    _zero_rows(gb_ptr, gb_off, sgb_n, sgb_r, zero_col, R, FLAT_B, ZBLOCK, VEC)

    # grad_cores partials Σ_e g[e,m] A[i_e,p] B[j_e,q], packed in one vector (slot (m·R + p)·R + q)
    slot = tl.arange(0, MRRP)
    gc = tl.zeros((MRRP,), dtype=tl.float32)
    for m in tl.static_range(M):
        g_m = tl.load(g_base + e * sg_k + m * sg_m, mask=ok_e, other=0.0).to(tl.float32)
        for p in tl.static_range(R):
            ga_p = g_m * tl.load(a_base + i_e * sa_n + p * sa_r, mask=ok_e, other=0.0).to(tl.float32)
            for q in tl.static_range(R):
                b_q = tl.load(b_base + j_e * sb_n + q * sb_r, mask=ok_e, other=0.0).to(tl.float32)
                gc += tl.where(slot == (m * R + p) * R + q, tl.sum(ga_p * b_q), 0.0)

    tl.debug_barrier()  # the zero stores above must land before the kept rows below

    # grad_row[i, p] = Σ_{f: i_f = i} d/dA[i_f, p] (likewise grad_col), as a [CHUNK, BLOCK_K] match
    # matrix per chunk of entries f summed over f: each lane holds its entry's whole column, so
    # the sum needs no shuffles. Entries that are not ok have i = j = -1 and match only each
    # other (and are not stored). Duplicates sum the same terms in the same order: equal bits.
    for p in tl.static_range(R):
        acc_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for f0 in range(0, BLOCK_K, CHUNK):  # one iteration for k <= 32: the matches are shared over p
            if CHUNK == BLOCK_K:
                f = e
                i_f, j_f, ok_f = i_e, j_e, ok_e
            else:
                f = f0 + tl.arange(0, CHUNK)
                vid_f = tl.load(id_base + f * si_k, mask=f < knn, other=-1).to(tl.int64)
                i_f, j_f, ok_f = _bwd_split_ids(vid_f, n_row, n_col)
            da, db = _bwd_entry_grads(
                g_base,
                sg_k,
                sg_m,
                a_base,
                sa_n,
                sa_r,
                b_base,
                sb_n,
                sb_r,
                c_base,
                sc_m,
                sc_r,
                sc_s,
                f,
                i_f,
                j_f,
                ok_f,
                p,
                R,
                M,
            )
            acc_a += tl.sum(tl.where(i_f[:, None] == i_e[None, :], da[:, None], 0.0), axis=0)
            acc_b += tl.sum(tl.where(j_f[:, None] == j_e[None, :], db[:, None], 0.0), axis=0)
        tl.store(ga_ptr + ga_off + i_e * sga_n + p * sga_r, acc_a.to(ga_ptr.dtype.element_ty), mask=ok_e)
        tl.store(gb_ptr + gb_off + j_e * sgb_n + p * sgb_r, acc_b.to(gb_ptr.dtype.element_ty), mask=ok_e)
    # partials laid out [heads, M·R·R, tokens]: the launcher's sum over tokens is then a contiguous
    # row reduction (a sum over the first axis of a [tokens, 8] block has almost no parallelism)
    tl.store(gc_part_ptr + (h * (M * R * R) + slot) * tokens + t, gc, mask=slot < M * R * R)


# ------------------------------------------------------------------------------------ launchers


def _block_k(knn: int) -> int:
    return max(16, next_pow2(knn))


def _unsupported(
    knn: int, row_scores: Tensor, col_scores: Tensor, cores: Tensor, *more: Tensor, n_keys: int = -1
) -> str | None:
    if any(x.dtype == torch.float64 for x in (row_scores, col_scores, cores, *more)):
        return "float64 inputs"
    if knn > MAX_KNN:
        return f"knn above {MAX_KNN}"
    if (max(row_scores.shape[2], col_scores.shape[2]) if n_keys == -1 else n_keys) > MAX_KEYS:
        return f"more than {MAX_KEYS} sub-keys per side"
    if row_scores.shape[3] > MAX_RANK:
        return f"rank above {MAX_RANK}"
    return None


def tdqkr_retrieval_cuda(
    row_scores: Tensor, col_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ultramem::tdqkr_retrieval (runs on CPU tensors under TRITON_INTERPRET=1)."""
    check_once(_OP, check_retrieval_args, _OP, row_scores, col_scores, cores, u, v, knn, n_keys)
    reason = _unsupported(knn, row_scores, col_scores, cores, u, v, n_keys=n_keys)
    if reason is not None:
        from .. import retrieval as ref

        _fallback_once(reason)
        return ref.forward_reference(row_scores, col_scores, cores, u, v, knn, n_keys)
    return launch_forward(row_scores, col_scores, cores, u, v, knn, n_keys)


def _coarse_layout(n: int, g: int) -> dict:
    """Blocks of one side: [P1·G] keys (P1 the largest power of 2 with P1·G keys within the rows
    of G) plus a [P2·G] remainder (P2 a power of 2), and which of them hold padding."""
    rows = cdiv(n, g)
    p1 = 1 << (rows.bit_length() - 1)
    rem = rows - p1
    p2 = next_pow2(rem) if rem else 1
    return dict(p1=p1, p2=p2, has_rem=rem > 0, mask1=p1 * g > n, mask2=rem > 0 and (p1 + p2) * g > n)


def _group_threads(knn: int, g: int, every_thread_real: bool) -> int:
    """Threads per group for the group-maximum start of a threshold search (see _kth_threshold):
    the smallest power of 2 above knn groups over g threads, each thread holding at least one real
    entry; 0 (start at the minimum) when that is impossible."""
    groups = 1 << knn.bit_length()
    return g // groups if every_thread_real and groups <= g else 0


def _contiguous_key_stride(x: Tensor) -> int:
    """x's key stride when each [n, R] block has rows of R contiguous elements (the kernel then
    takes it as a constant), else 0."""
    r = x.shape[3]
    return r if x.stride(2) == r and (r == 1 or x.stride(3) == 1) else 0


def _candidate_slots(knn: int, block_k: int, tile_i: int) -> tuple[int, int]:
    """(slots per row tile, slots per program) of the candidate selection of a tiled grid."""
    per_tile = CAND_TILE_FACTOR[block_k > 128] * block_k
    check(
        per_tile >= knn and per_tile & (per_tile - 1) == 0,
        _OP,
        f"{per_tile} candidate slots per tile (CAND_TILE_FACTOR) must be a power of 2 and at least knn={knn}",
    )
    return per_tile, next_pow2(cdiv(knn, tile_i) * per_tile)


def _scratch_words(block_k: int, cand: int, r: int) -> int:
    """32-bit words of forward scratch per program, in parts of one row per program each: the kept
    row and column keys (2·block_k), the selected pairs (block_k) and their totals (block_k,
    fp32); with a tiled grid (cand > 0) also the candidates' positions (cand) and totals (cand,
    fp32) and the staged factors (2·r·block_k, fp32). Each part is a multiple of 4 words, so it
    starts 16-byte aligned."""
    return 4 * block_k + (2 * cand + 2 * r * block_k if cand else 0)


def launch_forward(
    row_scores: Tensor,
    col_scores: Tensor,
    cores: Tensor,
    u: Tensor,
    v: Tensor,
    knn: int,
    n_keys: int = -1,
    row_map: tuple[Tensor, int, Tensor] | None = None,
    q_norm: tuple[Tensor, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward launch on checked arguments (launch shapes from the module constants); with
    n_keys, the rows of each side past n_keys are padding, never read. row_map: (perm,
    num_logical, row_window), to write table rows instead of ids; q_norm: (q, eps), the raw
    queries whose RMS factors scale the scores (both tdqkr_retrieval_rows)."""
    t, h, n_row, r = row_scores.shape
    n_col = col_scores.shape[2]
    if n_keys != -1:
        n_row = n_col = n_keys
    m = cores.shape[1]
    dev = row_scores.device
    ids = torch.empty((t, h, knn), dtype=torch.int64, device=dev)
    scores = torch.empty((t, h, knn, m), dtype=row_scores.dtype, device=dev)
    if t * h == 0:
        return ids, scores
    block_k = _block_k(knn)
    tile_i = max(1, min(block_k, GRID_TILE // block_k))
    cand_tile_slots, cand = 0, 0
    if tile_i < block_k:
        cand_tile_slots, cand = _candidate_slots(knn, block_k, tile_i)
    small_k = block_k <= 32
    warps = FWD_NUM_WARPS_SMALL_K if small_k else FWD_NUM_WARPS
    # The register caps were measured at rank 2 with 2 cores; larger ranks and core counts keep
    # more per-key values live, so they get ptxas's own choice rather than risk a spill.
    cap = None
    if r * m <= 4:
        cap = FWD_MAXNREG_TILED if cand else FWD_MAXNREG_SMALL_K if small_k else None
    g = 32 * warps  # keys per register row: one per thread
    ws = torch.empty(t * h * _scratch_words(block_k, cand, r), dtype=torch.int32, device=dev)
    lr, lc = _coarse_layout(n_row, g), _coarse_layout(n_col, g)
    grid_g = min(g, block_k * block_k)
    # without a map, u stands in for the map's pointers (never read): a real argument, not a written one
    perm, num_logical, row_window = row_map if row_map is not None else (u, 1, u)
    if q_norm is None:  # and for the queries, with fixed sizes, so that launches without them compile once
        q, q_eps, q_strides, kd = u, 0.0, (0, 0, 0), 1
    else:
        q, q_eps = q_norm
        q_strides, kd = q.stride()[:3], q.shape[3]
    launch(
        _retrieval_fwd_kernel,
        (t * h,),
        row_scores,
        *row_scores.stride(),
        col_scores,
        *col_scores.stride(),
        cores,
        *cores.stride(),
        u,
        *u.stride(),
        v,
        *v.stride(),
        ids,
        scores,
        ws,
        perm,
        row_window,
        num_logical,
        q,
        *q_strides,
        q_eps,
        h,
        n_row,
        n_col,
        knn,
        R=r,
        M=m,
        G=g,
        P1_R=lr["p1"],
        P2_R=lr["p2"],
        REM_R=lr["has_rem"],
        MASK1_R=lr["mask1"],
        MASK2_R=lr["mask2"],
        P1_C=lc["p1"],
        P2_C=lc["p2"],
        REM_C=lc["has_rem"],
        MASK1_C=lc["mask1"],
        MASK2_C=lc["mask2"],
        KEY_STRIDE_A=_contiguous_key_stride(row_scores),
        KEY_STRIDE_B=_contiguous_key_stride(col_scores),
        GS_R=_group_threads(knn, g, n_row >= g),
        GS_C=_group_threads(knn, g, n_col >= g),
        BLOCK_K=block_k,
        TILE_I=tile_i,
        GRID_G=grid_g,
        FULL_K=knn == block_k,
        GS_K=_group_threads(knn, grid_g, knn == block_k),
        TILE_G=min(g, tile_i * block_k),
        CAND=cand,
        CAND_TILE=cand_tile_slots,
        CAND_G=min(g, max(cand, 1)),
        ONE_HEAD=h == 1,
        VALUE_STEPS=VALUE_STEPS,
        ROW_MAP=row_map is not None,
        KD=kd,
        BLOCK_D=next_pow2(kd),
        Q_NORM=q_norm is not None,
        num_warps=warps,
        maxnreg=cap,
    )
    return ids, scores


def tdqkr_retrieval_backward_cuda(
    grad_scores: Tensor, row_scores: Tensor, col_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    """CUDA kernel of ultramem::tdqkr_retrieval_backward. With n_keys the gradients keep the
    padded shape of the scores (the caller's GEMM reads them in place), zero in the padding: the
    kernel zeroes each (token, head)'s whole block, padding included, before it writes the kept
    rows, so the outputs are written by the launch alone."""
    n_ids = check_once(
        _BWD, check_retrieval_backward_args, _BWD, grad_scores, row_scores, col_scores, cores, ids, n_keys
    )
    check_index_range(ids, n_ids, _BWD, "ids")  # (CPU and debug mode; the kernel skips such ids)
    reason = _unsupported(ids.shape[2], row_scores, col_scores, cores, grad_scores, n_keys=n_keys)
    if reason is not None:
        from .. import retrieval as ref

        _fallback_once(reason)
        return ref.backward_reference(grad_scores, row_scores, col_scores, cores, ids, n_keys)
    return launch_backward(grad_scores, row_scores, col_scores, cores, ids, n_keys)


def tdqkr_retrieval_stacked_cuda(
    sub_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ultramem::tdqkr_retrieval_stacked: the forward on the two halves' views."""
    check_once(_STACKED, check_stacked_retrieval_args, _STACKED, sub_scores, cores, u, v, knn, n_keys)
    a, b = sub_scores.unbind(2)
    reason = _unsupported(knn, a, b, cores, u, v, n_keys=n_keys)
    if reason is not None:
        from .. import retrieval as ref

        _fallback_once(reason)
        return ref.forward_reference(a, b, cores, u, v, knn, n_keys, op=_STACKED)
    return launch_forward(a, b, cores, u, v, knn, n_keys)


def tdqkr_retrieval_rows_cuda(
    sub_scores: Tensor,
    cores: Tensor,
    u: Tensor,
    v: Tensor,
    knn: int,
    n_keys: int,
    perm: Tensor,
    num_logical: int,
    row_window: Tensor,
    q: Tensor | None = None,
    q_eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ultramem::tdqkr_retrieval_rows: the stacked forward, writing table rows."""
    args = (sub_scores, cores, u, v, knn, n_keys, perm, num_logical, row_window, q, q_eps)
    check_once(_ROWS, check_retrieval_rows_args, _ROWS, *args)
    check_row_window(_ROWS, row_window)  # (CPU and debug mode)
    a, b = sub_scores.unbind(2)
    reason = _unsupported(knn, a, b, cores, u, v, *([] if q is None else [q]), n_keys=n_keys)
    if reason is not None:
        from .. import retrieval as ref

        _fallback_once(reason)
        return ref.rows_reference(*args)
    q_norm = None if q is None else (q, q_eps)
    return launch_forward(a, b, cores, u, v, knn, n_keys, (perm, num_logical, row_window), q_norm)


def tdqkr_retrieval_stacked_backward_cuda(
    grad_scores: Tensor, sub_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """CUDA kernel of ultramem::tdqkr_retrieval_stacked_backward: one launch writes both halves of
    the one gradient tensor (see tdqkr_retrieval_backward_cuda for the padding)."""
    n_ids = check_once(
        _STACKED_BWD, check_stacked_retrieval_backward_args, _STACKED_BWD, grad_scores, sub_scores, cores, ids, n_keys
    )
    check_index_range(ids, n_ids, _STACKED_BWD, "ids")
    a, b = sub_scores.unbind(2)
    reason = _unsupported(ids.shape[2], a, b, cores, grad_scores, n_keys=n_keys)
    if reason is not None:
        from .. import retrieval as ref

        _fallback_once(reason)
        return ref.stacked_backward_reference(grad_scores, sub_scores, cores, ids, n_keys)
    return launch_backward_stacked(grad_scores, sub_scores, cores, ids, n_keys)


def _flat_slabs(x: Tensor) -> bool:
    """Whether every [token, head] block [n, r] of x is one contiguous range of n·r elements."""
    n, r = x.shape[2], x.shape[3]
    return (r == 1 or x.stride(3) == 1) and (n == 1 or x.stride(2) == r)


def _bwd_outputs(row_scores: Tensor, col_scores: Tensor, out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    if out is None:
        return torch.empty_like(row_scores, memory_format=torch.contiguous_format), torch.empty_like(
            col_scores, memory_format=torch.contiguous_format
        )
    for name, o, like in (("out[0] (grad_row)", out[0], row_scores), ("out[1] (grad_col)", out[1], col_scores)):
        check(
            o.shape == like.shape and o.dtype == like.dtype and o.device == like.device,
            _OP,
            f"{name} must match the scores: shape {tuple(like.shape)}, {like.dtype} on {like.device}; "
            f"got {tuple(o.shape)}, {o.dtype} on {o.device}",
        )
    return out


def launch_backward(
    grad_scores: Tensor,
    row_scores: Tensor,
    col_scores: Tensor,
    cores: Tensor,
    ids: Tensor,
    n_keys: int = -1,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward launch on checked arguments (ids outside [0, n_row·n_col) are skipped). With
    n_keys the rows of each side past n_keys are padding: zero in the gradients. `out`: (grad_row,
    grad_col) to write in full instead of fresh tensors, any strides (e.g. views into a larger
    buffer; a view's own elements must not overlap)."""
    t, h = row_scores.shape[:2]
    knn = ids.shape[2]
    if (t * h == 0 or knn == 0) and out is None:
        zeros = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (row_scores, col_scores, cores)]
        return zeros[0], zeros[1], zeros[2]
    grad_row, grad_col = _bwd_outputs(row_scores, col_scores, out)
    if t * h == 0 or knn == 0:
        return grad_row.zero_(), grad_col.zero_(), torch.zeros_like(cores)
    return grad_row, grad_col, _launch_bwd(grad_scores, row_scores, col_scores, cores, ids, n_keys, grad_row, grad_col)


def launch_backward_stacked(
    grad_scores: Tensor, sub_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """The stacked op's backward launch on checked arguments: (grad_sub_scores, grad_cores), both
    sides' gradients in one tensor of sub_scores' shape and strides."""
    grad = torch.empty_like(sub_scores)
    if grad.shape[0] * grad.shape[1] == 0 or ids.shape[2] == 0:
        return grad.zero_(), torch.zeros_like(cores)
    a, b = sub_scores.unbind(2)
    ga, gb = grad.unbind(2)
    return grad, _launch_bwd(grad_scores, a, b, cores, ids, n_keys, ga, gb, stacked=grad)


def _launch_bwd(
    grad_scores: Tensor,
    row_scores: Tensor,
    col_scores: Tensor,
    cores: Tensor,
    ids: Tensor,
    n_keys: int,
    grad_row: Tensor,
    grad_col: Tensor,
    stacked: Tensor | None = None,
) -> Tensor:
    """`_retrieval_bwd_kernel` writing grad_row and grad_col in full; returns grad_cores. stacked:
    the tensor [T, H, 2, n, r] whose halves along dim 2 are grad_row and grad_col, handed to the
    kernel once (a traced launch that writes two views of one tensor is functionalized into
    copies back into it)."""
    t, h, rows_a, r = row_scores.shape
    rows_b = col_scores.shape[2]
    n_row, n_col = (rows_a, rows_b) if n_keys == -1 else (n_keys, n_keys)
    m = cores.shape[1]
    knn = ids.shape[2]
    partial = torch.empty((h, m, r, r, t), dtype=torch.float32, device=row_scores.device)
    block_k = _block_k(knn)
    vec = max(1, 16 // grad_row.element_size())  # elements per 16-byte store
    launch(
        _retrieval_bwd_kernel,
        (t * h,),
        grad_scores,
        *grad_scores.stride(),
        row_scores,
        *row_scores.stride(),
        col_scores,
        *col_scores.stride(),
        cores,
        *cores.stride(),
        ids,
        *ids.stride(),
        grad_row if stacked is None else stacked,
        *grad_row.stride(),
        grad_col if stacked is None else None,
        *grad_col.stride(),
        0 if stacked is None else stacked.stride(2),
        partial,
        t,
        h,
        n_row,
        n_col,
        rows_a,
        rows_b,
        knn,
        R=r,
        M=m,
        MRRP=next_pow2(m * r * r),
        BLOCK_K=block_k,
        CHUNK=min(block_k, 32),
        FLAT_A=_flat_slabs(grad_row),
        FLAT_B=_flat_slabs(grad_col),
        ZBLOCK=4 * vec * 32 * BWD_NUM_WARPS,
        VEC=vec,
        num_warps=BWD_NUM_WARPS,
    )
    return partial.sum(-1).to(cores.dtype)
