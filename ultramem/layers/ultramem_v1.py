"""UltraMem v1 (docs/layers.md): UltraMemV2's retrieval over n = knum keys per side, a value table
owned by the layer (no sharing, no pre-values, no gate), and implicit value expansion: the
output has E² groups of vdim and an entry with virtual id t adds into group perm[t] div n².
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.ops import weighted_lookup

from ._common import check_input, fill_normal_rows, normal_from, paper_value_std
from .tucker import RELEASED_TABLE_STD, TuckerMemoryBase


class UltraMemV1(TuckerMemoryBase):
    """One UltraMem v1 layer (arXiv 2411.12364; docs/layers.md): `y, aux = layer(u, None)`.

    Args:
        cfg: the model config; `cfg.memory.knum` keys per side (n² = knum² values in the layer's
            own table), kdim, vdim, knn, heads, key_expand (implicit value expansion E²), ...
        layer_index: this layer's place among the memory layers (its init draws).
        num_layers: the number of memory layers (the paper init scales with it).

    Each v1 layer owns its value table (`values`); the `tables` argument is ignored."""

    released_norm_exponent = -0.33

    def __init__(self, cfg: ModelConfig, layer_index: int, num_layers: int):
        m = cfg.memory
        super().__init__(cfg, layer_index, num_layers, m.knum)
        self.vdim = m.vdim
        self.value_groups = m.key_expand**2  # value_expand = E²
        self.values = nn.Parameter(torch.empty(self.num_logical, self.vdim))
        self.w_o = nn.Linear(self.value_groups * self.vdim, self.dim, bias=False)

    def value_parameters(self) -> list[nn.Parameter]:
        """This layer's own value table (the trainer's value group)."""
        return [self.values]

    def forward(self, x: Tensor, tables=None) -> tuple[Tensor, Tensor]:
        check_input(self, x)
        if x.numel() == 0:
            # no tokens: an empty output and a zero aux loss (its terms are averages over tokens);
            # W_o and x (both empty here) keep the output in the graph, so a backward runs as usual
            y = self.w_o(x.new_zeros(x.shape[:-1] + (self.w_o.in_features,))) + x
            return y, torch.zeros((), device=x.device, dtype=torch.float32)
        x2 = x.reshape(-1, self.dim)
        t = x2.shape[0]
        hk = self.heads * self.knn
        a, b, ids, scores = self._retrieve(x2)
        logical, group = self._logical_and_group(ids)
        rows = logical.reshape(t, hk)
        lookup_scores = scores.to(a.dtype).reshape(t, hk, self.num_cores)
        if self.value_groups == 1:
            out = weighted_lookup(rows, self.values, lookup_scores)
        else:
            group = group.reshape(t, hk, 1)
            out = torch.cat(
                [
                    weighted_lookup(rows, self.values, lookup_scores * (group == g).to(lookup_scores.dtype))
                    for g in range(self.value_groups)
                ],
                dim=-1,
            )
        y2 = self.w_o(out)
        aux = self._aux_loss(x2, a, b, ids)
        return self._finish(x, y2, logical, scores), aux

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, tables=None) -> None:
        """Like UltraMemV2's with v1's norm scales (docs/layers.md) and its own table.

        Draw order: perm, cores, W_q, keys, W_o, calibration inputs ("paper"), values. The "paper"
        σ_V is the no-gate form of the formula (see paper_value_std); the E² groups split the
        same k·H entries, so the output variance does not depend on E."""
        self._reset_retrieval(generator)
        m = self.cfg.memory
        wo_std = (self.vdim * self.value_groups) ** -0.5 if m.init == "released" else self.cfg.std
        self.w_o.weight.copy_(normal_from(generator, self.w_o.weight, wo_std))
        if m.init == "released":
            value_std = RELEASED_TABLE_STD
        else:
            score_var = self.calibrate(generator, m.calibration_rounds)
            value_std = paper_value_std(self.cfg, self.num_layers, score_var, gated=False)
        self.value_init_std = value_std
        fill_normal_rows(self.values, generator, value_std)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_index}, n={self.n}, keys_per_side={self.n_side}, heads={self.heads}, "
            f"knn={self.knn}, rank={self.rank}, cores={self.num_cores}, value_groups={self.value_groups}"
        )
