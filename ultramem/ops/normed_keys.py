"""ultramem::normed_keys: the Tucker keys normalized as the sub-key GEMMs read them (docs/layers.md,
UltraMemV2 step 1).

    out[h, s, i, ρ, :] = keys[h, s, i, :, ρ] / sqrt(mean_d keys[h, s, i, d, ρ]² + eps)   (i < n)
    out[h, s, i, ρ, :] = 0                                                                (n ≤ i < n_pad)

Shapes: keys [H, S, n, kdim, r] (the layers' parameter layout) → out [H, S, n_pad, r, kdim],
contiguous, in `out_dtype`; computed in fp32 (fp64 for fp64 keys) and rounded once. The zero rows
past n pad the GEMM's output rows to an aligned length. Backward: the keys' gradient in their
dtype, from the out rows i < n (the padding has none).

Compiled from plain PyTorch, the normalization, the cast, the transpose and the padding took three
launches forward and three backward, for 3.5 MB of keys per 227M layer; on CUDA this op is
one launch each way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check_normed_keys_args, check_normed_keys_backward_args, debug_enabled
from ._triton import normed_keys as _triton_normed_keys  # (None without Triton)
from ._triton._launch import inline_on

_OP = "normed_keys"
_BWD = "normed_keys_backward"


def forward_reference(keys: Tensor, eps: float, n_pad: int, out_dtype: torch.dtype) -> Tensor:
    """The reference kernel: plain PyTorch, any device (the CPU kernel and the test oracle)."""
    check_normed_keys_args(_OP, keys, eps, n_pad, out_dtype)
    x = keys.to(acc_dtype(keys)).transpose(-1, -2)  # [H, S, n, r, kdim]
    y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(out_dtype)
    out = y.new_zeros(y.shape[:2] + (n_pad,) + y.shape[3:])
    out[:, :, : y.shape[2]] = y
    return out


def backward_reference(grad_out: Tensor, keys: Tensor, eps: float) -> Tensor:
    """The reference backward: d keys = rstd · (g − y · mean_d(g · y)) per key and rank."""
    check_normed_keys_backward_args(_BWD, grad_out, keys, eps)
    acc = acc_dtype(keys, grad_out)
    x = keys.to(acc).transpose(-1, -2)
    g = grad_out[:, :, : keys.shape[2]].to(acc)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = x * rstd
    dx = rstd * (g - y * (g * y).mean(-1, keepdim=True))
    return dx.transpose(-1, -2).to(keys.dtype).contiguous()


# A triton_op, as the other pure ops (see ultramem/ops/retrieval.py): with inline launches on, its
# CUDA body runs the launcher, which torch.compile traces; on CPU and in debug mode it calls the
# opaque twin.


def _inline_triton(x: Tensor) -> bool:
    return _triton_normed_keys is not None and inline_on(x) and not debug_enabled()


@torch.library.custom_op("ultramem::normed_keys_opaque", mutates_args=())
def _forward_opaque(keys: Tensor, eps: float, n_pad: int, out_dtype: torch.dtype) -> Tensor:
    return forward_reference(keys, eps, n_pad, out_dtype)


@_forward_opaque.register_fake
def _(keys, eps, n_pad, out_dtype):
    check_normed_keys_args(_OP, keys, eps, n_pad, out_dtype)
    h, s, _, kd, r = keys.shape
    return keys.new_empty((h, s, n_pad, r, kd), dtype=out_dtype)


@torch.library.custom_op("ultramem::normed_keys_backward_opaque", mutates_args=())
def _backward_opaque(grad_out: Tensor, keys: Tensor, eps: float) -> Tensor:
    return backward_reference(grad_out, keys, eps)


@_backward_opaque.register_fake
def _(grad_out, keys, eps):
    check_normed_keys_backward_args(_BWD, grad_out, keys, eps)
    return torch.empty_like(keys, memory_format=torch.contiguous_format)


if _triton_normed_keys is not None:
    _forward_opaque.register_kernel("cuda")(_triton_normed_keys.normed_keys_cuda)
    _backward_opaque.register_kernel("cuda")(_triton_normed_keys.normed_keys_backward_cuda)


@torch.library.triton_op("ultramem::normed_keys", mutates_args=())
def normed_keys(keys: Tensor, eps: float, n_pad: int, out_dtype: torch.dtype) -> Tensor:
    """out [H, S, n_pad, r, kdim] in out_dtype; see the module docstring."""
    if _inline_triton(keys):
        return _triton_normed_keys.normed_keys_cuda(keys, eps, n_pad, out_dtype)
    return _forward_opaque(keys, eps, n_pad, out_dtype)


@torch.library.triton_op("ultramem::normed_keys_backward", mutates_args=())
def normed_keys_backward(grad_out: Tensor, keys: Tensor, eps: float) -> Tensor:
    """The keys' gradient [H, S, n, kdim, r] in their dtype, from grad_out [H, S, n_pad, r, kdim]."""
    if _inline_triton(keys):
        return _triton_normed_keys.normed_keys_backward_cuda(grad_out, keys, eps)
    return _backward_opaque(grad_out, keys, eps)


def _setup_context(ctx, inputs, output) -> None:
    keys, eps, _n_pad, _out_dtype = inputs
    ctx.save_for_backward(keys)
    ctx.eps = eps


def _backward(ctx, grad_out: Tensor):
    (keys,) = ctx.saved_tensors
    return normed_keys_backward(grad_out, keys, ctx.eps), None, None, None


normed_keys.register_autograd(_backward, setup_context=_setup_context)
