"""The retrieval UltraMemV2 and UltraMem v1 share: query, keys, Tucker cores and the
Tucker-decomposed query-key retrieval over n' = E·n keys per side (docs/layers.md, UltraMem
arXiv 2411.12364), with the rank-1 refresh, auxiliary losses, metrics and norm calibration.
The subclasses add the value side.

Layouts: `w_q` output is [heads, side (row, col), (rank when q_per_rank), kdim];
`keys` is [H, 2, n', kdim, r]; `cores` is [H, M, r, r]; `perm` maps virtual ids
(i·n' + j, in [0, E²·n²)) to a logical value (mod n²) and, for v1, a group (div n²).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.ops import normed_keys, tdqkr_retrieval_stacked

from ._common import (
    CALIBRATION_TOKENS,
    LayerStats,
    RMSNorm,
    WeightTerms,
    full_tensor,
    key_balance_side,
    normal_from,
    rank1_refresh,
    rms_norm,
    tucker_rank_penalty,
    uniform_from,
    validate_memory_config,
)

logger = logging.getLogger(__name__)

# Sub-key score rows are padded to a multiple of this many elements (128 bytes in bf16, the
# alignment Inductor pads strides to), so eager and compiled code agree on one aligned layout.
SCORE_ROW_ALIGN = 64

# "released" init constants of the authors' public code (docs/layers.md).
RELEASED_NORM_EXPONENT = -0.4
RELEASED_TABLE_STD = 0.02


def _keys_contiguous(scores: Tensor) -> Tensor:
    """scores [T, H, 2, n', r] itself when each (token, head, side)'s [n', r] block is contiguous
    (the retrieval reads such views in place), else a contiguous copy (the q_per_rank einsum hands
    back a rank-major layout)."""
    if scores.stride(-1) == 1 and scores.stride(-2) == scores.shape[-1]:
        return scores
    return scores.contiguous()


class TuckerMemoryBase(WeightTerms, nn.Module):
    """Query, keys, Tucker cores and TDQKR retrieval over n' = E·n keys per side (docs/layers.md,
    UltraMemV2 steps 1–5)."""

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

    def _subkey_scores(self, x2: Tensor, q: Tensor | None = None) -> Tensor:
        """[T, H, 2, n'', r]: A and B stacked, <q_side(ρ), norm_k(K[h, side, i, :, ρ])> (docs/layers.md,
        UltraMemV2 steps 1–2) for i < n'; rows n' ≤ i < n'' (when n'' > n') are padding, see
        `_padded_keys`. Both sides are one batched GEMM each way (the stacked retrieval takes its
        output and hands back one gradient). q: W_q x2 when the caller computed it already."""
        t = x2.shape[0]
        h, r, kd = self.heads, self.rank, self.kdim
        q = self.w_q(x2) if q is None else q
        act = q.dtype
        cache = self._cached_terms()
        scale = self._q_scale() if cache is None else cache["q_scale"]
        keys = self._scoring_keys(act) if cache is None else cache["keys"].to(act)
        if self.q_per_rank:  # keys [H, 2, n', r, kdim]
            q = rms_norm(q.view(t, h, 2, r, kd), scale, self.norm_q.eps)
            return torch.einsum("thsrd,hsird->thsir", q, keys)
        return self._shared_query_scores(rms_norm(q.view(t, h, 2, kd), scale, self.norm_q.eps), keys)

    def _shared_query_scores(self, q: Tensor, keys: Tensor) -> Tensor:
        """One query per side, q [T, H, 2, kdim] against keys [H, 2, n''·r, kdim] → [T, H, 2, n'', r]."""
        t, h, r = q.shape[0], self.heads, self.rank
        return torch.einsum("thsd,hscd->thsc", q, keys).view(t, h, 2, keys.shape[2] // r, r)

    def _q_scale(self) -> Tensor:
        # <norm_q(q), norm_k(k)> = <q̂ ⊙ w_q ⊙ w_k, k̂>: both scales go on the query side, so the
        # keys' backward is a per-key normalization only (with norm_k's scale on the keys,
        # Inductor fused its gradient, a sum over all 2·n'·r keys, into a 19 µs kernel at 227M)
        return self.norm_q.weight * self.norm_k.weight

    def _scoring_keys(self, act: torch.dtype | None = None) -> Tensor:
        """The normalized keys as the sub-key GEMMs read them, in `act` (None: the keys' dtype):
        [H, 2, n', r, kdim] (q_per_rank), else folded to [H, 2, n''·r, kdim], zero past n'·r."""
        n_pad = self.n_side if self.q_per_rank else self._padded_keys()
        keys = normed_keys(self.keys, self.norm_k.eps, n_pad, self.keys.dtype if act is None else act)
        return keys if self.q_per_rank else keys.view(self.heads, 2, n_pad * self.rank, self.kdim)

    def _scaled_scoring_keys(self, act: torch.dtype | None = None) -> Tensor:
        """[H, 2, n''·r, kdim] in `act` (None: the keys' dtype): the normalized keys times both
        norms' scales, against which the raw queries score <q, w ⊙ k̂> = rms(q) · <norm_q(q),
        norm_k(k)> (not q_per_rank, whose normalization is per rank and does not factor out of
        the ranking)."""
        scale = self._q_scale()
        return self._scoring_keys(act) * (scale if act is None else scale.to(act))

    def _weight_terms(self, decode: bool = False) -> dict[str, Tensor]:
        terms = {"keys": self._scoring_keys(), "q_scale": self._q_scale()}
        if not self.q_per_rank:
            terms["scaled_keys"] = self._scaled_scoring_keys()
        return terms

    def _padded_keys(self) -> int:
        """n'' ≥ n' keys per side with n''·r a multiple of SCORE_ROW_ALIGN. The sub-key GEMM writes
        rows of n''·r scores: at 227M n'·r = 2276 made cuBLAS fall back to 2-element-aligned GEMMs
        (~4× slower), and Inductor pads such rows itself, then copies them to the eager strides
        the custom ops expect. The retrieval reads the first n' keys (n_keys) and hands back a
        gradient of the padded shape, which the GEMM's backward reads in place."""
        step = SCORE_ROW_ALIGN // math.gcd(SCORE_ROW_ALIGN, self.rank)
        return -(-self.n_side // step) * step

    def _retrieval_inputs(self, x2: Tensor, q: Tensor | None) -> tuple[Tensor, int]:
        """(the stacked sub-key scores as the retrieval reads them, its n_keys)."""
        ab = _keys_contiguous(self._subkey_scores(x2, q))
        return ab, self._n_keys(ab)

    def _n_keys(self, ab: Tensor) -> int:
        """The retrieval's n_keys for scores ab [T, H, 2, n'', r]: n' when rows are padded, else -1."""
        return self.n_side if ab.shape[3] != self.n_side else -1

    def _raw_query_inputs(self, q: Tensor, raw_scores: Tensor | None = None) -> tuple[Tensor, int, Tensor]:
        """For the rows retrieval (not q_per_rank): (the sub-key scores of the raw queries against
        `_scaled_scoring_keys`, n_keys, the queries [T, H, 2, kdim]). The retrieval divides the
        kept scores by both sides' RMS, so the normalization launches nothing of its own.
        raw_scores: those scores already computed, [T, H·2·n''·r] (a folded projection's)."""
        q = q.view(q.shape[0], self.heads, 2, self.kdim)
        if raw_scores is None:
            cache = self._cached_terms()
            keys = (self._scaled_scoring_keys() if cache is None else cache["scaled_keys"]).to(q.dtype)
            ab = self._shared_query_scores(q, keys)
        else:
            ab = raw_scores.view(q.shape[0], self.heads, 2, -1, self.rank)
        return ab, self._n_keys(ab), q

    def _retrieve(self, x2: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """→ (A, B [T, H, n', r] (views without the padding), ids [T, H, k] int64,
        scores [T, H, k, M] sorted by descending Σ_m s_m)."""
        ab, n_keys = self._retrieval_inputs(x2, q)
        ids, scores = tdqkr_retrieval_stacked(ab, self.cores, self.rank1_u, self.rank1_v, self.knn, n_keys)
        return ab[:, :, 0, : self.n_side], ab[:, :, 1, : self.n_side], ids, scores

    @property
    def has_aux_loss(self) -> bool:
        """Whether forward's aux loss can be other than a constant 0 (a rank penalty or key balance is on)."""
        return self.rank_penalty > 0 or self.key_balance_coef > 0

    def _aux_loss(self, x2: Tensor, a: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        """The enabled auxiliary losses times their coefficients (a constant 0 when none is on)."""
        aux = torch.zeros((), device=x2.device, dtype=torch.float32)
        if self.rank_penalty > 0:
            aux = aux + self.rank_penalty * tucker_rank_penalty(self.cores, self.rank_margin)
        if self.key_balance_coef > 0:
            acc = torch.promote_types(a.dtype, torch.float32)
            coarse_a = torch.einsum("thir,hr->thi", a.to(acc), self.rank1_u.to(acc))
            coarse_b = torch.einsum("thir,hr->thi", b.to(acc), self.rank1_v.to(acc))
            balance = key_balance_side(coarse_a, torch.div(ids, self.n_side, rounding_mode="floor")) + key_balance_side(
                coarse_b, ids % self.n_side
            )
            aux = aux + self.key_balance_coef * balance
        return aux

    def _logical_and_group(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        virtual = self.perm[ids]
        return virtual % self.num_logical, torch.div(virtual, self.num_logical, rounding_mode="floor")

    def _finish(self, x: Tensor, y2: Tensor, logical: Tensor, scores: Tensor) -> Tensor:
        y2 = F.dropout(y2, self.dropout, self.training)
        if self.training:
            self.stats.accumulate(logical, y2, scores)  # [T, H, k, M], descending Σ_m along k
        return y2.reshape(x.shape[:-1] + (y2.shape[-1],))

    # -- rank-1 refresh, metrics ----------------------------------------------------------------

    def refresh_rank1(self) -> None:
        """u, v ← first singular vectors of Σ_m C_m per head, with sign continuity (docs/layers.md)."""
        refresh_rank1_all([self])

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """The metrics (docs/layers.md) since the last call (reads buffers: a host sync), then resets the counters."""
        out = self.stats.report()
        sv = torch.linalg.svdvals(full_tensor(self.cores).detach().float().sum(1)).cpu()
        for h in range(sv.shape[0]):
            for i in range(sv.shape[1]):
                out[f"sv_h{h}_{i}"] = float(sv[h, i])
        return out

    # -- init ---------------------------------------------------------------------------------

    def _released_norm_scale(self) -> float:
        return self.kdim**self.released_norm_exponent

    @torch.no_grad()
    def _reset_retrieval(self, generator: torch.Generator) -> None:
        """perm, cores ~ U(0, 1), W_q, keys, norm scales (before calibration), u/v, stats."""
        perm = torch.randperm(self.num_virtual, generator=generator, device=generator.device)
        self.perm.copy_(perm.to(self.perm.device))
        self.cores.copy_(uniform_from(generator, self.cores, 0.0, 1.0))
        if self.cfg.memory.init == "released":
            std = self.kdim**-0.5
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
            x = normal_from(
                generator, torch.empty(CALIBRATION_TOKENS, self.dim, device=weight.device, dtype=weight.dtype), 1.0
            )
            scores = self._retrieve(x)[3].to(torch.float64)
            mean = float(scores.mean())
            if not mean > 0.0:
                logger.warning(
                    "memory layer %d: mean selected score %.3g is not positive; norm-scale calibration skipped",
                    self.layer_index,
                    mean,
                )
                break
            factor = mean**-0.25
            self.norm_q.weight.mul_(factor)
            self.norm_k.weight.mul_(factor)
            score_var = float(scores.var()) / (mean * mean)
        self.calibrated_score_var = score_var
        return score_var


@torch.no_grad()
def refresh_rank1_all(layers: Sequence[TuckerMemoryBase]) -> None:
    """`refresh_rank1` of every layer, as one batch per kind of cores (shape, dtype, device): a
    model refreshes all its layers after each optimizer step, and one small launch per op and
    layer left the GPU waiting on the host there."""
    groups: dict[tuple, list[tuple[TuckerMemoryBase, Tensor]]] = {}
    for layer in layers:
        cores = full_tensor(layer.cores)
        key = (tuple(cores.shape), cores.dtype, cores.device, layer.rank1_u.dtype, layer.rank1_v.dtype)
        groups.setdefault(key, []).append((layer, cores))
    for members in groups.values():
        group = [layer for layer, _ in members]
        cores = torch.stack([c for _, c in members])  # [L, H, M, r, r]: heads of all layers side by side
        u_old = torch.stack([layer.rank1_u for layer in group]).flatten(0, 1)
        v_old = torch.stack([layer.rank1_v for layer in group]).flatten(0, 1)
        u, v = rank1_refresh(cores.flatten(0, 1), u_old, v_old)
        shape = (len(group), *group[0].rank1_u.shape)
        torch._foreach_copy_([layer.rank1_u for layer in group], list(u.to(u_old.dtype).view(shape).unbind(0)))
        torch._foreach_copy_([layer.rank1_v for layer in group], list(v.to(v_old.dtype).view(shape).unbind(0)))
