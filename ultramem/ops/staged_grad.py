"""Staged table gradients for `gate_lookup` (the UltraMemV2 layers' value and pre-value tables),
and for `weighted_lookup` and `pre_value_gate` alone (one table each).

With gradient buffers (`register_grad_buffer`) each layer's backward adds its entries into both
persistent fp32 buffers right away: every entry reads and writes a whole fp32 row of each table
(most of the fused backward's time goes to those atomics). Staged, the backward instead writes
what the table gradients are made of:

    per entry:  row id, act(g)·s per core (the V weight), grad_g (the P weight)
    per token:  grad_out (V's source row), x (P's source row)

into a staging area, and `GradStaging.flush` adds everything staged into the buffers at once:
one sort of all staged row ids, then per table one pass over the sorted entries
(`sorted_block_add`). A row picked in several micro-batches and layers is then read and written
once per flush, not once per entry, and the backward itself no longer touches the tables.

The staging area holds `capacity` tokens (each layer's backward stages its T tokens; a model with
L memory layers stages L·T per micro-batch). The fill level lives on the device, so the staged
backward works inside CUDA graphs; a backward that finds no room left adds with atomics instead,
so a late flush costs speed, never correctness. Flush before anything reads the buffers (clipping,
the optimizer step, a gradient all-reduce): `ValueTables.flush_grad_staging()`, which the trainer
calls every `table_grad_flush` micro-batches and before each optimizer step.

    staging = GradStaging(capacity, entries, cores, vdim, pre_vdim, dtype, device)
    register_staging(values_grad_id, staging)        # ValueTables.use_grad_staging does both
    ...backward passes...
    staging.flush(values_grad_buffer, pre_values_grad_buffer)

One table: a `GradStaging` with only the values half (vdim > 0, pre_vdim = 0) registered under
a table's buffer id stages the backwards of `weighted_lookup(..., grad_buffer=id)` (per entry the
core weights, per token grad_out); one with only the pre-values half stages those of
`pre_value_gate(..., grad_buffer=id)` (per entry grad_gate, per token x). On CUDA their
backward is the fused backward kernel with one table and no gate, and `flush(grad, None)` /
`flush(None, grad)` adds them.

Results: the sums of the same products as the atomics, in another order (fp32 rounding only).
Deterministic mode (`ultramem.ops.determinism`) does not stage: its sorted per-call path stays.
Staged (and deferred) on CUDA and CPU alike, so the mechanism is testable without a GPU; the
speed-up is a GPU matter (perf/history/staged_flush.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import acc_dtype, check
from ._gather import gather_chunks
from ._triton import gate_lookup as _triton_gate_lookup  # None without Triton
from ._triton import staged_grad as _triton_staged_grad
from .determinism import deterministic_enabled

_stagings: dict[int, "GradStaging"] = {}


class GradStaging:
    """Room for `capacity` tokens of backward with `entries` entries per token, token rows
    (grad_out, x) in `dtype`. Two halves, either may be absent (width 0):

    - the values half (`vdim` > 0): per entry the weight of each of `cores` cores (`eff`), per
      token grad_out: `weighted_lookup`'s table gradient, grad_V[row] += eff · grad_out[t];
    - the pre-values half (`pre_vdim` > 0): per entry one weight (`grad_g`), per token x:
      `pre_value_gate`'s, grad_P[row] += grad_g · x[t].

    Both halves: `gate_lookup`'s backward (registered under the values buffer id). Values only:
    `weighted_lookup`'s; pre-values only: `pre_value_gate`'s (each under its table's buffer id)."""

    def __init__(
        self,
        capacity: int,
        entries: int,
        cores: int,
        vdim: int,
        pre_vdim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        check(capacity > 0, "GradStaging", f"capacity={capacity} tokens must be > 0")
        check(
            entries > 0 and cores > 0 and vdim >= 0 and pre_vdim >= 0 and vdim + pre_vdim > 0 and vdim % cores == 0,
            "GradStaging",
            f"entries={entries}, cores={cores}, vdim={vdim}, pre_vdim={pre_vdim}: need entries, cores > 0, "
            f"vdim and pre_vdim >= 0 (not both 0) and vdim divisible by cores",
        )
        self.capacity, self.entries, self.cores = capacity, entries, cores
        self.vdim, self.pre_vdim, self.dtype = vdim, pre_vdim, dtype
        kw = {"device": device}
        self.rows = torch.empty(capacity, entries, dtype=torch.int32, **kw)
        self.eff = torch.empty(capacity, entries, cores, dtype=torch.float32, **kw) if vdim else None
        self.grad_out = torch.empty(capacity, vdim, dtype=dtype, **kw) if vdim else None
        self.grad_g = torch.empty(capacity, entries, dtype=torch.float32, **kw) if pre_vdim else None
        self.x = torch.empty(capacity, pre_vdim, dtype=dtype, **kw) if pre_vdim else None
        # [0]: tokens staged so far; [1]: 0 between calls, within a CUDA staged backward the
        # programs done, so that the last moves [0] on (`ultramem.ops._triton.gate_lookup`)
        self.fill = torch.zeros(2, dtype=torch.int64, **kw)
        for t in self._tensors() + [self.fill]:
            torch._dynamo.mark_static_address(t)  # CUDA graphs keep these addresses

    @classmethod
    def from_tensors(
        cls,
        rows: Tensor,
        eff: Tensor | None,
        grad_out: Tensor | None,
        grad_g: Tensor | None,
        x: Tensor | None,
        fill: Tensor,
    ) -> "GradStaging":
        """A staging area over existing tensors (those of `tensors()`, e.g. handed to an op),
        allocating nothing."""
        self = cls.__new__(cls)
        self.rows, self.eff, self.grad_out, self.grad_g, self.x, self.fill = rows, eff, grad_out, grad_g, x, fill
        self.capacity, self.entries = rows.shape
        self.cores = eff.shape[2] if eff is not None else 1
        self.vdim = grad_out.shape[1] if grad_out is not None else 0
        self.pre_vdim = x.shape[1] if x is not None else 0
        self.dtype = (grad_out if grad_out is not None else x).dtype
        return self

    def tensors(self) -> tuple[Tensor | None, ...]:
        """(rows, eff, grad_out, grad_g, x, fill): what a backward writes (None: an absent half)."""
        return self.rows, self.eff, self.grad_out, self.grad_g, self.x, self.fill

    def _tensors(self) -> list[Tensor]:
        return [t for t in (self.rows, self.eff, self.grad_out, self.grad_g, self.x) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _fits(self, rows: Tensor, *token_rows: Tensor) -> bool:
        return (
            rows.shape[1] == self.entries
            and rows.device == self.fill.device
            and all(t.dtype == self.dtype and t.device == self.fill.device for t in token_rows)
        )

    def accepts(self, rows: Tensor, grad_out: Tensor, x: Tensor, scores: Tensor) -> bool:
        """Whether a `gate_lookup` backward with these tensors can be staged here (else it adds
        with atomics)."""
        return (
            self.vdim > 0
            and self.pre_vdim > 0
            and self._fits(rows, grad_out, x)
            and scores.shape[2] == self.cores
            and grad_out.shape[1] == self.vdim
            and x.shape[1] == self.pre_vdim
        )

    def accepts_lookup(self, rows: Tensor, grad_out: Tensor, scores: Tensor) -> bool:
        """The same for a `weighted_lookup` backward (a values-only staging area)."""
        return (
            self.vdim > 0
            and self.pre_vdim == 0
            and self._fits(rows, grad_out)
            and scores.shape[2] == self.cores
            and grad_out.shape[1] == self.vdim
        )

    def accepts_gate(self, rows: Tensor, x: Tensor) -> bool:
        """The same for a `pre_value_gate` backward (a pre-values-only staging area)."""
        return self.vdim == 0 and self.pre_vdim > 0 and self._fits(rows, x) and x.shape[1] == self.pre_vdim

    def staged_tokens(self) -> int:
        return int(self.fill[0].item())

    def stage_reference(
        self, rows: Tensor, grad_out: Tensor | None, x: Tensor | None, eff: Tensor | None, grad_g: Tensor | None
    ) -> bool:
        """Stage one backward with plain tensor ops (the CPU path; the halves this area has);
        False when it does not fit."""
        t = rows.shape[0]
        start = self.staged_tokens()
        if start + t > self.capacity:
            return False
        end = start + t
        self.rows[start:end].copy_(rows)
        if self.vdim:
            self.eff[start:end].copy_(eff)
            self.grad_out[start:end].copy_(grad_out)
        if self.pre_vdim:
            self.grad_g[start:end].copy_(grad_g)
            self.x[start:end].copy_(x)
        self.fill[0] += t
        return True

    @torch.no_grad()
    def flush(
        self,
        grad_values: Tensor | None,
        grad_pre_values: Tensor | None = None,
        kernels: bool | None = None,
        wait: bool = True,
    ) -> int | None:
        """Add everything staged into the gradient buffers of the halves this area has (the
        values' and the pre-values' buffers) and empty the staging area; returns the number of
        tokens flushed. `kernels`: the sort and the Triton passes (default: on CUDA), else plain
        `index_add_`. `wait` reads the fill level first (a host sync); without it the kernels
        sort the whole staging area and skip, on the device, the tokens at or past the fill
        level (nothing staged is missed; a staging area far from full costs more), and the
        count returned is None."""
        halves = [
            (self.grad_out, self.eff, grad_values, "grad_values"),
            (self.x, self.grad_g, grad_pre_values, "grad_pre_values"),
        ]
        halves = [h for h in halves if h[0] is not None]
        for _, _, buf, name in halves:
            check(buf is not None, "GradStaging.flush", f"{name} is None but this staging area holds its half")
        kernels = (self.rows.is_cuda if kernels is None else kernels) and _triton_staged_grad is not None
        n = self.staged_tokens() if wait or not kernels else self.capacity
        if n == 0:
            return 0
        rows = self.rows[:n]
        if kernels:
            order = _triton_staged_grad.sort_rows(rows, halves[0][2].shape[0])
            for g, w, buf, _ in halves:
                _triton_staged_grad.sorted_block_add(
                    rows, g[:n], w[:n], buf, torch.float32, order=order, limit=self.fill[:1]
                )
        else:
            for g, w, buf, _ in halves:
                add_weighted_rows(rows, g[:n], w[:n] if w.dim() == 3 else w[:n].unsqueeze(-1), buf)
        self.fill.zero_()
        return n if wait or not kernels else None


def add_weighted_rows(rows: Tensor, g: Tensor, w: Tensor, buf: Tensor) -> None:
    """buf[rows[t, e], chunk m] += w[t, e, m] · g[t, chunk m], ids outside [0, N) skipped."""
    t, e = rows.shape
    m = w.shape[2]
    acc = buf.dtype
    flat = rows.reshape(-1).long()
    ok = (flat >= 0) & (flat < buf.shape[0])
    contrib = (w.to(acc).unsqueeze(-1) * g.to(acc).view(t, 1, m, buf.shape[1] // m)).reshape(t * e, buf.shape[1])
    buf.index_add_(0, flat[ok], contrib[ok])


def check_staging_given(op: str, names: str, *stage: Tensor | None) -> None:
    """An op's staging area, handed over as tensors (`names`), comes whole or not at all."""
    given = [t is not None for t in stage]
    check(all(given) or not any(given), op, f"the staging area's tensors ({names}) come all together or not at all")


def may_stage(rows: Tensor, table: Tensor, *tensors: Tensor) -> bool:
    """Whether a backward on these tensors may stage: not in deterministic mode, fp32
    accumulation, int32 row ids; on CUDA at most the fused backward kernel's entries per token."""
    if deterministic_enabled() or acc_dtype(table, *tensors) != torch.float32 or table.shape[0] >= 2**31:
        return False
    return not rows.is_cuda or (
        _triton_gate_lookup is not None and rows.shape[1] <= _triton_gate_lookup.BWD_MAX_ENTRIES
    )


def stageable(grad_buffer: int, rows: Tensor, table: Tensor, *tensors: Tensor) -> GradStaging | None:
    """The staging area registered for this buffer id when a backward on these tensors may stage."""
    staging = _stagings.get(grad_buffer)
    return staging if staging is not None and may_stage(rows, table, *tensors) else None


def staged_lookup_backward(
    grad_buffer: int, grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor, buf: Tensor
) -> Tensor | None:
    """`weighted_lookup`'s backward staged into the values-only `GradStaging` registered for
    `grad_buffer` (into `buf` directly when it is full); returns grad_scores, or None when no
    staging applies (then the caller adds into `buf` itself). The caller checked the arguments."""
    staging = stageable(grad_buffer, rows, table, scores, grad_out)
    if staging is None or not staging.accepts_lookup(rows, grad_out, scores):
        return None
    if rows.is_cuda:
        return _triton_staged_grad.staged_lookup_backward_cuda(grad_out, rows, table, scores, buf, staging)
    return lookup_backward_reference(grad_out, rows, table, scores, buf, staging)


def lookup_backward_reference(
    grad_out: Tensor, rows: Tensor, table: Tensor, scores: Tensor, buf: Tensor, staging: GradStaging | None
) -> Tensor:
    """`weighted_lookup`'s backward in plain tensor ops: returns grad_scores; the table's gradient
    goes to `staging` (a values-only area) when given and not full, else into `buf`."""
    acc = acc_dtype(table, scores, grad_out)
    m = scores.shape[2]
    g = grad_out.to(acc).view(rows.shape[0], 1, m, table.shape[1] // m)
    grad_scores = (gather_chunks(rows, table, m, acc) * g).sum(-1)
    if staging is None or not staging.stage_reference(rows, grad_out, None, scores.to(acc), None):
        add_weighted_rows(rows, grad_out, scores.to(acc), buf)
    return grad_scores.to(scores.dtype).contiguous()


def staged_gate_backward(
    grad_buffer: int, grad_gate: Tensor, rows: Tensor, table: Tensor, x: Tensor, buf: Tensor
) -> Tensor | None:
    """`pre_value_gate`'s backward staged into the pre-values-only `GradStaging` registered for
    `grad_buffer`; returns grad_x, or None when no staging applies. The caller checked the arguments."""
    staging = stageable(grad_buffer, rows, table, x, grad_gate)
    if staging is None or not staging.accepts_gate(rows, x):
        return None
    if rows.is_cuda:
        return _triton_staged_grad.staged_gate_backward_cuda(grad_gate, rows, table, x, buf, staging)
    gg = grad_gate.float()
    grad_x = torch.einsum("te,ted->td", gg, gather_chunks(rows, table, 1, torch.float32)[:, :, 0])
    if not staging.stage_reference(rows, None, x, None, gg):
        add_weighted_rows(rows, x, gg.unsqueeze(-1), buf)
    return grad_x.to(x.dtype)


def register_staging(grad_buffer: int, staging: GradStaging | None) -> None:
    """Stage the backwards of the calls that pass `grad_buffer` (a `register_grad_buffer` id):
    `gate_lookup` calls whose values buffer it is (a staging area with both halves),
    `weighted_lookup` calls (values only), `pre_value_gate` calls (pre-values only). A call
    whose shapes or dtypes do not match the area adds into the buffer as without staging.
    None: stop staging (flush first)."""
    if staging is None:
        _stagings.pop(grad_buffer, None)
    else:
        _stagings[grad_buffer] = staging


def staging_for(grad_buffer: int) -> GradStaging | None:
    return _stagings.get(grad_buffer)
