"""The row gather of the PyTorch kernels, shared by `weighted_lookup` and the staged backwards'
CPU path (a leaf module: `staged_grad` cannot import the op module, which imports it)."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_chunks(rows: Tensor, table: Tensor, cores: int, dtype: torch.dtype) -> Tensor:
    """table[rows] as [T, E, M, D/M] in `dtype` (explicit sizes: T or E may be 0)."""
    t, e = rows.shape
    return table.index_select(0, rows.reshape(-1).long()).to(dtype).view(t, e, cores, table.shape[1] // cores)
