"""The value tables shared by all memory layers of a model (docs/layers.md).

UltraMemV2: `values` [N, vdim] and `pre_values` [N, pre_vdim] (None when pre_vdim = 0), with
N = knum²·L. Memory+: one `values` table [knum², vdim]. They are ordinary parameters, one copy.

Initialization. The "paper" σ_V depends on each layer's calibrated score variance, which is
only known after that layer's `reset_parameters`. So each layer reports the σ it wants through
`note_layer_init(layer_index, std, generator)`; once all `num_layers` layers have reported, the
tables fill themselves from that generator with σ = (mean_l σ_l⁴)^(1/4) (the output variance of
a gated layer is ∝ σ_V⁴, so this matches the layers' average target) and forget the reports.
Calling `reset_parameters(generator, sigma)` directly does the same with an explicit σ.

Gradients. By default the tables get ordinary dense gradients from autograd. Training code should
call `use_grad_buffers()`: the tables' gradients then accumulate in persistent fp32 buffers that the
ops' backwards add into row by row (no dense [N, D] gradient allocated and zero-filled per layer
and micro-batch), `param.grad` aliases each buffer so clipping and the optimizer read it as usual,
and `zero_grad_buffers()` clears them once per optimizer step.

Staged gradients (UltraMemV2 and Memory+, CUDA or CPU). After `use_grad_buffers()`,
`use_grad_staging(tokens, entries, cores, dtype)` makes the layers' backwards stage what the
tables' gradients are made of instead of adding it to the buffers entry by entry; then
`flush_grad_staging()` adds all of it at once, one sorted pass per table, and must run before
anything reads the buffers (the trainer flushes every `table_grad_flush` micro-batches and before
each optimizer step). A backward that finds the staging area full adds directly, as without
staging. `zero_grad_buffers()` drops what is staged too. See `ultramem.ops.staged_grad`.

Compute copy. With gradient buffers on, `use_compute_copy(torch.bfloat16)` makes the layers gather
from a bf16 copy of the tables (half the bytes of every gather; autocast does not reach the custom
ops, so without it they read the fp32 tables). The gradients still go to the fp32 buffers. The
copy must follow the tables. It refreshes itself after `load_state_dict` and, once
`refresh_after_steps(optimizer)` was called, after every step of that optimizer; after any other
change call `refresh_compute_copy()`. As a safety net an eager (not compiled) forward raises if
a table's version counter moved since the last refresh; fused optimizers (`AdamW(fused=True)`)
update in place without moving it, so the net is not a substitute for the refresh.

Under CUDA graphs the captured backward keeps the address of each gradient buffer, of each
compute copy and of the staging area: after the first captured step, only zero / refresh / flush
them in place (no second `use_grad_buffers()`, `use_compute_copy()` or `use_grad_staging()`, no
move to another device).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ultramem.ops import GradStaging, register_grad_buffer, register_staging, release_grad_buffer, update_grad_buffer

from ._common import fill_normal_rows, version_counter

logger = logging.getLogger(__name__)


def _grads_dropped(values: nn.Parameter, pre_values: nn.Parameter | None) -> bool:
    """Whether zero_grad(set_to_none=True) took a table's `.grad`, its gradient buffer, away."""
    return values.grad is None or (pre_values is not None and pre_values.grad is None)


def _refresh_after_load(module: nn.Module, _keys) -> None:
    """After load_state_dict (module-level, so that the tables pickle)."""
    if module._buffered is not None and module._replaced(module.values, module.pre_values):
        module.use_grad_buffers()  # load_state_dict(assign=True) put in new tables: buffers for them
    module.refresh_compute_copy()


class ValueTables(nn.Module):
    def __init__(self, num_rows: int, vdim: int, pre_vdim: int = 0, num_layers: int = 1):
        super().__init__()
        self.num_rows, self.vdim, self.pre_vdim, self.num_layers = num_rows, vdim, pre_vdim, num_layers
        self.values = nn.Parameter(torch.empty(num_rows, vdim))
        self.pre_values = nn.Parameter(torch.empty(num_rows, pre_vdim)) if pre_vdim > 0 else None
        self._noted_std: dict[int, float] = {}
        self.register_buffer("values_grad", None, persistent=False)
        self.register_buffer("pre_values_grad", None, persistent=False)
        # ids of the buffers registered with the ops (-1: none); the layers pass them to the ops
        self.values_grad_id = -1
        self.pre_values_grad_id = -1
        self.register_buffer("values_compute", None, persistent=False)
        self.register_buffer("pre_values_compute", None, persistent=False)
        self._compute_versions: tuple[int, ...] | None = None
        self.grad_staging: GradStaging | None = None
        # whether the layers hand the gradient buffers to their ops as tensors (`grad_targets`);
        # None: on CUDA, where the compiled backward then launches their kernels itself
        self.grads_as_inputs: bool | None = None
        self._buffered: tuple | None = None  # the parameters the gradient buffers were made for
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def __getstate__(self):
        # The buffers' ids index a process-wide registry: a copy (deepcopy, pickle) would add its
        # gradients into the original's buffers. It comes back as freshly built tables instead,
        # without buffers, staging or compute copies; `use_grad_buffers()` gives it its own.
        state = super().__getstate__()
        state.update(
            values_grad_id=-1, pre_values_grad_id=-1, grad_staging=None, _compute_versions=None, _buffered=None
        )
        dropped = ("values_grad", "pre_values_grad", "values_compute", "pre_values_compute")
        state["_buffers"] = {k: None if k in dropped else v for k, v in state["_buffers"].items()}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.use_grad_buffers(False)  # also drops the copied `.grad`, the original's buffer

    def value_parameters(self) -> list[nn.Parameter]:
        """The table parameters (the trainer's value group)."""
        return [p for p in (self.values, self.pre_values) if p is not None]

    def _params_and_buffers(self):
        return [
            (p, getattr(self, name + "_grad"))
            for name, p in (("values", self.values), ("pre_values", self.pre_values))
            if p is not None
        ]

    def use_grad_buffers(self, enabled: bool = True) -> None:
        """Accumulate the tables' gradients in place in persistent buffers (see the module doc)."""
        if not enabled:
            self.use_grad_staging(0)
        for name in ("values", "pre_values"):
            p = getattr(self, name)
            buf = None
            if enabled and p is not None:
                if type(p.data) is not torch.Tensor:
                    raise ValueError(
                        f"ValueTables.{name} is a {type(p.data).__name__}: gradient buffers need plain "
                        f"(unsharded) tables; leave the tables out of fully_shard (its ignored_params), "
                        f"as the trainer does"
                    )
                if p.dtype not in (torch.float32, torch.float64):
                    raise ValueError(
                        f"ValueTables.{name} is {p.dtype}: gradient buffers need float32 (or float64) "
                        f"tables; keep the tables in fp32 and use autocast for bf16 compute"
                    )
                buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
                torch._dynamo.mark_static_address(buf)  # zeroed in place: CUDA graphs keep its address
            elif p is not None:
                p.grad = None
                setattr(self, name + "_compute", None)  # a copy's gradient has no way back without buffers
            setattr(self, name + "_grad", buf)
            handle = getattr(self, name + "_grad_id")
            if buf is None and handle != -1:
                release_grad_buffer(handle)
                handle = -1
            elif buf is not None:
                if handle == -1:
                    handle = register_grad_buffer(buf)
            setattr(self, name + "_grad_id", handle)
        self._buffered = (self.values, self.pre_values) if enabled else None
        self.attach_grad_buffers()

    def use_grad_staging(
        self, tokens: int, entries: int = 0, cores: int = 1, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        """Stage the layers' table gradients, room for `tokens` tokens (all layers' together:
        L·T per micro-batch), `entries` entries per token, `cores` cores, the layers' grad_out
        (and x) in `dtype`; tokens=0 turns staging off (after flushing what is staged). With a
        pre-value table the staged backward is gate_lookup's (both tables), else
        weighted_lookup's (UltraMemV2 without pre-values, Memory+)."""
        if tokens and self.values_grad is None:
            raise ValueError(
                "use_grad_staging needs use_grad_buffers() first: the staged gradients are flushed "
                "into the gradient buffers"
            )
        if self.grad_staging is not None:
            self.flush_grad_staging()
            register_staging(self.values_grad_id, None)
            self.grad_staging = None
        if tokens:
            self.grad_staging = GradStaging(tokens, entries, cores, self.vdim, self.pre_vdim, dtype, self.values.device)
            register_staging(self.values_grad_id, self.grad_staging)

    def flush_grad_staging(self, wait: bool = True) -> int | None:
        """Add the staged gradients into the buffers; returns the tokens flushed (None when not
        waited for: `wait=False` spares the host sync, see `GradStaging.flush`)."""
        if self.grad_staging is None:
            return 0
        return self.grad_staging.flush(self.values_grad, self.pre_values_grad, wait=wait)

    def grad_targets(self) -> tuple[torch.Tensor | None, ...] | None:
        """What the layers' fused op adds the tables' gradients into, when the buffers go to it as
        tensors (`grads_as_inputs` True, or left at None for CUDA tables); otherwise None, and the
        layers pass the buffers' ids. With
        pre-values, for `gate_lookup_into`: (values' buffer, pre-values' buffer, the staging
        area's six tensors or six None); without, for `weighted_lookup_into`: (values' buffer,
        the staging area's rows, eff, grad_out and fill, or four None). None without buffers, and
        where no gradient is recorded (as `grad_ids`)."""
        if not torch.is_grad_enabled():
            return None
        as_inputs = self.values.is_cuda if self.grads_as_inputs is None else self.grads_as_inputs
        if not as_inputs or self.values_grad is None:
            return None
        staging = self.grad_staging
        if self.pre_values is not None:
            if self.pre_values_grad is None:
                return None
            stage = staging.tensors() if staging is not None and staging.pre_vdim else (None,) * 6
            return (self.values_grad, self.pre_values_grad, *stage)
        if staging is None or staging.pre_vdim:
            return (self.values_grad, None, None, None, None)
        return (self.values_grad, staging.rows, staging.eff, staging.grad_out, staging.fill)

    def grad_ids(self) -> tuple[int, int]:
        """The buffers' ids the layers pass to their ops (values, pre-values; -1: none). -1 both
        where no gradient is recorded (no_grad, inference_mode): an inference graph then names
        no buffer, so it runs where the ids are not registered (an exported model in another
        process)."""
        if not torch.is_grad_enabled():
            return -1, -1
        return self.values_grad_id, self.pre_values_grad_id

    def attach_grad_buffers(self) -> None:
        """Point each table's `.grad` and its registered id at its buffer (again after
        `zero_grad(set_to_none=True)` dropped `.grad`, or a move replaced the buffer)."""
        for name, p in (("values", self.values), ("pre_values", self.pre_values)):
            buf = getattr(self, name + "_grad")
            if p is not None and buf is not None:
                p.grad = buf
                update_grad_buffer(getattr(self, name + "_grad_id"), buf)

    def follow_zero_grad(self) -> None:
        """`optimizer.zero_grad()` (set_to_none=True, its default) drops the tables' `.grad`, which
        the buffers stand behind: this then clears the buffers and attaches them again, as if
        zeroed. The model's forward calls it before its blocks (compiled: one guard on `.grad`),
        a layer's eager forward too (docs/table-gradients.md)."""
        if self.values_grad is None or not _grads_dropped(self.values, self.pre_values):
            return
        with torch.no_grad():
            for _, buf in self._params_and_buffers():
                buf.zero_()
            if self.grad_staging is not None:
                self.grad_staging.fill.zero_()
        if torch.compiler.is_compiling():
            for p, buf in self._params_and_buffers():
                p.grad = buf
        else:
            self.attach_grad_buffers()  # also points the ops' ids at the buffers, moved or not

    def _replaced(self, values, pre_values) -> bool:
        """Whether a table is not the parameter its gradient buffer was made for (the tables are
        passed in: the eager forward has read them already)."""
        return values is not self._buffered[0] or pre_values is not self._buffered[1]

    def _eager_forward_checks(self) -> None:
        """An eager forward with gradient buffers on: refuse what would misplace gradients, and
        follow zero_grad() unless this is a recompute inside a backward (checkpointing). Module
        attributes are read once: this runs in every eager layer forward."""
        values, pre_values, values_grad = self.values, self.pre_values, self.values_grad
        if torch.is_grad_enabled() and self._replaced(values, pre_values):
            raise RuntimeError(
                "ValueTables: a table was replaced (a new Parameter, or torch.func.functional_call) while "
                "gradient buffers are on: its gradient would go to the old table's buffer; call "
                "use_grad_buffers() after replacing a table, or use_grad_buffers(False) for functional_call"
            )
        if values_grad.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(
                f"ValueTables: the gradient buffers were cast to {values_grad.dtype} with the module; "
                f"they need float32 tables: call use_grad_buffers(False) before such a cast, or keep the "
                f"tables in fp32 and use autocast"
            )
        if _grads_dropped(values, pre_values) and torch._C._current_graph_task_id() == -1:
            self.follow_zero_grad()

    @torch.no_grad()
    def zero_grad_buffers(self) -> None:
        """Clear the accumulated table gradients; call once per optimizer step."""
        for _, buf in self._params_and_buffers():
            if buf is not None:
                buf.zero_()
        if self.grad_staging is not None:
            self.grad_staging.fill.zero_()
        self.attach_grad_buffers()

    def use_compute_copy(self, dtype: torch.dtype | None = torch.bfloat16) -> None:
        """Gather from a `dtype` copy of the tables (None: from the tables themselves); see the module doc."""
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"compute copy dtype={dtype} must be a floating dtype")
            if self.values_grad is None:
                raise ValueError(
                    "use_compute_copy needs use_grad_buffers() first: the gradients of a copy reach "
                    "the tables only through the gradient buffers"
                )
        for name, p in (("values", self.values), ("pre_values", self.pre_values)):
            copy = None
            if dtype is not None and p is not None:
                copy = torch.empty_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                # refreshed in place only: CUDA graphs may keep its address instead of copying it
                torch._dynamo.mark_static_address(copy)
                # The ops' backwards (which add the table gradient to the buffers) must run even
                # when nothing else of the layer needs a gradient (e.g. a frozen layer): the copy
                # asks for one; the ops return None for it, so its .grad stays empty.
                copy.requires_grad_(p.requires_grad)
            setattr(self, name + "_compute", copy)
        self.refresh_compute_copy()

    def refresh_after_steps(self, optimizer: torch.optim.Optimizer):
        """Refresh the compute copy after every `optimizer.step()`; returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.refresh_compute_copy())

    def _versions(self) -> tuple[tuple[int, int | None], ...]:
        # the parameter's identity too: a replaced table (a new Parameter, functional_call) may
        # have the version count of the old one
        return tuple((id(p), version_counter(p)) for p in self.value_parameters())

    @torch.no_grad()
    def refresh_compute_copy(self) -> None:
        """Copy the tables into their compute copies (after each optimizer step, load, init)."""
        for name, p in (("values", self.values), ("pre_values", self.pre_values)):
            copy = getattr(self, name + "_compute")
            if copy is not None:
                copy.copy_(p)
        self._compute_versions = self._versions()

    def gather_tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, pre_values) for the layers' ops: the compute copies when in use, else the tables.
        Every layer's forward calls it first."""
        if self.values_grad is not None and not torch.compiler.is_compiling():
            self._eager_forward_checks()
        if self.values_compute is None:
            return self.values, self.pre_values
        if not torch.compiler.is_compiling() and self._versions() != self._compute_versions:
            raise RuntimeError(
                "ValueTables: the tables changed since the last refresh_compute_copy(); call it "
                "after every update of the tables (the trainer does after each optimizer step)"
            )
        return self.values_compute, self.pre_values_compute

    def note_layer_init(self, layer_index: int, std: float, generator: torch.Generator) -> None:
        """Record the σ_V memory layer `layer_index` wants; fill the tables when all have reported."""
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer_index={layer_index} must be in [0, num_layers={self.num_layers})")
        self._noted_std[layer_index] = float(std)
        if len(self._noted_std) == self.num_layers:
            sigma = (sum(s**4 for s in self._noted_std.values()) / self.num_layers) ** 0.25
            self.reset_parameters(generator, sigma)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, sigma: float) -> None:
        """values, then pre_values, ~ N(0, sigma²), drawn from `generator` in row order."""
        if not sigma > 0:
            raise ValueError(f"sigma={sigma} must be > 0")
        logger.info("value tables %s init with sigma=%.4g", tuple(self.values.shape), sigma)
        for p in self.value_parameters():
            fill_normal_rows(p, generator, sigma)
        self._noted_std.clear()
        self.refresh_compute_copy()

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, vdim={self.vdim}, pre_vdim={self.pre_vdim}"
