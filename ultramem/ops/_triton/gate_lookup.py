"""Triton kernel for ultramem::gate_lookup: the pre-value gate and the weighted lookup in one pass.

    g[t, e]         = <P[rows[t, e]], x[t]>                       (returned, before the GELU)
    out[t, chunk m] = Σ_e scores[t, e, m] · act(g[t, e]) · V[rows[t, e], chunk m]

One program owns a block of tokens and a block of V's columns; it gathers each entry's P row,
forms the gate in registers, and folds it into the weights of the V rows it gathers next, so
neither the gate nor the effective scores go through memory in between. When V is wider than
one column block, every column block recomputes the gate (only the first one stores it).

At most shapes a second kernel runs instead (`_use_chunks`): one program (one warp) per token
holds all of the token's entries at once and walks the columns in chunks, so no lane is masked
when the dims are not powers of 2 and all P chunks of all entries are in flight together.

The backward (`_gate_lookup_bwd_kernel`, `gate_lookup_backward_cuda`) has the same shape: one
program per token with all its entries, V chunks then P chunks, both tables' gradients as fp32
atomics, or (deterministic) written out for two sorted one-writer-per-row passes, or (staged)
written into a staging area; the staged launchers are in `staged_grad`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import acc_dtype, check_gate_lookup_args, check_index_range, check_once
from . import weighted_lookup as _wl
from ._launch import cdiv, launch, next_pow2
from .weighted_lookup import _block_d, _core_weights, _select_core, _tl_acc

_OP = "gate_lookup"

# Launch shapes of the kernels; the launchers read them on every call (sweeps and tests patch them).
# The entry-block kernel. D_FASTEST puts a token's column blocks next to each other in the grid
# (no faster at the reference shapes).
ENTRY_BLOCK_CONFIG = {
    "BLOCK_T": 1,
    "BLOCK_E": 8,
    "BLOCK_D": 256,
    "BLOCK_DP": 256,
    "num_warps": 1,
    "HOIST_V": True,
    "EVICT_FIRST": True,
    "D_FASTEST": False,
}

# The column-chunk kernel: a token waits for 3 memory round trips (ids; all P loads; all V loads)
# instead of the entry-block kernel's 5, and no lane idles on D = 192. No register cap: ptxas's
# own choice is as fast, and a forced cap can spill at other shapes (perf/history/gate_lookup.md).
CHUNKS_CONFIG = {
    "BLOCK_D": 64,
    "BLOCK_DP": 64,
    "num_warps": 1,
    "HOIST_V": 0,
    "EVICT_FIRST": True,
}
# The column-chunk kernel runs by default, except for many entries with narrow rows, where its one
# warp per token holds too many entries and the entry-block kernel is faster (the shape sweep in
# perf/history/gate_lookup.md).
CHUNKS_MAX_ENTRIES = 32  # above this, narrow rows go to the entry-block kernel
CHUNKS_MAX_ENTRIES_WIDE = 128  # above this, all rows do
WIDE_ROW = 256  # "wide": vdim or pre_vdim above this


def _use_chunks(entries: int, dv: int, dp: int) -> bool:
    if entries <= CHUNKS_MAX_ENTRIES:
        return True
    return entries <= CHUNKS_MAX_ENTRIES_WIDE and max(dv, dp) > WIDE_ROW


# Upper bound on entries x columns of one gathered chunk (2048 = 64 bf16 values, 8 16-byte loads per
# lane of one warp); above it the column chunk shrinks (down to 8) so that a large k does not spill.
CHUNK_TILE = 2048
# Elements of one table gathered together (one group of chunks in flight): 3 chunks of 32 x 64 =
# 96 registers per lane of one warp for bf16, a whole row of 192 columns.
CHUNK_GROUP = 6144


@triton.jit
def _load_rows(ptrs, mask, EVICT_FIRST: tl.constexpr):
    # Gathered rows are read once: evict_first keeps them from pushing ids, scores and x out of L2.
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _gate_lookup_fwd_kernel(
    rows_ptr,
    r_st,
    r_se,
    v_ptr,
    v_sn,
    v_sd,
    p_ptr,
    p_sn,
    p_sd,
    x_ptr,
    x_st,
    x_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    out_ptr,
    o_st,
    o_sd,
    gate_ptr,
    ga_st,
    ga_se,
    T,
    E,
    N,
    DV,
    DP,
    DM,
    M: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr,
    D_FASTEST: tl.constexpr,
    SUM_ONCE: tl.constexpr,
    HOIST_V: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    ACC: tl.constexpr,
):
    if D_FASTEST:  # a token's column blocks run next to each other: its P rows are hot in L2
        n_d = tl.cdiv(DV, BLOCK_D)
        pid_t = tl.program_id(0) // n_d
        pid_d = tl.program_id(0) % n_d
    else:
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DV
    chunk = (d // DM)[None, None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        te_ok = t_ok[:, None] & (e < E)[None, :]
        ids = tl.load(rows_ptr + t[:, None] * r_st + e[None, :] * r_se, mask=te_ok, other=0).to(tl.int64)
        ok = te_ok & (ids >= 0) & (ids < N)
        v_ptrs = v_ptr + ids[:, :, None] * v_sn + d[None, None, :] * v_sd
        v_mask = ok[:, :, None] & d_ok[None, None, :]
        if HOIST_V:  # V's rows do not depend on the gate: have them in flight together with P's
            v_raw = _load_rows(v_ptrs, v_mask, EVICT_FIRST)
        # Over several column blocks add products elementwise and reduce once.
        if SUM_ONCE:
            g_parts = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_DP), dtype=ACC)
        else:
            g = tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC)
        for p0 in range(0, DP, BLOCK_DP):
            dp = p0 + tl.arange(0, BLOCK_DP)
            dp_ok = dp < DP
            xv = tl.load(
                x_ptr + t[:, None] * x_st + dp[None, :] * x_sd, mask=t_ok[:, None] & dp_ok[None, :], other=0.0
            ).to(ACC)
            pv = _load_rows(
                p_ptr + ids[:, :, None] * p_sn + dp[None, None, :] * p_sd,
                ok[:, :, None] & dp_ok[None, None, :],
                EVICT_FIRST,
            ).to(ACC)
            if SUM_ONCE:
                g_parts += pv * xv[:, None, :]
            else:
                g += tl.sum(pv * xv[:, None, :], axis=2)
        if SUM_ONCE:
            g = tl.sum(g_parts, axis=2)
        tl.store(
            gate_ptr + t[:, None] * ga_st + e[None, :] * ga_se,
            g.to(gate_ptr.dtype.element_ty),
            mask=te_ok & (pid_d == 0),
        )
        if GELU:
            act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:
            act = g
        w = _core_weights(s_ptr + t[:, None] * s_st + e[None, :] * s_se, s_sm, ok, chunk, M, ACC)
        if not HOIST_V:
            v_raw = _load_rows(v_ptrs, v_mask, EVICT_FIRST)
        acc += tl.sum(v_raw.to(ACC) * (w * act[:, :, None]), axis=1)
    tl.store(
        out_ptr + t[:, None] * o_st + d[None, :] * o_sd,
        acc.to(out_ptr.dtype.element_ty),
        mask=t_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _gate_lookup_fwd_chunks_kernel(
    rows_ptr,
    r_st,
    r_se,
    v_ptr,
    v_sn,
    v_sd,
    p_ptr,
    p_sn,
    p_sd,
    x_ptr,
    x_st,
    x_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    out_ptr,
    o_st,
    o_sd,
    gate_ptr,
    ga_st,
    ga_se,
    E,
    N,
    DV,
    DP,
    DM: tl.constexpr,
    M: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr,
    CHUNKS_V: tl.constexpr,
    CHUNKS_P: tl.constexpr,
    GROUP_V: tl.constexpr,
    GROUP_P: tl.constexpr,
    HOIST_V: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    ACC: tl.constexpr,
):
    """One token per program, all its E <= BLOCK_E entries at once, columns in chunks.

    gate: g[e] = Σ over P's column chunks of <P[id_e, chunk], x[t, chunk]> (kept in registers);
    then, per V column chunk, out[t, chunk] = Σ_e act(g[e]) · scores[e, core] · V[id_e, chunk],
    stored right away (an output chunk needs only the weights and its own V chunk).

    What decides the speed is how many memory round trips a program waits for one after the
    other and how many bytes it has in flight meanwhile. The loads go out in groups (GROUP_P /
    GROUP_V chunks: a whole row of 192 columns at 32 entries) collected in tuples, and every load
    of a group is issued before the first one is waited for. ptxas does not order them so by
    itself (it starts the first chunk's math, stalls on it, and issues the rest one round trip
    later), and it deletes a bare tl.debug_barrier; what it keeps, and moves no load over, is the
    barrier of a layout change through shared memory. So:
    - x is loaded after the group's P chunks, and its change of layout is where the group's
      math starts (loaded before them, its barrier held the later P loads back behind x);
    - the scores are loaded after V's chunks, the same way (they are needed only there);
    - the first HOIST_V chunks of V can go out with P's, before the gate (more registers).
    With 32 entries of 192 columns a token waits for 3 round trips (checked in the SASS): its
    ids; 24 P loads of 16 bytes per lane (+ x); 24 V loads (+ scores).
    """
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    ids = tl.load(rows_ptr + t * r_st + e * r_se, mask=e_ok, other=0).to(tl.int64)
    ok = e_ok & (ids >= 0) & (ids < N)
    p_rows = p_ptr + ids[:, None] * p_sn
    cols_v = tl.arange(0, BLOCK_D)[None, :]
    cols_p = tl.arange(0, BLOCK_DP)[None, :]

    vs = ()
    for c in tl.static_range(HOIST_V):  # V's first chunks do not depend on the gate
        d = c * BLOCK_D + cols_v
        vs = vs + (_load_rows(v_ptr + ids[:, None] * v_sn + d * v_sd, ok[:, None] & (d < DV), EVICT_FIRST),)
    g = tl.zeros((BLOCK_E,), dtype=ACC)
    for g0 in tl.static_range(0, CHUNKS_P, GROUP_P):
        ps = ()
        for c in tl.static_range(g0, g0 + GROUP_P):
            if c < CHUNKS_P:
                dp = c * BLOCK_DP + cols_p
                ps = ps + (_load_rows(p_rows + dp * p_sd, ok[:, None] & (dp < DP), EVICT_FIRST),)
        xs = ()
        for c in tl.static_range(g0, g0 + GROUP_P):
            if c < CHUNKS_P:
                dp1 = c * BLOCK_DP + tl.arange(0, BLOCK_DP)
                xs = xs + (tl.load(x_ptr + t * x_st + dp1 * x_sd, mask=dp1 < DP, other=0.0),)
        for c in tl.static_range(g0, g0 + GROUP_P):
            if c < CHUNKS_P:
                g += tl.sum(ps[c - g0].to(ACC) * xs[c - g0].to(ACC)[None, :], axis=1)
    tl.store(gate_ptr + t * ga_st + e * ga_se, g.to(gate_ptr.dtype.element_ty), mask=e_ok)
    if GELU:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        act = g
    v_rows = v_ptr + ids[:, None] * v_sn  # (here, not above: fewer registers live during P's loads)

    for g0 in tl.static_range(0, CHUNKS_V, GROUP_V):
        if g0 > 0:
            vs = ()
        for c in tl.static_range(g0, g0 + GROUP_V):
            if c >= HOIST_V and c < CHUNKS_V:  # (the first HOIST_V are in flight already)
                d = c * BLOCK_D + cols_v
                vs = vs + (_load_rows(v_rows + d * v_sd, ok[:, None] & (d < DV), EVICT_FIRST),)
        if g0 == 0:  # scores after V's loads: their layout change fences the loads from the math
            scores = ()  # (masked by `ok`: an id out of range adds nothing, whatever its score)
            for m in tl.static_range(M):
                scores = scores + (tl.load(s_ptr + t * s_st + e * s_se + m * s_sm, mask=ok, other=0.0),)
            weights = ()  # per core: act(g) · score; all M loads are out before the first layout change
            for m in tl.static_range(M):
                weights = weights + (scores[m].to(ACC) * act,)
        for c in tl.static_range(g0, g0 + GROUP_V):
            if c < CHUNKS_V:
                w = _chunk_weights(weights, c, cols_v, BLOCK_D, DM, M)
                o = tl.sum(vs[c - g0].to(ACC) * w, axis=0)
                d1 = c * BLOCK_D + tl.arange(0, BLOCK_D)
                tl.store(out_ptr + t * o_st + d1 * o_sd, o.to(out_ptr.dtype.element_ty), mask=d1 < DV)


@triton.jit
def _per_core(x2, core, M: tl.constexpr):
    """The M columns of a [BLOCK_E, MP] register tile as a tuple of [BLOCK_E] vectors."""
    cols = ()
    for m in tl.static_range(M):
        cols = cols + (tl.sum(tl.where(core[None, :] == m, x2, 0.0), axis=1),)
    return cols


@triton.jit
def _load_chunk_group(
    row_ptrs,
    s_d,
    row_ok,
    tok_ptr,
    tok_sd,
    cols,
    DIM,
    g0: tl.constexpr,
    GROUP: tl.constexpr,
    CHUNKS: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
):
    """Chunks g0 .. g0 + GROUP of the entries' rows ([BLOCK_E, BLOCK] each) and of the token's
    vector, all issued before any is used: two tuples."""
    rows = ()
    tok = ()
    for c in tl.static_range(g0, g0 + GROUP):
        if c < CHUNKS:
            d = c * cols.shape[0] + cols
            rows = rows + (_load_rows(row_ptrs + d[None, :] * s_d, row_ok & (d < DIM)[None, :], EVICT_FIRST),)
            tok = tok + (tl.load(tok_ptr + d * tok_sd, mask=d < DIM, other=0.0),)
    return rows, tok


@triton.jit
def _gate_lookup_bwd_kernel(
    rows_ptr,
    r_st,
    r_se,
    v_ptr,
    v_sn,
    v_sd,
    p_ptr,
    p_sn,
    p_sd,
    x_ptr,
    x_st,
    x_sd,
    s_ptr,
    s_st,
    s_se,
    s_sm,
    gate_ptr,
    ga_st,
    ga_se,
    go_ptr,
    go_st,
    go_sd,
    gg_ptr,
    gg_st,
    gg_se,
    gv_ptr,
    gv_sn,
    gv_sd,
    gp_ptr,
    gp_sn,
    gp_sd,
    gs_ptr,
    gs_st,
    gs_se,
    gs_sm,
    gx_ptr,
    gx_st,
    gx_sd,
    ef_ptr,
    ef_st,
    ef_se,
    ef_sm,
    gg_out_ptr,
    go2_st,
    go2_se,
    sr_ptr,
    sr_st,
    sr_se,
    sgo_ptr,
    sgo_st,
    sgo_sd,
    sx_ptr,
    sx_st,
    sx_sd,
    fill_ptr,
    T,
    CAP,
    E,
    N,
    DV,
    DP,
    DM: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    GELU: tl.constexpr,
    HAS_GRAD_GATE: tl.constexpr,
    SCATTER: tl.constexpr,
    STAGED: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr,
    CHUNKS_V: tl.constexpr,
    CHUNKS_P: tl.constexpr,
    GROUP_V: tl.constexpr,
    GROUP_P: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    ACC: tl.constexpr,
):
    """The whole backward of one token (all its E <= BLOCK_E entries at once), columns in chunks:

    V pass: grad_V[id_e, d] += act(g_e) · s[e, core(d)] · grad_out[t, d] (fp32 atomics) and
            q[e, m] = <V[id_e, chunk m], grad_out[t, chunk m]>;
    then    grad_scores[e, m] = q[e, m] · act(g_e),
            grad_g[e] = Σ_m q[e, m] · s[e, m] · act'(g_e) (+ grad_gate[t, e]), kept in registers;
    P pass: grad_x[t, d] = Σ_e grad_g[e] · P[id_e, d] and grad_P[id_e, d] += grad_g[e] · x[t, d].

    Each gathered row is read once, and neither the effective scores nor the gate's gradient
    go through memory. Loads go out in groups of chunks before their math (see the forward
    chunk kernel). Ids out of [0, N) are never dereferenced and contribute nothing.

    SCATTER False (deterministic mode): no atomics; the effective scores act(g)·s and grad_g are
    written instead (to ef / gg_out), for the sorted one-writer-per-row table gradients.

    STAGED: the same, into a staging area of CAP tokens (`ultramem.ops.staged_grad`) at token
    fill + t, with fill = the tokens staged so far (fill_ptr[0]), together with the row ids,
    grad_out and x. When the T tokens of this call do not fit, each program adds its token into
    the tables with atomics instead, in a branch after both passes (inline atomics, even masked
    off, slow the kernel down: perf/history/staged_flush.md). fill_ptr[1] counts the programs
    done: the last one moves the level on (every program has read it by then) and resets the
    count.

    One table alone (the staged backwards of `weighted_lookup` and `pre_value_gate`): HAS_GATE
    False takes act(g) = 1 (no gate), and CHUNKS_P = 0 (a lookup: grad_scores = q) or CHUNKS_V = 0
    (a gate: grad_g = grad_gate, grad_x) skips the other table's pass; pointers of the absent
    half are never dereferenced."""
    t = tl.program_id(0).to(tl.int64)
    if STAGED:
        level = tl.load(fill_ptr).to(tl.int64)
        fits = level + T <= CAP
        ts = level + t
    else:
        ts = t
        fits = True
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    ids = tl.load(rows_ptr + t * r_st + e * r_se, mask=e_ok, other=0).to(tl.int64)
    ok = e_ok & (ids >= 0) & (ids < N)
    if STAGED:
        tl.store(sr_ptr + ts * sr_st + e * sr_se, ids.to(sr_ptr.dtype.element_ty), mask=e_ok & fits)
    if HAS_GATE:
        g = tl.load(gate_ptr + t * ga_st + e * ga_se, mask=ok, other=0.0).to(ACC)
        if GELU:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            act = g * cdf
            slope = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # Φ(g) + g·φ(g)
        else:
            act = g
            slope = tl.full((BLOCK_E,), 1.0, ACC)
    else:
        act = tl.full((BLOCK_E,), 1.0, ACC)
        slope = tl.full((BLOCK_E,), 1.0, ACC)
    core = tl.arange(0, MP)
    if CHUNKS_V > 0:
        s2 = tl.load(
            s_ptr + t * s_st + e[:, None] * s_se + core[None, :] * s_sm,
            mask=ok[:, None] & (core < M)[None, :],
            other=0.0,
        ).to(ACC)
    else:
        s2 = tl.zeros((BLOCK_E, MP), dtype=ACC)
    s_m = _per_core(s2, core, M)
    eff = _per_core(s2 * act[:, None], core, M)
    row_ok = ok[:, None]
    cols_v = tl.arange(0, BLOCK_D)
    cols_p = tl.arange(0, BLOCK_DP)

    q = ()
    for _m in tl.static_range(M):
        q = q + (tl.zeros((BLOCK_E,), dtype=ACC),)
    for g0 in tl.static_range(0, CHUNKS_V, GROUP_V):
        vs, gos = _load_chunk_group(
            v_ptr + ids[:, None] * v_sn,
            v_sd,
            row_ok,
            go_ptr + t * go_st,
            go_sd,
            cols_v,
            DV,
            g0,
            GROUP_V,
            CHUNKS_V,
            EVICT_FIRST,
        )
        for c in tl.static_range(g0, g0 + GROUP_V):
            if c < CHUNKS_V:
                d = c * BLOCK_D + cols_v
                go = gos[c - g0].to(ACC)[None, :]
                prod = vs[c - g0].to(ACC) * go
                w = _chunk_weights(eff, c, cols_v[None, :], BLOCK_D, DM, M)
                # q[m] += the row dots over this chunk's columns of core m (cores known at compile time)
                if (c * BLOCK_D) // DM == min(((c + 1) * BLOCK_D - 1) // DM, M - 1):
                    q = _add_at(q, (c * BLOCK_D) // DM, tl.sum(prod, axis=1), M)
                else:
                    cd = (d // DM)[None, :]
                    for m in tl.static_range((c * BLOCK_D) // DM, min(((c + 1) * BLOCK_D - 1) // DM, M - 1) + 1):
                        q = _add_at(q, m, tl.sum(tl.where(cd == m, prod, 0.0), axis=1), M)
                if STAGED:
                    tl.store(sgo_ptr + ts * sgo_st + d * sgo_sd, gos[c - g0], mask=(d < DV) & fits)
                if SCATTER:
                    tl.atomic_add(
                        gv_ptr + ids[:, None] * gv_sn + d[None, :] * gv_sd,
                        (w * go).to(gv_ptr.dtype.element_ty),
                        mask=row_ok & (d < DV)[None, :],
                        sem="relaxed",
                    )

    grad_g = tl.zeros((BLOCK_E,), dtype=ACC)
    if CHUNKS_V > 0:
        for m in tl.static_range(M):
            tl.store(gs_ptr + t * gs_st + e * gs_se + m * gs_sm, (q[m] * act).to(gs_ptr.dtype.element_ty), mask=e_ok)
            grad_g += q[m] * s_m[m]
        grad_g = grad_g * slope
    if HAS_GRAD_GATE:
        grad_g += tl.load(gg_ptr + t * gg_st + e * gg_se, mask=ok, other=0.0).to(ACC)
    if not SCATTER:
        if CHUNKS_P > 0:
            tl.store(gg_out_ptr + ts * go2_st + e * go2_se, grad_g, mask=e_ok & fits)
        if CHUNKS_V > 0:
            for m in tl.static_range(M):
                tl.store(ef_ptr + ts * ef_st + e * ef_se + m * ef_sm, eff[m], mask=e_ok & fits)

    for g0 in tl.static_range(0, CHUNKS_P, GROUP_P):
        ps, xs = _load_chunk_group(
            p_ptr + ids[:, None] * p_sn,
            p_sd,
            row_ok,
            x_ptr + t * x_st,
            x_sd,
            cols_p,
            DP,
            g0,
            GROUP_P,
            CHUNKS_P,
            EVICT_FIRST,
        )
        for c in tl.static_range(g0, g0 + GROUP_P):
            if c < CHUNKS_P:
                dp = c * BLOCK_DP + cols_p
                gx = tl.sum(ps[c - g0].to(ACC) * grad_g[:, None], axis=0)
                tl.store(gx_ptr + t * gx_st + dp * gx_sd, gx.to(gx_ptr.dtype.element_ty), mask=dp < DP)
                if STAGED:
                    tl.store(sx_ptr + ts * sx_st + dp * sx_sd, xs[c - g0], mask=(dp < DP) & fits)
                if SCATTER:
                    tl.atomic_add(
                        gp_ptr + ids[:, None] * gp_sn + dp[None, :] * gp_sd,
                        (grad_g[:, None] * xs[c - g0].to(ACC)[None, :]).to(gp_ptr.dtype.element_ty),
                        mask=row_ok & (dp < DP)[None, :],
                        sem="relaxed",
                    )

    if STAGED:
        if level + T > CAP:  # no room: this token's table gradients go into the tables now
            # loops not unrolled, so that this rare branch sets no register budget; names of
            # their own (a name the branch assigns keeps one type inside and out). The CHUNKS
            # guards change no machine code, but without them Inductor's access analysis, which
            # reads the loops before they are found empty, counts the absent table as written.
            if CHUNKS_V > 0:
                for over_c in tl.range(0, CHUNKS_V, num_stages=1):
                    over_d = over_c * BLOCK_D + cols_v
                    over_go = tl.load(go_ptr + t * go_st + over_d * go_sd, mask=over_d < DV, other=0.0).to(ACC)
                    over_w = _select_core(eff, (over_d // DM)[None, :], M)
                    tl.atomic_add(
                        gv_ptr + ids[:, None] * gv_sn + over_d[None, :] * gv_sd,
                        (over_w * over_go[None, :]).to(gv_ptr.dtype.element_ty),
                        mask=row_ok & (over_d < DV)[None, :],
                        sem="relaxed",
                    )
            if CHUNKS_P > 0:
                for over_c in tl.range(0, CHUNKS_P, num_stages=1):
                    over_dp = over_c * BLOCK_DP + cols_p
                    over_x = tl.load(x_ptr + t * x_st + over_dp * x_sd, mask=over_dp < DP, other=0.0).to(ACC)
                    tl.atomic_add(
                        gp_ptr + ids[:, None] * gp_sn + over_dp[None, :] * gp_sd,
                        (grad_g[:, None] * over_x[None, :]).to(gp_ptr.dtype.element_ty),
                        mask=row_ok & (over_dp < DP)[None, :],
                        sem="relaxed",
                    )
        # every warp of this program has read the level before the count says it is done
        tl.debug_barrier()
        done = tl.atomic_add(fill_ptr + 1, 1, sem="acq_rel")
        tl.store(fill_ptr, level + T, mask=(done == T - 1) & fits)
        tl.store(fill_ptr + 1, 0, mask=done == T - 1)


@triton.jit
def _chunk_weights(weights, c: tl.constexpr, cols, BLOCK: tl.constexpr, DM: tl.constexpr, M: tl.constexpr):
    """Per-entry weights of column chunk c ([BLOCK_E, 1], or [BLOCK_E, BLOCK] when the chunk spans
    cores): weights[core(d)] for its columns d = c·BLOCK + cols (cols a [1, BLOCK] range). The
    cores the chunk covers, first and last, are known at compile time (DM is a constexpr;
    written inline: a name assigned a constexpr expression in a static loop is not one), so a
    chunk within one core needs no per-column select."""
    if (c * BLOCK) // DM == min(((c + 1) * BLOCK - 1) // DM, M - 1):
        w = weights[(c * BLOCK) // DM][:, None]
    else:
        core = (c * BLOCK + cols) // DM
        w = tl.where(core == (c * BLOCK) // DM, weights[(c * BLOCK) // DM][:, None], 0.0)
        for m in tl.static_range((c * BLOCK) // DM + 1, min(((c + 1) * BLOCK - 1) // DM, M - 1) + 1):
            w = tl.where(core == m, weights[m][:, None], w)
    return w


@triton.jit
def _add_at(vectors, i: tl.constexpr, x, M: tl.constexpr):
    """vectors (a tuple of M) with x added to entry i."""
    out = ()
    for m in tl.static_range(M):
        if m == i:
            out = out + (vectors[m] + x,)
        else:
            out = out + (vectors[m],)
    return out


def _tensor_args(*tensors: Tensor) -> list:
    """Each tensor followed by its strides: the leading arguments of both fused kernels."""
    return [item for t in tensors for item in (t, *t.stride())]


def gate_lookup_cuda(
    rows: Tensor, values: Tensor, pre_values: Tensor, x: Tensor, scores: Tensor, gelu: bool
) -> tuple[Tensor, Tensor]:
    check_once(_OP, check_gate_lookup_args, _OP, rows, values, pre_values, x, scores)
    check_index_range(rows, values.shape[0], _OP, "rows")
    t, e = rows.shape
    n, dv = values.shape
    dp = pre_values.shape[1]
    m = scores.shape[2]
    out = scores.new_empty((t, dv))
    gate = x.new_empty((t, e))
    if t == 0:
        return out, gate
    acc = acc_dtype(values, pre_values, x, scores)
    if _use_chunks(e, dv, dp):
        _launch_chunks(rows, values, pre_values, x, scores, out, gate, bool(gelu), acc)
        return out, gate
    cfg = ENTRY_BLOCK_CONFIG
    bt, be = cfg["BLOCK_T"], cfg["BLOCK_E"]
    bd, bdp = _block_d(cfg["BLOCK_D"], max(dv, 1)), _block_d(cfg["BLOCK_DP"], max(dp, 1))
    n_d = max(1, cdiv(dv, bd))
    d_fastest = bool(cfg["D_FASTEST"]) and dv > 0
    grid = (cdiv(t, bt) * n_d, 1) if d_fastest else (cdiv(t, bt), n_d)
    launch(
        _gate_lookup_fwd_kernel,
        grid,
        *_tensor_args(rows, values, pre_values, x, scores, out, gate),
        t,
        e,
        n,
        dv,
        dp,
        max(dv // m, 1),
        M=m,
        GELU=bool(gelu),
        BLOCK_T=bt,
        BLOCK_E=be,
        BLOCK_D=bd,
        BLOCK_DP=bdp,
        D_FASTEST=d_fastest,
        SUM_ONCE=dp > bdp,
        HOIST_V=bool(cfg["HOIST_V"]),
        EVICT_FIRST=bool(cfg["EVICT_FIRST"]),
        ACC=_tl_acc(acc),
        num_warps=cfg["num_warps"],
    )
    return out, gate


def _chunk_plan(e: int, values: Tensor, pre_values: Tensor, cfg: dict) -> dict:
    """Block sizes of the column-chunk kernels (`cfg`: CHUNKS_CONFIG or BWD_CONFIG): BLOCK_E
    covers all entries, the column chunks shrink when entries x chunk would exceed CHUNK_TILE, and
    a group of chunks in flight together holds at most CHUNK_GROUP elements per table (at least
    one chunk)."""
    dv, dp = values.shape[1], pre_values.shape[1]
    be = next_pow2(max(e, 1))
    bd = _block_d(cfg["BLOCK_D"], dv)
    bdp = _block_d(cfg["BLOCK_DP"], dp)
    # The limits are sized for 2-byte tables; 4-byte values take twice the registers each.
    wide = max(values.element_size(), pre_values.element_size()) // 2 or 1
    tile, group = CHUNK_TILE // wide, CHUNK_GROUP // wide
    while be * bd > tile and bd > 8:
        bd //= 2
    while be * bdp > tile and bdp > 8:
        bdp //= 2
    chunks_v, chunks_p = cdiv(dv, bd), cdiv(dp, bdp)
    return dict(
        BLOCK_E=be,
        BLOCK_D=bd,
        BLOCK_DP=bdp,
        CHUNKS_V=chunks_v,
        CHUNKS_P=chunks_p,
        GROUP_V=max(1, min(chunks_v, group // (be * bd))),
        GROUP_P=max(1, min(chunks_p, group // (be * bdp))),
    )


def _launch_chunks(rows, values, pre_values, x, scores, out, gate, gelu, acc) -> None:
    """`_gate_lookup_fwd_chunks_kernel`: one program per token (blocks from `_chunk_plan`)."""
    cfg = CHUNKS_CONFIG
    t, e = rows.shape
    dv = values.shape[1]
    m = scores.shape[2]
    plan = _chunk_plan(e, values, pre_values, cfg)
    launch(
        _gate_lookup_fwd_chunks_kernel,
        (t,),
        *_tensor_args(rows, values, pre_values, x, scores, out, gate),
        e,
        values.shape[0],
        dv,
        pre_values.shape[1],
        DM=max(dv // m, 1),
        M=m,
        GELU=gelu,
        HOIST_V=min(int(cfg["HOIST_V"]), plan["GROUP_V"]),
        EVICT_FIRST=bool(cfg["EVICT_FIRST"]),
        ACC=_tl_acc(acc),
        num_warps=int(cfg["num_warps"]),
        **plan,
    )


# The fused backward (`_gate_lookup_bwd_kernel`), one program per token, on 2 warps (1 is
# slower, 4 no faster: perf/history/gate_lookup.md).
BWD_CONFIG = {"BLOCK_D": 64, "BLOCK_DP": 64, "num_warps": 2, "EVICT_FIRST": True}
# The fused backward holds all of a token's entries in one program (like the forward's chunk
# kernel); above this many entries the op uses the separate lookup and gate backwards instead
# (the sweep's largest entry count; the fused kernel itself was timed at 32).
BWD_MAX_ENTRIES = 128


def gate_lookup_backward_cuda(
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
    grad_values: Tensor,
    grad_pre_values: Tensor,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """The backward of gate_lookup: adds the tables' gradients into grad_values and
    grad_pre_values (no zero-fill) and returns (grad_scores, grad_x) in scores' and x's dtypes.
    One kernel with fp32 atomics; `deterministic`: the same kernel without atomics, then each
    table's gradient sorted by row, one writer per row (one sort shared by both tables). The
    staged variant is `staged_grad.staged_gate_lookup_backward_cuda`. Arguments are checked by
    the op (`gate_lookup_backward_into`)."""
    t, e = rows.shape
    m = scores.shape[2]
    grad_scores = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if t == 0:
        return grad_scores, grad_x
    if e == 0:
        return grad_scores, grad_x.zero_()
    acc = acc_dtype(values, pre_values, x, scores)
    if deterministic:
        eff = torch.empty((t, e, m), dtype=acc, device=scores.device)
        grad_g = torch.empty((t, e), dtype=acc, device=scores.device)
    else:
        eff, grad_g = grad_scores, gate  # placeholders (unused)
    _launch_backward(
        rows,
        values,
        pre_values,
        x,
        scores,
        gate,
        grad_out,
        grad_gate,
        grad_values,
        grad_pre_values,
        grad_scores,
        grad_x,
        eff,
        grad_g,
        gelu=gelu,
        has_gate=True,
        acc=acc,
        scatter=not deterministic,
        cfg=BWD_CONFIG,
    )
    if deterministic:
        order = _wl.sort_rows(rows, values.shape[0])
        for g, w, buf in ((grad_out, eff, grad_values), (x, grad_g, grad_pre_values)):
            _wl.segment_scatter(rows, g, w, buf, acc, accumulate=True, order=order)
    return grad_scores, grad_x


def _launch_backward(
    rows,
    values,
    pre_values,
    x,
    scores,
    gate,
    grad_out,
    grad_gate,
    grad_values,
    grad_pre_values,
    grad_scores,
    grad_x,
    eff,
    grad_g,
    *,
    gelu: bool,
    has_gate: bool,
    acc: torch.dtype,
    scatter: bool,
    cfg: dict,
    staging=None,
) -> None:
    """`_gate_lookup_bwd_kernel` (one program per token) on the launch shape `cfg` (BWD_CONFIG, or
    the staged gate backward's). A table of 0 columns is absent (its pass is skipped). Without
    staging and without `scatter`, eff / grad_g receive the effective scores and grad_g. With
    `staging` (a `GradStaging`) the kernel stages instead of writing the tables (into them with
    atomics when the area has no room) and moves the area's fill level on."""
    t, e = rows.shape
    dv, dp = values.shape[1], pre_values.shape[1]
    m = scores.shape[2]
    if staging is not None:
        eff = staging.eff if dv else eff
        grad_g = staging.grad_g if dp else grad_g
        stage_args = (staging.rows, staging.grad_out if dv else grad_out, staging.x if dp else x)
        fill, cap = staging.fill, staging.capacity
    else:
        stage_args, fill, cap = (rows, grad_out, x), rows, 0  # unused placeholders
    plan = _chunk_plan(e, values, pre_values, cfg)
    launch(
        _gate_lookup_bwd_kernel,
        (t,),
        *_tensor_args(
            rows,
            values,
            pre_values,
            x,
            scores,
            gate,
            grad_out,
            grad_gate if grad_gate is not None else gate,
            grad_values,
            grad_pre_values,
            grad_scores,
            grad_x,
            eff,
            grad_g,
            *stage_args,
        ),
        fill,
        t,
        cap,
        e,
        values.shape[0],
        dv,
        dp,
        DM=max(dv // m, 1),
        M=m,
        MP=next_pow2(m),
        GELU=bool(gelu),
        HAS_GRAD_GATE=grad_gate is not None,
        SCATTER=scatter and staging is None,
        STAGED=staging is not None,
        HAS_GATE=has_gate,
        EVICT_FIRST=bool(cfg["EVICT_FIRST"]),
        ACC=_tl_acc(acc),
        num_warps=int(cfg["num_warps"]),
        **plan,
    )
