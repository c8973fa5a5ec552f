"""Triton launchers for ultramem::pre_value_gate.

The gate is a one-core lookup seen from the other side, so it runs on the kernels of
`weighted_lookup`'s module:
- forward: gate[t, e] = <P[row], x[t]> is the lookup backward's "dots" with grad_out = x;
- grad_x[t] = Σ_e grad_gate[t, e] · P[row] is a lookup forward with scores = grad_gate;
- grad_P[row] += grad_gate[t, e] · x[t] is the lookup's table-gradient scatter with g = x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import acc_dtype, check, check_gate_args, check_index_range, check_once
from ..determinism import deterministic_enabled
from . import weighted_lookup as _wl

_OP = "pre_value_gate"


def pre_value_gate_cuda(rows: Tensor, table: Tensor, x: Tensor) -> Tensor:
    check_once(_OP, check_gate_args, _OP, rows, table, x)
    check_index_range(rows, table.shape[0], _OP, "rows")
    if table.shape[1] == 0:
        return x.new_zeros(rows.shape)
    gate = x.new_empty(rows.shape)
    _wl.gather_dots_scatter(rows, x, 1, acc_dtype(table, x), table=table, dots=gate)
    return gate


def gate_table_grad(
    grad_gate: Tensor,
    rows: Tensor,
    table: Tensor,
    x: Tensor,
    grad_table: Tensor,
    *,
    accumulate: bool,
    deterministic: bool | None = None,
    order: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Adds grad_P into grad_table (pre-zeroed when not `accumulate`); returns grad_x in x's dtype."""
    if deterministic is None:
        deterministic = deterministic_enabled()
    acc = acc_dtype(table, x, grad_gate)
    if rows.shape[1] == 0:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _wl.weighted_gather(rows, table, grad_gate, grad_x, acc)
    if deterministic:
        _wl.segment_scatter(rows, x, grad_gate, grad_table, acc, accumulate=accumulate, order=order)
    else:
        _wl.gather_dots_scatter(rows, x, 1, acc, scores=grad_gate, grad_table=grad_table)
    return grad_x


def pre_value_gate_backward_cuda(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The dense contract of the reference: a zero-filled [N, D] gradient per call."""
    op = "pre_value_gate_backward"
    check_once(op, check_gate_args, op, rows, table, x, grad_gate)
    check_index_range(rows, table.shape[0], op, "rows")
    acc = acc_dtype(table, x, grad_gate)
    grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
    grad_x = gate_table_grad(grad_gate, rows, table, x, grad_table, accumulate=False)
    return grad_table, grad_x


def pre_value_gate_backward_accumulate_cuda(
    grad_table: Tensor, grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor
) -> Tensor:
    """Adds grad_P into the persistent `grad_table` buffer; returns grad_x (nothing is written
    when the arguments are refused)."""
    op = "pre_value_gate_backward_accumulate"
    check_once(op, check_gate_args, op, rows, table, x, grad_gate)
    check_index_range(rows, table.shape[0], op, "rows")
    check(
        tuple(grad_table.shape) == tuple(table.shape),
        op,
        f"grad_table shape {tuple(grad_table.shape)} must equal table shape {tuple(table.shape)}",
    )
    return gate_table_grad(grad_gate, rows, table, x, grad_table, accumulate=True)
