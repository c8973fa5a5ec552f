"""ultramem::weighted_lookup_into: `weighted_lookup` whose backward adds the table's gradient into
a buffer handed to it as a tensor, as `gate_lookup_into` does for both tables (see there why).

    out = weighted_lookup_into(rows, table, scores, grad_table,
                               stage_rows, stage_eff, stage_grad_out, stage_fill)   # or no staging

The staging area is a values-only `GradStaging` (`ultramem.ops.staged_grad`): its rows, eff,
grad_out and fill tensors. The backward, `ultramem::weighted_lookup_into_backward`, adds into
`grad_table` (fp32 or fp64, the table's shape) or stages, and returns grad_scores; on CUDA with
atomics (sorted in deterministic mode, in the opaque op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check_index_range, check_lookup_args, check_once
from ._triton import staged_grad as _triton_staged_grad
from ._triton import weighted_lookup as _triton_weighted_lookup  # (None without Triton)
from .determinism import deterministic_enabled
from .staged_grad import GradStaging, check_staging_given, lookup_backward_reference, may_stage
from .table_grad import accumulates_in_place, check_grad_buffer
from .weighted_lookup import _forward_opaque, _inline_triton

_FWD = "weighted_lookup_into"
_BWD = "weighted_lookup_into_backward"
_WRITES = ("grad_table", "stage_rows", "stage_eff", "stage_grad_out", "stage_fill")


def _check_into(op: str, table: Tensor, grad_table: Tensor, *stage: Tensor | None) -> None:
    """The buffer and the staging area (signature only, the tensors one by one for `check_once`)."""
    check_grad_buffer(op, grad_table, table)
    check_staging_given(op, "rows, eff, grad_out, fill", *stage)


def _usable_staging(stage, rows: Tensor, table: Tensor, scores: Tensor, grad_out: Tensor) -> GradStaging | None:
    stage_rows, eff, stage_grad_out, fill = stage
    if stage_rows is None or not may_stage(rows, table, scores, grad_out):
        return None
    staging = GradStaging.from_tensors(stage_rows, eff, stage_grad_out, None, None, fill)
    return staging if staging.accepts_lookup(rows, grad_out, scores) else None


def _backward_inline(rows: Tensor, *tensors: Tensor) -> bool:
    """Whether the backward launches from the traced body as the forward does (atomics, staged);
    the deterministic sort and float64 run in the opaque op."""
    return _inline_triton(rows) and not deterministic_enabled() and acc_dtype(*tensors) != torch.float64


@torch.library.triton_op("ultramem::weighted_lookup_into", mutates_args=())
def weighted_lookup_into(
    rows: Tensor,
    table: Tensor,
    scores: Tensor,
    grad_table: Tensor,
    stage_rows: Tensor | None = None,
    stage_eff: Tensor | None = None,
    stage_grad_out: Tensor | None = None,
    stage_fill: Tensor | None = None,
) -> Tensor:
    """`weighted_lookup`'s out; the backward adds into grad_table (or stages); see the module doc."""
    check_once(_FWD, _check_into, _FWD, table, grad_table, stage_rows, stage_eff, stage_grad_out, stage_fill)
    if _inline_triton(table):
        return _triton_weighted_lookup.weighted_lookup_cuda(rows, table, scores)
    return _forward_opaque(rows, table, scores)


def _setup_context(ctx, inputs, output) -> None:
    rows, table, scores, *into = inputs
    ctx.into = into  # not saved: see `ultramem.ops.gate_lookup_into`
    ctx.save_for_backward(rows, table, scores)


def _backward(ctx, grad_out: Tensor):
    rows, table, scores = ctx.saved_tensors
    grad_scores = weighted_lookup_into_backward(*ctx.into, grad_out.contiguous(), rows, table, scores)
    return (None, None, grad_scores) + (None,) * 5


weighted_lookup_into.register_autograd(_backward, setup_context=_setup_context)


def _check_backward(grad_out, rows, table, scores, grad_table, *stage) -> None:
    check_lookup_args(_BWD, rows, table, scores, grad_out)
    _check_into(_BWD, table, grad_table, *stage)


def _cuda(grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor, grad_table: Tensor, stage) -> Tensor:
    """The Triton backward: staged, or atomics (sorted in deterministic mode)."""
    staging = _usable_staging(stage, rows, table, scores, grad_out)
    if staging is not None:
        return _triton_staged_grad.staged_lookup_backward_cuda(grad_out, rows, table, scores, grad_table, staging)
    return _triton_weighted_lookup.lookup_table_grad(grad_out, rows, table, scores, grad_table, accumulate=True)


@torch.library.custom_op(f"ultramem::{_BWD}_opaque", mutates_args=_WRITES)
def _backward_opaque(
    grad_table: Tensor,
    stage_rows: Tensor | None,
    stage_eff: Tensor | None,
    stage_grad_out: Tensor | None,
    stage_fill: Tensor | None,
    grad_out: Tensor,
    rows: Tensor,
    table: Tensor,
    scores: Tensor,
) -> Tensor:
    stage = (stage_rows, stage_eff, stage_grad_out, stage_fill)
    check_once(_BWD, _check_backward, grad_out, rows, table, scores, grad_table, *stage)
    check_index_range(rows, table.shape[0], _BWD, "rows")
    # in-place writes would move the buffers' version counters (`ultramem.ops.gate_lookup_into`)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        if rows.is_cuda and _triton_weighted_lookup is not None and acc_dtype(table, scores, grad_out) != torch.float64:
            return _cuda(grad_out, rows, table, scores, grad_table, stage)
        staging = _usable_staging(stage, rows, table, scores, grad_out)
        return lookup_backward_reference(grad_out, rows, table, scores, grad_table, staging)


@_backward_opaque.register_fake
def _(*args):
    # (the writes first: grad_table and the four staging tensors; then grad_out, rows, table, scores)
    _check_backward(*args[5:], *args[:5])
    return torch.empty_like(args[8], memory_format=torch.contiguous_format)


@torch.library.triton_op(f"ultramem::{_BWD}", mutates_args=_WRITES)
def weighted_lookup_into_backward(
    grad_table: Tensor,
    stage_rows: Tensor | None,
    stage_eff: Tensor | None,
    stage_grad_out: Tensor | None,
    stage_fill: Tensor | None,
    grad_out: Tensor,
    rows: Tensor,
    table: Tensor,
    scores: Tensor,
) -> Tensor:
    """The backward of `weighted_lookup_into`: adds the table's gradient into grad_table, or
    stages it; returns grad_scores. Arguments are checked before anything is written."""
    stage = (stage_rows, stage_eff, stage_grad_out, stage_fill)
    if _backward_inline(rows, table, scores, grad_out):
        check_once(_BWD, _check_backward, grad_out, rows, table, scores, grad_table, *stage)
        return _cuda(grad_out, rows, table, scores, grad_table, stage)
    return _backward_opaque(grad_table, *stage, grad_out, rows, table, scores)


accumulates_in_place(_backward_opaque)
accumulates_in_place(weighted_lookup_into_backward)
