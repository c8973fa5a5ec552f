"""Initialization: the "paper" scheme's output variance against a SwiGLU FFN's, the "released"
and Memory+ constants, reproducibility, and building on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from memory_layer_setup import make_cfg

from ultramem.config import MemoryConfig, ModelConfig
from ultramem.layers import build_memory

D, L = 128, 4
FFN_HIDDEN = int(4 * D * 2 / 3)  # 341


def ffn_output_variance(std: float, n_layers: int, tokens: int, seed: int) -> float:
    """SwiGLU d → ffn_hidden → d with the paper init on unit-variance input."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(FFN_HIDDEN, D, generator=g, dtype=torch.float64) * std
    w3 = torch.randn(FFN_HIDDEN, D, generator=g, dtype=torch.float64) * std
    w2 = torch.randn(D, FFN_HIDDEN, generator=g, dtype=torch.float64) * std / math.sqrt(2 * n_layers)
    u = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    return float((F.silu(u @ w1.T) * (u @ w3.T) @ w2.T).var())


@pytest.mark.parametrize(
    "kind,pre_vdim,glu", [("ultramem_v2", 64, True), ("ultramem_v2", 0, True), ("ultramem_v1", 0, True)]
)
def test_paper_init_output_variance_matches_ffn(kind, pre_vdim, glu):
    cfg = ModelConfig(
        dim=D,
        n_layers=L,
        ffn_hidden=FFN_HIDDEN,
        memory=MemoryConfig(type=kind, knum=32, kdim=32, vdim=64, pre_vdim=pre_vdim, knn=8, glu_act=glu, init="paper"),
    )
    tables, layers = build_memory(cfg, L)
    g = torch.Generator().manual_seed(7)
    for layer in layers:
        layer.reset_parameters(g, tables)
    x = torch.randn(4096, D, generator=torch.Generator().manual_seed(8))
    variances, score_means = [], []
    with torch.no_grad():
        for layer in layers:
            layer.eval()
            y, _ = layer(x, tables)
            variances.append(float(y.var()))
            score_means.append(float(layer._retrieve(x)[3].mean()))
    ffn = ffn_output_variance(cfg.std, L, 4096, seed=9)
    ratio = sum(variances) / len(variances) / ffn
    print(
        f"{kind} pre_vdim={pre_vdim}: memory/FFN output variance {ratio:.3f} "
        f"(per layer {[round(v / ffn, 3) for v in variances]}, FFN {ffn:.5f})"
    )
    assert 0.75 < ratio < 1.25
    # calibration: the selected per-core scores average ~1 on fresh inputs
    for mean in score_means:
        assert 0.9 < mean < 1.1


def _sample_std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def test_released_init_constants():
    cfg = make_cfg(type="ultramem_v2", init="released", knum=16, kdim=64, vdim=32, pre_vdim=16, heads=2)
    tables, layers = build_memory(cfg, 2)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.reset_parameters(g, tables)
    layer = layers[0]
    assert torch.all(layer.norm_q.weight == 64**-0.4) and torch.all(layer.norm_k.weight == 64**-0.4)
    for t, want in [
        (layer.w_q.weight, 64**-0.5),
        (layer.keys, 64**-0.5),
        (layer.w_o.weight, 32**-0.5),
        (layer.w_p.weight, 16**-0.5),
        (tables.values, 0.02),
        (tables.pre_values, 0.02),
    ]:
        assert abs(_sample_std(t) / want - 1) < 0.1
    assert float(layer.cores.detach().min()) >= 0 and float(layer.cores.detach().max()) < 1

    cfg1 = make_cfg(type="ultramem_v1", init="released", knum=16, kdim=64, vdim=32, key_expand=2)
    _, v1 = build_memory(cfg1, 1)
    v1[0].reset_parameters(g, None)
    assert torch.all(v1[0].norm_q.weight == 64**-0.33)
    assert abs(_sample_std(v1[0].w_o.weight) / (32 * 4) ** -0.5 - 1) < 0.1
    assert abs(_sample_std(v1[0].values) / 0.02 - 1) < 0.1


def test_memory_plus_init_constants():
    cfg = make_cfg(type="memory_plus", knum=16, kdim=32, vdim=24, heads=2)
    tables, layers = build_memory(cfg, 2)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.reset_parameters(g, tables)
    layer = layers[1]
    bound = math.sqrt(6 / (16 + 2 * 2 * 32))
    w_max = float(layer.w_q.weight.detach().abs().max())
    assert 0.9 * bound < w_max <= bound
    assert float(layer.keys.detach().abs().max()) <= 64**-0.5
    assert torch.all(layer.norm_q.weight == 1) and torch.all(layer.norm_k.weight == 1)
    assert abs(_sample_std(layer.w_s.weight) / 16**-0.5 - 1) < 0.1
    assert abs(_sample_std(layer.w_o.weight) / 24**-0.5 - 1) < 0.1
    assert tables.values.shape == (256, 24) and abs(_sample_std(tables.values) / 24**-0.5 - 1) < 0.05


def _init_state(cfg, num_layers, seed, meta: bool):
    if meta:
        with torch.device("meta"):
            tables, layers = build_memory(cfg, num_layers)
        for mod in [tables, *layers]:
            if mod is not None:
                mod.to_empty(device="cpu")
    else:
        tables, layers = build_memory(cfg, num_layers)
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        layer.reset_parameters(g, tables)
        layer.refresh_rank1()
    state = {}
    for i, layer in enumerate(layers):
        state.update({f"{i}.{k}": v for k, v in layer.state_dict().items()})
    if tables is not None:
        state.update({f"tables.{k}": v for k, v in tables.state_dict().items()})
    return state, tables, layers


@pytest.mark.parametrize("kind", ["ultramem_v2", "ultramem_v1", "memory_plus"])
def test_init_is_reproducible_and_works_after_meta(kind):
    cfg = make_cfg(type=kind, key_expand=2 if kind == "ultramem_v1" else 1, heads=2)
    state_a, tables, layers = _init_state(cfg, 3, seed=5, meta=False)
    state_b, _, _ = _init_state(cfg, 3, seed=5, meta=True)
    state_c, _, _ = _init_state(cfg, 3, seed=6, meta=False)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a if state_a[k].is_floating_point())
    for layer in layers:
        if hasattr(layer, "perm"):  # a permutation of the virtual ids
            assert torch.equal(layer.perm.sort().values, torch.arange(layer.num_virtual))
        assert float(layer.stats.hits.sum()) == 0
    if tables is not None:  # the shared tables were filled after the last layer reported
        want = (sum(layer.value_init_std**4 for layer in layers) / 3) ** 0.25
        assert abs(_sample_std(tables.values) / want - 1) < 0.15


def test_paper_value_std_against_the_spec_formula():
    """Without GELU on the gate σ_V⁴ = F·ρ, F the paper's formula and ρ = E[SiLU(h)²]/Var(h) for
    h ~ N(0, d·std²); with GELU σ_V stays within 10% of F^(1/4)."""
    from ultramem.layers._common import paper_value_std

    cfg = ModelConfig(dim=768, n_layers=20, ffn_hidden=2496, memory=MemoryConfig(knn=32, vdim=192, pre_vdim=192))
    score_var = 0.3
    spec = 0.2 * (2496 / 768) * 768 / (32 * 1 * (1 + score_var) * 192 * 192 * 20)
    c_p = 768 * cfg.std**2  # 0.4
    h = torch.linspace(-12, 12, 200001, dtype=torch.float64) * math.sqrt(c_p)
    density = torch.exp(-h * h / (2 * c_p)) / math.sqrt(2 * math.pi * c_p)
    rho = float(torch.trapezoid(F.silu(h) ** 2 * density, h)) / c_p
    cfg.memory.glu_act = False
    assert paper_value_std(cfg, 20, score_var, gated=True, gelu=False) ** 4 == pytest.approx(spec * rho, rel=1e-9)
    gelu_std = paper_value_std(cfg, 20, score_var, gated=True, gelu=True)
    assert 0.9 < gelu_std / spec**0.25 < 1.0
    no_gate = paper_value_std(cfg, 20, score_var, gated=False)
    assert no_gate**2 == pytest.approx(spec * 192 * rho * c_p, rel=1e-9)
