"""Random memory-layer configs: those within the validated ranges build, initialize, run forward
and backward (0, 1 or a few tokens; fp32 or fp64; train or eval; with or without gradient
buffers and staging) and give finite outputs and gradients; a few are compiled with
torch.compile(fullgraph=True) and match eager; configs outside the ranges raise ConfigError
(naming the key) and nothing else. Sizes and seed: fuzz_settings.py."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest
import torch
from fuzz_settings import LAYERS, LONG, SEED, write_report

from ultramem.config import ConfigError, MemoryConfig, ModelConfig
from ultramem.layers import build_memory, window_keys

TYPES = ("ultramem_v2", "ultramem_v1", "memory_plus")


def random_config(rng: random.Random) -> tuple[ModelConfig, int]:
    """A config the layers accept, with small sizes (the rules of validate_memory_config)."""
    kind = rng.choice(TYPES)
    layers = rng.randint(1, 3)
    cores = rng.randint(1, 3) if kind != "memory_plus" else 1
    mem = dict(
        type=kind,
        knum=rng.randint(2, 7),
        kdim=rng.randint(1, 8),
        vdim=cores * rng.randint(1, 4),
        heads=rng.randint(1, 3),
        tucker_rank=rng.randint(1, 3),
        tucker_cores=cores,
        key_expand=rng.randint(1, 2),
        q_per_rank=rng.random() < 0.5,
        glu_act=rng.random() < 0.5,
        init=rng.choice(["paper", "released"]),
        dropout=rng.choice([0.0, 0.0, 0.2]),
        tucker_rank_penalty=rng.choice([None, 0.0, 0.05]),
        tucker_rank_margin=rng.choice([0.0, 0.15]),
        key_balance_coef=rng.choice([0.0, 0.0, 0.1]),
        calibration_rounds=rng.randint(1, 2),
        pre_vdim=rng.choice([0, 1, 3, 5]) if kind == "ultramem_v2" else 0,
        share_ratio=rng.choice([0.2, 0.5, 1.0, 1.0 / 3.0]),
    )
    if kind == "ultramem_v2":
        n = window_keys(mem["knum"], layers, mem["share_ratio"])
        if n < 1:
            mem["share_ratio"] = 1.0
            n = window_keys(mem["knum"], layers, 1.0)
        keys = mem["key_expand"] * n
    elif kind == "ultramem_v1":
        keys = mem["key_expand"] * mem["knum"]
    else:
        keys = mem["knum"]
    mem["knn"] = rng.randint(1, min(keys, 6))
    cfg = ModelConfig(
        dim=rng.choice([4, 8, 12, 16]), ffn_hidden=rng.choice([8, 32]), n_layers=layers, memory=MemoryConfig(**mem)
    )
    return cfg, layers


# one broken key per invalid config: (key, value or a function of the config giving it)
BREAKS = [
    ("heads", 0),
    ("knum", 0),
    ("kdim", 0),
    ("vdim", 0),
    ("knn", 0),
    ("knn", -3),
    ("log_interval", 0),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("key_balance_coef", -0.5),
    ("tucker_rank", 0),
    ("tucker_cores", 0),
    ("key_expand", 0),
    ("tucker_rank_penalty", -1.0),
    ("tucker_rank_margin", -0.1),
    ("pre_vdim", -1),
    ("share_ratio", 0.0),
    ("share_ratio", 1.5),
    ("type", "ultramem_v3"),
    ("init", "xavier"),
    ("knn", lambda c, l: _keys_per_side(c, l) + 1),
    ("vdim", lambda c, l: c.memory.tucker_cores * 2 + 1),
    ("calibration_rounds", 0),
    ("model.dim", 0),
    ("model.ffn_hidden", 0),
    ("num_memory_layers", 0),
]


def _keys_per_side(cfg: ModelConfig, layers: int) -> int:
    m = cfg.memory
    if m.type == "memory_plus":
        return m.knum
    n = window_keys(m.knum, layers, m.share_ratio) if m.type == "ultramem_v2" else m.knum
    return m.key_expand * n


def invalid_config(rng: random.Random):
    """A valid config with one key broken (re-drawn until the break applies to its type)."""
    while True:
        cfg, layers = random_config(rng)
        key, value = rng.choice(BREAKS)
        m = cfg.memory
        if key == "pre_vdim" and m.type != "ultramem_v2" or key == "share_ratio" and m.type != "ultramem_v2":
            continue
        if (
            key
            in ("tucker_rank", "tucker_cores", "key_expand", "tucker_rank_penalty", "tucker_rank_margin", "vdim_cores")
            and m.type == "memory_plus"
        ):
            continue
        if key == "calibration_rounds" and (m.init != "paper" or m.type == "memory_plus"):
            continue
        if key == "vdim" and callable(value) and (m.type == "memory_plus" or m.tucker_cores == 1):
            continue
        value = value(cfg, layers) if callable(value) else value
        if key == "num_memory_layers":
            return cfg, value, key
        if key.startswith("model."):
            return dataclasses.replace(cfg, **{key[6:]: value}), layers, key
        return dataclasses.replace(cfg, memory=dataclasses.replace(m, **{key: value})), layers, key


def build(cfg: ModelConfig, layers: int, seed: int, dtype: torch.dtype):
    tables, mods = build_memory(cfg, layers)
    g = torch.Generator().manual_seed(seed)
    for layer in mods:
        layer.reset_parameters(g, tables)
        layer.refresh_rank1()
        layer.to(dtype)
    if tables is not None:
        tables.to(dtype)
    return tables, mods, g


def _finite(t) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def run_valid(seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    cfg, layers = random_config(rng)
    dtype = rng.choice([torch.float32, torch.float64])
    tables, mods, g = build(cfg, layers, seed, dtype)
    m = cfg.memory
    where = f"seed {seed}: {m.type} L={layers} {dtype} {cfg.memory}"
    buffers = tables is not None and rng.random() < 0.5
    if buffers:
        tables.use_grad_buffers()
        if rng.random() < 0.5:
            entries, cores = m.lookup_shape
            tables.use_grad_staging(rng.randint(1, 12), entries, cores, dtype)
    for layer in mods:
        layer.train(rng.random() < 0.7)
    layer = mods[rng.randrange(layers)]
    shape = rng.choice([(0,), (1,), (1, 1), (2, 0), (2, 3), (5,), (1, 7)])
    x = torch.randn(*shape, cfg.dim, generator=g, dtype=dtype, requires_grad=True)
    y, aux = layer(x, tables)
    assert y.shape == x.shape and y.dtype == dtype, where
    assert aux.dim() == 0 and _finite(aux) and _finite(y), where
    if x.numel() == 0:
        assert float(aux) == 0.0, where
    loss = (y * torch.randn(y.shape, generator=g, dtype=dtype)).sum() + aux
    loss.backward()
    if buffers:
        tables.flush_grad_staging()
    assert _finite(x.grad), where
    for name, p in [*layer.named_parameters(), *(tables.named_parameters() if tables is not None else [])]:
        assert _finite(p.grad), f"{where}: {name}.grad"
    stats["valid"] += 1
    stats["by_type"][m.type] = stats["by_type"].get(m.type, 0) + 1
    stats["tokens"] += x.numel() // cfg.dim
    stats["max_abs_out"] = max(stats["max_abs_out"], float(y.detach().abs().max()) if y.numel() else 0.0)
    if buffers:
        tables.use_grad_buffers(False)


def run_invalid(seed: int, stats: dict) -> None:
    cfg, layers, key = invalid_config(random.Random(seed))
    try:
        build_memory(cfg, layers)
    except ConfigError as exc:
        short = key.split(".")[-1]
        assert short in str(exc), f"seed {seed}: the ConfigError does not name {key}: {exc}"
    else:
        raise AssertionError(f"seed {seed}: {key} broken, yet build_memory accepted {cfg}")
    stats["invalid"] += 1
    stats["invalid_keys"][key] = stats["invalid_keys"].get(key, 0) + 1


def test_layer_fuzz():
    stats = dict(valid=0, invalid=0, tokens=0, max_abs_out=0.0, by_type={}, invalid_keys={})
    start = time.monotonic()
    for i in range(LAYERS["valid"]):
        run_valid(SEED * 1_000_003 + i, stats)
    for i in range(LAYERS["invalid"]):
        run_invalid(SEED * 1_000_003 + 500_000 + i, stats)
    stats["seconds"] = round(time.monotonic() - start, 1)
    print(
        f"\nlayer fuzz: {stats['valid']} configs run ({stats['by_type']}, {stats['tokens']} tokens, largest "
        f"|y| {stats['max_abs_out']:.3g}), {stats['invalid']} invalid configs refused with ConfigError "
        f"({len(stats['invalid_keys'])} keys) in {stats['seconds']} s"
    )
    write_report("layers", stats)
    assert stats["valid"] == LAYERS["valid"] and stats["invalid"] == LAYERS["invalid"]


def _compile_case(i: int):
    """A config (cycling through the types, with pre-values for v2) for the compiled cases."""
    rng = random.Random(SEED * 7_777 + i)
    while True:
        cfg, layers = random_config(rng)
        if cfg.memory.type == TYPES[i % 3] and (cfg.memory.type != "ultramem_v2" or cfg.memory.pre_vdim):
            # no dropout: eager and compiled code may draw the masks differently
            return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, dropout=0.0)), layers


@pytest.mark.parametrize("i", range(LAYERS["compiled"]))
def test_layer_fuzz_compiled(i):
    """torch.compile(fullgraph=True) (aot_eager: Dynamo capture, AOT autograd, functionalization
    of the stats buffers, without Inductor's C++ build) forward + backward against eager."""
    cfg, layers = _compile_case(i)
    torch._dynamo.reset()
    tables, mods, g = build(cfg, layers, 100 + i, torch.float32)
    layer = mods[-1].train()
    x = torch.randn(2, 4, cfg.dim, generator=g)
    gy = torch.randn(2, 4, cfg.dim, generator=g)
    params = [p for p in layer.parameters()] + ([] if tables is None else list(tables.parameters()))

    def run(fn):
        y, aux = fn(x, tables)
        return [y, aux, *torch.autograd.grad((y * gy).sum() + aux, params, allow_unused=True)]

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    worst = 0.0
    for want, got in zip(eager, compiled):
        if want is None:
            assert got is None
            continue
        assert _finite(got)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        worst = max(worst, float((got - want).detach().abs().max()) if got.numel() else 0.0)
    print(f"\nlayer fuzz compiled: {cfg.memory.type} L={layers}: worst |compiled - eager| {worst:.2e}")
    assert math.isfinite(worst)
    if LONG or i == 0:
        write_report(f"layers_compiled_{i}", dict(type=cfg.memory.type, worst_abs_diff=worst))


@pytest.mark.parametrize("key,value", [("knum", 2.5), ("heads", 1.5), ("vdim", "4"), ("knn", 2.0)])
def test_non_integer_sizes_raise_config_error(key, value):
    memory = MemoryConfig(**{**dict(knum=4, kdim=4, vdim=4, pre_vdim=2, knn=1), key: value})
    with pytest.raises(ConfigError, match=f"model.memory.{key}=.*must be an integer"):
        build_memory(ModelConfig(dim=8, ffn_hidden=8, n_layers=2, memory=memory), 2)
