"""Parameter, FLOP and memory accounting of a model built on the meta device (`--dry-run`).

Definitions (stated in the printed summary too):
- total parameters: every parameter once (tied head counted once).
- activated parameters per token: every parameter except the value tables and the routed MoE
  experts, plus the table entries a token reads: H·knn·width for each table a memory layer reads
  (UltraMemV2: vdim + pre_vdim per layer), plus the top_k of num_experts routed experts a token
  runs (router and shared experts count in full).
- training FLOPs per token: 6 · (activated parameters that take part in a matmul: everything but
  1-D parameters; the tied embedding counts once, as the LM head) + attention
  6 · n_layers · dim · seq_len (QKᵀ and AV, 2·2·d·S forward, ×3 with backward, ×1/2 causal).
- training state: fp32 parameters + fp32 gradients + AdamW's two fp32 moments = 16 B/parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ultramem.config import ModelConfig
from ultramem.moe import MoE

from .optim import table_parameters

BYTES_PER_PARAM_TRAINING = 16  # fp32 param + grad + exp_avg + exp_avg_sq


@dataclass
class TableInfo:
    name: str
    rows: int
    width: int
    readers: int  # memory layers that read this table

    @property
    def params(self) -> int:
        return self.rows * self.width


@dataclass
class ModelSummary:
    total: int
    embedding: int
    tables: list[TableInfo]
    table_params: int
    dense_params: int  # total - tables
    memory_dense_params: int  # memory layers' own parameters (projections, keys, cores, norms)
    table_reads_per_token: int
    activated: int
    matmul_activated: int
    n_memory_layers: int
    seq_len: int
    attention_flops_per_token: int
    memory_layer_breakdown: dict[str, int]  # parameters of memory layer 0 by name
    expert_params: int = 0  # routed MoE experts' weights, all experts of all layers
    expert_activated: int = 0  # of those, the top_k experts per layer a token runs
    n_moe_layers: int = 0

    @property
    def total_without_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def activated_without_embedding(self) -> int:
        return self.activated - self.embedding

    @property
    def flops_per_token(self) -> int:
        return 6 * self.matmul_activated + self.attention_flops_per_token

    @property
    def training_state_bytes(self) -> int:
        return BYTES_PER_PARAM_TRAINING * self.total


def summarize(model: torch.nn.Module, cfg: ModelConfig, seq_len: int) -> ModelSummary:
    params = dict(model.named_parameters())  # de-duplicated: a tied head appears once
    total = sum(p.numel() for p in params.values())
    embedding = model.tok_embeddings.weight.numel()
    tables_set = table_parameters(model)
    names = {id(p): n for n, p in params.items()}
    shared = set(model.memory_tables.parameters()) if getattr(model, "memory_tables", None) is not None else set()
    n_mem = len(model.memory_layers)
    heads, knn = cfg.memory.heads, cfg.memory.knn
    tables = []
    for p in sorted(tables_set, key=lambda p: names[id(p)]):
        rows, width = p.shape[0], p[0].numel()
        tables.append(TableInfo(names[id(p)], rows, width, n_mem if p in shared else 1))
    table_params = sum(t.params for t in tables)
    reads = sum(heads * knn * t.width * t.readers for t in tables)
    memory_dense = sum(p.numel() for p in model.memory_layers.parameters() if p not in tables_set)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    experts = sum(p.numel() for m in moes for p in m.expert_parameters())
    experts_used = sum(p.numel() // m.num_experts * m.top_k for m in moes for p in m.expert_parameters())
    activated = total - table_params + reads - experts + experts_used
    one_d = sum(p.numel() for p in params.values() if p.ndim < 2 and p not in tables_set)
    attention = 6 * cfg.n_layers * cfg.dim * seq_len
    breakdown = {}
    if n_mem:
        breakdown = {n: p.numel() for n, p in model.memory_layers[0].named_parameters() if p not in tables_set}
    return ModelSummary(
        total,
        embedding,
        tables,
        table_params,
        total - table_params,
        memory_dense,
        reads,
        activated,
        activated - one_d,
        n_mem,
        seq_len,
        attention,
        breakdown,
        experts,
        experts_used,
        len(moes),
    )


def _m(n: int) -> str:
    return f"{n:>15,d}  ({n / 1e6:,.2f} M)"


def format_summary(s: ModelSummary, cfg: ModelConfig) -> str:
    gib = 1024**3
    lines = [
        f"model: dim={cfg.dim} blocks={cfg.n_layers} heads={cfg.n_heads} ffn_hidden={cfg.ffn_hidden} "
        f"vocab={cfg.vocab_size} memory={cfg.memory.type} ({s.n_memory_layers} layers, insert={cfg.memory.insert!r})",
    ]
    if s.n_moe_layers:
        moe = cfg.moe
        lines.append(
            f"moe: {s.n_moe_layers} layers, top {moe.top_k} of {moe.num_experts} experts of hidden "
            f"{moe.hidden(cfg.ffn_hidden)}, {moe.num_shared} shared"
        )
    lines += [
        "parameters",
        f"  total (with embedding)              {_m(s.total)}",
        f"  total (without embedding)           {_m(s.total_without_embedding)}",
        f"  embedding (tied with the LM head)   {_m(s.embedding)}",
        f"  value tables                        {_m(s.table_params)}",
        f"  dense (all but tables)              {_m(s.dense_params)}",
        f"    of which memory layers' own       {_m(s.memory_dense_params)}",
    ]
    if s.n_moe_layers:
        lines.append(f"    of which routed experts (all)     {_m(s.expert_params)}")
    if s.memory_layer_breakdown:
        lines.append("    one memory layer: " + ", ".join(f"{n} {v:,d}" for n, v in s.memory_layer_breakdown.items()))
    lines += [
        "activated per token (dense params + table entries read: heads·knn·width per table and layer"
        + (" + the top_k routed experts)" if s.n_moe_layers else ")"),
        f"  table entries read per token        {_m(s.table_reads_per_token)}",
    ]
    if s.n_moe_layers:
        lines.append(f"  routed experts run per token        {_m(s.expert_activated)}")
    lines += [
        f"  activated (with embedding)          {_m(s.activated)}",
        f"  activated (without embedding)       {_m(s.activated_without_embedding)}",
        f"training FLOPs per token at seq_len={s.seq_len}",
        "  formula: 6·(activated params in matmuls: all but 1-D; tied head once) + 6·n_layers·dim·seq_len",
        f"  matmul params                       {_m(s.matmul_activated)}",
        f"  attention term                      {s.attention_flops_per_token / 1e9:>15,.3f} GFLOP",
        f"  total                               {s.flops_per_token / 1e9:>15,.3f} GFLOP/token",
        "training state (fp32 params + grads + AdamW m, v = 16 B/param)",
        f"  {s.training_state_bytes / gib:,.2f} GiB  (params alone {4 * s.total / gib:,.2f} GiB fp32)",
    ]
    if s.tables:
        lines.append("value tables")
        for t in s.tables:
            lines.append(
                f"  {t.name}: {t.rows:,d} rows × {t.width} = {t.params / 1e6:,.2f} M params, "
                f"{4 * t.params / gib:,.2f} GiB fp32, read by {t.readers} layer(s)"
            )
    return "\n".join(lines)
