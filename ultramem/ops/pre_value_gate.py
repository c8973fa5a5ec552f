"""ultramem::pre_value_gate: the PEER-style gate of SPEC §3 step 6.

    gate[t, e] = <table[rows[t, e]], x[t]>

`x` is the layer input projected to `pre_vdim` (W_p x); the optional GELU is applied by the
layer outside the op. Shapes: rows [T, E] int32/int64, table [N, D], x [T, D] → gate [T, E] in
x's dtype. Backward: a row-scattered fp32 (fp64 for fp64 input) table gradient and grad_x.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check, check_dim, check_float, check_index, check_index_range, check_same_device
from .table_grad import check_grad_buffer_id, registered_grad_buffer, pre_value_gate_backward_into

_OP = "pre_value_gate"


def _check_args(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> None:
    check_dim(rows, 2, _OP, "rows", "[tokens, entries]")
    check_dim(table, 2, _OP, "table", "[num_rows, dim]")
    check_dim(x, 2, _OP, "x", "[tokens, dim]")
    check_index(rows, _OP, "rows")
    check_float(table, _OP, "table")
    check_float(x, _OP, "x")
    check_same_device(_OP, rows=rows, table=table, x=x)
    check(x.shape[0] == rows.shape[0], _OP, f"x has {x.shape[0]} tokens but rows has {rows.shape[0]}")
    check(x.shape[1] == table.shape[1], _OP, f"x dim {x.shape[1]} must equal table dim {table.shape[1]}")
    check_grad_buffer_id(_OP, grad_buffer, table)


@torch.library.custom_op("ultramem::pre_value_gate", mutates_args=())
def pre_value_gate(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
    """Reference kernel (CPU; CUDA until a faster one is registered). `grad_buffer`: the id of
    a registered persistent gradient buffer, as for `weighted_lookup` (see its module doc)."""
    _check_args(rows, table, x, grad_buffer)
    check_index_range(rows, table.shape[0], _OP, "rows")
    acc = acc_dtype(table, x)
    t, e = rows.shape
    pre = table.index_select(0, rows.reshape(-1).long()).to(acc).view(t, e, -1)
    return torch.einsum("ted,td->te", pre, x.to(acc)).to(x.dtype)


@pre_value_gate.register_fake
def _(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
    _check_args(rows, table, x, grad_buffer)
    return x.new_empty(rows.shape)


@torch.library.custom_op("ultramem::pre_value_gate_backward", mutates_args=())
def pre_value_gate_backward(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (grad_table [N, D] fp32/fp64, grad_x [T, D] in x's dtype)."""
    check(tuple(grad_gate.shape) == tuple(rows.shape), _OP,
          f"grad_gate shape {tuple(grad_gate.shape)} must equal rows shape {tuple(rows.shape)}")
    acc = acc_dtype(table, x, grad_gate)
    t, e = rows.shape
    g = grad_gate.to(acc)
    pre = table.index_select(0, rows.reshape(-1).long()).to(acc).view(t, e, -1)
    grad_x = torch.einsum("te,ted->td", g, pre)
    contrib = (g.unsqueeze(-1) * x.to(acc).unsqueeze(1)).reshape(t * e, -1)
    grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
    grad_table.index_add_(0, rows.reshape(-1).long(), contrib)
    return grad_table, grad_x.to(x.dtype).contiguous()


@pre_value_gate_backward.register_fake
def _(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(table, x, grad_gate)
    return table.new_empty(table.shape, dtype=acc), torch.empty_like(x, memory_format=torch.contiguous_format)


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

from ._triton import pre_value_gate as _triton_pre_value_gate  # noqa: E402  (None without Triton)

if _triton_pre_value_gate is not None:
    @pre_value_gate.register_kernel("cuda")
    def _(rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int = -1) -> Tensor:
        if grad_buffer != -1:  # the launcher checks the other arguments
            registered_grad_buffer(_OP, grad_buffer, table)
        return _triton_pre_value_gate.pre_value_gate_cuda(rows, table, x)

    pre_value_gate_backward.register_kernel("cuda")(_triton_pre_value_gate.pre_value_gate_backward_cuda)
