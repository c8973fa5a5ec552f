"""ultramem::gate_lookup_into: `gate_lookup` whose backward adds the tables' gradients into
buffers handed to it as tensors (docs/table-gradients.md).

    out, g = gate_lookup_into(rows, values, pre_values, x, scores, gelu, grad_values, grad_pre_values,
                              *staging.tensors())      # or no staging tensors

The forward is `gate_lookup`'s. Its backward, `ultramem::gate_lookup_into_backward`, adds
into `grad_values` / `grad_pre_values` (fp32 or fp64, the tables' shapes) as
`gate_lookup_backward_into` adds into registered buffers, or stages into the staging area given by
its six tensors (rows, eff, grad_out, grad_g, x, fill: `GradStaging.tensors()`), with the same
fallbacks (`ultramem.ops.staged_grad`).

Why tensors rather than buffer ids: the backward then declares what it writes, so torch.compile
keeps it in the compiled backward and, on CUDA, Inductor launches its kernels from its own code
(a triton_op, as the forward ops) where the id-based op stays an opaque call with its Python
dispatch per layer and step.

The buffers are accumulators that no backward reads back, so the backward's writes leave their
version counters alone (`accumulates_in_place`): with one compiled region per layer, a region
saves the shared buffers for its backward, and a later layer's backward writing them first would
otherwise fail autograd's saved-tensor check. For the same reason the forward keeps them on its
autograd context rather than saving them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check_index_range, check_once
from ._triton import gate_lookup as _triton_gate_lookup  # (None without Triton)
from ._triton import staged_grad as _triton_staged_grad
from .determinism import deterministic_enabled
from .gate_lookup import _forward_opaque, _inline_triton, backward_reference, check_backward_tensors
from .staged_grad import GradStaging, check_staging_given, may_stage
from .table_grad import accumulates_in_place, check_grad_buffer

_FWD = "gate_lookup_into"
_BWD = "gate_lookup_into_backward"
# what the backward writes: the two buffers and the staging area's six tensors
_WRITES = (
    "grad_values",
    "grad_pre_values",
    "stage_rows",
    "stage_eff",
    "stage_grad_out",
    "stage_grad_g",
    "stage_x",
    "stage_fill",
)


def _staging(stage: tuple[Tensor | None, ...]) -> GradStaging | None:
    rows, eff, grad_out, grad_g, x, fill = stage
    if rows is None:
        return None
    return GradStaging.from_tensors(rows, eff, grad_out, grad_g, x, fill)


def _check_into(
    op: str, values: Tensor, pre_values: Tensor, grad_values: Tensor, grad_pre_values: Tensor, *stage: Tensor | None
) -> None:
    """The buffers and the staging area (signature only: the tensors are passed one by one, so
    that `check_once` keys on their signatures and keeps no reference to them)."""
    check_grad_buffer(op, grad_values, values)
    check_grad_buffer(op, grad_pre_values, pre_values)
    check_staging_given(op, "rows, eff, grad_out, grad_g, x, fill", *stage)


def _usable_staging(stage, rows, values, pre_values, x, scores, grad_out) -> GradStaging | None:
    staging = _staging(stage)
    if staging is None or not may_stage(rows, values, pre_values, x, scores):
        return None
    return staging if staging.accepts(rows, grad_out, x, scores) else None


def _backward_inline(rows: Tensor, *tensors: Tensor) -> bool:
    """Whether the backward's kernels launch from the traced body as the forward's do: the
    atomics and the staged kernels do; the deterministic sort, float64 and the reference for many
    entries run in the opaque op."""
    return (
        _inline_triton(rows)
        and not deterministic_enabled()
        and acc_dtype(*tensors) != torch.float64
        and rows.shape[1] <= _triton_gate_lookup.BWD_MAX_ENTRIES
    )


@torch.library.triton_op("ultramem::gate_lookup_into", mutates_args=())
def gate_lookup_into(
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gelu: bool,
    grad_values: Tensor,
    grad_pre_values: Tensor,
    stage_rows: Tensor | None = None,
    stage_eff: Tensor | None = None,
    stage_grad_out: Tensor | None = None,
    stage_grad_g: Tensor | None = None,
    stage_x: Tensor | None = None,
    stage_fill: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`gate_lookup`'s (out, g); the backward adds into the buffers (or stages); see the module doc."""
    stage = (stage_rows, stage_eff, stage_grad_out, stage_grad_g, stage_x, stage_fill)
    check_once(_FWD, _check_into, _FWD, values, pre_values, grad_values, grad_pre_values, *stage)
    if _inline_triton(values):
        return _triton_gate_lookup.gate_lookup_cuda(rows, values, pre_values, x, scores, gelu)
    return _forward_opaque(rows, values, pre_values, x, scores, gelu)


def _setup_context(ctx, inputs, output) -> None:
    rows, values, pre_values, x, scores, gelu, *into = inputs
    ctx.set_materialize_grads(False)  # the gate output's gradient is usually None
    ctx.gelu = gelu
    ctx.into = into  # not saved: see the module doc
    ctx.save_for_backward(rows, values, pre_values, x, scores, output[1])


def _backward(ctx, grad_out: Tensor | None, grad_gate: Tensor | None):
    rows, values, pre_values, x, scores, gate = ctx.saved_tensors
    if grad_out is None:
        grad_out = scores.new_zeros((rows.shape[0], values.shape[1]))
    grad_scores, grad_x = gate_lookup_into_backward(
        *ctx.into, grad_out.contiguous(), grad_gate, rows, values, pre_values, x, scores, gate, ctx.gelu
    )
    return (None, None, None, grad_x, grad_scores) + (None,) * 9


gate_lookup_into.register_autograd(_backward, setup_context=_setup_context)


def _check_backward(
    grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, grad_values, grad_pre_values, *stage
):
    check_backward_tensors(_BWD, grad_out, grad_gate, rows, values, pre_values, x, scores, gate)
    _check_into(_BWD, values, pre_values, grad_values, grad_pre_values, *stage)


def _cuda(grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, grad_values, grad_pre_values, stage):
    """The Triton backward: staged, or atomics (sorted in deterministic mode), or for float64 or
    more entries than the fused kernel holds the reference."""
    args = (grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, grad_values, grad_pre_values)
    if acc_dtype(values, pre_values, x, scores) == torch.float64 or rows.shape[1] > _triton_gate_lookup.BWD_MAX_ENTRIES:
        return backward_reference(*args)
    staging = _usable_staging(stage, rows, values, pre_values, x, scores, grad_out)
    if staging is not None:
        return _triton_staged_grad.staged_gate_lookup_backward_cuda(*args, staging)
    return _triton_gate_lookup.gate_lookup_backward_cuda(*args, deterministic=deterministic_enabled())


@torch.library.custom_op(f"ultramem::{_BWD}_opaque", mutates_args=_WRITES)
def _accumulate_opaque(
    grad_values: Tensor,
    grad_pre_values: Tensor,
    stage_rows: Tensor | None,
    stage_eff: Tensor | None,
    stage_grad_out: Tensor | None,
    stage_grad_g: Tensor | None,
    stage_x: Tensor | None,
    stage_fill: Tensor | None,
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
) -> tuple[Tensor, Tensor]:
    stage = (stage_rows, stage_eff, stage_grad_out, stage_grad_g, stage_x, stage_fill)
    args = (grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, grad_values, grad_pre_values)
    check_once(_BWD, _check_backward, *args, *stage)
    check_index_range(rows, values.shape[0], _BWD, "rows")
    # the reference's in-place writes would move the buffers' version counters (module doc)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        if rows.is_cuda and _triton_gate_lookup is not None:
            return _cuda(*args, stage)
        return backward_reference(*args, _usable_staging(stage, rows, values, pre_values, x, scores, grad_out))


@_accumulate_opaque.register_fake
def _(*args):
    # (the writes first: grad_values, grad_pre_values, the six staging tensors; then the rest)
    _check_backward(*args[8:], *args[:8])
    scores, x = args[14], args[13]
    return (
        torch.empty_like(scores, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


@torch.library.triton_op(f"ultramem::{_BWD}", mutates_args=_WRITES)
def gate_lookup_into_backward(
    grad_values: Tensor,
    grad_pre_values: Tensor,
    stage_rows: Tensor | None,
    stage_eff: Tensor | None,
    stage_grad_out: Tensor | None,
    stage_grad_g: Tensor | None,
    stage_x: Tensor | None,
    stage_fill: Tensor | None,
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
) -> tuple[Tensor, Tensor]:
    """The backward of `gate_lookup_into`: adds both tables' gradients into the buffers, or stages
    them; returns (grad_scores, grad_x). Arguments are checked before anything is written."""
    stage = (stage_rows, stage_eff, stage_grad_out, stage_grad_g, stage_x, stage_fill)
    if _backward_inline(rows, values, pre_values, x, scores):
        args = (grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, grad_values, grad_pre_values)
        check_once(_BWD, _check_backward, *args, *stage)
        return _cuda(*args, stage)
    return _accumulate_opaque(
        grad_values, grad_pre_values, *stage, grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu
    )


accumulates_in_place(_accumulate_opaque)
accumulates_in_place(gate_lookup_into_backward)
