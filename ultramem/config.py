"""Model, memory-layer and MoE configuration (the `[model]`, `[model.memory]`, `[model.moe]` TOML sections).

Training, data, optimizer and parallelism settings live in `ultramem.train.config`; this module
holds only what a layer or the model needs, so that `ops ← layers ← model ← train` stays one-way.
The authors' names for the memory settings are given in comments where ours differ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MEMORY_TYPES = ("ultramem_v2", "ultramem_v1", "memory_plus", "none")
MEMORY_INITS = ("paper", "released")


class ConfigError(ValueError):
    """A configuration value that breaks a rule; the message names the key and the rule."""


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclass
class MemoryConfig:
    type: str = "ultramem_v2"  # one of MEMORY_TYPES; "none" gives the dense baseline
    insert: str = "full"  # mem_insert: "full" (one per block) or "a:b/c:e/...": read at block a, add after block b
    knum: int = 360  # mem_knum: keys per side for v1 / Memory+; table rows per layer = knum² (v2)
    kdim: int = 192  # width of the query and of each sub-key
    vdim: int = 192  # width of a value row (the layer output before its projection)
    pre_vdim: int = 192  # 0 disables the pre-value gate (g = 1)
    knn: int = 32  # values kept per head and token
    heads: int = 1  # mem_head
    share_ratio: float = 0.5  # v2: fraction of the pooled table one layer addresses
    tucker_rank: int = 2  # r: rank of the Tucker cores (r × r sub-key grid per core)
    tucker_cores: int = 2  # tucker_multihead (M)
    key_expand: int = 1  # E: n' = E·n keys per side
    q_per_rank: bool = False  # one query per Tucker rank instead of one shared
    glu_act: bool = True  # GELU on the pre-value gate
    init: str = "paper"  # mem_init: "paper" or "released"
    dropout: float = 0.0  # mem_dropout
    # Tucker rank penalty coefficient; None means the type's default (v1: 0.001, else 0).
    tucker_rank_penalty: float | None = None
    tucker_rank_margin: float = 0.15  # hinge margin of the Tucker rank penalty
    key_balance_coef: float = 0.0  # weight of the key-usage balance loss (0: off)
    log_interval: int = 100  # mem_log_interval: steps between metric reports
    calibration_rounds: int = 3  # "paper" init: rounds of norm-scale calibration

    @property
    def rank_penalty(self) -> float:
        if self.tucker_rank_penalty is not None:
            return self.tucker_rank_penalty
        return 0.001 if self.type == "ultramem_v1" else 0.0

    @property
    def lookup_shape(self) -> tuple[int, int]:
        """(entries, cores) of each token's lookup in the shared tables: heads·knn rows, weighted
        per Tucker core (UltraMemV2) or by one score (Memory+)."""
        return self.heads * self.knn, (1 if self.type == "memory_plus" else self.tucker_cores)


@dataclass
class MoEConfig:
    """A mixture-of-experts FFN in every block (the OLMoE baseline, arXiv 2409.02060), in place of
    the dense SwiGLU. It may sit beside memory layers: they read the FFN's input either way."""

    num_experts: int = 0  # 0: the dense FFN
    top_k: int = 8  # experts per token
    expert_hidden: int | None = None  # SwiGLU width of one expert; None: model.ffn_hidden // top_k
    num_shared: int = 0  # always-active experts of expert_hidden each, beside the routed ones
    lb_coef: float = 0.01  # load-balancing loss E·Σ_e f_e·P_e
    z_coef: float = 0.001  # router z-loss mean(logsumexp(logits)²)

    def __post_init__(self) -> None:
        validate_moe(self)  # TOML values; command-line overrides are checked when the model is built

    def hidden(self, ffn_hidden: int) -> int:
        return self.expert_hidden if self.expert_hidden is not None else max(1, ffn_hidden // self.top_k)


def validate_moe(moe: MoEConfig) -> None:
    """Raise ConfigError naming the `model.moe.*` key that breaks a rule."""
    key = "model.moe."
    _require(moe.num_experts >= 0, key + "num_experts", moe.num_experts, "must be >= 0 (0: dense FFN)")
    if moe.num_experts == 0:
        return
    _require(
        1 <= moe.top_k <= moe.num_experts,
        key + "top_k",
        moe.top_k,
        f"must be in [1, model.moe.num_experts={moe.num_experts}]",
    )
    _require(
        moe.expert_hidden is None or moe.expert_hidden >= 1,
        key + "expert_hidden",
        moe.expert_hidden,
        "must be >= 1 (or unset: model.ffn_hidden // top_k)",
    )
    _require(moe.num_shared >= 0, key + "num_shared", moe.num_shared, "must be >= 0")
    _require(moe.lb_coef >= 0.0, key + "lb_coef", moe.lb_coef, "must be >= 0")
    _require(moe.z_coef >= 0.0, key + "z_coef", moe.z_coef, "must be >= 0")


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # embedding rows (>= the tokenizer's vocabulary)
    dim: int = 768  # model width
    n_layers: int = 20  # decoder blocks
    n_heads: int = 12  # attention heads
    ffn_hidden: int = 2496  # SwiGLU hidden width
    max_seq_len: int = 4096  # longest sequence (RoPE tables)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float | None = None  # None: sqrt(2 / (5·dim)), the paper's Appendix A
    tie_embeddings: bool = True  # the LM head is the embedding matrix
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5.0 * self.dim))


def validate_heads(cfg: ModelConfig) -> None:
    """The attention's split of `dim` into heads, each rotated by RoPE in pairs."""
    _require(cfg.n_heads >= 1, "model.n_heads", cfg.n_heads, "must be >= 1")
    _require(cfg.dim % cfg.n_heads == 0, "model.dim", cfg.dim, f"must be divisible by model.n_heads={cfg.n_heads}")
    head_dim = cfg.dim // cfg.n_heads
    _require(head_dim % 2 == 0, "model.dim / model.n_heads", head_dim, "must be even (RoPE rotates pairs)")


# ---------------------------------------------------------------------------------------------
# Memory placement


_INSERT_KEY = "model.memory.insert"


def parse_memory_insert(insert: str, n_layers: int) -> list[tuple[int, int]]:
    """ "full" or "a:b/c:e/..." → [(read_block, write_block), ...] in layer order.

    Rule (docs/layers.md): 0 <= a <= b < n_layers for every part. Spans may overlap or share blocks
    (a layer reading at block 1 does not depend on another writing after block 2), so no order
    between parts is imposed; layer l is the l-th part.
    """
    text = insert.strip()
    if text == "full":
        return [(i, i) for i in range(n_layers)]
    if not text:
        raise ConfigError(f"{_INSERT_KEY}={insert!r}: empty; use 'full' or 'a:b/c:e/...'")
    pairs: list[tuple[int, int]] = []
    for part in text.split("/"):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if m is None:
            raise ConfigError(f"{_INSERT_KEY}={insert!r}: part {part!r} is not 'a:b' with integers a <= b")
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise ConfigError(f"{_INSERT_KEY}={insert!r}: part {part!r} writes before it reads (b={b} < a={a})")
        if b >= n_layers:
            raise ConfigError(f"{_INSERT_KEY}={insert!r}: part {part!r} is out of range (blocks are 0..{n_layers - 1})")
        pairs.append((a, b))
    return pairs


def memory_placement(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The (read_block, write_block) pairs of the model's memory layers; [] for the dense model."""
    if cfg.memory.type == "none":
        return []
    return parse_memory_insert(cfg.memory.insert, cfg.n_layers)
