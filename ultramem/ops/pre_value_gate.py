"""ultramem::pre_value_gate: the PEER-style gate of docs/layers.md, UltraMemV2 step 6.

    gate[t, e] = <table[rows[t, e]], x[t]>

`x` is the layer input projected to `pre_vdim` (W_p x); the optional GELU is applied by the
layer outside the op. Shapes: rows [T, E] int32/int64, table [N, D], x [T, D] → gate [T, E] in
x's dtype. Backward: a row-scattered fp32 (fp64 for fp64 input) table gradient and grad_x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check_gate_args, check_index_range, debug_enabled
from ._triton import pre_value_gate as _triton_pre_value_gate  # (None without Triton)
from ._triton._launch import inline_on
from .table_grad import check_grad_buffer_id, pre_value_gate_backward_into, registered_grad_buffer

_OP = "pre_value_gate"
_BWD = "pre_value_gate_backward"


def _check_args(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> None:
    check_gate_args(_OP, rows, table, x)
    check_grad_buffer_id(_OP, grad_buffer, table)


def _gather(rows: Tensor, table: Tensor, dtype: torch.dtype) -> Tensor:
    """table[rows] as [T, E, D] in `dtype` (explicit sizes: T or E may be 0)."""
    t, e = rows.shape
    return table.index_select(0, rows.reshape(-1).long()).to(dtype).view(t, e, table.shape[1])


def forward_reference(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
    """The reference kernel: plain PyTorch, any device (CPU; CUDA without Triton). `grad_buffer`:
    the id of a registered persistent gradient buffer, as for `weighted_lookup` (see its module doc)."""
    _check_args(rows, table, x, grad_buffer)
    check_index_range(rows, table.shape[0], _OP, "rows")
    acc = acc_dtype(table, x)
    return torch.einsum("ted,td->te", _gather(rows, table, acc), x.to(acc)).to(x.dtype)


def backward_reference(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The reference backward (see forward_reference)."""
    check_gate_args(_BWD, rows, table, x, grad_gate)
    check_index_range(rows, table.shape[0], _BWD, "rows")
    acc = acc_dtype(table, x, grad_gate)
    t, e = rows.shape
    g = grad_gate.to(acc)
    grad_x = torch.einsum("te,ted->td", g, _gather(rows, table, acc))
    contrib = (g.unsqueeze(-1) * x.to(acc).unsqueeze(1)).reshape(t * e, table.shape[1])
    grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
    grad_table.index_add_(0, rows.reshape(-1).long(), contrib)
    return grad_table, grad_x.to(x.dtype).contiguous()


# The public ops are triton_ops, as tdqkr_retrieval's (see ultramem/ops/retrieval.py): with inline
# launches on, their CUDA body runs the Triton launcher, which torch.compile traces; otherwise,
# on CPU and in debug mode they call an opaque twin (the reference on CPU, the launcher on CUDA).


def _inline_triton(x: Tensor) -> bool:
    return _triton_pre_value_gate is not None and inline_on(x) and not debug_enabled()


@torch.library.custom_op("ultramem::pre_value_gate_opaque", mutates_args=())
def _forward_opaque(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
    return forward_reference(rows, table, x, grad_buffer)


@_forward_opaque.register_fake
def _(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
    _check_args(rows, table, x, grad_buffer)
    return x.new_empty(rows.shape)


@torch.library.custom_op("ultramem::pre_value_gate_backward_opaque", mutates_args=())
def _backward_opaque(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return backward_reference(grad_gate, rows, table, x)


@_backward_opaque.register_fake
def _(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    check_gate_args(_BWD, rows, table, x, grad_gate)
    acc = acc_dtype(table, x, grad_gate)
    return table.new_empty(table.shape, dtype=acc), torch.empty_like(x, memory_format=torch.contiguous_format)


if _triton_pre_value_gate is not None:

    @_forward_opaque.register_kernel("cuda")
    def _(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
        if grad_buffer != -1:  # the launcher checks the other arguments
            registered_grad_buffer(_OP, grad_buffer, table)
        return _triton_pre_value_gate.pre_value_gate_cuda(rows, table, x)

    _backward_opaque.register_kernel("cuda")(_triton_pre_value_gate.pre_value_gate_backward_cuda)


@torch.library.triton_op("ultramem::pre_value_gate", mutates_args=())
def pre_value_gate(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
    """gate [T, E] in x's dtype; `grad_buffer`: see forward_reference."""
    if _inline_triton(table):
        check_grad_buffer_id(_OP, grad_buffer, table)  # (the launcher checks the other arguments)
        return _triton_pre_value_gate.pre_value_gate_cuda(rows, table, x)
    return _forward_opaque(rows, table, x, grad_buffer)


@torch.library.triton_op("ultramem::pre_value_gate_backward", mutates_args=())
def pre_value_gate_backward(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (grad_table [N, D] fp32/fp64, grad_x [T, D] in x's dtype)."""
    if _inline_triton(table):
        return _triton_pre_value_gate.pre_value_gate_backward_cuda(grad_gate, rows, table, x)
    return _backward_opaque(grad_gate, rows, table, x)


def _setup_context(ctx, inputs, output) -> None:
    rows, table, x, grad_buffer = inputs
    ctx.save_for_backward(rows, table, x)
    ctx.grad_buffer = grad_buffer


def _backward(ctx, grad_gate: Tensor):
    rows, table, x = ctx.saved_tensors
    if ctx.grad_buffer != -1:
        grad_x = pre_value_gate_backward_into(grad_gate.contiguous(), rows, table, x, ctx.grad_buffer)
        return None, None, grad_x, None
    grad_table, grad_x = pre_value_gate_backward(grad_gate.contiguous(), rows, table, x)
    return None, grad_table, grad_x, None


pre_value_gate.register_autograd(_backward, setup_context=_setup_context)
