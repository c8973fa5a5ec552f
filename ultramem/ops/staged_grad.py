"""Staged table gradients for `gate_lookup` (the UltraMemV2 layers' value and pre-value tables).

With gradient buffers (`register_grad_buffer`) each layer's backward adds its entries into both
persistent fp32 buffers right away: every entry reads and writes a whole fp32 row of each table
(at the 227M shapes ≈ 465 µs of the 483 µs fused backward, bound by those atomics). Staged, the
backward instead writes what the table gradients are made of:

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

Results: the sums of the same products as the atomics, in another order (fp32 rounding only).
Deterministic mode (`ultramem.ops.determinism`) does not stage: its sorted per-call path stays.
Staged (and deferred) on CUDA and CPU alike, so the mechanism is testable without a GPU; the
speed-up is a GPU matter (perf/NOTES.md, "Staged table gradients").
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check

_stagings: dict[int, "GradStaging"] = {}


class GradStaging:
    """Room for `capacity` tokens of `gate_lookup` backward with `entries` entries per token and
    `cores` cores, tables of widths vdim / pre_vdim, token rows (grad_out, x) in `dtype`."""

    def __init__(self, capacity: int, entries: int, cores: int, vdim: int, pre_vdim: int, dtype: torch.dtype,
                 device: torch.device | str):
        check(capacity > 0, "GradStaging", f"capacity={capacity} tokens must be > 0")
        check(entries > 0 and cores > 0 and vdim % cores == 0 and pre_vdim > 0, "GradStaging",
              f"entries={entries}, cores={cores}, vdim={vdim}, pre_vdim={pre_vdim}: need entries, cores, pre_vdim "
              f"> 0 and vdim divisible by cores")
        self.capacity, self.entries, self.cores = capacity, entries, cores
        self.vdim, self.pre_vdim, self.dtype = vdim, pre_vdim, dtype
        kw = {"device": device}
        self.rows = torch.empty(capacity, entries, dtype=torch.int32, **kw)
        self.eff = torch.empty(capacity, entries, cores, dtype=torch.float32, **kw)
        self.grad_g = torch.empty(capacity, entries, dtype=torch.float32, **kw)
        self.grad_out = torch.empty(capacity, vdim, dtype=dtype, **kw)
        self.x = torch.empty(capacity, pre_vdim, dtype=dtype, **kw)
        self.fill = torch.zeros(1, dtype=torch.int64, **kw)  # tokens staged so far
        for t in (self.rows, self.eff, self.grad_g, self.grad_out, self.x, self.fill):
            torch._dynamo.mark_static_address(t)  # CUDA graphs keep these addresses

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.eff, self.grad_g, self.grad_out, self.x))

    def accepts(self, rows: Tensor, grad_out: Tensor, x: Tensor, scores: Tensor) -> bool:
        """Whether a backward with these tensors can be staged here (else it uses the atomics)."""
        return (rows.shape[1] == self.entries and scores.shape[2] == self.cores
                and grad_out.shape[1] == self.vdim and x.shape[1] == self.pre_vdim
                and grad_out.dtype == self.dtype and x.dtype == self.dtype
                and grad_out.device == self.fill.device and rows.device == self.fill.device)

    def staged_tokens(self) -> int:
        return int(self.fill.item())

    def stage_reference(self, rows: Tensor, grad_out: Tensor, x: Tensor, eff: Tensor, grad_g: Tensor) -> bool:
        """Stage one backward with plain tensor ops (the CPU path); False when it does not fit."""
        t = rows.shape[0]
        start = int(self.fill.item())
        if start + t > self.capacity:
            return False
        end = start + t
        self.rows[start:end].copy_(rows)
        self.eff[start:end].copy_(eff)
        self.grad_g[start:end].copy_(grad_g)
        self.grad_out[start:end].copy_(grad_out)
        self.x[start:end].copy_(x)
        self.fill.add_(t)
        return True

    @torch.no_grad()
    def flush(self, grad_values: Tensor, grad_pre_values: Tensor, kernels: bool | None = None,
              wait: bool = True) -> int | None:
        """Add everything staged into the two gradient buffers and empty the staging area;
        returns the number of tokens flushed. `kernels`: the sort and the Triton passes (default:
        on CUDA), else plain `index_add_`. `wait` reads the fill level first (a host sync);
        without it the kernels sort the whole staging area and skip, on the device, the tokens
        at or past the fill level (nothing staged is missed; a staging area far from full costs
        more), and the count returned is None."""
        from ._triton import weighted_lookup as _twl  # noqa: PLC0415  (None without Triton)

        kernels = (self.rows.is_cuda if kernels is None else kernels) and _twl is not None
        n = self.staged_tokens() if wait or not kernels else self.capacity
        if n == 0:
            return 0
        rows, eff, grad_g = self.rows[:n], self.eff[:n], self.grad_g[:n]
        grad_out, x = self.grad_out[:n], self.x[:n]
        if kernels:
            order = _twl.sort_rows(rows, grad_values.shape[0])
            _twl.sorted_block_add(rows, grad_out, eff, grad_values, torch.float32, order=order, limit=self.fill)
            _twl.sorted_block_add(rows, x, grad_g, grad_pre_values, torch.float32, order=order, limit=self.fill)
        else:
            add_weighted_rows(rows, grad_out, eff, grad_values)
            add_weighted_rows(rows, x, grad_g.unsqueeze(-1), grad_pre_values)
        self.fill.zero_()
        return n if wait or not kernels else None


def add_weighted_rows(rows: Tensor, g: Tensor, w: Tensor, buf: Tensor) -> None:
    """buf[rows[t, e], chunk m] += w[t, e, m] · g[t, chunk m], ids outside [0, N) skipped."""
    t, e = rows.shape
    m = w.shape[2]
    acc = buf.dtype
    flat = rows.reshape(-1).long()
    ok = (flat >= 0) & (flat < buf.shape[0])
    contrib = (w.to(acc).unsqueeze(-1) * g.to(acc).view(t, 1, m, -1)).reshape(t * e, -1)
    buf.index_add_(0, flat[ok], contrib[ok])


def register_staging(values_grad_buffer: int, staging: GradStaging | None) -> None:
    """Stage the backwards of `gate_lookup` calls whose values buffer id is `values_grad_buffer`
    (None: stop staging; flush first)."""
    if staging is None:
        _stagings.pop(values_grad_buffer, None)
    else:
        _stagings[values_grad_buffer] = staging


def staging_for(values_grad_buffer: int) -> GradStaging | None:
    return _stagings.get(values_grad_buffer)
