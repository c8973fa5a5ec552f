"""`inference_cache`: the memory layers' weight-only terms computed once, for forwards without
autograd. Outputs must be the uncached ones to the bit, the cache must really be used (eager
and compiled), and a weight that changes inside must not go unnoticed."""

from __future__ import annotations

import pytest
import torch
from memory_layer_setup import build_random, make_cfg, make_input
from tiny import tiny_cfg
from torch._dynamo.testing import CompileCounterWithBackend

from ultramem.layers import inference_cache, ultramem_v2
from ultramem.model import build_model

KINDS = {
    "v2": dict(type="ultramem_v2", heads=2),
    "v2_no_pre_values_per_rank": dict(type="ultramem_v2", heads=2, pre_vdim=0, q_per_rank=True),
    "v1_expanded": dict(type="ultramem_v1", key_expand=2),
    "memory_plus": dict(type="memory_plus", heads=2),
}


def _fail(*args, **kwargs):
    raise AssertionError("a weight-only term was computed inside inference_cache")


def _no_weight_terms(layer, monkeypatch):
    """Make computing any weight-only term fail: what runs afterwards must use the cache."""
    for name in ("_scoring_keys", "_q_scale", "_qp_weight", "_folded_weight"):
        if hasattr(layer, name):
            monkeypatch.setattr(layer, name, _fail)
    if not hasattr(layer, "_scoring_keys"):  # Memory+ normalizes its keys with norm_k
        monkeypatch.setattr(layer.norm_k, "forward", _fail)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_forward_matches_uncached_bitwise(kind, monkeypatch):
    tables, layers, g = build_random(make_cfg(**KINDS[kind]), 2, seed=3)
    layer = layers[1].eval()
    x = make_input((3, 4), g)
    with torch.no_grad():
        want = layer(x, tables)[0]
    with torch.inference_mode(), inference_cache(layer):
        _no_weight_terms(layer, monkeypatch)
        got = layer(x, tables)[0]
        monkeypatch.undo()
    assert torch.equal(got, want)
    assert layer._inference_cache is None  # dropped on exit


def test_decode_cache_folds_the_keys_where_the_retrieval_writes_rows(monkeypatch):
    """decode=True: on the CPU nothing changes (the stacked retrieval needs normalized queries);
    where the retrieval writes rows (CUDA, patched here) the projection's one GEMM also yields
    the sub-key scores, eager and compiled, and the output is the unfolded one up to rounding."""
    tables, layers, g = build_random(make_cfg(type="ultramem_v2", heads=2), 2, seed=12)
    layer = layers[1].eval()
    x = make_input((3, 4), g)
    with torch.no_grad():
        want = layer(x, tables)[0]
        with inference_cache(layer, decode=True):
            assert "folded_weight" not in layer._inference_cache
            assert torch.equal(layer(x, tables)[0], want)
    monkeypatch.setattr(ultramem_v2, "retrieval_writes_rows", lambda x: True)
    with torch.no_grad():
        want = layer(x, tables)[0]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    with torch.inference_mode(), inference_cache(layer, decode=True):
        folded = layer._inference_cache["folded_weight"]
        scores = layer.heads * 2 * layer._padded_keys() * layer.rank
        assert folded.shape == (layer.w_q.out_features + layer.pre_vdim + scores, layer.dim)
        with monkeypatch.context() as patch:
            _no_weight_terms(layer, patch)
            got = layer(x, tables)[0]
            got_compiled = compiled(x, tables)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_compiled, want, rtol=1e-10, atol=1e-12)


def test_autocast_casts_the_cached_terms():
    """fp32 weights under bf16 autocast: the cache is fp32, the forward casts it as it would."""
    tables, layers, g = build_random(make_cfg(type="ultramem_v2", heads=2), 1, seed=4)
    layer = layers[0].float().eval()
    tables.float()
    x = make_input((2, 5), g).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x, tables)[0]
        with inference_cache(layer):
            assert layer._inference_cache["keys"].dtype == torch.float32
            got = layer(x, tables)[0]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_autograd_inside_computes_the_terms():
    """With autograd on, the keys get their gradient as always (the cache holds none)."""
    tables, layers, g = build_random(make_cfg(type="ultramem_v2"), 1, seed=5)
    layer = layers[0]
    x = make_input((2, 3), g)
    with inference_cache(layer):
        layer(x, tables)[0].sum().backward()
    assert layer.keys.grad is not None and layer.keys.grad.abs().sum() > 0
    assert layer.w_p.weight.grad is not None and layer.w_p.weight.grad.abs().sum() > 0


def test_changed_weights_are_refused():
    tables, layers, g = build_random(make_cfg(type="ultramem_v2"), 1, seed=6)
    layer = layers[0].eval()
    x = make_input((2, 3), g)
    with pytest.raises(RuntimeError, match=r"weights changed inside inference_cache \(keys\)"):
        with torch.no_grad(), inference_cache(layer):
            layer(x, tables)
            layer.keys.add_(1.0)
            layer(x, tables)  # eager: refused before it runs on stale keys
    assert layer._inference_cache is None
    # a change no forward saw is refused at the exit (the compiled forwards cannot check)
    with pytest.raises(RuntimeError, match=r"weights changed inside inference_cache \(w_o.weight\)"):
        with torch.no_grad(), inference_cache(layer):
            layer.w_o.weight.mul_(2.0)
    assert layer._inference_cache is None
    with torch.no_grad(), inference_cache(layer):  # a fresh cache after the change is fine
        layer(x, tables)
    # a cast swaps the weights' storage (`.data`) without an in-place write
    with pytest.raises(RuntimeError, match=r"weights changed inside inference_cache \(keys, cores, w_q.weight"):
        with torch.no_grad(), inference_cache(layer):
            layer.float()
            layer(x.float(), tables)
    # a parameter replaced by another
    with pytest.raises(RuntimeError, match=r"weights changed inside inference_cache \(cores\)"):
        with torch.no_grad(), inference_cache(layer):
            layer.cores = torch.nn.Parameter(layer.cores.detach().clone())


def test_errors_inside_drop_the_cache_and_nesting_is_refused():
    tables, layers, _ = build_random(make_cfg(type="memory_plus"), 1, seed=7)
    layer = layers[0]
    with pytest.raises(KeyError):
        with inference_cache(layer):
            raise KeyError("boom")
    assert layer._inference_cache is None
    with inference_cache(layer):
        with pytest.raises(RuntimeError, match="already inside inference_cache"):
            with inference_cache(layer):
                pass
        assert layer._inference_cache is not None  # the outer cache survives the refused inner one
    assert layer._inference_cache is None


def test_copies_made_inside_are_models_of_their_own():
    """deepcopy or pickle inside the context: the copy holds no cache (its own weights may change)."""
    import copy
    import io

    tables, layers, g = build_random(make_cfg(type="ultramem_v2"), 1, seed=9)
    layer = layers[0].eval()
    x = make_input((2, 3), g)
    with torch.no_grad(), inference_cache(layer):
        twin = copy.deepcopy(layer)
        buf = io.BytesIO()
        torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert other._inference_cache is None and "_cached_from" not in other.__dict__
        with torch.no_grad():
            other.keys.mul_(-1.0)
            other(x, tables)  # a copied cache would refuse this
            with inference_cache(other):
                want = other(x, tables)[0]
            assert not torch.equal(want, layer(x, tables)[0])


def test_sharded_weights_are_refused():
    """A parameter of a tensor subclass (as FSDP's DTensor shards) cannot be cached as it stands."""
    from torch.testing._internal.two_tensor import TwoTensor

    _, layers, _ = build_random(make_cfg(type="memory_plus"), 1, seed=8)
    layer = layers[0]
    layer.keys = torch.nn.Parameter(TwoTensor(layer.keys.detach(), layer.keys.detach().clone()))
    with pytest.raises(ValueError, match="keys is a TwoTensor"):
        with inference_cache(layer):
            pass
    assert layer._inference_cache is None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_uses_and_leaves_the_cache(backend, monkeypatch):
    """A compiled model: the same logits with the cache, whose terms the compiled graph does not
    compute; after the exit it recompiles, so a later weight change is seen."""
    torch._dynamo.reset()
    model = build_model(tiny_cfg("ultramem_v2", n_layers=2), seed=1).eval()
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        want = model(tokens)
        torch.testing.assert_close(compiled(tokens), want, rtol=1e-5, atol=1e-5)
        with inference_cache(model):
            for layer in model.memory_layers:
                _no_weight_terms(layer, monkeypatch)
            got = compiled(tokens)
            monkeypatch.undo()
        assert counter.frame_count == 2  # entering recompiled (the guard on the cache)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for layer in model.memory_layers:
            layer.keys.mul_(-1.0)
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 3  # the first graph again, or a third
        assert not torch.allclose(model(tokens), want)
        with inference_cache(model):  # entered again: the graph reads the new terms, not the first ones
            torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 3
