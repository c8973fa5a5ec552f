"""Triton launcher for ultramem::layer_stats_accumulate: a memory layer's running statistics in
one launch (compiled from plain PyTorch they took six inside the layer: two split reductions
with their epilogues and the add into the totals, besides the hit scatter; each a launch the
host pays for on every training forward).

One grid, three kinds of program, told apart by their program id:
- y programs: Σy and Σy² over a chunk of y each (and program 0 the two counts);
- score programs: Σ_m of the first and of the last ranked entry over a block of rows each;
- id programs: hits[id] += 1 over a block of ids each.
Every program adds its partial sums into `sums` with fp64 atomics, so their last bits depend on
the order the programs finish in; the hit counts are exact (integers in fp64). Deterministic
mode takes the reference instead (see ultramem/ops/layer_stats.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import acc_dtype, check_index_range, check_once, check_stats_args
from ._launch import cdiv, launch, next_pow2

_OP = "layer_stats_accumulate"

# y elements per program: Y_BLOCK · Y_TILES. Large enough that the atomics on two addresses stay
# few (576 y programs at 227M), small enough to spread y over all SMs at smaller batches too;
# 8 warps hide the loads' latency (tuning in perf/NOTES.md).
LAUNCH = {"Y_BLOCK": 1024, "Y_TILES": 16, "R_BLOCK": 256, "ID_BLOCK": 1024, "num_warps": 8}


@triton.jit
def _layer_stats_kernel(
    hits_ptr,
    sums_ptr,
    ids_ptr,
    y_ptr,
    scores_ptr,
    n_values,
    n_ids,
    n_y,
    n_rows,
    n_cores,
    last_offset,
    stride_row,
    stride_core,
    y_programs,
    score_programs,
    ACC: tl.constexpr,
    Y_BLOCK: tl.constexpr,
    Y_TILES: tl.constexpr,
    R_BLOCK: tl.constexpr,
    M_BLOCK: tl.constexpr,
    ID_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < y_programs:
        start = pid.to(tl.int64) * (Y_BLOCK * Y_TILES)
        offs = tl.arange(0, Y_BLOCK)
        s = tl.zeros([Y_BLOCK], ACC)
        q = tl.zeros([Y_BLOCK], ACC)
        for i in tl.static_range(Y_TILES):
            o = start + i * Y_BLOCK + offs
            v = tl.load(y_ptr + o, mask=o < n_y, other=0.0).to(ACC)
            s += v
            q += v * v
        tl.atomic_add(sums_ptr, tl.sum(s, 0).to(tl.float64), sem="relaxed")
        tl.atomic_add(sums_ptr + 1, tl.sum(q, 0).to(tl.float64), sem="relaxed")
        if pid == 0:
            # (a count of 1 arrives as a constexpr: no .to on it)
            zero = tl.zeros([], tl.float64)
            tl.atomic_add(sums_ptr + 2, zero + n_y, sem="relaxed")
            tl.atomic_add(sums_ptr + 5, zero + n_rows, sem="relaxed")
    elif pid < y_programs + score_programs:
        r = (pid - y_programs).to(tl.int64) * R_BLOCK + tl.arange(0, R_BLOCK)[:, None]
        m = tl.arange(0, M_BLOCK)[None, :].to(tl.int64)
        mask = (r < n_rows) & (m < n_cores)
        at = scores_ptr + r * stride_row + m * stride_core
        first = tl.load(at, mask=mask, other=0.0).to(ACC)
        last = tl.load(at + last_offset, mask=mask, other=0.0).to(ACC)
        tl.atomic_add(sums_ptr + 3, tl.sum(tl.sum(first, 1), 0).to(tl.float64), sem="relaxed")
        tl.atomic_add(sums_ptr + 4, tl.sum(tl.sum(last, 1), 0).to(tl.float64), sem="relaxed")
    else:
        o = (pid - y_programs - score_programs).to(tl.int64) * ID_BLOCK + tl.arange(0, ID_BLOCK)
        idx = tl.load(ids_ptr + o, mask=o < n_ids, other=-1).to(tl.int64)
        ok = (o < n_ids) & (idx >= 0) & (idx < n_values)  # an id out of range counts nowhere
        tl.atomic_add(hits_ptr + idx, tl.full([ID_BLOCK], 1.0, tl.float64), mask=ok, sem="relaxed")


def layer_stats_accumulate_cuda(hits: Tensor, sums: Tensor, ids: Tensor, y: Tensor, scores: Tensor) -> None:
    check_once(_OP, check_stats_args, hits, sums, ids, y, scores)
    check_index_range(ids, hits.shape[0], _OP, "ids")
    ids, y = ids.reshape(-1), y.reshape(-1)
    n_rows, k, n_cores = scores.shape
    c = LAUNCH
    m_block = next_pow2(n_cores)
    r_block = max(c["R_BLOCK"] // m_block, 1)
    y_programs = cdiv(y.numel(), c["Y_BLOCK"] * c["Y_TILES"])
    if y_programs == 0 and n_rows:  # the counts ride on program 0, a y program
        y_programs = 1
    score_programs = cdiv(n_rows, r_block)
    programs = y_programs + score_programs + cdiv(ids.numel(), c["ID_BLOCK"])
    if programs == 0:
        return
    acc = tl.float64 if acc_dtype(y, scores) == torch.float64 else tl.float32
    launch(
        _layer_stats_kernel,
        (programs,),
        hits,
        sums,
        ids,
        y,
        scores,
        hits.shape[0],
        ids.numel(),
        y.numel(),
        n_rows,
        n_cores,
        (k - 1) * scores.stride(1),
        scores.stride(0),
        scores.stride(2),
        y_programs,
        score_programs,
        ACC=acc,
        Y_BLOCK=c["Y_BLOCK"],
        Y_TILES=c["Y_TILES"],
        R_BLOCK=r_block,
        M_BLOCK=m_block,
        ID_BLOCK=c["ID_BLOCK"],
        num_warps=c["num_warps"],
    )
