"""Pieces shared by the memory layers: config rules, rank-1 refresh, init draws, the inference
cache of weight-only terms, stats."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import MEMORY_INITS, ConfigError, ModelConfig
from ultramem.norm import RMSNorm, rms_norm  # noqa: F401  (the layers import them from here)
from ultramem.ops import layer_stats_accumulate

LAYER_TYPES = ("ultramem_v2", "ultramem_v1", "memory_plus")
_KEY = "model.memory."
# Tokens of random unit-variance input used by the "paper" init's norm-scale calibration.
CALIBRATION_TOKENS = 2048
# Rows drawn per chunk when filling a big table, so init never needs a second full-size copy.
_INIT_CHUNK_ROWS = 1 << 16


# ---------------------------------------------------------------------------------------------
# Config rules


def window_keys(knum: int, num_layers: int, share_ratio: float) -> int:
    """n = floor(sqrt(N · share_ratio)) with N = knum²·L (docs/layers.md).

    A relative tolerance of 1e-9 keeps exact ratios such as 1/3 from losing a key to rounding
    (knum²·3·(1/3) evaluates to a hair under knum² in floating point)."""
    n_rows = knum * knum * num_layers
    return math.isqrt(int(math.floor(n_rows * share_ratio * (1.0 + 1e-9))))


def _require(cond: bool, key: str, value, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {rule}")


def validate_memory_config(cfg: ModelConfig, num_layers: int) -> None:
    """Raise ConfigError naming the key for any memory setting the layers cannot build."""
    m = cfg.memory
    _require(m.type in LAYER_TYPES, _KEY + "type", m.type, f"must be one of {LAYER_TYPES} to build memory layers")
    _require(m.init in MEMORY_INITS, _KEY + "init", m.init, f"must be one of {MEMORY_INITS}")
    _require(isinstance(num_layers, int) and num_layers >= 1, "num_memory_layers", num_layers, "must be >= 1")
    # types first: a float or a string size would otherwise fail deep inside torch.empty
    for key, value in (("model.dim", cfg.dim), ("model.ffn_hidden", cfg.ffn_hidden)) + tuple(
        (_KEY + name, getattr(m, name))
        for name in ("heads", "knum", "kdim", "vdim", "pre_vdim", "knn", "tucker_rank", "tucker_cores", "key_expand")
    ):
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
    _require(cfg.dim >= 1, "model.dim", cfg.dim, "must be >= 1")
    _require(cfg.ffn_hidden >= 1, "model.ffn_hidden", cfg.ffn_hidden, "must be >= 1 (the paper init uses it)")
    for name in ("heads", "knum", "kdim", "vdim", "knn", "log_interval"):
        _require(getattr(m, name) >= 1, _KEY + name, getattr(m, name), "must be >= 1")
    _require(0.0 <= m.dropout < 1.0, _KEY + "dropout", m.dropout, "must be in [0, 1)")
    _require(m.key_balance_coef >= 0.0, _KEY + "key_balance_coef", m.key_balance_coef, "must be >= 0")
    if m.type == "memory_plus":
        _require(m.knn <= m.knum, _KEY + "knn", m.knn, f"must be <= keys per side (model.memory.knum={m.knum})")
        return
    for name in ("tucker_rank", "tucker_cores", "key_expand"):
        _require(getattr(m, name) >= 1, _KEY + name, getattr(m, name), "must be >= 1")
    _require(
        m.vdim % m.tucker_cores == 0,
        _KEY + "vdim",
        m.vdim,
        f"must be divisible by model.memory.tucker_cores={m.tucker_cores} (one chunk per core)",
    )
    _require(m.rank_penalty >= 0.0, _KEY + "tucker_rank_penalty", m.tucker_rank_penalty, "must be >= 0")
    _require(m.tucker_rank_margin >= 0.0, _KEY + "tucker_rank_margin", m.tucker_rank_margin, "must be >= 0")
    if m.init == "paper":
        _require(
            m.calibration_rounds >= 1,
            _KEY + "calibration_rounds",
            m.calibration_rounds,
            "must be >= 1 with model.memory.init='paper'",
        )
    if m.type == "ultramem_v2":
        _require(m.pre_vdim >= 0, _KEY + "pre_vdim", m.pre_vdim, "must be >= 0 (0 disables the gate)")
        _require(0.0 < m.share_ratio <= 1.0, _KEY + "share_ratio", m.share_ratio, "must be in (0, 1]")
        n = window_keys(m.knum, num_layers, m.share_ratio)
        _require(
            n >= 1,
            _KEY + "share_ratio",
            m.share_ratio,
            f"gives n = floor(sqrt(knum²·L·share_ratio)) = {n} keys per side; need >= 1",
        )
    else:
        n = m.knum
    keys_per_side = m.key_expand * n
    _require(
        m.knn <= keys_per_side,
        _KEY + "knn",
        m.knn,
        f"must be <= keys per side (key_expand·n = {m.key_expand}·{n} = {keys_per_side})",
    )


# ---------------------------------------------------------------------------------------------
# Modules and tensor helpers


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a parameter that may be sharded as a DTensor (FSDP2)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# The CUDA SVD/eigen solvers check their status on the host (a sync), so the rank-1 refresh and
# the Tucker penalty use closed forms for rank 1 and 2 (every packaged configuration has r = 2)
# and fall back to torch.linalg (which syncs on CUDA) only for r >= 3.
_TINY = 1e-30


def _top_pair_rank2(s: Tensor) -> tuple[Tensor, Tensor]:
    """First singular vectors of 2×2 matrices s [H, 2, 2] in closed form (pure tensor ops).

    v is the top eigenvector of sᵀs = [[p, q], [q, t]]: angle ½·atan2(2q, p − t); u = s·v/‖s·v‖."""
    p = s[:, 0, 0] ** 2 + s[:, 1, 0] ** 2
    t = s[:, 0, 1] ** 2 + s[:, 1, 1] ** 2
    q = s[:, 0, 0] * s[:, 0, 1] + s[:, 1, 0] * s[:, 1, 1]
    angle = 0.5 * torch.atan2(2 * q, p - t)
    v = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    sv = torch.einsum("hij,hj->hi", s, v)
    u = sv / sv.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    return u, v


def _singular_values_rank2(s: Tensor) -> Tensor:
    """[σ1, σ2] of 2×2 matrices s [H, 2, 2], differentiable and finite at σ1 = σ2 or σ2 = 0."""
    frob = s.pow(2).sum((-1, -2))
    det = s[:, 0, 0] * s[:, 1, 1] - s[:, 0, 1] * s[:, 1, 0]
    half = 0.5 * frob
    root = torch.sqrt((half * half - det * det).clamp_min(_TINY))  # eigenvalues of sᵀs: half ± root
    return torch.stack([torch.sqrt((half + root).clamp_min(_TINY)), torch.sqrt((half - root).clamp_min(_TINY))], dim=-1)


def rank1_refresh(cores: Tensor, u_old: Tensor, v_old: Tensor) -> tuple[Tensor, Tensor]:
    """First singular vectors (u, v) of S_h = Σ_m C_m[h] per head, float32 (docs/layers.md, rank-1 refresh).

    The sign σ of each head's pair is the one minimizing |σu − u_old|₁ + |σv − v_old|₁; on a tie
    (the first refresh, where u_old = v_old = 0) σ makes Σu + Σv >= 0, so the first result does
    not depend on the SVD backend's sign convention. No host sync for r <= 2."""
    s = cores.detach().to(torch.float32).sum(1)  # [H, r, r]
    r = s.shape[-1]
    if r == 1:
        u, v = torch.ones_like(s[:, 0]), torch.where(s[:, 0] < 0, -1.0, 1.0)
    elif r == 2:
        u, v = _top_pair_rank2(s)
    else:
        left, _, right_h = torch.linalg.svd(s)
        u, v = left[..., :, 0], right_h[..., 0, :]
    u_old, v_old = u_old.to(torch.float32), v_old.to(torch.float32)
    keep = (u - u_old).abs().sum(-1) + (v - v_old).abs().sum(-1)
    flip = (u + u_old).abs().sum(-1) + (v + v_old).abs().sum(-1)
    tie_flip = (flip == keep) & ((u.sum(-1) + v.sum(-1)) < 0)
    sign = torch.where((flip < keep) | tie_flip, -1.0, 1.0).unsqueeze(-1)
    return u * sign, v * sign


def tucker_rank_penalty(cores: Tensor, margin: float) -> Tensor:
    """mean over heads of Σ_{i>=2} relu(σ_i − margin)², σ the singular values of Σ_m C_m[h].

    The penalty "mean(relu(σ_2..σ_r − margin)²) over heads" is read as: sum over the trailing
    singular values of one head, then average over heads (for r = 2 the two readings agree)."""
    s = cores.to(torch.promote_types(cores.dtype, torch.float32)).sum(1)  # [H, r, r]
    r = s.shape[-1]
    if r == 1:
        return s.new_zeros(())
    sv = _singular_values_rank2(s) if r == 2 else torch.linalg.svdvals(s)  # [H, r], descending
    return F.relu(sv[:, 1:] - margin).pow(2).sum(-1).mean()


def key_balance_side(coarse: Tensor, kept: Tensor) -> Tensor:
    """n'·Σ_i p_i f_i for one side (Switch-style).

    coarse [T, H, n'] are the coarse scores of the side's keys; p_i is the softmax probability of
    key i averaged over tokens and heads. kept [T, H, k] are the keys (of this side) of the final
    top-k pairs; f_i is the fraction of those entries that use key i (not differentiated)."""
    n_keys = coarse.shape[-1]
    p = torch.softmax(coarse.to(torch.promote_types(coarse.dtype, torch.float32)), dim=-1).reshape(-1, n_keys).mean(0)
    counts = torch.zeros(n_keys, device=coarse.device, dtype=p.dtype)
    counts = counts.index_add(0, kept.reshape(-1), torch.ones(kept.numel(), device=coarse.device, dtype=p.dtype))
    f = counts / kept.numel()
    return n_keys * (p * f).sum()


def normal_from(generator: torch.Generator, like: Tensor, std: float) -> Tensor:
    """N(0, std²) draws shaped like `like`, from `generator` (on its device), in like's dtype/device."""
    draw = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.mul_(std).to(device=like.device, dtype=like.dtype)


def uniform_from(generator: torch.Generator, like: Tensor, low: float, high: float) -> Tensor:
    draw = torch.rand(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.mul_(high - low).add_(low).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def fill_normal_rows(param: Tensor, generator: torch.Generator, std: float) -> None:
    """param[:] ~ N(0, std²), drawn in row chunks (same draws as one big call's row order)."""
    rows = param.shape[0]
    for start in range(0, rows, _INIT_CHUNK_ROWS):
        chunk = param[start : start + _INIT_CHUNK_ROWS]
        chunk.copy_(normal_from(generator, chunk, std))


def act_second_moment(act: str, var: float) -> float:
    """E[act(h)²] for h ~ N(0, var), act "silu" or "gelu" (erf form), by 64-point Gauss–Hermite
    quadrature: deterministic and exact to ~1e-12 for these smooth functions."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    h = nodes * math.sqrt(var)
    if act == "silu":
        y = h / (1.0 + np.exp(-h))
    elif act == "gelu":
        y = h * 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in h]))
    else:
        raise ValueError(f"act={act!r} must be 'silu' or 'gelu'")
    return float((weights * y * y).sum() / math.sqrt(2.0 * math.pi))


def paper_value_std(cfg: ModelConfig, num_layers: int, score_var: float, gated: bool, gelu: bool = True) -> float:
    """σ_V of the "paper" init (docs/layers.md) from the calibrated variance σ_s² of the selected scores.

    Paper:  σ_V⁴ = F := 0.2·k_inner·d / (k·H·(1+σ_s²)·pre_vdim·vdim·L),  k_inner = ffn_hidden/d.
    Its aim is a memory output variance equal to the FFN's. For unit-variance input x:
        Var(y) = vdim·std² · k·H·E[s²] · E[act(g)²] · σ_V²,
    E[s²] = 1+σ_s² (scores calibrated to mean 1), g = <P[row], W_p x> of variance
    Var(g) = pre_vdim·σ_V²·c_p, c_p = d·std². The FFN (SwiGLU, last linear std/sqrt(2L)) has
        Var = ffn_hidden·std²·E[SiLU(h)²]·c_p / (2L),  h ~ N(0, c_p),
    and with std² = 2/(5d) the two agree exactly when the gate's activation keeps the same
    fraction of variance as the FFN's: γ := E[act(g)²]/Var(g) equals ρ := E[SiLU(h)²]/c_p
    (≈ 0.31). GELU keeps more (γ ≈ 0.32–0.39 for Var(g) in 0.2–0.6), and the literal formula
    puts the output 15–30% above the FFN's (measured 1.25–1.28× at d=128, pre_vdim=vdim=64,
    k=8, L=4). We keep the formula's target and correct for that:
    - gate with GELU: σ_V⁴ = F·ρ/γ(Var(g)), solved by fixed-point iteration (σ_V moves by ~6%);
    - gate without GELU (glu_act = false): γ = 1, σ_V⁴ = F·ρ;
    - no gate (pre_vdim = 0, and v1): the factor pre_vdim·σ_V²·c_p·γ becomes 1, so
        σ_V² = 0.2·k_inner·d·E[SiLU(h)²] / (k·H·(1+σ_s²)·vdim·L).
    With an init_std other than the paper's, 0.2 is 0.5·c_p in all of these (same derivation).
    """
    m = cfg.memory
    c_p = cfg.dim * cfg.std**2
    silu_sq = act_second_moment("silu", c_p)
    # FFN variance / (vdim·std²·k·H·(1+σ_s²)): what E[act(g)²]·σ_V² must equal
    target = 0.5 * cfg.ffn_hidden * silu_sq * c_p / (m.knn * m.heads * (1.0 + score_var) * m.vdim * num_layers)
    if not gated:
        return math.sqrt(target)
    # gated: E[act(g)²]·σ_V² = γ·pre_vdim·c_p·σ_V⁴
    target_g = target / (m.pre_vdim * c_p)  # = γ·σ_V⁴; at std² = 2/(5d), γ = ρ gives the paper's F
    if not gelu:
        return target_g**0.25
    sigma4 = target_g / (silu_sq / c_p)  # start from the paper's formula
    for _ in range(20):
        gate_var = m.pre_vdim * math.sqrt(sigma4) * c_p
        new = target_g / (act_second_moment("gelu", gate_var) / gate_var)
        if abs(new - sigma4) <= 1e-12 * sigma4:
            break
        sigma4 = new
    return sigma4**0.25


def _name(layer: nn.Module) -> str:
    return f"{type(layer).__name__} layer {layer.layer_index}"


def check_input(layer: nn.Module, x: Tensor) -> None:
    """A memory layer's input: [..., dim], in the weights' dtype unless autocast picks the dtype.
    The layer's name is read only to raise: under torch.compile its index would be a guard (a
    recompile per layer)."""
    if x.dim() == 0 or x.shape[-1] != layer.dim:
        got = x.shape[-1] if x.dim() else "none (0-d input)"
        raise ValueError(f"{_name(layer)}: input last dim {got} != model.dim {layer.dim}")
    weight = layer.w_q.weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{_name(layer)}: input dtype {x.dtype} != the weights' "
            f"{weight.dtype}; cast one to the other, or run under torch.autocast"
        )


# ---------------------------------------------------------------------------------------------
# Weight-only terms, cached for inference (docs/layers.md, "Inference")


class WeightTerms:
    """Mixin of the memory layers: the terms of a forward that depend on the weights alone (the
    normalized keys, stacked projections) are computed per forward, or taken from the cache that
    `inference_cache` fills from `_weight_terms(decode)` while autograd is off."""

    _inference_cache: dict[str, Tensor] | None = None
    # per parameter: (name, owning module, attribute, the parameter, version, data_ptr) at entry
    _cached_from: tuple[tuple, ...] = ()

    def __getstate__(self):
        # a copy (deepcopy, pickle) is a model of its own, outside the context
        state = super().__getstate__()
        state.pop("_inference_cache", None)
        state.pop("_cached_from", None)
        return state

    def _weight_terms(self, decode: bool = False) -> dict[str, Tensor]:
        """The terms the cache holds, in the weights' dtype (with decode, those of
        `inference_cache(..., decode=True)` too)."""
        raise NotImplementedError

    def _cached_terms(self) -> dict[str, Tensor] | None:
        """The cached terms inside `inference_cache` with autograd off, else None (compute them)."""
        cache = self._inference_cache
        if cache is None or torch.is_grad_enabled():
            return None
        if not torch.compiler.is_compiling():
            self._check_cache()
        return cache

    def _weight_state(self) -> tuple[tuple, ...]:
        out = []
        for owner_name, owner in self.named_modules():
            for attr, p in owner._parameters.items():
                if p is not None:
                    out.append((f"{owner_name}.{attr}" if owner_name else attr, owner, attr, p, *_stamp(p)))
        return tuple(out)

    def _check_cache(self) -> None:
        changed = [
            name
            for name, owner, attr, p, *stamp in self._cached_from
            if owner._parameters.get(attr) is not p or _stamp(p) != stamp
        ]
        if changed:
            raise RuntimeError(
                f"{_name(self)}: weights changed inside inference_cache "
                f"({', '.join(changed)}); its cached terms are stale"
            )


def version_counter(t: Tensor) -> int | None:
    """t's version counter (counts in-place writes); None for an inference tensor, which has none."""
    return None if t.is_inference() else t._version


def _stamp(p: Tensor) -> list:
    # the version counter sees in-place updates, the storage a swapped `.data` (casts, moves);
    # see docs/layers.md for what goes unseen
    return [version_counter(p), p.data_ptr()]


@contextlib.contextmanager
def inference_cache(module: nn.Module, decode: bool = False) -> Iterator[nn.Module]:
    """Within, every memory layer in `module` reuses its weight-only terms, computed once on entry
    (the keys' normalization and padding, the stacked query projection): at decode shapes they
    are a third of a layer's launches. Forwards with autograd on compute them as usual.

    decode=True, for calls of a few tokens (generation's steps): UltraMemV2 layers with one query
    per side, on CUDA, also fold the keys into the query projection, so that one GEMM yields the
    queries, the gate's input and the raw sub-key scores (one GEMM and launch fewer a call). Each
    token's scores then cost dim multiply-adds per key instead of kdim, which long prompts
    should not pay; and the outputs differ from the unfolded ones by rounding (docs/layers.md).

    The weights must not change inside: an eager forward, and the exit, raise if one did (in-place
    writes and swapped parameters; writes through `.data` go unseen). A compiled module recompiles
    once, on entry.

        with torch.inference_mode(), inference_cache(model):
            logits = model(tokens)
    """
    layers = [m for m in module.modules() if isinstance(m, WeightTerms)]
    for layer in layers:
        if layer._inference_cache is not None:
            raise RuntimeError(f"{_name(layer)} is already inside inference_cache")
        for name, p in layer.named_parameters():
            if type(p.data) is not Tensor:
                raise ValueError(
                    f"inference_cache needs plain (unsharded) weights: {_name(layer)}'s {name} "
                    f"is a {type(p.data).__name__}"
                )
    try:
        for layer in layers:
            with torch.no_grad():
                layer._inference_cache = layer._weight_terms(decode)
            layer._cached_from = layer._weight_state()
        yield module
    except BaseException:
        _drop_caches(layers)
        raise
    try:
        for layer in layers:
            layer._check_cache()
    finally:
        _drop_caches(layers)


def _drop_caches(layers: list) -> None:
    for layer in layers:
        layer.__dict__.pop("_inference_cache", None)
        layer.__dict__.pop("_cached_from", None)


# ---------------------------------------------------------------------------------------------
# Metrics (docs/layers.md)


class LayerStats(nn.Module):
    """Running statistics of one memory layer, updated in place during training forwards.

    Nothing here reads a value back to the host until `report()`, so accumulating costs no sync
    and compiles into the layer's graph. Buffers are not saved in checkpoints."""

    def __init__(self, num_values: int):
        super().__init__()
        self.num_values = num_values
        # float64 counts are exact to 2^53 (a float32 one stops at 2^24, which one busy value
        # passes within a report interval at 227M: ~1e10 hits per layer per 100 steps), and
        # Inductor scatters into float64 with atomics in place; an int64 index_add_ becomes a
        # sort + index_put (~120 µs at 227M)
        self.register_buffer("hits", torch.zeros(num_values, dtype=torch.float64), persistent=False)
        # [Σy, Σy², count(y), Σ top-1 score, Σ k-th score, count(scores)]
        self.register_buffer("sums", torch.zeros(6, dtype=torch.float64), persistent=False)
        # False: training forwards collect nothing (one op per layer and forward)
        self.enabled = True

    def _apply(self, fn, recurse=True):
        # The counters stay float64 whatever the model is cast to (`model.bfloat16()` would stop
        # the counts at 256): moves apply, casts do not, and the values are kept exactly.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float64)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        self.hits.zero_()
        self.sums.zero_()

    @torch.no_grad()
    def accumulate(self, logical: Tensor, y: Tensor, scores: Tensor) -> None:
        """logical: the layer's logical value ids hit (any shape); y: the layer output; scores
        [..., k, M]: per (token, head) the k kept entries' scores per core, best first. Nothing
        while not `enabled`."""
        if not self.enabled:
            return
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return  # activation checkpointing's recompute, inside the backward: counted in the forward
        # one op (one launch on CUDA), straight into the totals: an int32 count per forward cost a
        # zero-fill and an add over all n² counters besides the scatter
        scores = scores.detach()
        layer_stats_accumulate(self.hits, self.sums, logical, y.detach(), scores.reshape(-1, *scores.shape[-2:]))

    @torch.no_grad()
    def report(self) -> dict[str, float]:
        """coverage, KL(hits ‖ uniform), output std, mean top-1 / k-th score; then reset.

        With no accumulated forward since the last report the values are NaN (coverage 0)."""
        hits = self.hits
        total = hits.sum()
        coverage = (hits > 0).to(torch.float64).mean()
        p = hits / total.clamp_min(1.0)
        # 0·log 0 = 0: only nonzero p contribute
        kl = torch.where(p > 0, p * torch.log(p * self.num_values), torch.zeros_like(p)).sum()
        s = self.sums.tolist()
        hit_total = float(total)
        nan = float("nan")
        out = {
            "coverage": float(coverage),
            "kl_uniform": float(kl) if hit_total > 0 else nan,
        }
        if s[2] > 0:
            mean = s[0] / s[2]
            out["out_std"] = math.sqrt(max(s[1] / s[2] - mean * mean, 0.0))
        else:
            out["out_std"] = nan
        out["top1_score"] = s[3] / s[5] if s[5] > 0 else nan
        out["kth_score"] = s[4] / s[5] if s[5] > 0 else nan
        self.reset()
        return out
