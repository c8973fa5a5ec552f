"""torch.compile(fullgraph=True) of each memory layer, forward + backward, against eager.

fullgraph=True raises on any graph break. UltraMemV2 goes through Inductor (C++ codegen on CPU,
~20 s on 2 cores); v1 and Memory+ through aot_eager, which runs the same Dynamo capture, AOT
autograd and functionalization of the in-place stats buffers in a few seconds."""

from __future__ import annotations

import pytest
import torch
from memory_layer_setup import build_random, make_cfg


@pytest.mark.parametrize(
    "kind,backend", [("ultramem_v2", "inductor"), ("ultramem_v1", "aot_eager"), ("memory_plus", "aot_eager")]
)
def test_compiled_layer_matches_eager(kind, backend):
    torch._dynamo.reset()
    memory = dict(type=kind, heads=2, key_balance_coef=0.1)
    if kind != "memory_plus":
        memory.update(tucker_rank_penalty=0.1, q_per_rank=True, pre_vdim=4)
    if kind == "ultramem_v1":
        memory.update(key_expand=2)
    tables, layers, g = build_random(make_cfg(**memory), 2, seed=21)
    layer = layers[1].float().train()
    if tables is not None:
        tables.float()
    x = torch.randn(2, 5, 16, generator=g)
    gy = torch.randn(2, 5, 16, generator=g)
    params = list(layer.parameters()) + (list(tables.parameters()) if tables is not None else [])

    def run(module):
        layer.stats.reset()
        y, aux = module(x, tables)
        grads = torch.autograd.grad((y * gy).sum() + aux, params)
        return y.detach(), aux.detach(), grads, layer.stats.hits.clone(), layer.stats.sums.clone()

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend=backend))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-6)
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[3], eager[3], rtol=0, atol=0)  # hits updated in the graph
    torch.testing.assert_close(compiled[4], eager[4], rtol=1e-4, atol=1e-4)
    assert float(eager[3].sum()) == 10 * 2 * layer.knn  # tokens × heads × k


def test_layers_share_one_compiled_graph():
    """Every UltraMemV2 layer runs the same forward; their per-layer row offsets must not be
    graph constants (one recompile per layer: past torch's recompile limit of 8, the 227M model's
    later layers silently ran uncompiled). aot_eager: the guards are what is tested here."""
    torch._dynamo.reset()
    tables, layers, g = build_random(make_cfg(type="ultramem_v2", pre_vdim=4), 4, seed=5)
    assert len({layer.offset for layer in layers}) == 4
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    eager = [layer(x, tables)[0] for layer in layers]
    compiled = [torch.compile(layer, fullgraph=True, backend="aot_eager") for layer in layers]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [c(x, tables)[0] for c in compiled]
    for want, out in zip(eager, got):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_row_window_filled_after_meta_build():
    """The offsets are buffers outside the state dict: init fills them after to_empty."""
    from ultramem.model import build_model  # noqa: PLC0415

    model = build_model(make_cfg(type="ultramem_v2"), device="cpu", seed=0)
    layers = [m for m in model.modules() if hasattr(m, "row_window")]
    assert layers and [m.row_window.tolist() for m in layers] == [[[m.offset, m.num_rows]] for m in layers]
    # a constant Inductor would inline (an AOTInductor package's buffer) became a kernel per call
    from torch._inductor.graph import GraphLowering  # noqa: PLC0415

    assert not any(GraphLowering.can_inline_constant(m.row_window) for m in layers)
    # Built without init (to load a checkpoint into), and after a load into a corrupted buffer.
    bare = build_model(make_cfg(type="ultramem_v2"), device="cpu", seed=None)
    bare_layers = [m for m in bare.modules() if hasattr(m, "row_window")]
    assert [m.row_window.tolist() for m in bare_layers] == [[[m.offset, m.num_rows]] for m in layers]
    torch.testing.assert_close(bare.rope_cos, model.rope_cos, rtol=0, atol=0)
    for m in bare_layers:
        m.row_window.fill_(123456789)
    bare.load_state_dict(model.state_dict())
    assert [m.row_window.tolist() for m in bare_layers] == [[[m.offset, m.num_rows]] for m in layers]
