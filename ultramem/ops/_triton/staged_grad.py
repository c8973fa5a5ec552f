"""Triton kernels and launchers of the staged table gradients (`ultramem.ops.staged_grad`).

A staged backward is `gate_lookup`'s fused backward kernel (`_gate_lookup_bwd_kernel`, STAGED)
with both tables, or with one (the backwards of `weighted_lookup` and `pre_value_gate`): instead
of adding into the gradient buffers it writes each entry's row id and weights and each token's
source rows into a `GradStaging` area, at the area's fill level (read on the device); the tokens
of a call that finds no room go into the buffers with fp32 atomics, and the kernel's last program
moves the level on: one launch per staged backward.

`GradStaging.flush` adds everything staged at once: one sort of the staged row ids
(`sort_rows`), then per table `sorted_block_add` (`_sorted_block_add_kernel`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import acc_dtype
from . import gate_lookup as _tgl
from ._launch import cdiv
from .weighted_lookup import _block_d, _load_core_scores, _scores3, _select_core, _tl_acc, sort_rows

# ------------------------------------------------------------------------------------ kernels


@triton.jit
def _same_row_sum(row_a, val_a, row_b, val_b):
    """Combine of a segmented scan: b's running sum, plus a's when both are in the same row."""
    return row_b, val_b + tl.where(row_a == row_b, val_a, 0.0)


@triton.jit
def _sorted_block_add_kernel(
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
    limit_ptr,
    E,
    N,
    D,
    DM,
    M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKS: tl.constexpr,
    ACC: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
):
    """grad_table[row] += Σ scores · g[token] over entries sorted by row, in blocks of BLOCK_J
    entries × CHUNKS column chunks of BLOCK_D: all of a block's source rows are loaded at once
    (many entries in flight, which the run-walking segment kernel lacks when g is not in L2),
    summed per row by a segmented scan, and each row's sum in the block goes out as one fp32
    atomic add from its last entry. A row whose run crosses blocks gets one add per block, so
    the result is not bitwise reproducible. HAS_LIMIT: only tokens below *limit_ptr (read on the
    device) count.

    Programs loop over blocks (block b, b + programs, ...) and load the next block's row ids and
    entry indices while this block's source rows are in flight, so that a block waits for one
    memory round trip (its source rows), not two (its entry indices, then the rows they name)."""
    n_blocks = tl.cdiv(L, BLOCK_J)
    step = tl.num_programs(0)
    d0 = tl.program_id(1) * (CHUNKS * BLOCK_D)
    lane = tl.arange(0, BLOCK_J)
    if HAS_LIMIT:
        limit = tl.load(limit_ptr)
    # A block's row ids (-1 past the end), its next entry's, and its flat entry indices: loaded in
    # the kernel body, as a store address made from a helper's result counts, in Inductor's access
    # analysis, as a write to every pointer passed to the helper.
    j = (tl.program_id(0) * BLOCK_J + lane).to(tl.int64)
    row = tl.load(sorted_ptr + j, mask=j < L, other=-1).to(tl.int64)
    nxt = tl.load(sorted_ptr + j + 1, mask=(j < L) & (j + 1 < L), other=-1).to(tl.int64)
    ent = tl.load(perm_ptr + j, mask=j < L, other=0).to(tl.int64)
    for blk in range(tl.program_id(0), n_blocks, step):
        in_table = (row >= 0) & (row < N)
        tok = ent // E
        en = ent - tok * E
        real = in_table  # entries that add (their products are 0 otherwise)
        if HAS_LIMIT:
            real = real & (tok < limit)
        gvs = ()
        for c in tl.static_range(CHUNKS):  # every chunk's source rows in flight before any math
            d = d0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
            gvs = gvs + (
                tl.load(
                    g_ptr + tok[:, None] * g_st + d[None, :] * g_sd, mask=real[:, None] & (d < D)[None, :], other=0.0
                ),
            )
        # the weights too, before the first atomic add: loads after it could not be hoisted above
        # it (the adds might alias them) and would cost a round trip per chunk
        s_cores = _load_core_scores(s_ptr + tok * s_st + en * s_se, s_sm, real, M, ACC)
        # (a row's last entry in the block writes its sum, whether or not that entry itself adds)
        last = in_table & ((nxt != row) | (lane == BLOCK_J - 1))
        rows2 = tl.broadcast_to(row.to(tl.int32)[:, None], (BLOCK_J, BLOCK_D))
        out_rows = row
        j = ((blk + step) * BLOCK_J + lane).to(tl.int64)  # the next block's
        row = tl.load(sorted_ptr + j, mask=j < L, other=-1).to(tl.int64)
        nxt = tl.load(sorted_ptr + j + 1, mask=(j < L) & (j + 1 < L), other=-1).to(tl.int64)
        ent = tl.load(perm_ptr + j, mask=j < L, other=0).to(tl.int64)
        for c in tl.static_range(CHUNKS):
            d = d0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
            w = _select_core(s_cores, (d // DM)[None, :], M)
            _, run = tl.associative_scan((rows2, w * gvs[c].to(ACC)), 0, _same_row_sum)
            tl.atomic_add(
                gt_ptr + out_rows[:, None] * gt_sn + d[None, :] * gt_sd,
                run.to(gt_ptr.dtype.element_ty),
                mask=last[:, None] & (d < D)[None, :],
                sem="relaxed",
            )


# ------------------------------------------------------------------------ staged backwards


def staged_gate_lookup_backward_cuda(
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
    staging,
) -> tuple[Tensor, Tensor]:
    """`gate_lookup`'s backward with both tables' gradients staged (a `GradStaging` with both
    halves): no table writes; the kernel stages each entry's row, effective scores act(g)·s and
    gate gradient, and the token's grad_out and x, for a later sorted pass over many
    micro-batches. Tokens that do not fit (checked on the device) go into grad_values and
    grad_pre_values with atomics. Returns (grad_scores, grad_x) as `gate_lookup_backward_cuda`."""
    t, e = rows.shape
    grad_scores = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if t == 0:
        return grad_scores, grad_x
    if e == 0:
        return grad_scores, grad_x.zero_()
    _tgl._launch_backward(
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
        grad_scores,
        gate,
        gelu=gelu,
        has_gate=True,
        acc=acc_dtype(values, pre_values, x, scores),
        scatter=False,
        staging=staging,
        cfg=_tgl.BWD_CONFIG,
    )
    return grad_scores, grad_x


def staged_lookup_backward_cuda(
    grad_out: Tensor,
    rows: Tensor,
    values: Tensor,
    scores: Tensor,
    grad_values: Tensor,
    staging,
) -> Tensor:
    """`weighted_lookup`'s backward with its table gradient staged (a values-only `GradStaging`):
    the backward kernel's values pass alone, no gate (grad_scores = the row dots); returns
    grad_scores. Tokens that do not fit go into `grad_values` with atomics."""
    t, e = rows.shape
    grad_scores = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    if t == 0 or e == 0:
        return grad_scores.zero_()
    none = values.new_empty((values.shape[0], 0))  # the absent pre-value table: 0 columns, never read
    _tgl._launch_backward(
        rows,
        values,
        none,
        grad_out,
        scores,
        rows,
        grad_out,
        None,
        grad_values,
        grad_values,
        grad_scores,
        grad_out,
        grad_scores,
        rows,
        gelu=False,
        has_gate=False,
        acc=acc_dtype(values, scores, grad_out),
        scatter=False,
        staging=staging,
        cfg=_tgl.BWD_CONFIG,
    )
    return grad_scores


# The gate's one-table staged backward on one warp per token: faster than BWD_CONFIG's two (and
# than four); the lookup's is as fast either way and keeps BWD_CONFIG (perf/history/staged_flush.md).
STAGED_GATE_CONFIG = {"num_warps": 1}


def staged_gate_backward_cuda(
    grad_gate: Tensor,
    rows: Tensor,
    pre_values: Tensor,
    x: Tensor,
    grad_pre_values: Tensor,
    staging,
) -> Tensor:
    """`pre_value_gate`'s backward with its table gradient staged (a pre-values-only
    `GradStaging`): the backward kernel's pre-values pass alone with grad_g = grad_gate; returns
    grad_x. Tokens that do not fit go into `grad_pre_values` with atomics."""
    t, e = rows.shape
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if t == 0 or e == 0:
        return grad_x.zero_()
    none = pre_values.new_empty((pre_values.shape[0], 0))  # the absent value table
    one_core = grad_gate.unsqueeze(-1)  # placeholder scores [T, E, 1], never read
    _tgl._launch_backward(
        rows,
        none,
        pre_values,
        x,
        one_core,
        grad_gate,
        x,
        grad_gate,
        grad_pre_values,
        grad_pre_values,
        one_core,
        grad_x,
        one_core,
        grad_gate,
        gelu=False,
        has_gate=False,
        acc=acc_dtype(pre_values, x, grad_gate),
        scatter=False,
        staging=staging,
        cfg={**_tgl.BWD_CONFIG, **STAGED_GATE_CONFIG},
    )
    return grad_x


# ------------------------------------------------------------------------ the flush's block add


# The staged flush's block add (`sorted_block_add`): entries per program, columns per chunk and
# chunks per program, and PROGRAMS_PER_SM, programs per multiprocessor, each looping over blocks
# (0: one program per block, no loop). Chosen by the launch-shape sweeps in
# perf/history/staged_flush.md.
BLOCK_ADD_CONFIG = {"BLOCK_J": 32, "BLOCK_D": 64, "CHUNKS": 3, "num_warps": 1, "PROGRAMS_PER_SM": 16}
# Programs of the block add where the device has no multiprocessor count (the interpreter).
_BLOCK_ADD_PROGRAMS_CPU = 3


def _block_add_programs(n_blocks: int, device: torch.device, per_sm: int) -> int:
    if per_sm <= 0:
        return n_blocks
    if device.type == "cuda":
        return min(n_blocks, per_sm * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_blocks, _BLOCK_ADD_PROGRAMS_CPU)


def sorted_block_add(
    rows: Tensor,
    g: Tensor,
    scores: Tensor,
    grad_table: Tensor,
    acc: torch.dtype,
    *,
    order: tuple[Tensor, Tensor] | None = None,
    limit: Tensor | None = None,
) -> None:
    """grad_table[row] += Σ over the row's entries of scores · g[token] (`_sorted_block_add_kernel`:
    blocks of row-sorted entries, one atomic add per row and block). For many entries whose
    source rows are not in L2 (the staged flush); not bitwise reproducible. `limit`: a
    one-element device tensor; tokens at or past its value are skipped (no host sync)."""
    t, e = rows.shape
    n, d = grad_table.shape
    if t == 0 or e == 0 or d == 0:
        return
    cfg = BLOCK_ADD_CONFIG
    (sc, s_strides, m), (sorted_ids, perm) = _scores3(scores), order or sort_rows(rows, n)
    bj, bd = cfg["BLOCK_J"], _block_d(cfg["BLOCK_D"], d)
    chunks = max(1, min(int(cfg["CHUNKS"]), cdiv(d, bd)))
    programs = _block_add_programs(cdiv(t * e, bj), grad_table.device, int(cfg["PROGRAMS_PER_SM"]))
    _sorted_block_add_kernel[(programs, cdiv(d, bd * chunks))](
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
        limit if limit is not None else sorted_ids,
        e,
        n,
        d,
        d // m,
        M=m,
        BLOCK_J=bj,
        BLOCK_D=bd,
        CHUNKS=chunks,
        ACC=_tl_acc(acc),
        HAS_LIMIT=limit is not None,
        num_warps=cfg["num_warps"],
    )
