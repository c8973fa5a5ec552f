"""Memory layers built on the `ultramem.ops` custom ops (docs/layers.md).

    tables, layers = build_memory(model_cfg, num_memory_layers)
    for layer in layers:
        layer.reset_parameters(generator, tables)   # the tables fill themselves after the last one
    y, aux = layers[l](u, tables)                   # u [..., d] → y [..., d], aux a scalar
    layer.refresh_rank1()                           # before the first forward, after every step
    layer.metrics()                                 # on reporting steps only (host sync)
    with torch.inference_mode(), inference_cache(model):  # weight-only terms computed once
        ...
    with torch.inference_mode(), inference_cache(model, decode=True):  # and the keys folded: decode steps
        ...

Norm scales are the 1-D parameters `norm_q.weight` / `norm_k.weight` (no weight decay); the value
tables are `ValueTables.values` / `.pre_values`, or `UltraMemV1.values` (each v1 layer owns its
table); `value_parameters()` on either returns them.
"""

from __future__ import annotations

from torch import nn

from ultramem.config import ModelConfig

from ._common import inference_cache, validate_memory_config, window_keys
from .memory_plus import MemoryPlus
from .tables import ValueTables
from .ultramem_v1 import UltraMemV1
from .ultramem_v2 import UltraMemV2

__all__ = [
    "MemoryPlus",
    "UltraMemV1",
    "UltraMemV2",
    "ValueTables",
    "build_memory",
    "inference_cache",
    "validate_memory_config",
    "window_keys",
]


def build_memory(model_cfg: ModelConfig, num_memory_layers: int) -> tuple[ValueTables | None, list[nn.Module]]:
    """The shared value tables (None for v1 and for type "none") and the memory layers, layer l
    built with layer_index=l. Raises ConfigError naming the key when the config does not fit."""
    m = model_cfg.memory
    if m.type == "none":
        return None, []
    validate_memory_config(model_cfg, num_memory_layers)
    n_layers = num_memory_layers
    if m.type == "ultramem_v2":
        tables = ValueTables(m.knum * m.knum * n_layers, m.vdim, m.pre_vdim, n_layers)
        return tables, [UltraMemV2(model_cfg, l, n_layers) for l in range(n_layers)]
    if m.type == "ultramem_v1":
        return None, [UltraMemV1(model_cfg, l, n_layers) for l in range(n_layers)]
    tables = ValueTables(m.knum * m.knum, m.vdim, 0, n_layers)
    return tables, [MemoryPlus(model_cfg, l, n_layers) for l in range(n_layers)]
