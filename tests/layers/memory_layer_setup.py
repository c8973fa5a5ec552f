"""Tiny memory-layer configs and randomized layers shared by the layer tests."""

from __future__ import annotations

import torch

from ultramem.config import MemoryConfig, ModelConfig
from ultramem.layers import build_memory

D = 16


def make_cfg(**memory) -> ModelConfig:
    base = dict(knum=6, kdim=8, vdim=8, pre_vdim=4, knn=3, heads=1, calibration_rounds=1)
    base.update(memory)
    return ModelConfig(dim=D, ffn_hidden=32, n_layers=3, n_heads=2, memory=MemoryConfig(**base))


def build_random(cfg: ModelConfig, num_layers: int, seed: int):
    """Build, init, go to float64, then scramble what init makes special (uniform norm scales,
    positive cores, refreshed u/v) so the formulas are exercised in general position."""
    tables, layers = build_memory(cfg, num_layers)
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        layer.reset_parameters(g, tables)
        layer.double()
    if tables is not None:
        tables.double()
    with torch.no_grad():
        for mod in [*layers, tables]:
            if mod is None:
                continue
            for p in mod.parameters():
                p.copy_(
                    torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.5 if p.dim() > 1 else 1.0)
                    + (1.0 if p.dim() == 1 else 0.0)
                )
        for layer in layers:
            if hasattr(layer, "rank1_u"):
                layer.rank1_u.copy_(torch.randn(layer.rank1_u.shape, generator=g, dtype=torch.float64))
                layer.rank1_v.copy_(torch.randn(layer.rank1_v.shape, generator=g, dtype=torch.float64))
    return tables, layers, g


def make_input(shape, g):
    x = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    flat = x.view(-1, D)
    flat[1] = flat[0]  # duplicate token: same rows selected by two tokens
    return x
