"""The decoder language model with sparse memory layers (docs/layers.md).

    x = embed(tokens)
    for each block:  h = x + Attn(norm_attn(x));  u = norm_ffn(h);  x = h + FFN(u) [+ Mem(u)]
    logits = norm(x) @ embedᵀ   (tied head)

A pre-norm decoder (RMSNorm, rotary attention, SwiGLU FFN) with memory layers beside the FFNs:
a memory layer reads a block's FFN input `u` and adds its output to the residual. UltraMemV2
(arXiv 2508.18756) puts one in every block and gives the init (`init_weights`, its Appendix A).
With `model.moe.num_experts > 0` every block's FFN is a mixture of experts (`ultramem.moe`, the
MoE baseline of UltraMemV2); its router losses join the memory layers' in the auxiliary loss.

Memory layers live beside the blocks (`Transformer.memory_layers`) and share their value tables
(`Transformer.memory_tables`). `model.memory.insert` (parsed by `ultramem.config`) says where
each one reads and writes: "full" puts layer l at block l; the skip form "a:b/c:e" (UltraMem's
skip-layer placement, arXiv 2411.12364) lets a layer read `u` of block a and add its output to
the residual after block b. Blocks are separate modules so that they can be compiled,
checkpointed and sharded one at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig, memory_placement, validate_heads, validate_moe
from ultramem.moe import MoE
from ultramem.norm import RMSNorm

# ---------------------------------------------------------------------------------------------
# Building blocks


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [max_seq_len, head_dim/2] for rotary embeddings (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, S, H, hd]; rotates consecutive pairs (x0, x1) by the position's angle."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings (one fused QKV projection)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        bsz, seq, dim = x.shape
        q, k, v = self.wqkv(x).view(bsz, seq, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(bsz, seq, dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One decoder block. Returns the new residual and the FFN input `u` (memory layers read it;
    in autocast's dtype when autocast is on), or None for `u` when `feeds_memory` is False (the
    model sets that on blocks no memory layer reads: a compiled block then writes no `u`). An MoE
    block returns its router losses as a third element: returning them, rather than keeping them
    on the module, lets a compiled block stay a pure function."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.feeds_memory = True
        self.norm_attn = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_ffn = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.moe.num_experts > 0
        self.ffn = MoE(cfg) if self.is_moe else FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, residual_adds: tuple[Tensor, ...] = ()
    ) -> tuple[Tensor, ...]:
        """residual_adds: memory layers' outputs that belong to the residual before this block.
        They are added here rather than between blocks so that, with blocks compiled one at a
        time, the add fuses into the block's first kernel (between compiled blocks it was an
        eager fp32 + bf16 add and, in the backward, an eager cast of its gradient to bf16)."""
        for y in residual_adds:
            x = x + y
        h = x + self.attn(self.norm_attn(x), cos, sin)
        u = self.norm_ffn(h)
        if self.is_moe:
            y, aux = self.ffn(u)
            extra = (aux,)
        else:
            y, extra = self.ffn(u), ()
        out = h + y
        if not self.feeds_memory:
            return out, None, *extra
        if torch.is_autocast_enabled(u.device.type):
            # Memory layers use u only through matmuls, which autocast runs in its dtype: hand it
            # over in that dtype. The cast fuses into the norm here (no fp32 u is written, nor cast
            # again in each memory layer's graph) and u's gradient comes back at half the bytes.
            u = u.to(torch.get_autocast_dtype(u.device.type))
        return out, u, *extra


# ---------------------------------------------------------------------------------------------
# Memory layers, beside the FFN (optional: the dense model never imports them)


def _build_memory(cfg: ModelConfig, n_memory: int):
    from ultramem.layers import build_memory  # memory layers are optional for the dense model

    return build_memory(cfg, n_memory)


def validate_memory(cfg: ModelConfig) -> None:
    """Let the memory layers check their own rules by building them on the meta device."""
    n_memory = len(memory_placement(cfg))
    if n_memory:
        with torch.device("meta"):
            _build_memory(cfg, n_memory)


def run_stage(
    block: Block,
    layers: tuple[nn.Module, ...],
    tables: nn.Module | None,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    written: tuple[Tensor, ...],
    aux: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """One block, then the memory layers that read its FFN input: (residual, their outputs, aux
    plus the block's and the layers' auxiliary losses)."""
    x, u, *block_aux = block(x, cos, sin, written)
    for a in block_aux:
        aux = aux + a
    ys = []
    for layer in layers:
        y, layer_aux = layer(u, tables)
        ys.append(y)
        if getattr(layer, "has_aux_loss", True):  # adding a constant 0 cost a kernel per region
            aux = aux + layer_aux
    return x, tuple(ys), aux


# ---------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """Token embedding → blocks, with the memory layers beside them → final norm → head (tied to
    the embedding unless `model.tie_embeddings` is off)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_heads(cfg)
        validate_moe(cfg.moe)  # again: command-line overrides skip the check at config load
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

        self.placement = memory_placement(cfg)
        self.memory_tables: nn.Module | None = None
        self.memory_layers = nn.ModuleList()
        if self.placement:
            tables, layers = _build_memory(cfg, len(self.placement))
            self.memory_tables = tables
            self.memory_layers = nn.ModuleList(layers)
        # block index → memory layers reading / writing there (static, so compile sees constants)
        self._reads = {a: [l for l, (r, _) in enumerate(self.placement) if r == a] for a, _ in self.placement}
        self._writes = {b: [l for l, (_, w) in enumerate(self.placement) if w == b] for _, b in self.placement}
        for i, block in enumerate(self.blocks):
            block.feeds_memory = i in self._reads

        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, targets: Tensor | None = None):
        """tokens [B, S] → logits [B, S, V]; with targets [B, S] → (loss, aux) where
        loss = mean cross-entropy + aux and aux is the sum of the memory layers' auxiliary losses
        and the MoE blocks' router losses."""
        self._check_tokens(tokens, targets)
        if self.memory_tables is not None:  # here, outside any checkpointed or compiled block
            self.memory_tables.follow_zero_grad()
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.tok_embeddings(tokens)
        loss_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; float64 models in float64
        aux = x.new_zeros((), dtype=loss_dtype)
        pending: dict[int, Tensor] = {}
        written: tuple[Tensor, ...] = ()  # memory outputs written after the previous block
        for i, block in enumerate(self.blocks):
            reads = self._reads.get(i, ())
            layers = tuple(self.memory_layers[l] for l in reads)
            x, ys, aux = run_stage(block, layers, self.memory_tables, x, cos, sin, written, aux)
            pending.update(zip(reads, ys))
            written = tuple(pending.pop(l) for l in self._writes.get(i, ()))
        for y in written:
            x = x + y
        x = self.norm(x)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = F.linear(x, weight)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), targets.flatten(0, 1))
        return loss + aux, aux

    def _check_tokens(self, tokens: Tensor, targets: Tensor | None) -> None:
        """Shapes always (free: static under torch.compile); id ranges on the CPU only, where
        reading them back costs no device sync."""
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(
                f"tokens must be integer ids of shape [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence of {tokens.shape[1]} tokens: longer than model.max_seq_len={self.rope_cos.shape[0]}"
            )
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        if tokens.device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
            vocab = self.tok_embeddings.num_embeddings
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {vocab})")

    def memory_metrics(self) -> dict[str, float]:
        """Every memory layer's metrics, keyed `mem{l}/{name}` (call on reporting steps only)."""
        out: dict[str, float] = {}
        for l, layer in enumerate(self.memory_layers):
            for name, value in layer.metrics().items():
                out[f"mem{l}/{name}"] = value
        return out

    # -- init ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Paper init (docs/layers.md): linears and embedding N(0, std), wo/w2 × 1/sqrt(2·n_layers),
        norm scales 1, memory layers by their own reset_parameters. Draws come from one CPU
        generator in a fixed order, so the result depends only on the seed (not on the device,
        nor on the number of ranks); also fills buffers after `to_empty` from the meta device."""
        cfg = self.cfg
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = cfg.std
        out_std = std / math.sqrt(2 * cfg.n_layers)

        def normal_(p: Tensor, s: float) -> None:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(s))

        normal_(self.tok_embeddings.weight, std)
        for block in self.blocks:
            block.norm_attn.reset_parameters()
            block.norm_ffn.reset_parameters()
            normal_(block.attn.wqkv.weight, std)
            normal_(block.attn.wo.weight, out_std)
            if block.is_moe:  # as the dense FFN: inputs N(0, std), output projection out_std
                normal_(block.ffn.router, std)
                normal_(block.ffn.w13, std)
                normal_(block.ffn.w2, out_std)
                if block.ffn.shared_w13 is not None:
                    normal_(block.ffn.shared_w13, std)
                    normal_(block.ffn.shared_w2, out_std)
            else:
                normal_(block.ffn.w1.weight, std)
                normal_(block.ffn.w3.weight, std)
                normal_(block.ffn.w2.weight, out_std)
        self.norm.reset_parameters()
        if self.output is not None:
            normal_(self.output.weight, std)
        if self.memory_layers:
            mem_gen = torch.Generator(device="cpu").manual_seed(seed + 1)
            for layer in self.memory_layers:
                layer.reset_parameters(mem_gen, self.memory_tables)
        self.init_buffers()
        self.refresh_rank1()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the buffers that are derived from the config, not saved in the state dict (RoPE
        tables, the memory layers' row offsets): after `to_empty` they hold garbage, and a
        state-dict load does not write them."""
        cfg = self.cfg
        device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, device=device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for layer in self.memory_layers:
            if hasattr(layer, "init_buffers"):
                layer.init_buffers()

    def refresh_rank1(self) -> None:
        """Recompute the memory layers' rank-1 core approximations (after every optimizer step):
        the Tucker layers' in one batch, any other layer by its own `refresh_rank1`."""
        if not self.memory_layers:
            return
        from ultramem.layers.tucker import TuckerMemoryBase, refresh_rank1_all

        tucker, others = [], []
        for layer in self.memory_layers:  # (layers may be wrapped, e.g. for recompute)
            found = [m for m in layer.modules() if isinstance(m, TuckerMemoryBase)]
            if found:
                tucker += found
            else:
                others.append(layer)
        refresh_rank1_all(tucker)
        for layer in others:
            layer.refresh_rank1()


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, seed: int | None = 0) -> Transformer:
    """Build on `device` (e.g. "meta" for no allocation) and, unless meta or seed is None, init."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        with torch.device("meta"):
            return Transformer(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if seed is not None:
        model.init_weights(seed)
    else:
        model.init_buffers()
    return model
