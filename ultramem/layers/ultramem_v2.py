"""UltraMemV2 (docs/layers.md; arXiv 2508.18756): the Tucker retrieval over a window of the
shared value tables, a PEER-style pre-value gate and a multi-core weighted sum, then one output
projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.ops import gate_lookup, gate_lookup_into, tdqkr_retrieval_rows, weighted_lookup, weighted_lookup_into

from ._common import check_input, normal_from, paper_value_std, window_keys
from .tables import ValueTables
from .tucker import RELEASED_TABLE_STD, TuckerMemoryBase


def retrieval_writes_rows(x: Tensor) -> bool:
    """Whether a forward without autograd hands the row arithmetic and the queries' normalization
    to `tdqkr_retrieval_rows`: on CUDA, where its one launch does them; on the CPU its reference
    kernel would run them as eager ops that Inductor otherwise fuses into the compiled graph."""
    return x.is_cuda


def _refill_buffers(module: nn.Module, _keys) -> None:
    """After load_state_dict (module-level, so that the layer pickles)."""
    module.init_buffers()


class UltraMemV2(TuckerMemoryBase):
    """One UltraMemV2 layer (arXiv 2508.18756; docs/layers.md): `y, aux = layer(u, tables)`.

    Args:
        cfg: the model config; `cfg.dim` and `cfg.memory` (knum, kdim, vdim, pre_vdim, knn,
            heads, share_ratio, tucker_rank, tucker_cores, key_expand, glu_act, init, ...).
        layer_index: this layer's place l among the memory layers; its window of the shared
            tables starts at row l·knum².
        num_layers: L, the number of memory layers sharing the tables (N = knum²·L rows).

    Call with `u` [..., d] (the block's FFN input) and the model's `ValueTables`; returns the
    output [..., d] to add to the residual and the auxiliary loss (a scalar, 0 by default).
    Call `reset_parameters(generator, tables)` after building and `refresh_rank1()` after every
    optimizer step."""

    def __init__(self, cfg: ModelConfig, layer_index: int, num_layers: int):
        m = cfg.memory
        n = window_keys(m.knum, num_layers, m.share_ratio)
        super().__init__(cfg, layer_index, num_layers, n)
        self.num_rows = m.knum * m.knum * num_layers  # N
        self.offset = (layer_index * m.knum * m.knum) % self.num_rows  # o_l
        # (o_l, N) as a tensor for forward: an int attribute that differs per layer is a constant
        # to torch.compile, so each layer would recompile the shared forward (past the recompile
        # limit, layers ran uncompiled); as a buffer all layers share one graph. Two values, not
        # o_l alone, and [1, 2], not [2]: see tdqkr_retrieval_rows. Not in the state dict:
        # refilled by init_buffers (reset_parameters, the model's init_buffers after to_empty from
        # the meta device) and after every load_state_dict.
        self.register_buffer("row_window", torch.tensor([[self.offset, self.num_rows]]), persistent=False)
        self.register_load_state_dict_post_hook(_refill_buffers)
        self.vdim, self.pre_vdim, self.glu_act = m.vdim, m.pre_vdim, m.glu_act
        self.w_p = nn.Linear(self.dim, self.pre_vdim, bias=False) if self.pre_vdim > 0 else None
        self.w_o = nn.Linear(self.vdim, self.dim, bias=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Buffers derived from the config (not in the state dict): the row window (o_l, N)."""
        self.row_window.copy_(torch.tensor([[self.offset, self.num_rows]]))

    def _check_tables(self, tables: ValueTables | None) -> ValueTables:
        if tables is None or tables.values.shape != (self.num_rows, self.vdim):
            got = None if tables is None else tuple(tables.values.shape)
            raise ValueError(
                f"UltraMemV2 layer {self.layer_index}: tables.values must have shape "
                f"(N={self.num_rows}, vdim={self.vdim}), got {got}"
            )
        if self.pre_vdim > 0 and (
            tables.pre_values is None or tables.pre_values.shape != (self.num_rows, self.pre_vdim)
        ):
            got = None if tables.pre_values is None else tuple(tables.pre_values.shape)
            raise ValueError(
                f"UltraMemV2 layer {self.layer_index}: tables.pre_values must have shape "
                f"(N={self.num_rows}, pre_vdim={self.pre_vdim}), got {got}"
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
        t = x2.shape[0]
        hk = self.heads * self.knn
        # no gradient, statistic or key balance needs the ids: the retrieval can write the rows
        writes_rows = not (torch.is_grad_enabled() or self.training or self.key_balance_coef > 0)
        writes_rows = writes_rows and retrieval_writes_rows(x2)
        q, gate_in, raw_scores = self._project(x2, fold=writes_rows)
        if not writes_rows:
            a, b, ids, scores = self._retrieve(x2, q)
            logical, _ = self._logical_and_group(ids)
            rows = ((logical + self.row_window[0, 0]) % self.num_rows).reshape(t, hk)
        else:
            # the retrieval writes the rows itself and, from the raw queries, applies their
            # normalization to the kept scores
            if self.q_per_rank:
                (ab, n_keys), q_raw = self._retrieval_inputs(x2, q), None
            else:
                ab, n_keys, q_raw = self._raw_query_inputs(q, raw_scores)
            rows, scores = tdqkr_retrieval_rows(
                ab,
                self.cores,
                self.rank1_u,
                self.rank1_v,
                self.knn,
                n_keys,
                self.perm,
                self.num_logical,
                self.row_window,
                q_raw,
                self.norm_q.eps,
            )
            rows = rows.reshape(t, hk)
            a = b = ids = logical = None
        act = scores.dtype  # A's dtype
        values, pre_values = tables.gather_tables()
        lookup_scores = scores.to(act).reshape(t, hk, self.num_cores)
        into = tables.grad_targets()
        if self.w_p is not None and into is not None:
            # scores · act(<P[row], W_p x>) weight the V rows: one fused pass over both tables, whose
            # gradients go into the tables' buffers (or staging area) handed over as tensors
            out, _ = gate_lookup_into(rows, values, pre_values, gate_in.to(act), lookup_scores, self.glu_act, *into)
        elif self.w_p is not None:
            buffer_ids = tables.grad_ids()
            out, _ = gate_lookup(rows, values, pre_values, gate_in.to(act), lookup_scores, self.glu_act, *buffer_ids)
        elif into is not None:
            out = weighted_lookup_into(rows, values, lookup_scores, *into)
        else:
            out = weighted_lookup(rows, values, lookup_scores, tables.grad_ids()[0])
        y2 = self.w_o(out)
        aux = self._aux_loss(x2, a, b, ids)
        return self._finish(x, y2, logical, scores), aux

    def _project(self, x2: Tensor, fold: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(W_q x2, W_p x2 or None, None) as one GEMM over the stacked weights: the backward then
        forms the input's gradient in one GEMM too, where two had to be summed (an addmm that
        first copied its addend: a [T, d] copy per layer), and the weights' gradients in one.
        With fold, inside a decode cache, the third is the raw queries' sub-key scores
        [T, H·2·n''·r] from the same GEMM (`_folded_weight`)."""
        cache = self._cached_terms()
        if fold and cache is not None and "folded_weight" in cache:
            weight = cache["folded_weight"]
            sizes = [self.w_q.out_features, self.pre_vdim]  # pre_vdim 0 without W_p
            q, gate_in, raw_scores = F.linear(x2, weight).split([*sizes, weight.shape[0] - sum(sizes)], dim=-1)
            return q, gate_in if self.w_p is not None else None, raw_scores
        if self.w_p is None:
            return self.w_q(x2), None, None
        qp = F.linear(x2, self._qp_weight() if cache is None else cache["qp_weight"])
        return *qp.split([self.w_q.out_features, self.pre_vdim], dim=-1), None

    def _qp_weight(self) -> Tensor:
        return torch.cat([self.w_q.weight, self.w_p.weight])

    def _folded_weight(self) -> Tensor:
        """[W_q; W_p; W_s], W_s [H·2·n''·r, d] = per head and side the scaled scoring keys times
        that side's rows of W_q, so x·W_sᵀ = <W_q x, w ⊙ k̂>, the raw queries' sub-key scores:
        formed in fp32 (or the weights' wider dtype), rounded once to the weights' dtype."""
        acc = torch.promote_types(self.w_q.weight.dtype, torch.float32)
        keys = self._scaled_scoring_keys(acc)  # [H, 2, n''·r, kdim]
        w_q = self.w_q.weight.to(acc).view(self.heads, 2, self.kdim, self.dim)
        w_s = torch.einsum("hscd,hsdm->hscm", keys, w_q).reshape(-1, self.dim)
        pre = [] if self.w_p is None else [self.w_p.weight]
        return torch.cat([self.w_q.weight, *pre, w_s.to(self.w_q.weight.dtype)])

    def _weight_terms(self, decode: bool = False) -> dict[str, Tensor]:
        terms = super()._weight_terms(decode)
        if self.w_p is not None:
            terms["qp_weight"] = self._qp_weight()
        if decode and not self.q_per_rank and retrieval_writes_rows(self.w_q.weight):
            terms["folded_weight"] = self._folded_weight()
        return terms

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, tables: ValueTables | None = None) -> None:
        """UltraMemV2 init (docs/layers.md) of this layer's parameters and buffers; tells `tables` the σ_V it wants.

        Draw order: perm, cores, W_q, keys, W_p, W_o, calibration inputs. The tables fill
        themselves once every layer has reported (see ValueTables.note_layer_init)."""
        self._reset_retrieval(generator)
        self.init_buffers()
        m = self.cfg.memory
        if m.init == "released":
            wp_std, wo_std = self.dim**-0.5, self.vdim**-0.5  # value_expand = 1 in v2
        else:
            wp_std = wo_std = self.cfg.std
        if self.w_p is not None:
            self.w_p.weight.copy_(normal_from(generator, self.w_p.weight, wp_std))
        self.w_o.weight.copy_(normal_from(generator, self.w_o.weight, wo_std))
        if m.init == "released":
            value_std = RELEASED_TABLE_STD
        else:
            score_var = self.calibrate(generator, m.calibration_rounds)
            value_std = paper_value_std(
                self.cfg, self.num_layers, score_var, gated=self.pre_vdim > 0, gelu=self.glu_act
            )
        self.value_init_std = value_std
        if tables is not None:
            tables.note_layer_init(self.layer_index, value_std, generator)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_index}, n={self.n}, keys_per_side={self.n_side}, heads={self.heads}, "
            f"knn={self.knn}, rank={self.rank}, cores={self.num_cores}, rows={self.num_rows}, "
            f"offset={self.offset}, pre_vdim={self.pre_vdim}"
        )
