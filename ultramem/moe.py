"""A mixture-of-experts FFN: the MoE baseline UltraMemV2 (arXiv 2508.18756) compares against,
built like OLMoE (arXiv 2409.02060).

    p = softmax(W_r u)                      router probabilities over all E experts (fp32)
    (g, e) = top-k of p                     not renormalized over the k chosen (as OLMoE)
    y = Σ_j g_j · SwiGLU_{e_j}(u)  [+ SwiGLU_shared(u)]
    aux = lb_coef · E · Σ_e f_e · P_e  +  z_coef · mean_t logsumexp(W_r u)²

f_e is the fraction of the T·k (token, slot) assignments that go to expert e (no gradient), P_e
the mean router probability of e; the balance loss is 1 when both are uniform.

No token is dropped and every shape is static, so a block compiles with fullgraph=True:
- bf16 (autocast on the GPU): the T·k assignments are sorted by expert and two
  `torch._grouped_mm` calls run each expert on its contiguous group; group sizes enter only as
  the values of the offsets tensor, never as shapes.
- any other dtype: every expert runs on every token and the router's gates (zero for experts not
  chosen) weight the hidden units. Exact, E/k times the expert FLOPs: for CPU runs and float64
  tests (`_grouped_mm` takes bf16 only under compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig


class MoE(nn.Module):
    """y, aux = moe(u): u [..., dim] → y [..., dim] and aux a scalar (the weighted router losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.dim, self.num_experts, self.top_k = cfg.dim, m.num_experts, m.top_k
        self.hidden = m.hidden(cfg.ffn_hidden)
        self.lb_coef, self.z_coef = m.lb_coef, m.z_coef
        e, h, d = self.num_experts, self.hidden, self.dim
        self.router = nn.Parameter(torch.empty(e, d))
        # nn.Linear's [out, in] layout per expert; gate and up projections fused: [E, 2h, d]
        self.w13 = nn.Parameter(torch.empty(e, 2 * h, d))
        self.w2 = nn.Parameter(torch.empty(e, d, h))
        # shared experts are always active with gate 1: one SwiGLU of num_shared·h units
        hs = m.num_shared * h
        self.shared_w13 = nn.Parameter(torch.empty(2 * hs, d)) if hs else None
        self.shared_w2 = nn.Parameter(torch.empty(d, hs)) if hs else None

    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts' weights: a token uses top_k / num_experts of them."""
        return [self.w13, self.w2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        probs, gate, expert, aux = self.route(x)
        # the experts run in autocast's dtype when it is on, like nn.Linear would
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xe = x.to(dtype)
        w13, w2 = self.w13.to(dtype), self.w2.to(dtype)
        if dtype == torch.bfloat16 and self.dim % 8 == 0 and self.hidden % 8 == 0:  # _grouped_mm's 16-byte strides
            y = self._experts_grouped(xe, gate, expert, w13, w2)
        else:
            y = self._experts_dense(xe, gate, expert, w13, w2)
        if self.shared_w13 is not None:
            y = y + _swiglu(xe, self.shared_w13.to(dtype), self.shared_w2.to(dtype))
        return y.to(x.dtype).reshape(shape), aux

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router probabilities [T, E], top-k gates and experts [T, k], and the weighted aux loss.
        In fp32 with autocast off: top-k picks and logsumexp² are sensitive to bf16 rounding."""
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(acc), self.router.to(acc))
        probs = logits.softmax(-1)
        gate, expert = probs.topk(self.top_k, dim=-1)
        counts = torch.zeros_like(probs[0]).scatter_add_(0, expert.flatten(), torch.ones_like(gate).flatten())
        f = counts / expert.numel()
        balance = self.num_experts * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return probs, gate, expert, self.lb_coef * balance + self.z_coef * z

    def _experts_grouped(self, x: Tensor, gate: Tensor, expert: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
        """Sort the T·k assignments by expert; each expert multiplies its contiguous group."""
        t, k = gate.shape
        flat = expert.flatten()
        order = flat.argsort(stable=True)
        counts = flat.new_zeros(self.num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        xs = x[order // k]  # row r holds token order[r] // k
        hs = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
        a = F.silu(hs[:, : self.hidden]) * hs[:, self.hidden :]
        ys = torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)
        y = ys[order.argsort()].view(t, k, self.dim)  # back to (token, slot) order
        return (y * gate.unsqueeze(-1)).sum(1)

    def _experts_dense(self, x: Tensor, gate: Tensor, expert: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
        """All experts on all tokens; experts not chosen get gate 0."""
        combine = gate.new_zeros(gate.shape[0], self.num_experts).scatter_add(1, expert, gate)
        hs = torch.einsum("td,efd->tef", x, w13)
        a = F.silu(hs[..., : self.hidden]) * hs[..., self.hidden :]
        return torch.einsum("teh,edh->td", a * combine.to(a.dtype).unsqueeze(-1), w2)


def _swiglu(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    h = F.linear(x, w13)
    half = h.shape[-1] // 2
    return F.linear(F.silu(h[..., :half]) * h[..., half:], w2)
