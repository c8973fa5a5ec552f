"""build_memory: what it builds, and a ConfigError naming the key for each rule it enforces."""

from __future__ import annotations

import re

import pytest
import torch
from memory_layer_setup import make_cfg

from ultramem.config import ConfigError
from ultramem.layers import MemoryPlus, UltraMemV1, UltraMemV2, ValueTables, build_memory


def test_builds_the_right_modules():
    tables, layers = build_memory(make_cfg(type="ultramem_v2", pre_vdim=4, share_ratio=0.5), 3)
    assert isinstance(tables, ValueTables) and tables.values.shape == (108, 8) and tables.pre_values.shape == (108, 4)
    assert [type(m) for m in layers] == [UltraMemV2] * 3 and [m.layer_index for m in layers] == [0, 1, 2]
    assert [m.offset for m in layers] == [0, 36, 72] and layers[0].n == 7  # floor(sqrt(54))
    tables, layers = build_memory(make_cfg(type="ultramem_v2", pre_vdim=0), 2)
    assert tables.pre_values is None and layers[0].w_p is None
    tables, layers = build_memory(make_cfg(type="ultramem_v1", key_expand=2), 2)
    assert tables is None and all(isinstance(m, UltraMemV1) for m in layers)
    assert layers[0].values.shape == (36, 8) and layers[0].w_o.in_features == 4 * 8
    tables, layers = build_memory(make_cfg(type="memory_plus", vdim=10), 2)
    assert tables.values.shape == (36, 10) and all(isinstance(m, MemoryPlus) for m in layers)
    assert build_memory(make_cfg(type="none"), 2) == (None, [])


def test_exact_share_ratios_keep_all_keys():
    _, layers = build_memory(make_cfg(type="ultramem_v2", share_ratio=1 / 3), 3)
    assert layers[0].n == 6


def test_norm_scales_are_one_dimensional_parameters():
    _, layers = build_memory(make_cfg(type="ultramem_v2"), 1)
    one_d = {n for n, p in layers[0].named_parameters() if p.dim() == 1}
    assert one_d == {"norm_q.weight", "norm_k.weight"}


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        tables, layers = build_memory(
            make_cfg(type="ultramem_v2", knum=360, kdim=192, vdim=192, pre_vdim=192, knn=32), 20
        )
    assert tables.values.shape == (2_592_000, 192) and layers[0].n == 1138 and tables.values.is_meta


BAD = [
    ({"type": "ultramem_v3"}, 2, "model.memory.type"),
    ({"init": "xavier"}, 2, "model.memory.init"),
    ({"vdim": 10, "tucker_cores": 4}, 2, "model.memory.vdim"),
    ({"knn": 7}, 2, "model.memory.knn"),  # n = floor(sqrt(36·2·0.5)) = 6 keys per side
    ({"heads": 0}, 2, "model.memory.heads"),
    ({"knum": 0}, 2, "model.memory.knum"),
    ({"kdim": 0}, 2, "model.memory.kdim"),
    ({"vdim": 0}, 2, "model.memory.vdim"),
    ({"knn": 0}, 2, "model.memory.knn"),
    ({"pre_vdim": -1}, 2, "model.memory.pre_vdim"),
    ({"share_ratio": 0.0}, 2, "model.memory.share_ratio"),
    ({"share_ratio": 1.5}, 2, "model.memory.share_ratio"),
    ({"share_ratio": 1e-4}, 2, "model.memory.share_ratio"),  # n = 0
    ({"tucker_rank": 0}, 2, "model.memory.tucker_rank"),
    ({"tucker_cores": 0}, 2, "model.memory.tucker_cores"),
    ({"key_expand": 0}, 2, "model.memory.key_expand"),
    ({"dropout": 1.0}, 2, "model.memory.dropout"),
    ({"tucker_rank_penalty": -0.1}, 2, "model.memory.tucker_rank_penalty"),
    ({"tucker_rank_margin": -0.1}, 2, "model.memory.tucker_rank_margin"),
    ({"key_balance_coef": -1.0}, 2, "model.memory.key_balance_coef"),
    ({"calibration_rounds": 0}, 2, "model.memory.calibration_rounds"),
    ({"log_interval": 0}, 2, "model.memory.log_interval"),
    ({}, 0, "num_memory_layers"),
    ({"type": "ultramem_v1", "knn": 5, "knum": 4}, 2, "model.memory.knn"),
    ({"type": "memory_plus", "knn": 7}, 2, "model.memory.knn"),
    ({"type": "memory_plus", "heads": 0}, 2, "model.memory.heads"),
]


@pytest.mark.parametrize("memory,num_layers,key", BAD)
def test_config_errors_name_the_key(memory, num_layers, key):
    settings = {"type": "ultramem_v2", "share_ratio": 0.5}
    settings.update(memory)
    with pytest.raises(ConfigError, match=re.escape(key) + "="):
        build_memory(make_cfg(**settings), num_layers)


def test_key_expand_allows_more_knn():
    _, layers = build_memory(make_cfg(type="ultramem_v2", share_ratio=0.5, knn=7, key_expand=2), 2)
    assert layers[0].n_side == 12


def test_ffn_hidden_and_dim_rules():
    cfg = make_cfg(type="ultramem_v2")
    cfg.ffn_hidden = 0
    with pytest.raises(ConfigError, match="model.ffn_hidden="):
        build_memory(cfg, 2)
    cfg = make_cfg(type="ultramem_v2")
    cfg.dim = 0
    with pytest.raises(ConfigError, match="model.dim="):
        build_memory(cfg, 2)
