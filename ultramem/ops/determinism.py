"""Deterministic mode for the table gradients of the gather ops.

The fast CUDA backwards of `weighted_lookup` and `pre_value_gate` scatter into the table
gradient with fp32 atomics, so the order of the additions (and the last bits of the result)
changes from run to run. In deterministic mode they sort the entries by row instead and sum
each row's contributions in a fixed order with one writer per row: bit-identical results on
the same inputs, at the cost of a sort (see perf/NOTES.md for the numbers).

The mode is on when `set_deterministic(True)` was called, when the environment variable
ULTRAMEM_DETERMINISTIC is set to a non-zero value, or when PyTorch's own
`torch.use_deterministic_algorithms(True)` is in force. CPU kernels are always deterministic.
"""

from __future__ import annotations

import os

import torch

from ._trace_state import record

_deterministic = os.environ.get("ULTRAMEM_DETERMINISTIC", "0") not in ("", "0")
record("deterministic", _deterministic)


def set_deterministic(enabled: bool) -> None:
    """Make the CUDA table gradients bit-reproducible (sorted, one writer per row)."""
    global _deterministic
    _deterministic = bool(enabled)
    record("deterministic", _deterministic)


def deterministic_enabled() -> bool:
    return _deterministic or torch.are_deterministic_algorithms_enabled()
