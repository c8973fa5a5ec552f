"""One way to launch a Triton kernel from an op's CUDA path, eager or traced.

The ops are `torch.library.triton_op`s: when torch.compile traces one, its Triton launches go
through `wrap_triton`, so Inductor sees them and emits each launch in its own generated code: at
run time there is no Python dispatch, no argument check and no Triton launcher per call. On real
tensors the launch is Triton's own, as before.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton


def _traced(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            # the first tensor decides: a trace hands the op fake (or functional) tensors only
            return type(a) is not torch.Tensor and is_fake(a)
    return False


def launch(kernel, grid, *args, maxnreg: int | None = None, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), traceable inside a triton_op.

    maxnreg (a register cap per thread) applies to direct launches only: Inductor's launcher of a
    user kernel does not take it, so a compiled launch runs with ptxas's own register choice."""
    if _traced(args):
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    if maxnreg is not None:
        kwargs["maxnreg"] = maxnreg
    kernel[grid](*args, **kwargs)
