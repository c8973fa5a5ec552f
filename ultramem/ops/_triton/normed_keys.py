"""Triton kernels for ultramem::normed_keys: one program per block of (key, rank) rows, each row's
kdim values on chip. Forward: normalize, round to the output dtype, store transposed (rank before
kdim), zeros for the padding rows. Backward: recompute the row's rstd from the keys and write its
gradient in the keys' layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import acc_dtype, check_normed_keys_args, check_normed_keys_backward_args, check_once
from ._launch import cdiv, launch, next_pow2

# Elements per program (rows × next_pow2(kdim)): at 227M, 4,608 rows of 192 make 576 programs.
LAUNCH = {"ELEMENTS": 2048, "num_warps": 4}


@triton.jit
def _normed_keys_fwd_kernel(
    out_ptr,
    keys_ptr,
    n_rows,
    n_keys,
    n_pad,
    sides,
    rank,
    kdim,
    eps,
    s_h,
    s_s,
    s_i,
    s_d,
    s_r,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # out row (h, s, i, ρ)
    d = tl.arange(0, BLOCK_D)
    hs = row // (n_pad * rank)
    i = (row // rank) % n_pad
    p = row % rank
    base = (hs // sides) * s_h + (hs % sides) * s_s + i * s_i + p * s_r
    real = (row < n_rows) & (i < n_keys)
    dmask = d < kdim
    x = tl.load(keys_ptr + base[:, None] + d[None, :] * s_d, mask=real[:, None] & dmask[None, :], other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / kdim + eps)
    y = tl.where(real[:, None], x * rstd[:, None], 0.0)  # padding rows: 0, also with eps = 0
    out = out_ptr + row[:, None] * kdim + d[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(row < n_rows)[:, None] & dmask[None, :])


@triton.jit
def _normed_keys_bwd_kernel(
    grad_ptr,
    keys_ptr,
    dkeys_ptr,
    n_rows,
    n_keys,
    sides,
    rank,
    kdim,
    eps,
    s_h,
    s_s,
    s_i,
    s_d,
    s_r,
    g_h,
    g_s,
    g_i,
    g_r,
    g_d,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # key row (h, s, i, ρ), i < n
    d = tl.arange(0, BLOCK_D)
    hs = row // (n_keys * rank)
    i = (row // rank) % n_keys
    p = row % rank
    h, s = hs // sides, hs % sides
    mask = (row < n_rows)[:, None] & (d < kdim)[None, :]
    x = tl.load(keys_ptr + (h * s_h + s * s_s + i * s_i + p * s_r)[:, None] + d[None, :] * s_d, mask=mask, other=0.0)
    g = tl.load(grad_ptr + (h * g_h + s * g_s + i * g_i + p * g_r)[:, None] + d[None, :] * g_d, mask=mask, other=0.0)
    x = x.to(ACC)
    g = g.to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / kdim + eps)
    y = x * rstd[:, None]
    dx = rstd[:, None] * (g - y * (tl.sum(g * y, 1) / kdim)[:, None])
    # d keys is contiguous in the keys' layout [H, S, n, kdim, r]
    out = dkeys_ptr + ((hs * n_keys + i) * (kdim * rank) + p)[:, None] + d[None, :] * rank
    tl.store(out, dx.to(dkeys_ptr.dtype.element_ty), mask=mask)


def _blocks(kdim: int) -> tuple[int, int]:
    block_d = max(next_pow2(kdim), 1)
    return max(LAUNCH["ELEMENTS"] // block_d, 1), block_d


def _acc(*tensors: Tensor):
    return tl.float64 if acc_dtype(*tensors) == torch.float64 else tl.float32


def normed_keys_cuda(keys: Tensor, eps: float, n_pad: int, out_dtype: torch.dtype) -> Tensor:
    check_once("normed_keys", check_normed_keys_args, "normed_keys", keys, eps, n_pad, out_dtype)
    h, s, n, kd, r = keys.shape
    out = torch.empty((h, s, n_pad, r, kd), dtype=out_dtype, device=keys.device)
    rows = h * s * n_pad * r
    if rows == 0 or kd == 0:
        return out
    block_r, block_d = _blocks(kd)
    launch(
        _normed_keys_fwd_kernel,
        (cdiv(rows, block_r),),
        out,  # first: `launch` tells eager from traced calls by it, and keys are a Parameter
        keys,
        rows,
        n,
        n_pad,
        s,
        r,
        kd,
        float(eps),
        *keys.stride(),
        ACC=_acc(keys),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=LAUNCH["num_warps"],
    )
    return out


def normed_keys_backward_cuda(grad_out: Tensor, keys: Tensor, eps: float) -> Tensor:
    check_once("normed_keys_backward", check_normed_keys_backward_args, "normed_keys_backward", grad_out, keys, eps)
    h, s, n, kd, r = keys.shape
    dkeys = torch.empty((h, s, n, kd, r), dtype=keys.dtype, device=keys.device)
    rows = h * s * n * r
    if rows == 0 or kd == 0:
        return dkeys
    block_r, block_d = _blocks(kd)
    launch(
        _normed_keys_bwd_kernel,
        (cdiv(rows, block_r),),
        grad_out,
        keys,
        dkeys,
        rows,
        n,
        s,
        r,
        kd,
        float(eps),
        *keys.stride(),
        *grad_out.stride(),
        ACC=_acc(keys, grad_out),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=LAUNCH["num_warps"],
    )
    return dkeys
