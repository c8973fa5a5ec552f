"""Accumulate-style backwards of the gather ops: the table gradient is added in place into a
persistent buffer instead of being returned as a fresh dense [N, D] tensor.

    ultramem::weighted_lookup_backward_accumulate(grad_table!, grad_out, rows, table, scores) -> grad_scores
    ultramem::pre_value_gate_backward_accumulate(grad_table!, grad_gate, rows, table, x) -> grad_x

`grad_table` is an fp32 (or fp64) tensor of the table's shape, zeroed once by its owner (for
instance after each optimizer step), so gradient accumulation over micro-batches is free and no
call pays for a 2 GB zero-fill. The other outputs are those of the public backward ops. On CUDA
the adds are fp32 atomics, or sorted and one writer per row in deterministic mode
(`ultramem.ops.determinism`).

The public forward ops reach these through a registered buffer id rather than a tensor argument:

    handle = register_grad_buffer(buf)                       # once (ValueTables.use_grad_buffers)
    out = weighted_lookup(rows, table, scores, grad_buffer=handle)

Their backward then calls `ultramem::{weighted_lookup,pre_value_gate}_backward_into`, which adds
into the registered buffer. The buffer is deliberately not a graph input: under per-layer
`torch.compile`, AOTAutograd saves every tensor input it needs for the backward and checks its
version counter, so a buffer shared by several compiled layers (each adding into it during the
backward) would fail that check. An integer id keeps the buffer out of the graphs; the side
effect lives inside opaque custom ops whose outputs are always used, so it runs exactly once.
`gate_lookup_into` and `weighted_lookup_into` take the buffers as tensors instead, their
backwards writing them without moving the version counters that this check reads (see there).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
import weakref

import torch
from torch import Tensor

from ._checks import check, check_gate_args, check_index_range, check_lookup_args, check_once, check_same_device
from .staged_grad import staged_gate_backward, staged_lookup_backward

_FLOAT_ACC = (torch.float32, torch.float64)

# Weak references: the owner (ValueTables) keeps its buffers alive; a dropped model frees them.
_grad_buffers: dict[int, weakref.ref] = {}
_next_handle = itertools.count()


def keep_in_graphs(op) -> None:
    """Mark an op whose real output is a side effect (adding into a registered buffer) as
    side-effectful, so that graph passes (AOTAutograd's dead-code elimination, Inductor) keep it
    when none of its returned tensors is used: e.g. when only the tables need gradients."""
    torch.fx.node.has_side_effect(op._opoverload)


def accumulates_in_place(op) -> None:
    """Let custom op `op` write its mutable arguments without moving their version counters (see
    `ultramem.ops.gate_lookup_into`). Only for accumulators that nothing reads back as a saved input."""
    overload = op._opoverload
    below = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, *args, **kwargs):
        return overload.redispatch(keyset & below, *args, **kwargs)

    if "allow_override" in inspect.signature(op._lib.impl).parameters:
        op._lib.impl(op._name, kernel, "ADInplaceOrView", with_keyset=True, allow_override=True)
    else:  # older PyTorch refuses a second Python kernel for a key unless it forgets the first
        torch.library._impls.discard(f"{op._lib.ns}/{op._name}/ADInplaceOrView")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            op._lib.impl(op._name, kernel, "ADInplaceOrView", with_keyset=True)


def register_grad_buffer(buf: Tensor) -> int:
    """Register a persistent gradient buffer; returns the id to pass as `grad_buffer`."""
    handle = next(_next_handle)
    _grad_buffers[handle] = weakref.ref(buf)
    return handle


def update_grad_buffer(handle: int, buf: Tensor) -> None:
    """Point an id at another tensor (after the owner moved or re-allocated its buffer)."""
    if handle not in _grad_buffers:
        raise KeyError(f"grad_buffer={handle} is not registered")
    _grad_buffers[handle] = weakref.ref(buf)


def release_grad_buffer(handle: int) -> None:
    _grad_buffers.pop(handle, None)


def registered_grad_buffer(op: str, handle: int, table: Tensor) -> Tensor:
    ref = _grad_buffers.get(handle)
    buf = ref() if ref is not None else None
    check(
        buf is not None,
        op,
        f"grad_buffer={handle} is not a registered buffer id, or its buffer was freed "
        f"(register_grad_buffer gives one; -1 means none)",
    )
    check_once(op, check_grad_buffer, op, buf, table)
    return buf


def check_grad_buffer_id(op: str, handle: int, table: Tensor) -> None:
    """A forward's check of its buffer id (-1: none): a bad or freed id fails there, not only in
    the backward. A symbolic id (Dynamo retracing a function called with other ids) is checked
    when the backward runs."""
    if isinstance(handle, int) and handle != -1:
        registered_grad_buffer(op, handle, table)


def check_grad_buffer(op: str, grad_table: Tensor, table: Tensor) -> None:
    check(
        tuple(grad_table.shape) == tuple(table.shape),
        op,
        f"grad_table shape {tuple(grad_table.shape)} must equal table shape {tuple(table.shape)}",
    )
    check(grad_table.dtype in _FLOAT_ACC, op, f"grad_table must be float32 or float64, got {grad_table.dtype}")
    check_same_device(op, grad_table=grad_table, table=table)


def _check_lookup_accumulate(
    op: str, grad_table: Tensor, grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor
) -> None:
    check_lookup_args(op, rows, table, scores, grad_out)
    check_grad_buffer(op, grad_table, table)


def _check_gate_accumulate(
    op: str, grad_table: Tensor, grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor
) -> None:
    check_gate_args(op, rows, table, x, grad_gate)
    check_grad_buffer(op, grad_table, table)


@torch.library.custom_op("ultramem::weighted_lookup_backward_accumulate", mutates_args=("grad_table",))
def weighted_lookup_backward_accumulate(
    grad_table: Tensor, grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor
) -> Tensor:
    """grad_table[rows[t, e], chunk m] += scores[t, e, m] · grad_out[t, chunk m]; returns grad_scores.
    Every argument (and the range of rows) is checked before grad_table is touched."""
    op = "weighted_lookup_backward_accumulate"
    _check_lookup_accumulate(op, grad_table, grad_out, rows, table, scores)
    check_index_range(rows, table.shape[0], op, "rows")
    acc = grad_table.dtype
    t, e = rows.shape
    m = scores.shape[2]
    dm = table.shape[1] // m
    flat = rows.reshape(-1).long()
    g = grad_out.to(acc).view(t, 1, m, dm)
    vals = table.index_select(0, flat).to(acc).view(t, e, m, dm)
    grad_scores = (vals * g).sum(-1)
    grad_table.index_add_(0, flat, (scores.to(acc).unsqueeze(-1) * g).reshape(t * e, table.shape[1]))
    return grad_scores.to(scores.dtype).contiguous()


@weighted_lookup_backward_accumulate.register_fake
def _(grad_table: Tensor, grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor) -> Tensor:
    _check_lookup_accumulate("weighted_lookup_backward_accumulate", grad_table, grad_out, rows, table, scores)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.custom_op("ultramem::pre_value_gate_backward_accumulate", mutates_args=("grad_table",))
def pre_value_gate_backward_accumulate(
    grad_table: Tensor, grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor
) -> Tensor:
    """grad_table[rows[t, e]] += grad_gate[t, e] · x[t]; returns grad_x. Every argument (and the
    range of rows) is checked before grad_table is touched."""
    op = "pre_value_gate_backward_accumulate"
    _check_gate_accumulate(op, grad_table, grad_gate, rows, table, x)
    check_index_range(rows, table.shape[0], op, "rows")
    acc = grad_table.dtype
    t, e = rows.shape
    d = table.shape[1]
    flat = rows.reshape(-1).long()
    gg = grad_gate.to(acc)
    pre = table.index_select(0, flat).to(acc).view(t, e, d)
    grad_x = torch.einsum("te,ted->td", gg, pre)
    grad_table.index_add_(0, flat, (gg.unsqueeze(-1) * x.to(acc).unsqueeze(1)).reshape(t * e, d))
    return grad_x.to(x.dtype).contiguous()


@pre_value_gate_backward_accumulate.register_fake
def _(grad_table: Tensor, grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> Tensor:
    _check_gate_accumulate("pre_value_gate_backward_accumulate", grad_table, grad_gate, rows, table, x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


from ._triton import pre_value_gate as _triton_pre_value_gate  # noqa: E402  (None without Triton)
from ._triton import weighted_lookup as _triton_weighted_lookup  # noqa: E402

if _triton_weighted_lookup is not None:

    @weighted_lookup_backward_accumulate.register_kernel("cuda")
    def _(grad_table: Tensor, grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor) -> Tensor:
        check_grad_buffer("weighted_lookup_backward_accumulate", grad_table, table)  # (the launcher checks the rest)
        return _triton_weighted_lookup.weighted_lookup_backward_accumulate_cuda(
            grad_table, grad_out, rows, table, scores
        )


if _triton_pre_value_gate is not None:

    @pre_value_gate_backward_accumulate.register_kernel("cuda")
    def _(grad_table: Tensor, grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor) -> Tensor:
        check_grad_buffer("pre_value_gate_backward_accumulate", grad_table, table)
        return _triton_pre_value_gate.pre_value_gate_backward_accumulate_cuda(grad_table, grad_gate, rows, table, x)


@torch.library.custom_op("ultramem::weighted_lookup_backward_into", mutates_args=())
def weighted_lookup_backward_into(
    grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int
) -> Tensor:
    """Adds the table gradient into registered buffer `grad_buffer` (a hidden side effect: see the
    module doc); returns grad_scores. Arguments are checked before the buffer is touched."""
    op = "weighted_lookup_backward_into"
    buf = registered_grad_buffer(op, grad_buffer, table)
    check_once(op, check_lookup_args, op, rows, table, scores, grad_out)
    check_index_range(rows, table.shape[0], op, "rows")
    grad_scores = staged_lookup_backward(grad_buffer, grad_out, rows, table, scores, buf)
    if grad_scores is not None:  # a GradStaging is registered for this buffer
        return grad_scores
    if rows.is_cuda and _triton_weighted_lookup is not None:  # checked above: no second dispatch and checks
        return _triton_weighted_lookup.lookup_table_grad(grad_out, rows, table, scores, buf, accumulate=True)
    return weighted_lookup_backward_accumulate(buf, grad_out, rows, table, scores)


@weighted_lookup_backward_into.register_fake
def _(grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor, grad_buffer: int) -> Tensor:
    check_lookup_args("weighted_lookup_backward_into", rows, table, scores, grad_out)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.custom_op("ultramem::pre_value_gate_backward_into", mutates_args=())
def pre_value_gate_backward_into(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int) -> Tensor:
    """Adds the table gradient into registered buffer `grad_buffer`; returns grad_x. Arguments are
    checked before the buffer is touched."""
    op = "pre_value_gate_backward_into"
    buf = registered_grad_buffer(op, grad_buffer, table)
    check_once(op, check_gate_args, op, rows, table, x, grad_gate)
    check_index_range(rows, table.shape[0], op, "rows")
    grad_x = staged_gate_backward(grad_buffer, grad_gate, rows, table, x, buf)
    if grad_x is not None:
        return grad_x
    if rows.is_cuda and _triton_pre_value_gate is not None:  # checked above: no second dispatch and checks
        return _triton_pre_value_gate.gate_table_grad(grad_gate, rows, table, x, buf, accumulate=True)
    return pre_value_gate_backward_accumulate(buf, grad_gate, rows, table, x)


@pre_value_gate_backward_into.register_fake
def _(grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor, grad_buffer: int) -> Tensor:
    check_gate_args("pre_value_gate_backward_into", rows, table, x, grad_gate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


keep_in_graphs(weighted_lookup_backward_into)
keep_in_graphs(pre_value_gate_backward_into)
