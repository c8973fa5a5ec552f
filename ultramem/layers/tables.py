"""The value tables shared by all memory layers of a model (SPEC §2).

UltraMemV2: `values` [N, vdim] and `pre_values` [N, pre_vdim] (None when pre_vdim = 0), with
N = knum²·L. Memory+: one `values` table [knum², vdim]. They are ordinary parameters, one copy.

Initialization. The "paper" σ_V depends on each layer's calibrated score variance, which is
only known after that layer's `reset_parameters`. So each layer reports the σ it wants through
`note_layer_init(layer_index, std, generator)`; once all `num_layers` layers have reported, the
tables fill themselves from that generator with σ = (mean_l σ_l⁴)^(1/4) (the output variance of
a gated layer is ∝ σ_V⁴, so this matches the layers' average target) and forget the reports.
Calling `reset_parameters(generator, sigma)` directly does the same with an explicit σ.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ._common import fill_normal_rows

logger = logging.getLogger(__name__)


class ValueTables(nn.Module):
    def __init__(self, num_rows: int, vdim: int, pre_vdim: int = 0, num_layers: int = 1):
        super().__init__()
        self.num_rows, self.vdim, self.pre_vdim, self.num_layers = num_rows, vdim, pre_vdim, num_layers
        self.values = nn.Parameter(torch.empty(num_rows, vdim))
        self.pre_values = nn.Parameter(torch.empty(num_rows, pre_vdim)) if pre_vdim > 0 else None
        self._noted_std: dict[int, float] = {}

    def value_parameters(self) -> list[nn.Parameter]:
        """The table parameters (the trainer's value group)."""
        return [p for p in (self.values, self.pre_values) if p is not None]

    def note_layer_init(self, layer_index: int, std: float, generator: torch.Generator) -> None:
        """Record the σ_V memory layer `layer_index` wants; fill the tables when all have reported."""
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer_index={layer_index} must be in [0, num_layers={self.num_layers})")
        self._noted_std[layer_index] = float(std)
        if len(self._noted_std) == self.num_layers:
            sigma = (sum(s ** 4 for s in self._noted_std.values()) / self.num_layers) ** 0.25
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

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, vdim={self.vdim}, pre_vdim={self.pre_vdim}"
