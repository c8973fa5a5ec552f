"""ultramem::gate_lookup: the pre-value gate and the weighted lookup fused (docs/layers.md, UltraMemV2 steps 6–7).

    g[t, e]         = <pre_values[rows[t, e]], x[t]>
    out[t, chunk m] = Σ_e scores[t, e, m] · act(g[t, e]) · values[rows[t, e], chunk m]

with act = GELU (exact, erf form) when `gelu` is true, else the identity. It equals
`weighted_lookup(rows, values, scores * act(pre_value_gate(rows, pre_values, x))[..., None])`
but reads each entry's two rows in one pass and never writes the effective scores.

Shapes: rows [T, E] int32/int64, values [N, Dv] (Dv divisible by M), pre_values [N, Dp],
x [T, Dp], scores [T, E, M] → (out [T, Dv] in scores' dtype, g [T, E] in x's dtype, before the
activation). `values_grad_buffer` / `pre_values_grad_buffer` (ids from `register_grad_buffer`,
-1 for none) work as `grad_buffer` of `weighted_lookup` / `pre_value_gate`: the table's gradient
is added into that persistent buffer and the op returns none for the table. With both ids (the
trainer's case) the backward is one op, `gate_lookup_backward_into`: on CUDA one kernel for the
gathers, dots and fp32 atomics (in deterministic mode the same kernel without atomics, then each
table's gradient sorted by row with one writer per row; with a `GradStaging` registered for the
values buffer, the same kernel staging the gradients' parts for a later flush,
`ultramem.ops.staged_grad`); otherwise it goes through the lookup's and the gate's backward ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import (
    acc_dtype,
    check,
    check_float,
    check_gate_lookup_args,
    check_index_range,
    check_once,
    check_same_device,
    debug_enabled,
)
from ._triton import gate_lookup as _triton_gate_lookup  # (None without Triton)
from ._triton import staged_grad as _triton_staged_grad
from ._triton._launch import inline_on
from .determinism import deterministic_enabled
from .pre_value_gate import pre_value_gate_backward
from .staged_grad import GradStaging, add_weighted_rows, stageable
from .table_grad import (
    check_grad_buffer_id,
    keep_in_graphs,
    pre_value_gate_backward_into,
    registered_grad_buffer,
    weighted_lookup_backward_into,
)
from .weighted_lookup import weighted_lookup_backward

_OP = "gate_lookup"
_BWD = "gate_lookup_backward_into"


def _check_args(
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    values_grad_buffer: int = -1,
    pre_values_grad_buffer: int = -1,
    op: str = _OP,
) -> None:
    check_gate_lookup_args(op, rows, values, pre_values, x, scores)
    _check_grad_buffers(values, pre_values, values_grad_buffer, pre_values_grad_buffer)


def _check_grad_buffers(
    values: Tensor, pre_values: Tensor, values_grad_buffer: int, pre_values_grad_buffer: int
) -> None:
    """A bad or freed buffer id fails in the forward (and at trace time), not only in the backward."""
    check_grad_buffer_id(_OP, values_grad_buffer, values)
    check_grad_buffer_id(_OP, pre_values_grad_buffer, pre_values)


def _gelu_and_slope(g: Tensor) -> tuple[Tensor, Tensor]:
    """GELU(g) = g·Φ(g) and its derivative Φ(g) + g·φ(g)."""
    cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
    return g * cdf, cdf + g * pdf


def forward_reference(
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gelu: bool,
    values_grad_buffer: int = -1,
    pre_values_grad_buffer: int = -1,
) -> tuple[Tensor, Tensor]:
    """The reference kernel: plain PyTorch, any device (CPU; CUDA without Triton)."""
    _check_args(rows, values, pre_values, x, scores, values_grad_buffer, pre_values_grad_buffer)
    check_index_range(rows, values.shape[0], _OP, "rows")
    acc = acc_dtype(values, pre_values, x, scores)
    t, e = rows.shape
    m = scores.shape[2]
    flat = rows.reshape(-1).long()
    pre = pre_values.index_select(0, flat).to(acc).view(t, e, pre_values.shape[1])
    g = torch.einsum("ted,td->te", pre, x.to(acc))
    act = _gelu_and_slope(g)[0] if gelu else g
    vals = values.index_select(0, flat).to(acc).view(t, e, m, values.shape[1] // m)
    out = torch.einsum("temd,tem->tmd", vals, scores.to(acc) * act.unsqueeze(-1))
    return out.reshape(t, values.shape[1]).to(scores.dtype).contiguous(), g.to(x.dtype).contiguous()


# The public forward is a triton_op, as tdqkr_retrieval (see ultramem/ops/retrieval.py): with
# inline launches on, its CUDA body runs the Triton launcher, which torch.compile traces;
# otherwise, on CPU and in debug mode it calls its opaque twin (the reference on CPU, the launcher
# on CUDA). The backward into the gradient buffers stays a custom op: it adds into buffers that
# are no graph input (see `table_grad`).


def _inline_triton(x: Tensor) -> bool:
    return _triton_gate_lookup is not None and inline_on(x) and not debug_enabled()


@torch.library.custom_op("ultramem::gate_lookup_opaque", mutates_args=())
def _forward_opaque(
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gelu: bool,
    values_grad_buffer: int = -1,
    pre_values_grad_buffer: int = -1,
) -> tuple[Tensor, Tensor]:
    return forward_reference(rows, values, pre_values, x, scores, gelu, values_grad_buffer, pre_values_grad_buffer)


@_forward_opaque.register_fake
def _(
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gelu: bool,
    values_grad_buffer: int = -1,
    pre_values_grad_buffer: int = -1,
) -> tuple[Tensor, Tensor]:
    _check_args(rows, values, pre_values, x, scores, values_grad_buffer, pre_values_grad_buffer)
    return scores.new_empty((rows.shape[0], values.shape[1])), x.new_empty(rows.shape)


if _triton_gate_lookup is not None:

    @_forward_opaque.register_kernel("cuda")
    def _(
        rows: Tensor,
        values: Tensor,
        pre_values: Tensor,
        x: Tensor,
        scores: Tensor,
        gelu: bool,
        values_grad_buffer: int = -1,
        pre_values_grad_buffer: int = -1,
    ) -> tuple[Tensor, Tensor]:
        _check_grad_buffers(values, pre_values, values_grad_buffer, pre_values_grad_buffer)
        return _triton_gate_lookup.gate_lookup_cuda(rows, values, pre_values, x, scores, gelu)


@torch.library.triton_op("ultramem::gate_lookup", mutates_args=())
def gate_lookup(
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gelu: bool,
    values_grad_buffer: int = -1,
    pre_values_grad_buffer: int = -1,
) -> tuple[Tensor, Tensor]:
    """Returns (out [T, Dv] in scores' dtype, g [T, E] in x's dtype); see the module doc."""
    if _inline_triton(values):
        _check_grad_buffers(values, pre_values, values_grad_buffer, pre_values_grad_buffer)
        return _triton_gate_lookup.gate_lookup_cuda(rows, values, pre_values, x, scores, gelu)
    return _forward_opaque(rows, values, pre_values, x, scores, gelu, values_grad_buffer, pre_values_grad_buffer)


def _setup_context(ctx, inputs, output) -> None:
    rows, values, pre_values, x, scores, gelu, values_grad_buffer, pre_values_grad_buffer = inputs
    # the gate output is usually unused: its gradient then comes as None, not a zero-filled tensor
    ctx.set_materialize_grads(False)
    ctx.gelu = gelu
    ctx.grad_buffers = values_grad_buffer, pre_values_grad_buffer
    ctx.save_for_backward(rows, values, pre_values, x, scores, output[1])


def _effective_scores(scores: Tensor, gate: Tensor, gelu: bool, acc: torch.dtype):
    """(s, act(g), act'(g), eff = s · act(g)) in `acc`. The effective scores stay in the
    accumulation dtype, so the lookup's backward returns their gradient unrounded."""
    g = gate.to(acc)
    act, slope = _gelu_and_slope(g) if gelu else (g, torch.ones_like(g))
    s = scores.to(acc)
    return s, act, slope, s * act.unsqueeze(-1)


def _gate_gradient(grad_eff: Tensor, s: Tensor, slope: Tensor, grad_gate: Tensor | None) -> Tensor:
    """grad_g = Σ_m grad_eff · s · act'(g) (+ the gate output's own gradient)."""
    grad_g = (grad_eff * s).sum(-1) * slope
    return grad_g if grad_gate is None else grad_g + grad_gate.to(grad_g.dtype)


def _composed_backward(
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
    values_grad_buffer: int,
    pre_values_grad_buffer: int,
):
    """The backward through the lookup's and the gate's backward ops (each table's gradient
    into its buffer, or returned): (grad_values, grad_pre_values, grad_x, grad_scores)."""
    acc = acc_dtype(values, pre_values, x, scores)
    s, act, slope, eff = _effective_scores(scores, gate, gelu, acc)
    if values_grad_buffer != -1:
        grad_values = None
        grad_eff = weighted_lookup_backward_into(grad_out, rows, values, eff, values_grad_buffer)
    else:
        grad_values, grad_eff = weighted_lookup_backward(grad_out, rows, values, eff)
    grad_scores = (grad_eff * act.unsqueeze(-1)).to(scores.dtype)
    grad_g = _gate_gradient(grad_eff, s, slope, grad_gate)
    if pre_values_grad_buffer != -1:
        grad_pre_values = None
        grad_x = pre_value_gate_backward_into(grad_g.contiguous(), rows, pre_values, x, pre_values_grad_buffer)
    else:
        grad_pre_values, grad_x = pre_value_gate_backward(grad_g.contiguous(), rows, pre_values, x)
    return grad_values, grad_pre_values, grad_x, grad_scores


@torch.library.custom_op("ultramem::gate_lookup_backward_into", mutates_args=())
def gate_lookup_backward_into(
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
    values_grad_buffer: int,
    pre_values_grad_buffer: int,
) -> tuple[Tensor, Tensor]:
    """The backward of gate_lookup with both tables' gradients added into registered buffers (a
    hidden side effect, as `weighted_lookup_backward_into`), or staged for a later flush when a
    `GradStaging` is registered for the values buffer (`ultramem.ops.staged_grad`); returns
    (grad_scores, grad_x). On CUDA: `gate_lookup_backward_cuda` (atomics, or sorted in
    deterministic mode) or, staged, `staged_gate_lookup_backward_cuda`. Arguments, buffer ids and
    the range of rows are checked before either buffer is touched."""
    _check_backward_args(
        grad_out, grad_gate, rows, values, pre_values, x, scores, gate, values_grad_buffer, pre_values_grad_buffer
    )
    check_index_range(rows, values.shape[0], _BWD, "rows")
    staging = _staging(values_grad_buffer, rows, values, pre_values, x, scores, grad_out)
    if staging is not None:
        buffers = (
            registered_grad_buffer(_OP, values_grad_buffer, values),
            registered_grad_buffer(_OP, pre_values_grad_buffer, pre_values),
        )
        return backward_reference(
            grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, *buffers, staging
        )
    _, _, grad_x, grad_scores = _composed_backward(
        grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, values_grad_buffer, pre_values_grad_buffer
    )
    return grad_scores.contiguous(), grad_x.contiguous()


@gate_lookup_backward_into.register_fake
def _(
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
    values_grad_buffer: int,
    pre_values_grad_buffer: int,
):
    _check_backward_args(
        grad_out, grad_gate, rows, values, pre_values, x, scores, gate, values_grad_buffer, pre_values_grad_buffer
    )
    return (
        torch.empty_like(scores, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


keep_in_graphs(gate_lookup_backward_into)


def _check_backward_args(
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    values_grad_buffer: int,
    pre_values_grad_buffer: int,
    buffers: bool = True,
) -> None:
    """The arguments, and (buffers) that both ids name registered buffers that fit their tables.
    Without buffers the checks read only the signature (`check_once`)."""
    op = _BWD
    for name, handle in (
        ("values_grad_buffer", values_grad_buffer),
        ("pre_values_grad_buffer", pre_values_grad_buffer),
    ):
        check(handle != -1, op, f"{name}={handle}: both tables' buffer ids are required (register_grad_buffer)")
    check_backward_tensors(op, grad_out, grad_gate, rows, values, pre_values, x, scores, gate)
    if buffers:
        # both ids resolve before the first buffer is written (a freed second buffer would otherwise
        # fail after the first one had been added into)
        check_grad_buffer_id(op, values_grad_buffer, values)
        check_grad_buffer_id(op, pre_values_grad_buffer, pre_values)


def check_backward_tensors(
    op: str,
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
) -> None:
    """The tensor arguments of a gate_lookup backward (signature only)."""
    _check_args(rows, values, pre_values, x, scores, op=op)
    extra = {} if grad_gate is None else {"grad_gate": grad_gate}
    check_same_device(op, grad_out=grad_out, gate=gate, rows=rows, **extra)
    for name, t in (("grad_out", grad_out), ("gate", gate), ("grad_gate", grad_gate)):
        if t is not None:
            check_float(t, op, name)
    check(
        tuple(grad_out.shape) == (rows.shape[0], values.shape[1]),
        op,
        f"grad_out shape {tuple(grad_out.shape)} must be (tokens, vdim) = ({rows.shape[0]}, {values.shape[1]})",
    )
    for name, t in (("gate", gate), ("grad_gate", grad_gate)):
        check(
            t is None or tuple(t.shape) == tuple(rows.shape),
            op,
            f"{name} shape {None if t is None else tuple(t.shape)} must equal rows shape {tuple(rows.shape)}",
        )


def _staging(
    values_grad_buffer: int,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    grad_out: Tensor,
) -> GradStaging | None:
    """The staging area registered for this values buffer, if this backward can use it."""
    staging = stageable(values_grad_buffer, rows, values, pre_values, x, scores)
    return staging if staging is not None and staging.accepts(rows, grad_out, x, scores) else None


def backward_reference(
    grad_out: Tensor,
    grad_gate: Tensor | None,
    rows: Tensor,
    values: Tensor,
    pre_values: Tensor,
    x: Tensor,
    scores: Tensor,
    gate: Tensor,
    gelu: bool,
    grad_values: Tensor,
    grad_pre_values: Tensor,
    staging: GradStaging | None = None,
):
    """The backward into gradient buffers in plain tensor ops: (grad_scores, grad_x); each
    entry's effective scores and gate gradient go to `staging` when given and not full, else into
    the buffers."""
    acc = acc_dtype(values, pre_values, x, scores)
    t, e = rows.shape
    m = scores.shape[2]
    dm = values.shape[1] // m
    flat = rows.reshape(-1).long()
    s, act, slope, eff = _effective_scores(scores, gate, gelu, acc)
    vals = values.index_select(0, flat).to(acc).view(t, e, m, dm)
    grad_eff = (vals * grad_out.to(acc).view(t, 1, m, dm)).sum(-1)
    grad_g = _gate_gradient(grad_eff, s, slope, grad_gate)
    pre = pre_values.index_select(0, flat).to(acc).view(t, e, pre_values.shape[1])
    grad_x = torch.einsum("te,ted->td", grad_g, pre)
    if staging is None or not staging.stage_reference(rows, grad_out, x, eff, grad_g):
        add_weighted_rows(rows, grad_out, eff, grad_values)
        add_weighted_rows(rows, x, grad_g.unsqueeze(-1), grad_pre_values)
    return (grad_eff * act.unsqueeze(-1)).to(scores.dtype).contiguous(), grad_x.to(x.dtype).contiguous()


def _backward(ctx, grad_out: Tensor | None, grad_gate: Tensor | None):
    rows, values, pre_values, x, scores, gate = ctx.saved_tensors
    if grad_out is None:
        grad_out = scores.new_zeros((rows.shape[0], values.shape[1]))
    grad_out = grad_out.contiguous()
    values_buf, pre_values_buf = ctx.grad_buffers
    if values_buf != -1 and pre_values_buf != -1:  # the trainer's case: one fused backward
        grad_scores, grad_x = gate_lookup_backward_into(
            grad_out, grad_gate, rows, values, pre_values, x, scores, gate, ctx.gelu, values_buf, pre_values_buf
        )
        return None, None, None, grad_x, grad_scores, None, None, None
    grad_values, grad_pre_values, grad_x, grad_scores = _composed_backward(
        grad_out, grad_gate, rows, values, pre_values, x, scores, gate, ctx.gelu, values_buf, pre_values_buf
    )
    return None, grad_values, grad_pre_values, grad_x, grad_scores, None, None, None


gate_lookup.register_autograd(_backward, setup_context=_setup_context)

if _triton_gate_lookup is not None:

    @gate_lookup_backward_into.register_kernel("cuda")
    def _(
        grad_out: Tensor,
        grad_gate: Tensor | None,
        rows: Tensor,
        values: Tensor,
        pre_values: Tensor,
        x: Tensor,
        scores: Tensor,
        gate: Tensor,
        gelu: bool,
        values_grad_buffer: int,
        pre_values_grad_buffer: int,
    ):
        ids = (values_grad_buffer, pre_values_grad_buffer)
        check_once(
            _BWD, _check_backward_args, grad_out, grad_gate, rows, values, pre_values, x, scores, gate, *ids, False
        )
        # both buffers resolve (and are checked against their tables) before either is written
        buffers = (
            registered_grad_buffer(_BWD, values_grad_buffer, values),
            registered_grad_buffer(_BWD, pre_values_grad_buffer, pre_values),
        )
        check_index_range(rows, values.shape[0], _BWD, "rows")
        if (
            acc_dtype(values, pre_values, x, scores) == torch.float64
            or rows.shape[1] > _triton_gate_lookup.BWD_MAX_ENTRIES
        ):
            _, _, grad_x, grad_scores = _composed_backward(
                grad_out,
                grad_gate,
                rows,
                values,
                pre_values,
                x,
                scores,
                gate,
                gelu,
                values_grad_buffer,
                pre_values_grad_buffer,
            )
            return grad_scores.contiguous(), grad_x.contiguous()
        staging = _staging(values_grad_buffer, rows, values, pre_values, x, scores, grad_out)
        args = (
            grad_out,
            grad_gate,
            rows,
            values,
            pre_values,
            x,
            scores,
            gate,
            gelu,
            *buffers,
        )
        if staging is not None:
            return _triton_staged_grad.staged_gate_lookup_backward_cuda(*args, staging)
        # atomics outside deterministic mode: the sorted one-writer-per-row passes slow down
        # when training concentrates the picks on hot rows (perf/history/gate_lookup.md)
        return _triton_gate_lookup.gate_lookup_backward_cuda(*args, deterministic=deterministic_enabled())
