"""Argument checks shared by the ops: each error names the argument and the rule it broke."""
from __future__ import annotations

import os

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Range checks on indices read the data, which costs a host sync on CUDA; they always run
# on CPU and run on CUDA only in debug mode (ULTRAMEM_DEBUG=1 or set_debug(True)).
_debug = os.environ.get("ULTRAMEM_DEBUG", "0") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Turn on the index range checks on every device (they cost a host sync on CUDA)."""
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    return _debug


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"ultramem::{op}: {msg}")


def check_dim(t: torch.Tensor, ndim: int, op: str, name: str, layout: str) -> None:
    check(t.dim() == ndim, op, f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_index(t: torch.Tensor, op: str, name: str) -> None:
    check(t.dtype in INDEX_DTYPES, op, f"{name} must be int32 or int64, got {t.dtype}")


def check_float(t: torch.Tensor, op: str, name: str) -> None:
    check(t.dtype in FLOAT_DTYPES, op, f"{name} must be a floating tensor (bf16/fp16/fp32/fp64), got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) == 1, op, f"all tensors must be on one device, got {devices}")


def check_index_range(idx: torch.Tensor, upper: int, op: str, name: str) -> None:
    """Raise if any index lies outside [0, upper). Skipped for fake/meta tensors."""
    if idx.numel() == 0 or idx.device.type == "meta":
        return
    if idx.device.type != "cpu" and not _debug:
        return
    lo, hi = int(idx.min()), int(idx.max())
    check(lo >= 0 and hi < upper, op, f"{name} has values in [{lo}, {hi}], outside the valid range [0, {upper})")


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64 (the test oracle), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
