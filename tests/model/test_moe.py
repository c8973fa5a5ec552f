"""The MoE FFN: against a per-token loop in float64, its aux losses against their formulas, both
expert paths, fullgraph compile, init, config rules, and a model with MoE blocks that learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from ultramem.config import ConfigError, MemoryConfig, ModelConfig, MoEConfig
from ultramem.model import build_model
from ultramem.moe import MoE


def moe_cfg(
    num_experts=6, top_k=2, expert_hidden=8, num_shared=0, dim=16, memory="none", n_layers=2, lb_coef=0.01, z_coef=0.001
) -> ModelConfig:
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=expert_hidden,
        num_shared=num_shared,
        lb_coef=lb_coef,
        z_coef=z_coef,
    )
    mem = MemoryConfig(type=memory, knum=4, kdim=8, vdim=16, pre_vdim=8, knn=2, calibration_rounds=1)
    return ModelConfig(
        vocab_size=97, dim=dim, n_layers=n_layers, n_heads=2, ffn_hidden=32, max_seq_len=16, memory=mem, moe=moe
    )


def make_moe(cfg: ModelConfig, dtype=torch.float64, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.router.mul_(5)  # spread the router probabilities so top-k choices are not near ties
    return moe


def reference(moe: MoE, x):
    """One token at a time: softmax over all experts, top-k, Σ gate·SwiGLU_e(x) (+ shared)."""
    h = moe.hidden
    out = []
    for xt in x:
        p = torch.softmax(moe.router @ xt, dim=-1)
        gates, experts = p.topk(moe.top_k)
        yt = torch.zeros_like(xt)
        for g, e in zip(gates, experts):
            w1, w3 = moe.w13[e, :h], moe.w13[e, h:]
            yt = yt + g * (moe.w2[e] @ (F.silu(w1 @ xt) * (w3 @ xt)))
        if moe.shared_w13 is not None:
            hs = moe.shared_w13.shape[0] // 2
            yt = yt + moe.shared_w2 @ (F.silu(moe.shared_w13[:hs] @ xt) * (moe.shared_w13[hs:] @ xt))
        out.append(yt)
    return torch.stack(out)


def grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("num_shared", [0, 2])
def test_matches_per_token_loop_in_float64(num_shared):
    moe = make_moe(moe_cfg(num_shared=num_shared))
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    y, _ = moe(x)
    want = reference(moe, x.reshape(-1, 16)).reshape(3, 5, 16)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    inputs = [x] + list(moe.parameters())
    for name, got, ref in zip(
        ["x"] + [n for n, _ in moe.named_parameters()], grads(y, inputs, gy), grads(want, inputs, gy)
    ):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=name)


def test_grouped_path_matches_the_loop():
    """The sorted, grouped-matmul path (bf16 in training) in fp32 eager, where _grouped_mm also runs:
    the same outputs and gradients as the float64 loop."""
    moe = make_moe(moe_cfg(num_experts=5, top_k=3, expert_hidden=8))
    x = torch.randn(17, 16, dtype=torch.float64, requires_grad=True)
    want = reference(moe, x)
    gy = torch.randn_like(want)
    ref_grads = grads(want, [x, moe.w13, moe.w2, moe.router], gy)
    m32 = moe.float()
    x32 = x.detach().float().requires_grad_()
    _, gate, expert, _ = m32.route(x32)
    y = m32._experts_grouped(x32, gate, expert, m32.w13, m32.w2)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads(y, [x32, m32.w13, m32.w2, m32.router], gy.float()), ref_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_takes_the_grouped_path_and_agrees_with_dense():
    moe = make_moe(moe_cfg(num_experts=8, top_k=2, expert_hidden=16), dtype=torch.float32)
    x = torch.randn(2, 9, 16)
    called = []
    grouped = moe._experts_grouped
    moe._experts_grouped = lambda *a: called.append(1) or grouped(*a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert called and y.dtype == torch.float32 and aux.dtype == torch.float32
    with torch.no_grad():
        _, gate, expert, _ = moe.route(x.reshape(-1, 16))
        xb, w13, w2 = x.reshape(-1, 16).bfloat16(), moe.w13.bfloat16(), moe.w2.bfloat16()
        dense = moe._experts_dense(xb, gate, expert, w13, w2)
        torch.testing.assert_close(grouped(xb, gate, expert, w13, w2).float(), dense.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(
        y, reference(moe.double(), x.double().reshape(-1, 16)).float().reshape(2, 9, 16), rtol=5e-2, atol=5e-2
    )


def test_aux_losses_match_their_formulas():
    cfg = moe_cfg(num_experts=6, top_k=2, lb_coef=0.3, z_coef=0.07)
    moe = make_moe(cfg)
    x = torch.randn(40, 16, dtype=torch.float64)
    _, aux = moe(x)
    logits = x @ moe.router.T
    p = logits.softmax(-1)
    chosen = p.topk(2, dim=-1).indices
    f = torch.stack([(chosen == e).sum() for e in range(6)]).double() / (40 * 2)
    balance = 6 * (f * p.mean(0)).sum()
    z = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    torch.testing.assert_close(aux, 0.3 * balance + 0.07 * z)
    # uniform routing gives balance 1 whatever the top-k picks
    with torch.no_grad():
        moe.router.zero_()
    _, aux0 = moe(x)
    torch.testing.assert_close(aux0, torch.tensor(0.3 * 1.0 + 0.07 * math.log(6) ** 2, dtype=torch.float64))


def test_balance_loss_gradient_reaches_the_router_only_through_p():
    moe = make_moe(moe_cfg(lb_coef=1.0, z_coef=0.0))
    x = torch.randn(30, 16, dtype=torch.float64)
    _, aux = moe(x)
    (g_router,) = torch.autograd.grad(aux, [moe.router])
    logits = x @ moe.router.T
    p = logits.softmax(-1)
    f = F.one_hot(p.topk(2, dim=-1).indices, 6).sum(1).double().mean(0) / 2  # constant
    router = moe.router.detach().requires_grad_()
    manual = 6 * (f * (x @ router.T).softmax(-1).mean(0)).sum()
    (want,) = torch.autograd.grad(manual, [router])
    torch.testing.assert_close(g_router, want)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiles_fullgraph(autocast):
    """fullgraph=True raises on any graph break: the routing has static shapes on both paths."""
    torch._dynamo.reset()
    moe = make_moe(moe_cfg(num_experts=8, top_k=2, expert_hidden=16, num_shared=1), dtype=torch.float32)
    x = torch.randn(2, 7, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref_y, ref_aux = moe(x)
        (ref_y.sum() + ref_aux).backward()
        ref_g = moe.w13.grad.clone()
        moe.zero_grad()
        y, aux = torch.compile(moe, fullgraph=True, backend="aot_eager")(x)
        (y.sum() + aux).backward()
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(aux, ref_aux)
    torch.testing.assert_close(moe.w13.grad, ref_g)
    torch._dynamo.reset()


def test_model_with_moe_compiles_fullgraph():
    torch._dynamo.reset()
    model = build_model(moe_cfg(), seed=0)
    tokens = torch.randint(0, 97, (2, 8))
    ref_loss, ref_aux = model(tokens, tokens)
    loss, aux = torch.compile(model, fullgraph=True, backend="aot_eager")(tokens, tokens)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(aux, ref_aux)
    torch._dynamo.reset()


# -- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["none", "ultramem_v2"])
def test_model_loss_is_ce_plus_router_losses(memory):
    model = build_model(moe_cfg(memory=memory, n_layers=3), seed=1)
    assert all(b.is_moe and isinstance(b.ffn, MoE) for b in model.blocks)
    tokens = torch.randint(0, 97, (2, 9))
    loss, aux = model(tokens, tokens)
    ce = F.cross_entropy(model(tokens).reshape(-1, 97), tokens.reshape(-1))
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    x, block_aux, mem_aux = model.tok_embeddings(tokens), 0.0, 0.0
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            x, u, a = block(x, cos, sin)
            block_aux += a.item()
            if memory != "none":
                y, la = model.memory_layers[i](u, model.memory_tables)
                x, mem_aux = x + y, mem_aux + la.item()
    assert aux.item() == pytest.approx(block_aux + mem_aux, rel=1e-5) and block_aux > 0
    assert loss.item() == pytest.approx(ce.item() + aux.item(), rel=1e-5)


def test_model_with_moe_learns_random_data():
    torch.manual_seed(0)
    model = build_model(moe_cfg(num_experts=4, top_k=2, dim=32, num_shared=1), seed=0)
    data = torch.randint(0, 97, (8, 13))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5
    for p in model.parameters():
        assert p.grad is not None


def test_init_like_the_dense_ffn():
    cfg = moe_cfg(num_experts=16, top_k=2, expert_hidden=64, dim=64, num_shared=1, n_layers=4)
    model = build_model(cfg, seed=3)
    std = math.sqrt(2 / (5 * 64))
    out_std = std / math.sqrt(2 * 4)
    cat = lambda name: torch.cat([getattr(b.ffn, name).flatten() for b in model.blocks])  # noqa: E731
    for name, s in (("router", std), ("w13", std), ("w2", out_std), ("shared_w13", std), ("shared_w2", out_std)):
        assert cat(name).std().item() == pytest.approx(s, rel=0.05), name
        assert abs(cat(name).mean().item()) < 0.05 * s, name
    again = build_model(cfg, seed=3)
    for (n, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n


def test_dense_default_is_unchanged():
    cfg = moe_cfg(num_experts=0)
    model = build_model(cfg, seed=0)
    assert not any(isinstance(m, MoE) for m in model.modules())
    assert len(model.blocks[0](torch.randn(1, 3, 16), model.rope_cos[:3], model.rope_sin[:3])) == 2


# -- config rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(num_experts=-1), "model.moe.num_experts=-1"),
        (dict(num_experts=4, top_k=5), "model.moe.top_k=5"),
        (dict(num_experts=4, top_k=0), "model.moe.top_k=0"),
        (dict(num_experts=4, top_k=2, expert_hidden=0), "model.moe.expert_hidden=0"),
        (dict(num_experts=4, top_k=2, num_shared=-1), "model.moe.num_shared=-1"),
        (dict(num_experts=4, top_k=2, lb_coef=-0.1), "model.moe.lb_coef=-0.1"),
        (dict(num_experts=4, top_k=2, z_coef=-1.0), "model.moe.z_coef=-1.0"),
    ],
)
def test_bad_moe_values_name_the_key(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        MoEConfig(**kw)


def test_toml_and_overrides_are_checked(tmp_path):
    from ultramem.train.config import load_config

    path = tmp_path / "moe.toml"
    path.write_text(
        '[model]\ndim = 32\nn_heads = 2\n[model.memory]\ntype = "none"\n[model.moe]\nnum_experts = 4\ntop_k = 8\n'
    )
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k=8"):
        load_config(str(path))
    # an override is set after the dataclasses are built: config validation checks it, and so
    # does the model build for configs made in code
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k=6"):
        load_config("dense-debug", ["--model.moe.num_experts=4", "--model.moe.top_k=6"])
    cfg = load_config("dense-debug", ["--model.moe.num_experts=4", "--model.moe.top_k=6"], validate=False)
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k=6"):
        build_model(cfg.model, device="meta")
    cfg = load_config("dense-debug", ["--model.moe.num_experts=8", "--model.moe.top_k=2"])
    assert cfg.model.moe.hidden(cfg.model.ffn_hidden) == 352 // 2


def test_summary_counts_top_k_experts_as_activated():
    from ultramem.train.summary import format_summary, summarize

    cfg = moe_cfg(num_experts=8, top_k=2, expert_hidden=12, num_shared=1, dim=16, n_layers=3)
    s = summarize(build_model(cfg, device="meta"), cfg, seq_len=16)
    d, e, k, h, L = 16, 8, 2, 12, 3
    experts = L * e * 3 * d * h
    dense = build_model(moe_cfg(num_experts=0, n_layers=3), device="meta")
    no_ffn = sum(p.numel() for p in dense.parameters()) - L * 3 * d * 32
    shared_and_router = L * (3 * d * h + e * d)
    assert s.expert_params == experts and s.expert_activated == L * k * 3 * d * h and s.n_moe_layers == L
    assert s.total == no_ffn + experts + shared_and_router
    assert s.activated == no_ffn + L * k * 3 * d * h + shared_and_router
    one_d = L * 2 * d + d
    assert s.flops_per_token == 6 * (s.activated - one_d) + 6 * L * d * 16
    text = format_summary(s, cfg)
    assert "top 2 of 8 experts" in text and f"{s.expert_activated:,d}" in text
