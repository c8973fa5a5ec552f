"""Memory+ (docs/layers.md): a product-key memory with a SiLU gate over one table shared by all layers.

Per head: q = W_q x split into (q_row, q_col), each normalized by norm_q; a[i] = <q_row,
norm_k(K[h,0,i])>, b[j] likewise; the top-k rows and columns give a k×k grid a[i] + b[j]; the
best k pairs (id = i·knum + j) are weighted by the softmax of their k scores. All H·k entries
of a token sum into one vector of vdim: y = W_o((Σ w·V[id]) ⊙ SiLU(W_s x)).
The norm is applied to the keys (two public implementations drop it by mistake).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.ops import weighted_lookup, weighted_lookup_into

from ._common import (
    LayerStats,
    RMSNorm,
    WeightTerms,
    check_input,
    key_balance_side,
    normal_from,
    uniform_from,
    validate_memory_config,
)
from .tables import ValueTables


class MemoryPlus(WeightTerms, nn.Module):
    """One Memory+ layer, product keys with a SiLU gate (docs/layers.md): `y, aux = layer(u, tables)`.

    Args:
        cfg: the model config; `cfg.memory` knum (keys per side: knum² rows in the one shared
            table), kdim, vdim, knn, heads.
        layer_index: this layer's place among the memory layers.
        num_layers: the number of memory layers sharing the table.

    Call with `u` [..., d] and the model's `ValueTables` ([knum², vdim]); returns the output
    [..., d] and the auxiliary loss."""

    def __init__(self, cfg: ModelConfig, layer_index: int, num_layers: int):
        super().__init__()
        validate_memory_config(cfg, num_layers)
        m = cfg.memory
        self.cfg = cfg
        self.layer_index, self.num_layers = layer_index, num_layers
        self.dim, self.heads, self.kdim, self.knum, self.knn, self.vdim = (
            cfg.dim,
            m.heads,
            m.kdim,
            m.knum,
            m.knn,
            m.vdim,
        )
        self.num_values = m.knum * m.knum
        self.key_balance_coef = m.key_balance_coef
        self.dropout = m.dropout
        self.w_q = nn.Linear(self.dim, self.heads * 2 * self.kdim, bias=False)
        self.norm_q = RMSNorm(self.kdim, cfg.norm_eps)
        self.norm_k = RMSNorm(self.kdim, cfg.norm_eps)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.knum, self.kdim))
        self.w_s = nn.Linear(self.dim, self.vdim, bias=False)
        self.w_o = nn.Linear(self.vdim, self.dim, bias=False)
        self.stats = LayerStats(self.num_values)
        self.value_init_std: float | None = None

    def _check_tables(self, tables: ValueTables | None) -> ValueTables:
        if tables is None or tables.values.shape != (self.num_values, self.vdim):
            got = None if tables is None else tuple(tables.values.shape)
            raise ValueError(
                f"MemoryPlus layer {self.layer_index}: tables.values must have shape "
                f"(knum²={self.num_values}, vdim={self.vdim}), got {got}"
            )
        return tables

    def forward(self, x: Tensor, tables: ValueTables) -> tuple[Tensor, Tensor]:
        tables = self._check_tables(tables)
        check_input(self, x)
        if x.numel() == 0:
            # no tokens: an empty output and a zero aux loss (its terms are averages over tokens);
            # W_o and x (both empty here) keep the output in the graph, so a backward runs as usual
            y = self.w_o(x.new_zeros(x.shape[:-1] + (self.w_o.in_features,))) + x
            return y, torch.zeros((), device=x.device, dtype=torch.float32)
        x2 = x.reshape(-1, self.dim)
        t, h, k = x2.shape[0], self.heads, self.knn
        q = self.w_q(x2)
        act = q.dtype
        q = self.norm_q(q.view(t, h, 2, self.kdim))
        cache = self._cached_terms()
        keys = (self.norm_k(self.keys) if cache is None else cache["keys"]).to(act)  # [H, 2, knum, kdim]
        a = torch.einsum("thd,hnd->thn", q[:, :, 0], keys[:, 0])
        b = torch.einsum("thd,hnd->thn", q[:, :, 1], keys[:, 1])
        top_a, idx_a = a.topk(k, dim=-1)
        top_b, idx_b = b.topk(k, dim=-1)
        grid = (top_a.unsqueeze(-1) + top_b.unsqueeze(-2)).reshape(t, h, k * k)
        scores, best = grid.topk(k, dim=-1)  # [T, H, k], descending
        row = idx_a.gather(-1, torch.div(best, k, rounding_mode="floor"))
        col = idx_b.gather(-1, best % k)
        ids = row * self.knum + col
        weights = torch.softmax(scores.to(torch.promote_types(act, torch.float32)), dim=-1).to(act)
        lookup = ids.reshape(t, h * k), tables.gather_tables()[0], weights.reshape(t, h * k, 1)
        into = tables.grad_targets()  # the gradient buffer as a tensor, or by id
        out = (
            weighted_lookup_into(*lookup, *into) if into is not None else weighted_lookup(*lookup, tables.grad_ids()[0])
        )
        y2 = self.w_o(out * F.silu(self.w_s(x2)))
        aux = torch.zeros((), device=x2.device, dtype=torch.float32)
        if self.key_balance_coef > 0:
            aux = aux + self.key_balance_coef * (key_balance_side(a, row) + key_balance_side(b, col))
        y2 = F.dropout(y2, self.dropout, self.training)
        if self.training:
            self.stats.accumulate(ids, y2, scores.unsqueeze(-1))  # [T, H, k, 1], descending
        return y2.reshape(x.shape[:-1] + (self.dim,)), aux

    def _weight_terms(self, decode: bool = False) -> dict[str, Tensor]:
        return {"keys": self.norm_k(self.keys)}

    @property
    def has_aux_loss(self) -> bool:
        """Whether forward's aux loss can be other than a constant 0 (key balance is on)."""
        return self.key_balance_coef > 0

    def refresh_rank1(self) -> None:
        """No Tucker cores: nothing to refresh."""

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """The metrics (docs/layers.md) since the last call (a host sync), then resets the counters
        (no cores: no sv_*)."""
        return self.stats.report()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, tables: ValueTables | None = None) -> None:
        """Memory+ init (docs/layers.md), for either `init` scheme. Draw order: W_q, keys, W_s, W_o.

        W_q Xavier-uniform; K ~ U(±(2·kdim)^-1/2); norm scales 1; std is read per fan-in:
        W_s (d → vdim) N(0, d^-1/2), W_o (vdim → d) and the table V N(0, vdim^-1/2) (written with d
        in the usual statement, where the table width vdim is meant)."""
        fan_out, fan_in = self.w_q.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        self.w_q.weight.copy_(uniform_from(generator, self.w_q.weight, -bound, bound))
        key_bound = (2 * self.kdim) ** -0.5
        self.keys.copy_(uniform_from(generator, self.keys, -key_bound, key_bound))
        self.norm_q.weight.fill_(1.0)
        self.norm_k.weight.fill_(1.0)
        self.w_s.weight.copy_(normal_from(generator, self.w_s.weight, self.dim**-0.5))
        self.w_o.weight.copy_(normal_from(generator, self.w_o.weight, self.vdim**-0.5))
        self.stats.reset()
        self.value_init_std = self.vdim**-0.5
        if tables is not None:
            tables.note_layer_init(self.layer_index, self.value_init_std, generator)

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, knum={self.knum}, heads={self.heads}, knn={self.knn}, vdim={self.vdim}"
