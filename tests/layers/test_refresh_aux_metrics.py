"""Rank-1 refresh, auxiliary losses and metrics of the memory layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_layer_oracle import memory_plus_oracle, tucker_oracle
from memory_layer_setup import build_random, make_cfg, make_input
from torch.utils._python_dispatch import TorchDispatchMode

import ultramem.layers.ultramem_v2 as v2_module
from ultramem.layers import build_memory
from ultramem.layers._common import LayerStats, rank1_refresh
from ultramem.layers.tucker import refresh_rank1_all

# ------------------------------------------------------------------------------ rank-1 refresh


def _layer_with_random_cores(rank=3, heads=2, seed=0):
    cfg = make_cfg(type="ultramem_v2", heads=heads, tucker_rank=rank, tucker_cores=2)
    tables, layers, g = build_random(cfg, 2, seed=seed)
    layer = layers[0]
    layer.rank1_u.zero_()
    layer.rank1_v.zero_()
    return layer, g


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_refresh_gives_first_singular_vectors(rank):
    layer, _ = _layer_with_random_cores(rank=rank)
    layer.refresh_rank1()
    for h in range(layer.heads):
        s = layer.cores.detach()[h].sum(0).numpy()
        left, sv, right_t = np.linalg.svd(s)
        u, v = layer.rank1_u[h].numpy(), layer.rank1_v[h].numpy()
        assert abs(abs(u @ left[:, 0]) - 1) < 1e-6 and abs(abs(v @ right_t[0]) - 1) < 1e-6
        assert u @ s @ v == pytest.approx(sv[0], rel=1e-6)  # u and v carry the same sign
        assert u.sum() + v.sum() >= 0  # the first refresh's sign convention


def test_refresh_keeps_the_sign_when_the_svd_flips(monkeypatch):
    layer, _ = _layer_with_random_cores(rank=3)  # r >= 3 goes through torch.linalg.svd
    layer.refresh_rank1()
    u0, v0 = layer.rank1_u.clone(), layer.rank1_v.clone()
    real_svd = torch.linalg.svd

    def flipped_svd(a, *args, **kwargs):
        left, s, right_h = real_svd(a, *args, **kwargs)
        return -left, s, -right_h

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    layer.refresh_rank1()
    torch.testing.assert_close(layer.rank1_u, u0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.rank1_v, v0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rank", [2, 3])
def test_refresh_after_a_small_perturbation_does_not_flip(rank):
    layer, g = _layer_with_random_cores(rank=rank, seed=3)
    layer.refresh_rank1()
    for _ in range(5):
        u_old, v_old = layer.rank1_u.clone(), layer.rank1_v.clone()
        with torch.no_grad():
            layer.cores.add_(1e-2 * torch.randn(layer.cores.shape, generator=g, dtype=layer.cores.dtype))
        layer.refresh_rank1()
        assert torch.all((layer.rank1_u * u_old).sum(-1) > 0)
        assert torch.all((layer.rank1_v * v_old).sum(-1) > 0)


@pytest.mark.parametrize("rank", [2, 3])
def test_refresh_of_all_layers_at_once_matches_each_layer_alone(rank):
    cfg = make_cfg(type="ultramem_v2", heads=2, tucker_rank=rank, tucker_cores=2)
    _, layers, _ = build_random(cfg, 4, seed=5)  # distinct cores and previous u, v per layer
    expected = [rank1_refresh(layer.cores, layer.rank1_u, layer.rank1_v) for layer in layers]
    layers[1].float()  # a second kind of cores: batched apart
    refresh_rank1_all(layers)
    for layer, (u, v) in zip(layers, expected):
        tol = {} if layer.cores.dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(layer.rank1_u, u.to(layer.rank1_u.dtype), **tol)
        torch.testing.assert_close(layer.rank1_v, v.to(layer.rank1_v.dtype), **tol)


def test_refresh_of_all_layers_launches_as_many_ops_for_eight_layers_as_for_two():
    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 8):
        _, layers, _ = build_random(make_cfg(type="ultramem_v2", heads=1), n, seed=0)
        Count.ops = 0
        with Count():
            refresh_rank1_all(layers)
        counts.append(Count.ops)
    assert counts[0] == counts[1], counts


# ------------------------------------------------------------------------------ auxiliary losses


def _balance_from_trace(trace, n_side, side):
    """n'·Σ_i p_i f_i from the oracle's coarse scores and kept pairs (numpy)."""
    coarse = np.array(trace[side])  # [T·H, n']
    p = np.exp(coarse - coarse.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(0)
    kept = [e[0] if side == "a" else e[1] for entries in trace["kept"] for e in entries]
    f = np.bincount(kept, minlength=n_side) / len(kept)
    return n_side * float((p * f).sum())


@pytest.mark.parametrize("rank", [2, 3])
def test_aux_losses_match_direct_formulas(rank):
    coef_rank, margin, coef_bal = 0.05, 0.01, 0.3
    cfg = make_cfg(
        type="ultramem_v2",
        heads=2,
        tucker_rank=rank,
        key_expand=2,
        tucker_rank_penalty=coef_rank,
        tucker_rank_margin=margin,
        key_balance_coef=coef_bal,
    )
    tables, layers, g = build_random(cfg, 2, seed=8)
    layer = layers[1]
    x = make_input((3, 3), g)
    _, aux = layer(x, tables)
    _, trace = tucker_oracle(layer, x, tables, kind="v2", n=layer.n, offset=36, num_rows=72)
    # Tucker penalty: mean over heads of Σ_{i>=2} relu(σ_i − margin)², and its gradient
    # d/dC_m = coef/H · Σ_{i>=2} 2·relu(σ_i − margin)·u_i v_iᵀ (numpy SVD)
    cores = layer.cores.detach().numpy()
    penalty, grad_cores = 0.0, np.zeros_like(cores)
    for h in range(cores.shape[0]):
        left, sv, right_t = np.linalg.svd(cores[h].sum(0))
        excess = np.maximum(sv[1:] - margin, 0)
        penalty += (excess**2).sum() / cores.shape[0]
        g_s = sum(2 * excess[i - 1] * np.outer(left[:, i], right_t[i]) for i in range(1, len(sv)))
        grad_cores[h] = coef_rank / cores.shape[0] * g_s
    balance = _balance_from_trace(trace, layer.n_side, "a") + _balance_from_trace(trace, layer.n_side, "b")
    assert float(aux.detach()) == pytest.approx(coef_rank * penalty + coef_bal * balance, rel=1e-10)
    assert penalty > 0 and balance > 0
    # the balance loss's gradient reaches the queries (through p), the penalty's the cores
    grad_c, grad_q = torch.autograd.grad(aux, [layer.cores, layer.w_q.weight])
    assert float(grad_q.abs().sum()) > 0
    # only the penalty depends on the cores (selection is not differentiated, u/v are constants)
    np.testing.assert_allclose(grad_c.numpy(), grad_cores, rtol=1e-8, atol=1e-12)


def test_rank2_penalty_is_finite_at_degenerate_cores():
    """Equal singular values (σ1 = σ2) and σ2 = 0 are where the closed form's square roots kink."""
    from ultramem.layers._common import tucker_rank_penalty

    for s in (torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 4.0]]), torch.zeros(2, 2)):
        cores = (s / 2).expand(1, 2, 2, 2).clone().double().requires_grad_(True)
        for margin in (0.0, 0.15):
            penalty = tucker_rank_penalty(cores, margin)
            want = sum(max(x - margin, 0.0) ** 2 for x in np.linalg.svd(s.numpy(), compute_uv=False)[1:])
            assert float(penalty.detach()) == pytest.approx(want, abs=1e-12)
            (grad,) = torch.autograd.grad(penalty, cores)
            assert bool(torch.isfinite(grad).all())


def test_memory_plus_key_balance_matches_formula():
    cfg = make_cfg(type="memory_plus", heads=2, key_balance_coef=0.7)
    tables, layers, g = build_random(cfg, 1, seed=4)
    x = make_input((5,), g)
    _, aux = layers[0](x, tables)
    _, trace = memory_plus_oracle(layers[0], x, tables)
    want = _balance_from_trace(trace, 6, "a") + _balance_from_trace(trace, 6, "b")
    assert float(aux.detach()) == pytest.approx(0.7 * want, rel=1e-10)


@pytest.mark.parametrize("kind", ["ultramem_v2", "ultramem_v1", "memory_plus"])
def test_aux_losses_off_means_zero_and_no_compute(kind, monkeypatch):
    import ultramem.layers.memory_plus as mp_module

    def forbidden(*args, **kwargs):
        raise AssertionError("auxiliary loss computed while its coefficient is 0")

    for module in (v2_module, mp_module):
        for name in ("tucker_rank_penalty", "key_balance_side"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
    # documented defaults except v1's rank penalty (on by default for v1: 0.001)
    memory = {"type": kind}
    if kind == "ultramem_v1":
        memory["tucker_rank_penalty"] = 0.0
    tables, layers, g = build_random(make_cfg(**memory), 2, seed=1)
    y, aux = layers[0](make_input((4,), g), tables)
    assert aux.dim() == 0 and float(aux) == 0.0 and not aux.requires_grad


def test_v1_rank_penalty_is_on_by_default():
    cfg = make_cfg(type="ultramem_v1")
    assert cfg.memory.rank_penalty == 0.001
    tables, layers, g = build_random(cfg, 1, seed=2)
    with torch.no_grad():
        layers[0].cores.copy_(torch.eye(2, dtype=torch.float64).expand_as(layers[0].cores))  # σ = (2, 2)
    _, aux = layers[0](make_input((3,), g), None)
    assert float(aux.detach()) == pytest.approx(0.001 * (2 - 0.15) ** 2, rel=1e-12)


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("compiled", [False, True])
def test_stats_collect_nothing_while_disabled(compiled):
    torch._dynamo.reset()
    cfg = make_cfg(type="ultramem_v2", heads=1)
    tables, layers, g = build_random(cfg, 2, seed=0)
    layer = layers[0].train()
    forward = torch.compile(layer) if compiled else layer
    x = make_input((16,), g)
    forward(x, tables)
    hits, sums = layer.stats.hits.clone(), layer.stats.sums.clone()
    assert hits.sum() > 0
    layer.stats.enabled = False
    forward(x, tables)
    torch.testing.assert_close(layer.stats.hits, hits, rtol=0, atol=0)
    torch.testing.assert_close(layer.stats.sums, sums, rtol=0, atol=0)
    layer.stats.enabled = True
    forward(x, tables)
    torch.testing.assert_close(layer.stats.hits, 2 * hits, rtol=0, atol=0)
    torch._dynamo.reset()


def test_stats_report_matches_numpy():
    stats = LayerStats(8)
    hist = np.array([3, 0, 1, 0, 5, 0, 0, 7], dtype=np.float64)
    stats.hits.copy_(torch.from_numpy(hist))
    stats.sums.copy_(torch.tensor([2.0, 10.0, 4.0, 6.0, 3.0, 2.0], dtype=torch.float64))
    out = stats.report()
    p = hist / hist.sum()
    nz = p > 0
    assert out["coverage"] == pytest.approx(4 / 8)
    assert out["kl_uniform"] == pytest.approx(float((p[nz] * np.log(p[nz] * 8)).sum()), rel=1e-12)
    assert out["out_std"] == pytest.approx(np.sqrt(10 / 4 - (2 / 4) ** 2))
    assert out["top1_score"] == pytest.approx(3.0) and out["kth_score"] == pytest.approx(1.5)
    again = stats.report()  # reset after reading
    assert again["coverage"] == 0 and np.isnan(again["kl_uniform"]) and np.isnan(again["out_std"])
    uniform = LayerStats(5)
    uniform.hits.fill_(2)
    assert uniform.report()["kl_uniform"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_totals_match_float64(dtype):
    """Two forwards' Σy, Σy², Σ_m of the top-1 and of the k-th scores, with their counts,
    accumulated into the fp64 totals, against float64 sums of the same values."""
    g = torch.Generator().manual_seed(3)
    stats = LayerStats(50)
    y = (torch.randn(300, 24, generator=g) + 0.5).to(dtype)
    scores = torch.rand(300, 2, 3, 2, generator=g).to(dtype)  # [T, H, k, M]
    for _ in range(2):
        stats.accumulate(torch.randint(0, 50, (300, 2), generator=g), y, scores)
    y64, s64 = y.double(), scores.double()
    want = [y64.sum(), y64.square().sum(), 300 * 24, s64[:, :, 0].sum(), s64[:, :, -1].sum(), 600]
    totals = 2 * torch.tensor([float(w) for w in want], dtype=torch.float64)
    torch.testing.assert_close(stats.sums, totals, rtol=1e-5, atol=1e-4)
    assert float(stats.hits.sum()) == 2 * 600


@pytest.mark.parametrize("cast", ["bfloat16", "half", "float"])
def test_counters_stay_float64_when_the_model_is_cast(cast):
    """model.bfloat16() would make the hit counts stop at 256: the counters keep their dtype and
    values through casts, and still move with the module."""
    stats = LayerStats(4)
    stats.hits[0] = 2**24 + 1
    stats.sums[1] = 1 / 3
    outer = torch.nn.Sequential(stats)
    getattr(outer, cast)()
    assert stats.hits.dtype == stats.sums.dtype == torch.float64
    assert int(stats.hits[0]) == 2**24 + 1 and float(stats.sums[1]) == 1 / 3
    outer.to("meta", torch.bfloat16)  # moved and cast in one call
    assert stats.hits.device.type == "meta" and stats.hits.dtype == stats.sums.dtype == torch.float64


def test_hit_counter_does_not_saturate():
    """A busy value passes 2^24 hits within one report interval at the 227M shapes; the count
    (and the KL) must keep growing past it."""
    stats = LayerStats(4)
    stats.hits[0] = 2**24
    stats.accumulate(torch.zeros(1000, dtype=torch.int64), torch.zeros(3), torch.zeros(2, 1, 1))
    assert int(stats.hits[0]) == 2**24 + 1000


@pytest.mark.parametrize("kind", ["ultramem_v2", "ultramem_v1", "memory_plus"])
def test_layer_metrics_accumulate_in_training_only(kind):
    cfg = make_cfg(type=kind, heads=2, key_expand=2 if kind == "ultramem_v1" else 1)
    tables, layers, g = build_random(cfg, 2, seed=6)
    layer = layers[1]
    layer.stats.reset()
    x1, x2 = make_input((5,), g), make_input((2, 2), g)
    layer.eval()
    layer(x1, tables)
    assert float(layer.stats.hits.sum()) == 0 and float(layer.stats.sums.abs().sum()) == 0
    layer.train()
    ys, traces = [], []
    for x in (x1, x2):
        y, _ = layer(x, tables)
        ys.append(y.detach().reshape(-1))
        if kind == "memory_plus":
            traces.append(memory_plus_oracle(layer, x, tables)[1])
        else:
            traces.append(tucker_oracle(layer, x, tables, kind=kind[-2:], n=layer.n, offset=36, num_rows=72)[1])
    entries = [e for tr in traces for kept in tr["kept"] for e in kept]
    n_values = layer.stats.num_values
    hist = np.bincount([e[2] for e in entries], minlength=n_values).astype(np.float64)
    np.testing.assert_array_equal(layer.stats.hits.numpy(), hist)
    per_head = [kept for tr in traces for kept in tr["kept"]]
    y_all = torch.cat(ys).numpy()
    out = layer.metrics()
    p = hist / hist.sum()
    nz = p > 0
    assert out["coverage"] == pytest.approx(nz.mean())
    assert out["kl_uniform"] == pytest.approx(float((p[nz] * np.log(p[nz] * n_values)).sum()), rel=1e-9)
    assert out["out_std"] == pytest.approx(float(y_all.std()), rel=1e-9)
    assert out["top1_score"] == pytest.approx(np.mean([k[0][4] for k in per_head]), rel=1e-9)
    assert out["kth_score"] == pytest.approx(np.mean([k[-1][4] for k in per_head]), rel=1e-9)
    if kind != "memory_plus":
        for h in range(layer.heads):
            sv = np.linalg.svd(layer.cores.detach()[h].sum(0).numpy(), compute_uv=False)
            for i, s in enumerate(sv):
                assert out[f"sv_h{h}_{i}"] == pytest.approx(float(s), rel=1e-5)
    assert float(layer.stats.hits.sum()) == 0  # reset by metrics()


@pytest.mark.parametrize("kind", ["ultramem_v2", "ultramem_v1", "memory_plus"])
def test_training_forward_reads_nothing_back_to_the_host(kind, monkeypatch):
    """The stats update stays on the device: no .item()/.tolist()/float()/bool() on a tensor."""
    tables, layers = build_memory(make_cfg(type=kind, key_balance_coef=0.1), 2)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.reset_parameters(g, tables)
    layer = layers[0].train()
    x = torch.randn(3, 4, 16, generator=g)

    def sync(*args, **kwargs):
        raise AssertionError("host sync during a training forward")

    for name in ("item", "tolist", "__float__", "__bool__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    y, aux = layer(x, tables)
    (y.sum() + aux).backward()
    monkeypatch.undo()
    assert float(layer.stats.hits.sum()) == 12 * layer.knn
