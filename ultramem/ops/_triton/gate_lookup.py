"""Triton kernel for ultramem::gate_lookup: the pre-value gate and the weighted lookup in one pass.

    g[t, e]         = <P[rows[t, e]], x[t]>                       (returned, before the GELU)
    out[t, chunk m] = Σ_e scores[t, e, m] · act(g[t, e]) · V[rows[t, e], chunk m]

One program owns a block of tokens and a block of V's columns; it gathers each entry's P row,
forms the gate in registers, and folds it into the weights of the V rows it gathers next, so
neither the gate nor the effective scores go through memory in between. When V is wider than
one column block, every column block recomputes the gate (only the first one stores it).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._checks import acc_dtype, check_index_range
from .weighted_lookup import _block_d, _core_weights, _tl_acc

_OP = "gate_lookup"

CONFIG = {"BLOCK_T": 1, "BLOCK_E": 8, "BLOCK_D": 256, "BLOCK_DP": 256, "num_warps": 1, "HOIST_V": True}


@triton.jit
def _load_rows(ptrs, mask, EVICT_FIRST: tl.constexpr):
    # Gathered rows are read once: evict_first keeps them from pushing ids, scores and x out of L2.
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _gate_lookup_fwd_kernel(
    rows_ptr, r_st, r_se,
    v_ptr, v_sn, v_sd,
    p_ptr, p_sn, p_sd,
    x_ptr, x_st, x_sd,
    s_ptr, s_st, s_se, s_sm,
    out_ptr, o_st, o_sd,
    gate_ptr, ga_st, ga_se,
    T, E, N, DV, DP, DM,
    M: tl.constexpr, GELU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DP: tl.constexpr, D_FASTEST: tl.constexpr, SUM_ONCE: tl.constexpr,
    HOIST_V: tl.constexpr, EVICT_FIRST: tl.constexpr, ACC: tl.constexpr,
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
            xv = tl.load(x_ptr + t[:, None] * x_st + dp[None, :] * x_sd,
                         mask=t_ok[:, None] & dp_ok[None, :], other=0.0).to(ACC)
            pv = _load_rows(p_ptr + ids[:, :, None] * p_sn + dp[None, None, :] * p_sd,
                            ok[:, :, None] & dp_ok[None, None, :], EVICT_FIRST).to(ACC)
            if SUM_ONCE:
                g_parts += pv * xv[:, None, :]
            else:
                g += tl.sum(pv * xv[:, None, :], axis=2)
        if SUM_ONCE:
            g = tl.sum(g_parts, axis=2)
        tl.store(gate_ptr + t[:, None] * ga_st + e[None, :] * ga_se, g.to(gate_ptr.dtype.element_ty),
                 mask=te_ok & (pid_d == 0))
        if GELU:
            act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:
            act = g
        w = _core_weights(s_ptr + t[:, None] * s_st + e[None, :] * s_se, s_sm, ok, chunk, M, ACC)
        if not HOIST_V:
            v_raw = _load_rows(v_ptrs, v_mask, EVICT_FIRST)
        acc += tl.sum(v_raw.to(ACC) * (w * act[:, :, None]), axis=1)
    tl.store(out_ptr + t[:, None] * o_st + d[None, :] * o_sd, acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


def gate_lookup_cuda(rows: Tensor, values: Tensor, pre_values: Tensor, x: Tensor, scores: Tensor, gelu: bool,
                     config: dict | None = None) -> tuple[Tensor, Tensor]:
    # Imported late: the op module imports this one at its end to register the kernel.
    from ..gate_lookup import _check_args  # noqa: PLC0415
    _check_args(rows, values, pre_values, x, scores)
    check_index_range(rows, values.shape[0], _OP, "rows")
    cfg = {**CONFIG, **(config or {})}
    t, e = rows.shape
    n, dv = values.shape
    dp = pre_values.shape[1]
    m = scores.shape[2]
    out = scores.new_empty((t, dv))
    gate = x.new_empty((t, e))
    if t == 0:
        return out, gate
    acc = acc_dtype(values, pre_values, x, scores)
    bt, be = cfg["BLOCK_T"], cfg["BLOCK_E"]
    bd, bdp = _block_d(cfg["BLOCK_D"], max(dv, 1)), _block_d(cfg["BLOCK_DP"], max(dp, 1))
    n_d = max(1, triton.cdiv(dv, bd))
    d_fastest = bool(cfg.get("D_FASTEST", False)) and dv > 0
    grid = (triton.cdiv(t, bt) * n_d, 1) if d_fastest else (triton.cdiv(t, bt), n_d)
    _gate_lookup_fwd_kernel[grid](
        rows, rows.stride(0), rows.stride(1),
        values, values.stride(0), values.stride(1),
        pre_values, pre_values.stride(0), pre_values.stride(1),
        x, x.stride(0), x.stride(1),
        scores, scores.stride(0), scores.stride(1), scores.stride(2),
        out, out.stride(0), out.stride(1),
        gate, gate.stride(0), gate.stride(1),
        t, e, n, dv, dp, max(dv // m, 1),
        M=m, GELU=bool(gelu), BLOCK_T=bt, BLOCK_E=be, BLOCK_D=bd, BLOCK_DP=bdp, D_FASTEST=d_fastest, SUM_ONCE=dp > bdp,
        HOIST_V=bool(cfg.get("HOIST_V", False)), EVICT_FIRST=bool(cfg.get("EVICT_FIRST", False)),
        ACC=_tl_acc(acc),
        num_warps=cfg["num_warps"],
    )
    return out, gate
