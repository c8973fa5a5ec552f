"""The memory layers on unusual input: no tokens at all, and a wrong feature width."""

from __future__ import annotations

import pytest
import torch
from memory_layer_setup import D, build_random, make_cfg

# (config overrides, class name in the messages); key balance and v1's rank penalty are on, so
# a zero aux loss means the layer really skipped them, not that they were off
LAYERS = [
    (dict(key_balance_coef=0.1), "UltraMemV2"),
    (dict(pre_vdim=0, key_balance_coef=0.1), "UltraMemV2"),
    (dict(type="ultramem_v1", key_balance_coef=0.1), "UltraMemV1"),
    (dict(type="memory_plus", knum=4, key_balance_coef=0.1), "MemoryPlus"),
]


@pytest.mark.parametrize("overrides,name", LAYERS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(LAYERS)])
def test_zero_tokens_give_an_empty_output_and_zero_aux(overrides, name):
    tables, layers, _ = build_random(make_cfg(**overrides), 2, 0)
    layer = layers[1]
    layer.train()
    x = torch.zeros(2, 0, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x, tables)
    assert y.shape == (2, 0, D) and y.dtype == torch.float64
    assert aux.shape == () and float(aux) == 0.0
    (y.sum() + aux).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # the parameters that took part get (zero) gradients; nothing is NaN
    for p in layer.parameters():
        assert p.grad is None or torch.all(p.grad == 0)
    # and the layer still works on real tokens afterwards
    y, aux = layer(torch.randn(2, 3, D, dtype=torch.float64), tables)
    assert y.shape == (2, 3, D) and torch.isfinite(y).all() and torch.isfinite(aux)


@pytest.mark.parametrize("overrides,name", LAYERS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(LAYERS)])
def test_wrong_feature_width_names_layer_and_dims(overrides, name):
    tables, layers, _ = build_random(make_cfg(**overrides), 2, 0)
    for width in (D - 1, D + 1):
        with pytest.raises(ValueError, match=rf"^{name} layer 1: input last dim {width} != model.dim {D}$"):
            layers[1](torch.randn(3, 5, width, dtype=torch.float64), tables)
    with pytest.raises(ValueError, match=rf"^{name} layer 0: input last dim none \(0-d input\) != model.dim {D}$"):
        layers[0](torch.tensor(1.0, dtype=torch.float64), tables)
    # empty input of the wrong width is refused as well, not passed off as "no tokens"
    with pytest.raises(ValueError, match=rf"input last dim {D + 3} != model.dim {D}"):
        layers[0](torch.zeros(0, D + 3, dtype=torch.float64), tables)


@pytest.mark.parametrize("overrides,name", LAYERS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(LAYERS)])
def test_an_input_of_another_dtype_is_refused_unless_autocast_picks_it(overrides, name):
    tables, layers, _ = build_random(make_cfg(**overrides), 2, 0)  # float64 weights
    layer = layers[1]
    for dtype in (torch.float32, torch.bfloat16):
        refused = rf"^{name} layer 1: input dtype {dtype} != the weights' torch.float64"
        for shape in ((3, 5, D), (0, D)):
            with pytest.raises(ValueError, match=refused):
                layer(torch.zeros(shape, dtype=dtype), tables)
    layer.float()
    if tables is not None:
        tables.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the dtype: bf16 input is fine
        y, _ = layer(torch.randn(3, 5, D, dtype=torch.bfloat16), tables)
    assert y.shape == (3, 5, D)
