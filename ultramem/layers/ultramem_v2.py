"""UltraMemV2 (SPEC §3): Tucker-decomposed retrieval over a window of the shared value tables,
a PEER-style pre-value gate and multi-core weighted sum, then one output projection.

`TuckerMemoryBase` holds what UltraMemV2 and UltraMem v1 share (query, keys, cores, retrieval,
rank-1 refresh, auxiliary losses, metrics, calibration); the subclasses add the value side.

Layouts: `w_q` output is [heads, side (row, col), (rank when q_per_rank), kdim];
`keys` is [H, 2, n', kdim, r] (SPEC); `cores` is [H, M, r, r]; `perm` maps virtual ids
(i·n' + j, in [0, E²·n²)) to a logical value (mod n²) and, for v1, a group (div n²).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.ops import gate_lookup, tdqkr_retrieval, weighted_lookup

from ._common import (CALIBRATION_TOKENS, LayerStats, RMSNorm, full_tensor, key_balance_side, normal_from,
                      paper_value_std, rank1_refresh, rms_norm, tucker_rank_penalty, uniform_from,
                      validate_memory_config, window_keys)
from .tables import ValueTables

logger = logging.getLogger(__name__)

# Sub-key score rows are padded to a multiple of this many elements (128 bytes in bf16, the
# alignment Inductor pads strides to), so eager and compiled code agree on one aligned layout.
SCORE_ROW_ALIGN = 64

# "released" init constants of the authors' public code (SPEC §3).
RELEASED_NORM_EXPONENT = -0.4
RELEASED_TABLE_STD = 0.02


def _keys_contiguous(scores: Tensor) -> Tensor:
    """scores [T, H, n', r] itself when each (token, head)'s [n', r] block is contiguous (the
    retrieval reads such views in place), else a contiguous copy (the q_per_rank einsum hands
    back a rank-major layout)."""
    if scores.stride(-1) == 1 and scores.stride(-2) == scores.shape[-1]:
        return scores
    return scores.contiguous()


class TuckerMemoryBase(nn.Module):
    """Query, keys, Tucker cores and TDQKR retrieval over n' = E·n keys per side (SPEC §3 steps 1–5)."""

    released_norm_exponent = RELEASED_NORM_EXPONENT

    def __init__(self, cfg: ModelConfig, layer_index: int, num_layers: int, keys_per_side: int):
        super().__init__()
        validate_memory_config(cfg, num_layers)
        m = cfg.memory
        self.cfg = cfg
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.dim, self.heads, self.kdim = cfg.dim, m.heads, m.kdim
        self.rank, self.num_cores, self.knn = m.tucker_rank, m.tucker_cores, m.knn
        self.key_expand, self.q_per_rank = m.key_expand, m.q_per_rank
        self.n = keys_per_side
        self.n_side = m.key_expand * keys_per_side  # n'
        self.num_logical = keys_per_side * keys_per_side  # n²
        self.num_virtual = self.n_side * self.n_side  # E²·n²
        self.rank_penalty = m.rank_penalty
        self.rank_margin = m.tucker_rank_margin
        self.key_balance_coef = m.key_balance_coef
        self.dropout = m.dropout
        q_per_side = self.kdim * (self.rank if self.q_per_rank else 1)
        self.w_q = nn.Linear(self.dim, self.heads * 2 * q_per_side, bias=False)
        self.norm_q = RMSNorm(self.kdim, cfg.norm_eps)
        self.norm_k = RMSNorm(self.kdim, cfg.norm_eps)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_side, self.kdim, self.rank))
        self.cores = nn.Parameter(torch.empty(self.heads, self.num_cores, self.rank, self.rank))
        self.register_buffer("rank1_u", torch.zeros(self.heads, self.rank))
        self.register_buffer("rank1_v", torch.zeros(self.heads, self.rank))
        self.register_buffer("perm", torch.empty(self.num_virtual, dtype=torch.int64))
        self.stats = LayerStats(self.num_logical)
        # Score variance σ_s² measured by the last "paper" calibration (None before it ran).
        self.calibrated_score_var: float | None = None
        # σ_V this layer asked the value tables for at its last reset_parameters.
        self.value_init_std: float | None = None

    # -- retrieval ----------------------------------------------------------------------------

    def _subkey_scores(self, x2: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A, B [T, H, n'', r]: <q_side(ρ), norm_k(K[h, side, i, :, ρ])> (SPEC §3 steps 1–2) for
        i < n'; rows n' ≤ i < n'' (when n'' > n') are padding, see `_padded_keys`. q: W_q x2
        when the caller computed it already."""
        t = x2.shape[0]
        h, r, kd, ns = self.heads, self.rank, self.kdim, self.n_side
        q = self.w_q(x2) if q is None else q
        act = q.dtype
        # <norm_q(q), norm_k(k)> = <q̂ ⊙ w_q ⊙ w_k, k̂>: both scales go on the query side, so the
        # keys' backward is a per-key normalization only (with norm_k's scale on the keys,
        # Inductor fused its gradient, a sum over all 2·n'·r keys, into a 19 µs kernel at 227M)
        scale = self.norm_q.weight * self.norm_k.weight
        keys = rms_norm(self.keys.transpose(-1, -2), None, self.norm_k.eps).to(act)  # [H, 2, n', r, kdim]
        if self.q_per_rank:
            q = rms_norm(q.view(t, h, 2, r, kd), scale, self.norm_q.eps)
            a = torch.einsum("thrd,hird->thir", q[:, :, 0], keys[:, 0])
            b = torch.einsum("thrd,hird->thir", q[:, :, 1], keys[:, 1])
        else:
            q = rms_norm(q.view(t, h, 2, kd), scale, self.norm_q.eps)
            # keys folded to [H, n'·r, kdim]: one batched matmul per side
            ns_pad = self._padded_keys()
            folded = F.pad(keys.reshape(h, 2, ns * r, kd), (0, 0, 0, (ns_pad - ns) * r))
            a = torch.einsum("thd,hcd->thc", q[:, :, 0], folded[:, 0]).view(t, h, ns_pad, r)
            b = torch.einsum("thd,hcd->thc", q[:, :, 1], folded[:, 1]).view(t, h, ns_pad, r)
        return a, b

    def _padded_keys(self) -> int:
        """n'' ≥ n' keys per side with n''·r a multiple of SCORE_ROW_ALIGN. The sub-key GEMM writes
        rows of n''·r scores: at 227M n'·r = 2276 made cuBLAS fall back to 2-element-aligned GEMMs
        (~4× slower), and Inductor pads such rows itself, then copies them to the eager strides
        the custom ops expect. The retrieval reads the first n' keys (n_keys) and hands back a
        gradient of the padded shape, which the GEMM's backward reads in place."""
        step = SCORE_ROW_ALIGN // math.gcd(SCORE_ROW_ALIGN, self.rank)
        return -(-self.n_side // step) * step

    def _retrieve(self, x2: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """→ (A, B [T, H, n', r] (views without the padding), ids [T, H, k] int64,
        scores [T, H, k, M] sorted by descending Σ_m s_m)."""
        a, b = self._subkey_scores(x2, q)
        a, b = _keys_contiguous(a), _keys_contiguous(b)
        n_keys = self.n_side if a.shape[2] != self.n_side else -1
        ids, scores = tdqkr_retrieval(a, b, self.cores, self.rank1_u, self.rank1_v, self.knn, n_keys)
        return a[:, :, :self.n_side], b[:, :, :self.n_side], ids, scores

    def _aux_loss(self, x2: Tensor, a: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        """The enabled auxiliary losses times their coefficients (a constant 0 when none is on)."""
        aux = torch.zeros((), device=x2.device, dtype=torch.float32)
        if self.rank_penalty > 0:
            aux = aux + self.rank_penalty * tucker_rank_penalty(self.cores, self.rank_margin)
        if self.key_balance_coef > 0:
            acc = torch.promote_types(a.dtype, torch.float32)
            coarse_a = torch.einsum("thir,hr->thi", a.to(acc), self.rank1_u.to(acc))
            coarse_b = torch.einsum("thir,hr->thi", b.to(acc), self.rank1_v.to(acc))
            balance = (key_balance_side(coarse_a, torch.div(ids, self.n_side, rounding_mode="floor"))
                       + key_balance_side(coarse_b, ids % self.n_side))
            aux = aux + self.key_balance_coef * balance
        return aux

    def _logical_and_group(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        virtual = self.perm[ids]
        return virtual % self.num_logical, torch.div(virtual, self.num_logical, rounding_mode="floor")

    def _finish(self, x: Tensor, y2: Tensor, logical: Tensor, scores: Tensor) -> Tensor:
        y2 = F.dropout(y2, self.dropout, self.training)
        if self.training:
            # Σ_m s_m of the first and the k-th entry ([T, H, k, M], descending along k)
            self.stats.accumulate(logical, y2, scores[:, :, 0].sum(-1), scores[:, :, -1].sum(-1))
        return y2.reshape(x.shape[:-1] + (y2.shape[-1],))

    # -- rank-1 refresh, metrics ----------------------------------------------------------------

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """u, v ← first singular vectors of Σ_m C_m per head, with sign continuity (SPEC §3)."""
        u, v = rank1_refresh(full_tensor(self.cores), self.rank1_u, self.rank1_v)
        self.rank1_u.copy_(u)
        self.rank1_v.copy_(v)

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """SPEC §7 since the last call (reads buffers: a host sync), then resets the counters."""
        out = self.stats.report()
        sv = torch.linalg.svdvals(full_tensor(self.cores).detach().float().sum(1)).cpu()
        for h in range(sv.shape[0]):
            for i in range(sv.shape[1]):
                out[f"sv_h{h}_{i}"] = float(sv[h, i])
        return out

    # -- init ---------------------------------------------------------------------------------

    def _released_norm_scale(self) -> float:
        return self.kdim ** self.released_norm_exponent

    @torch.no_grad()
    def _reset_retrieval(self, generator: torch.Generator) -> None:
        """perm, cores ~ U(0, 1), W_q, keys, norm scales (before calibration), u/v, stats."""
        perm = torch.randperm(self.num_virtual, generator=generator, device=generator.device)
        self.perm.copy_(perm.to(self.perm.device))
        self.cores.copy_(uniform_from(generator, self.cores, 0.0, 1.0))
        if self.cfg.memory.init == "released":
            std = self.kdim ** -0.5
            scale = self._released_norm_scale()
        else:
            # keys pass through norm_k, so their scale is immaterial; use the linears' std
            std = self.cfg.std
            scale = 1.0
        self.w_q.weight.copy_(normal_from(generator, self.w_q.weight, std))
        self.keys.copy_(normal_from(generator, self.keys, std))
        self.norm_q.weight.fill_(scale)
        self.norm_k.weight.fill_(scale)
        self.rank1_u.zero_()
        self.rank1_v.zero_()
        self.refresh_rank1()
        self.stats.reset()
        self.calibrated_score_var = None

    @torch.no_grad()
    def calibrate(self, generator: torch.Generator, rounds: int) -> float:
        """Rescale norm_q/norm_k so the selected scores average 1; return their variance σ_s².

        "Selected scores" are all M per-core scores s_m of the kept entries: s_m is what
        multiplies a value chunk, so E[s_m²] = 1 + σ_s² is the factor the σ_V formula needs.
        A and B are each proportional to s_q·s_k (the two scales), so every score is ∝
        (s_q·s_k)²: dividing the mean by c takes s_q and s_k each times c^(-1/4). Selection is
        invariant to that positive rescaling; more rounds only average over fresh inputs."""
        weight = self.w_q.weight
        score_var = 0.0
        for _ in range(rounds):
            x = normal_from(generator, torch.empty(CALIBRATION_TOKENS, self.dim, device=weight.device,
                                                   dtype=weight.dtype), 1.0)
            scores = self._retrieve(x)[3].to(torch.float64)
            mean = float(scores.mean())
            if not mean > 0.0:
                logger.warning("memory layer %d: mean selected score %.3g is not positive; "
                               "norm-scale calibration skipped", self.layer_index, mean)
                break
            factor = mean ** -0.25
            self.norm_q.weight.mul_(factor)
            self.norm_k.weight.mul_(factor)
            score_var = float(scores.var()) / (mean * mean)
        self.calibrated_score_var = score_var
        return score_var


class UltraMemV2(TuckerMemoryBase):
    """One UltraMemV2 layer: y, aux = layer(u, tables) with u [..., d] and the shared ValueTables."""

    def __init__(self, cfg: ModelConfig, layer_index: int, num_layers: int):
        m = cfg.memory
        n = window_keys(m.knum, num_layers, m.share_ratio)
        super().__init__(cfg, layer_index, num_layers, n)
        self.num_rows = m.knum * m.knum * num_layers  # N
        self.offset = (layer_index * m.knum * m.knum) % self.num_rows  # o_l
        # o_l as a tensor for forward: an int attribute that differs per layer is a constant to
        # torch.compile, so each layer would recompile the shared forward (past the recompile
        # limit, layers ran uncompiled); as a buffer all layers share one graph. Not in the state
        # dict: refilled by init_buffers (reset_parameters, the model's init_buffers after
        # to_empty from the meta device) and after every load_state_dict.
        self.register_buffer("row_offset", torch.tensor(self.offset, dtype=torch.int64), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.init_buffers())
        self.vdim, self.pre_vdim, self.glu_act = m.vdim, m.pre_vdim, m.glu_act
        self.w_p = nn.Linear(self.dim, self.pre_vdim, bias=False) if self.pre_vdim > 0 else None
        self.w_o = nn.Linear(self.vdim, self.dim, bias=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Buffers derived from the config (not in the state dict): the row offset o_l."""
        self.row_offset.fill_(self.offset)

    def _check_tables(self, tables: ValueTables | None) -> ValueTables:
        if tables is None or tables.values.shape != (self.num_rows, self.vdim):
            got = None if tables is None else tuple(tables.values.shape)
            raise ValueError(f"UltraMemV2 layer {self.layer_index}: tables.values must have shape "
                             f"(N={self.num_rows}, vdim={self.vdim}), got {got}")
        if self.pre_vdim > 0 and (tables.pre_values is None
                                  or tables.pre_values.shape != (self.num_rows, self.pre_vdim)):
            got = None if tables.pre_values is None else tuple(tables.pre_values.shape)
            raise ValueError(f"UltraMemV2 layer {self.layer_index}: tables.pre_values must have shape "
                             f"(N={self.num_rows}, pre_vdim={self.pre_vdim}), got {got}")
        return tables

    def forward(self, x: Tensor, tables: ValueTables) -> tuple[Tensor, Tensor]:
        tables = self._check_tables(tables)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            got = x.shape[-1] if x.dim() else "none (0-d input)"
            raise ValueError(f"UltraMemV2 layer {self.layer_index}: input last dim {got} != model.dim {self.dim}")
        if x.numel() == 0:
            # no tokens: an empty output and a zero aux loss (its terms are averages over tokens);
            # W_o and x (both empty here) keep the output in the graph, so a backward runs as usual
            y = self.w_o(x.new_zeros(x.shape[:-1] + (self.w_o.in_features,))) + x
            return y, torch.zeros((), device=x.device, dtype=torch.float32)
        x2 = x.reshape(-1, self.dim)
        t = x2.shape[0]
        hk = self.heads * self.knn
        q, gate_in = self._project(x2)
        a, b, ids, scores = self._retrieve(x2, q)
        logical, _ = self._logical_and_group(ids)
        rows = ((logical + self.row_offset) % self.num_rows).reshape(t, hk)
        act = a.dtype
        values, pre_values = tables.gather_tables()
        lookup_scores = scores.to(act).reshape(t, hk, self.num_cores)
        if self.w_p is not None:
            # scores · act(<P[row], W_p x>) weight the V rows: one fused pass over both tables
            out, _ = gate_lookup(rows, values, pre_values, gate_in.to(act), lookup_scores, self.glu_act,
                                 tables.values_grad_id, tables.pre_values_grad_id)
        else:
            out = weighted_lookup(rows, values, lookup_scores, tables.values_grad_id)
        y2 = self.w_o(out)
        aux = self._aux_loss(x2, a, b, ids)
        return self._finish(x, y2, logical, scores), aux

    def _project(self, x2: Tensor) -> tuple[Tensor, Tensor | None]:
        """(W_q x2, W_p x2 or None) as one GEMM over the stacked weights: the backward then forms
        the input's gradient in one GEMM too, where two had to be summed (an addmm that first
        copied its addend: a [T, d] copy per layer), and the weights' gradients in one."""
        if self.w_p is None:
            return self.w_q(x2), None
        qp = F.linear(x2, torch.cat([self.w_q.weight, self.w_p.weight]))
        return qp.split([self.w_q.out_features, self.pre_vdim], dim=-1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, tables: ValueTables | None = None) -> None:
        """SPEC §3 init of this layer's parameters and buffers; tells `tables` the σ_V it wants.

        Draw order: perm, cores, W_q, keys, W_p, W_o, calibration inputs. The tables fill
        themselves once every layer has reported (see ValueTables.note_layer_init)."""
        self._reset_retrieval(generator)
        self.init_buffers()
        m = self.cfg.memory
        if m.init == "released":
            wp_std, wo_std = self.dim ** -0.5, self.vdim ** -0.5  # value_expand = 1 in v2
        else:
            wp_std = wo_std = self.cfg.std
        if self.w_p is not None:
            self.w_p.weight.copy_(normal_from(generator, self.w_p.weight, wp_std))
        self.w_o.weight.copy_(normal_from(generator, self.w_o.weight, wo_std))
        if m.init == "released":
            value_std = RELEASED_TABLE_STD
        else:
            score_var = self.calibrate(generator, m.calibration_rounds)
            value_std = paper_value_std(self.cfg, self.num_layers, score_var, gated=self.pre_vdim > 0,
                                        gelu=self.glu_act)
        self.value_init_std = value_std
        if tables is not None:
            tables.note_layer_init(self.layer_index, value_std, generator)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, n={self.n}, keys_per_side={self.n_side}, heads={self.heads}, "
                f"knn={self.knn}, rank={self.rank}, cores={self.num_cores}, rows={self.num_rows}, "
                f"offset={self.offset}, pre_vdim={self.pre_vdim}")
