"""ultramem::weighted_lookup: the multi-core weighted sum of value rows (docs/layers.md, UltraMemV2 step 7).

    out[t, chunk m] = Σ_e scores[t, e, m] · table[rows[t, e], chunk m]

`table` has `D` columns split into `M` equal chunks, one per core; `scores` carries the core
scores already multiplied by the gate. Duplicate rows (within a token or across tokens) are
allowed; their contributions add.

Shapes: rows [T, E] int32/int64, table [N, D] float, scores [T, E, M] float → out [T, D] in
scores' dtype. Backward gives the table a row-scattered gradient in fp32 (fp64 for fp64 input)
and the scores their gradient in scores' dtype.

Table gradient: with `grad_buffer=-1` the backward returns a fresh dense gradient (simple, and
what a standalone user of the op expects). With the id of a buffer registered through
`ultramem.ops.register_grad_buffer` (an fp32 tensor of the table's shape, owned by the caller and
zeroed once per optimizer step) the backward adds into it in place and returns no table gradient:
no [N, D] allocation or zero-fill per call, and micro-batches accumulate for free. `ValueTables`
aliases `param.grad` to that buffer so clipping and the optimizer see it as the parameter's
gradient. Why an id and not a tensor argument: see `ultramem.ops.table_grad`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check_index_range, check_lookup_args, debug_enabled
from ._gather import gather_chunks
from ._triton import weighted_lookup as _triton_weighted_lookup  # (None without Triton)
from ._triton._launch import inline_on
from .table_grad import check_grad_buffer_id, registered_grad_buffer, weighted_lookup_backward_into

_OP = "weighted_lookup"
_BWD = "weighted_lookup_backward"


def _check_args(rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int = -1) -> None:
    check_lookup_args(_OP, rows, table, scores)
    check_grad_buffer_id(_OP, grad_buffer, table)


def forward_reference(rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int = -1) -> Tensor:
    """The reference kernel: plain PyTorch, any device (CPU; CUDA without Triton). `grad_buffer`:
    see the module doc."""
    _check_args(rows, table, scores, grad_buffer)
    check_index_range(rows, table.shape[0], _OP, "rows")
    acc = acc_dtype(table, scores)
    values = gather_chunks(rows, table, scores.shape[2], acc)  # [T, E, M, Dm]
    out = torch.einsum("temd,tem->tmd", values, scores.to(acc))
    return out.reshape(rows.shape[0], table.shape[1]).to(scores.dtype)


def backward_reference(grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """The reference backward (see forward_reference)."""
    check_lookup_args(_BWD, rows, table, scores, grad_out)
    check_index_range(rows, table.shape[0], _BWD, "rows")
    acc = acc_dtype(table, scores, grad_out)
    t, e = rows.shape
    m = scores.shape[2]
    g = grad_out.to(acc).view(t, 1, m, table.shape[1] // m)
    values = gather_chunks(rows, table, m, acc)
    grad_scores = (values * g).sum(-1)  # [T, E, M]
    contrib = (scores.to(acc).unsqueeze(-1) * g).reshape(t * e, table.shape[1])
    grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
    grad_table.index_add_(0, rows.reshape(-1).long(), contrib)
    return grad_table, grad_scores.to(scores.dtype).contiguous()


# The public ops are triton_ops, as tdqkr_retrieval's (see ultramem/ops/retrieval.py): with inline
# launches on, their CUDA body runs the Triton launcher, which torch.compile traces; otherwise,
# on CPU and in debug mode they call an opaque twin (the reference on CPU, the launcher on CUDA).


def _inline_triton(x: Tensor) -> bool:
    return _triton_weighted_lookup is not None and inline_on(x) and not debug_enabled()


@torch.library.custom_op("ultramem::weighted_lookup_opaque", mutates_args=())
def _forward_opaque(rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int = -1) -> Tensor:
    return forward_reference(rows, table, scores, grad_buffer)


@_forward_opaque.register_fake
def _(rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int = -1) -> Tensor:
    _check_args(rows, table, scores, grad_buffer)
    return scores.new_empty((rows.shape[0], table.shape[1]))


@torch.library.custom_op("ultramem::weighted_lookup_backward_opaque", mutates_args=())
def _backward_opaque(grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    return backward_reference(grad_out, rows, table, scores)


@_backward_opaque.register_fake
def _(grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    check_lookup_args(_BWD, rows, table, scores, grad_out)
    acc = acc_dtype(table, scores, grad_out)
    return table.new_empty(table.shape, dtype=acc), torch.empty_like(scores, memory_format=torch.contiguous_format)


if _triton_weighted_lookup is not None:

    @_forward_opaque.register_kernel("cuda")
    def _(rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int = -1) -> Tensor:
        if grad_buffer != -1:  # the launcher checks the other arguments
            registered_grad_buffer(_OP, grad_buffer, table)
        return _triton_weighted_lookup.weighted_lookup_cuda(rows, table, scores)

    _backward_opaque.register_kernel("cuda")(_triton_weighted_lookup.weighted_lookup_backward_cuda)


@torch.library.triton_op("ultramem::weighted_lookup", mutates_args=())
def weighted_lookup(rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int = -1) -> Tensor:
    """out [T, D] in scores' dtype; `grad_buffer`: see the module doc."""
    if _inline_triton(table):
        check_grad_buffer_id(_OP, grad_buffer, table)  # (the launcher checks the other arguments)
        return _triton_weighted_lookup.weighted_lookup_cuda(rows, table, scores)
    return _forward_opaque(rows, table, scores, grad_buffer)


@torch.library.triton_op("ultramem::weighted_lookup_backward", mutates_args=())
def weighted_lookup_backward(grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (grad_table [N, D] fp32/fp64, grad_scores [T, E, M] in scores' dtype)."""
    if _inline_triton(table):
        return _triton_weighted_lookup.weighted_lookup_backward_cuda(grad_out, rows, table, scores)
    return _backward_opaque(grad_out, rows, table, scores)


def _setup_context(ctx, inputs, output) -> None:
    rows, table, scores, grad_buffer = inputs
    ctx.save_for_backward(rows, table, scores)
    ctx.grad_buffer = grad_buffer


def _backward(ctx, grad_out: Tensor):
    rows, table, scores = ctx.saved_tensors
    if ctx.grad_buffer != -1:
        grad_scores = weighted_lookup_backward_into(grad_out.contiguous(), rows, table, scores, ctx.grad_buffer)
        return None, None, grad_scores, None
    grad_table, grad_scores = weighted_lookup_backward(grad_out.contiguous(), rows, table, scores)
    return None, grad_table, grad_scores, None


weighted_lookup.register_autograd(_backward, setup_context=_setup_context)
