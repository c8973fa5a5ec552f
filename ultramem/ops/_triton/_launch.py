"""One way to launch a Triton kernel from an op's CUDA path, eager or traced.

An op whose body is a `torch.library.triton_op` launches its kernels through `launch`. While
torch.compile traces the body (its tensors are fake or functional, not plain tensors), the
launch goes through `wrap_triton`: Inductor then emits the launch in its own generated code, with
no Python dispatch, argument checks or Triton launcher per call at run time. On plain tensors
(eager calls, the opaque ops' CUDA kernels, TRITON_INTERPRET=1 runs) the kernel is launched
directly, as Triton does.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.library import wrap_triton

from .._trace_state import record

# Whether the triton_ops launch inline when traced on CUDA (Inductor emits the launches: no per-call
# host work) or call their opaque twins (the launcher's own calls). On unless
# ULTRAMEM_INLINE_TRITON=0: inline launches lose the kernels' register caps (maxnreg), yet took less
# GPU time as well as less host time on an H200 (perf/NOTES.md, "The host path without CUDA
# graphs"). Read when an op is traced: change it with `ultramem.ops.set_inline_triton` before
# torch.compile runs, which also tags the compile caches' keys (`ultramem/ops/_trace_state.py`).
INLINE_TRITON = os.environ.get("ULTRAMEM_INLINE_TRITON", "1") not in ("", "0")
record("opaque", not INLINE_TRITON)


def set_inline_triton(enabled: bool) -> None:
    """Whether compiled CUDA calls of the triton_ops launch their kernels inline (Inductor emits the
    launches; the default) or call the opaque ops. Takes effect for graphs compiled afterwards."""
    global INLINE_TRITON
    INLINE_TRITON = bool(enabled)
    record("opaque", not INLINE_TRITON)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b). triton.cdiv and triton.next_power_of_2 are constexpr functions whose host
    calls cost microseconds each, several per launch."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0), as triton.next_power_of_2."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def inline_on(x: torch.Tensor) -> bool:
    """Whether an op with input x runs its CUDA launcher inside the triton_op body: when traced,
    if INLINE_TRITON; eagerly, always (the twin would run the same launcher one dispatch later)."""
    return x.device.type == "cuda" and (INLINE_TRITON or not traced(x))


def _first_tensor(args) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def traced(*tensors: torch.Tensor) -> bool:
    """Whether these are a trace's tensors (a trace hands an op's body fake or functional
    tensors only) rather than real ones."""
    return any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors)


def launch(kernel, grid, *args, maxnreg: int | None = None, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), traceable inside a triton_op.

    maxnreg (a register cap per thread) applies to direct launches only: Inductor's launcher of a
    user kernel drops it (its configs keep warps and stages), so a compiled launch runs with
    ptxas's own register choice."""
    first = _first_tensor(args)
    if first is not None and traced(first):
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    if maxnreg is not None:
        kwargs["maxnreg"] = maxnreg
    ctx = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
    with ctx:
        kernel[grid](*args, **kwargs)
