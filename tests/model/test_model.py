"""The decoder: shapes, causality, tied head, memory placement semantics, init, compile."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_cfg

from ultramem.config import ConfigError, parse_memory_insert
from ultramem.model import Transformer, apply_rope, build_model, run_stage


@pytest.mark.parametrize("memory_type", ["none", "ultramem_v2"])
def test_shapes_and_loss(memory_type):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(memory_type), seed=1)
    tokens = torch.randint(0, 97, (2, 11))
    logits = model(tokens)
    assert logits.shape == (2, 11, 97)
    loss, aux = model(tokens, tokens.roll(-1, 1))
    assert loss.ndim == 0 and aux.ndim == 0
    expected = F.cross_entropy(logits.reshape(-1, 97).double(), tokens.roll(-1, 1).reshape(-1)) + aux.double()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_aux_loss_is_added_to_the_loss():
    cfg = tiny_cfg()
    cfg.memory.tucker_rank_penalty = 10.0
    cfg.memory.tucker_rank_margin = 0.0  # so the penalty is nonzero at init
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 97, (2, 8))
    loss, aux = model(tokens, tokens)
    ce = F.cross_entropy(model(tokens).reshape(-1, 97), tokens.reshape(-1))
    assert aux.item() > 0
    assert loss.item() == pytest.approx(ce.item() + aux.item(), rel=1e-5)


@pytest.mark.parametrize("memory_type", ["ultramem_v2", "memory_plus"])
def test_a_stage_adds_only_the_aux_losses_that_are_on(memory_type):
    # a layer without an aux loss leaves the running aux as it was (adding its constant 0 cost a
    # kernel per compiled region); turned on after construction, its aux is added again
    model = build_model(tiny_cfg(memory_type, insert="full"), seed=0)
    block, layer = model.blocks[0], model.memory_layers[0]
    x = torch.randn(2, 8, 32)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    aux = torch.tensor(0.25)
    assert not layer.has_aux_loss
    _, _, out = run_stage(block, (layer,), model.memory_tables, x, cos, sin, (), aux)
    assert out is aux
    layer.key_balance_coef = 1.0
    assert layer.has_aux_loss
    _, _, out = run_stage(block, (layer,), model.memory_tables, x, cos, sin, (), aux)
    assert out.item() > 0.25


@pytest.mark.parametrize("memory_type", ["none", "ultramem_v2"])
def test_causal_future_tokens_do_not_change_past_logits(memory_type):
    model = build_model(tiny_cfg(memory_type), seed=2).eval()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 7:] = torch.randint(0, 97, (5,))
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[0, :7], lb[0, :7])
    assert not torch.allclose(la[0, 7:], lb[0, 7:])


def test_tied_embeddings_share_one_tensor():
    model = build_model(tiny_cfg("none"), seed=0)
    assert model.output is None
    names = [n for n, _ in model.named_parameters()]
    assert names.count("tok_embeddings.weight") == 1 and not any(n.startswith("output") for n in names)
    # the head is the embedding: logits = norm(x) @ Eᵀ; check by perturbing only the embedding
    tokens = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        base = model(tokens)
        x = model.tok_embeddings(tokens)
        for block in model.blocks:
            x, _ = block(x, model.rope_cos[:5], model.rope_sin[:5])
        manual = model.norm(x) @ model.tok_embeddings.weight.T
    torch.testing.assert_close(base, manual)
    untied = build_model(tiny_cfg("none", tie_embeddings=False), seed=0)
    assert untied.output is not None and untied.output.weight is not untied.tok_embeddings.weight


def _spec_forward(model, tokens):
    """The module doc's formula written out: memory layer l reads u of block a and adds its output
    to the residual right after block b (in placement order)."""
    cos, sin = model.rope_cos[: tokens.shape[1]], model.rope_sin[: tokens.shape[1]]
    x, pending = model.tok_embeddings(tokens), {}
    for i, block in enumerate(model.blocks):
        h = x + block.attn(block.norm_attn(x), cos, sin)
        u = block.norm_ffn(h)
        x = h + block.ffn(u)
        for l, (a, _) in enumerate(model.placement):
            if a == i:
                pending[l] = model.memory_layers[l](u, model.memory_tables)[0]
        for l, (_, b) in enumerate(model.placement):
            if b == i:
                x = x + pending.pop(l)
    return model.norm(x) @ model.tok_embeddings.weight.T


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("insert", ["full", "0:2/1:1/0:0/2:2"])  # two writes after block 0; one after the last
def test_memory_outputs_join_the_residual_after_their_block(insert, autocast):
    """The model adds memory outputs inside the next block and, under autocast, hands memory
    layers u in autocast's dtype: the same logits as the formula (bit for bit in eager)."""
    model = build_model(tiny_cfg(insert=insert), seed=3).eval()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, want = model(tokens), _spec_forward(model, tokens)
        u_dtype = model.blocks[0](model.tok_embeddings(tokens), model.rope_cos[:9], model.rope_sin[:9])[1].dtype
    assert u_dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_blocks_read_by_memory_layers_return_u():
    """A block no memory layer reads returns no u (compiled, it would be written for nothing)."""
    dense = build_model(tiny_cfg("none"), seed=0)
    skip = build_model(tiny_cfg(insert="1:2", n_layers=4), seed=0)
    assert [b.feeds_memory for b in dense.blocks] == [False] * 3
    assert [b.feeds_memory for b in skip.blocks] == [False, True, False, False]
    x = torch.randn(1, 5, 32)
    cos, sin = dense.rope_cos[:5], dense.rope_sin[:5]
    out, u = dense.blocks[0](x, cos, sin)
    assert u is None
    out_read, u_read = skip.blocks[1](x, cos, sin)
    assert u_read is not None and u_read.shape == x.shape
    torch.testing.assert_close(
        skip.blocks[1].norm_ffn(x + skip.blocks[1].attn(skip.blocks[1].norm_attn(x), cos, sin)), u_read
    )


def test_rope_rotates_pairs_by_position():
    x = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    cos, sin = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = apply_rope(x, cos.double(), sin.double())
    # position 1, pair 0 rotated by 90°: (x0, x1) → (-x1, x0); pair 1 unrotated
    torch.testing.assert_close(y[0, 1, 0], torch.stack([-x[0, 1, 0, 1], x[0, 1, 0, 0], x[0, 1, 0, 2], x[0, 1, 0, 3]]))
    # position 2, pair 1 rotated by 90°, pair 0 by 180°
    torch.testing.assert_close(y[0, 2, 0], torch.stack([-x[0, 2, 0, 0], -x[0, 2, 0, 1], -x[0, 2, 0, 3], x[0, 2, 0, 2]]))


# -- placement --------------------------------------------------------------------------------


def test_parse_full_and_skip_forms():
    assert parse_memory_insert("full", 3) == [(0, 0), (1, 1), (2, 2)]
    assert parse_memory_insert("0:2/3:3/4:7", 8) == [(0, 2), (3, 3), (4, 7)]
    assert parse_memory_insert(" 1 : 2 ", 4) == [(1, 2)]
    # The placement rule only asks b >= a: overlapping spans and shared blocks are allowed, in any order
    assert parse_memory_insert("0:2/1:3/1:1/0:0", 4) == [(0, 2), (1, 3), (1, 1), (0, 0)]


@pytest.mark.parametrize(
    "insert, fragment",
    [
        ("2:1", "b=1 < a=2"),
        ("0:8", "out of range"),
        ("0:1/3:9", "'3:9' is out of range"),
        ("0-1", "'0-1'"),
        ("a:b", "'a:b'"),
        ("", "empty"),
        ("0:1/", "''"),
    ],
)
def test_bad_insert_names_key_and_part(insert, fragment):
    with pytest.raises(ConfigError) as e:
        parse_memory_insert(insert, 8)
    assert "model.memory.insert" in str(e.value) and fragment in str(e.value)


@pytest.mark.parametrize(
    "heads, fragment",
    [(5, "model.dim=32: must be divisible by model.n_heads=5"), (32, "model.dim / model.n_heads=1: must be even")],
)
def test_model_refuses_heads_that_do_not_split_dim(heads, fragment):
    """Built directly, not through the trainer's config: the rule is the model's own."""
    with pytest.raises(ConfigError, match=fragment):
        build_model(tiny_cfg(n_heads=heads), device="meta")


@pytest.mark.parametrize("memory_type", ["ultramem_v2", "ultramem_v1", "memory_plus"])
def test_a_float64_model_computes_its_loss_in_float64(memory_type):
    """For float64 checks of the whole model (gradcheck, finite differences)."""
    model = build_model(tiny_cfg(memory_type, n_layers=2), seed=2).double()
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    loss, aux = model(tokens[:, :-1], tokens[:, 1:])
    assert loss.dtype == aux.dtype == torch.float64
    want = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()) + aux
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=0)


def test_skip_form_reads_at_a_and_writes_after_b():
    """Compare with a hand-written forward: layer 0 reads u of block 0, adds after block 2;
    layer 1 reads and writes at block 3."""
    cfg = tiny_cfg(insert="0:2/3:3", n_layers=5)
    model = build_model(cfg, seed=3).eval()
    assert len(model.memory_layers) == 2
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        cos, sin = model.rope_cos[:9], model.rope_sin[:9]
        x = model.tok_embeddings(tokens)
        b = model.blocks
        x, u0 = b[0](x, cos, sin)
        y0, _ = model.memory_layers[0](u0, model.memory_tables)
        x, _ = b[1](x, cos, sin)
        x, _ = b[2](x, cos, sin)
        x = x + y0
        x, u3 = b[3](x, cos, sin)
        x = x + model.memory_layers[1](u3, model.memory_tables)[0]
        x, _ = b[4](x, cos, sin)
        manual = F.linear(model.norm(x), model.tok_embeddings.weight)
        got = model(tokens)
    torch.testing.assert_close(got, manual)
    # and the placement matters: writing after block 0 instead gives other logits
    other = build_model(tiny_cfg(insert="0:0/3:3", n_layers=5), seed=3).eval()
    with torch.no_grad():
        assert not torch.allclose(other(tokens), got)


def test_overlapping_skip_spans_match_manual_forward():
    """ "0:2/1:1": layer 0 reads block 0 and writes after block 2; layer 1 reads and writes at
    block 1, inside layer 0's span."""
    model = build_model(tiny_cfg(insert="0:2/1:1", n_layers=3), seed=5).eval()
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        cos, sin = model.rope_cos[:7], model.rope_sin[:7]
        b, mem, tables = model.blocks, model.memory_layers, model.memory_tables
        x, u0 = b[0](model.tok_embeddings(tokens), cos, sin)
        y0 = mem[0](u0, tables)[0]
        x, u1 = b[1](x, cos, sin)
        x = x + mem[1](u1, tables)[0]
        x, _ = b[2](x, cos, sin)
        x = x + y0
        manual = F.linear(model.norm(x), model.tok_embeddings.weight)
        torch.testing.assert_close(model(tokens), manual)


def test_full_placement_matches_block_formula():
    """out = h + FFN(u) + Mem(u) in every block."""
    model = build_model(tiny_cfg(n_layers=2), seed=4).eval()
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        cos, sin = model.rope_cos[:6], model.rope_sin[:6]
        x = model.tok_embeddings(tokens)
        for i, blk in enumerate(model.blocks):
            h = x + blk.attn(blk.norm_attn(x), cos, sin)
            u = blk.norm_ffn(h)
            x = h + blk.ffn(u) + model.memory_layers[i](u, model.memory_tables)[0]
        manual = F.linear(model.norm(x), model.tok_embeddings.weight)
        torch.testing.assert_close(model(tokens), manual)


# -- init ---------------------------------------------------------------------------------------


def test_init_statistics_and_determinism():
    cfg = tiny_cfg("none", dim=64, n_layers=8, ffn_hidden=128, vocab_size=512)
    model = build_model(cfg, seed=5)
    std = math.sqrt(2 / (5 * 64))
    out_std = std / math.sqrt(2 * 8)
    w = model.tok_embeddings.weight
    assert w.std().item() == pytest.approx(std, rel=0.05) and abs(w.mean().item()) < 0.01 * std * 10
    attn_qkv = torch.cat([b.attn.wqkv.weight.flatten() for b in model.blocks])
    ffn_w1 = torch.cat([b.ffn.w1.weight.flatten() for b in model.blocks])
    wo = torch.cat([b.attn.wo.weight.flatten() for b in model.blocks])
    w2 = torch.cat([b.ffn.w2.weight.flatten() for b in model.blocks])
    assert attn_qkv.std().item() == pytest.approx(std, rel=0.03)
    assert ffn_w1.std().item() == pytest.approx(std, rel=0.03)
    assert wo.std().item() == pytest.approx(out_std, rel=0.03)
    assert w2.std().item() == pytest.approx(out_std, rel=0.03)
    for b in model.blocks:
        assert torch.equal(b.norm_attn.weight, torch.ones(64)) and torch.equal(b.norm_ffn.weight, torch.ones(64))
    again = build_model(cfg, seed=5)
    other = build_model(cfg, seed=6)
    for (n, p), (_, q), (_, r) in zip(
        model.state_dict().items(), again.state_dict().items(), other.state_dict().items()
    ):
        assert torch.equal(p, q), n
        if p.ndim >= 2:
            assert not torch.equal(p, r), n


def test_meta_build_then_to_empty_matches_direct_build():
    cfg = tiny_cfg()
    direct = build_model(cfg, seed=7)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(7)
    sd_direct = direct.state_dict()
    for name, t in meta.state_dict().items():
        torch.testing.assert_close(t, sd_direct[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(meta.rope_cos, direct.rope_cos)  # non-persistent buffers refilled
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(tokens), direct.eval()(tokens))


def test_blocks_are_a_module_list():
    model = build_model(tiny_cfg(), seed=0)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 3
    assert isinstance(model.memory_layers, torch.nn.ModuleList) and len(model.memory_layers) == 3


def test_compile_fullgraph_without_graph_breaks():
    """fullgraph=True raises on any graph break. aot_eager traces dynamo + autograd (what fullgraph
    checks) without the minutes of C++ compilation inductor needs on CPU."""
    torch._dynamo.reset()
    model = build_model(tiny_cfg(insert="0:1/2:2"), seed=8)
    tokens = torch.randint(0, 97, (2, 8))
    ref_loss, _ = model(tokens, tokens)
    ref_loss.backward()
    ref_grad = model.blocks[0].attn.wqkv.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, aux = compiled(tokens, tokens)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(model.blocks[0].attn.wqkv.weight.grad, ref_grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("memory_type", ["ultramem_v2", "memory_plus", "ultramem_v1"])
def test_built_in_inference_mode(memory_type):
    """A model built under torch.inference_mode (as inference code loads one) has tensors without
    version counters; it builds, runs and caches its memory layers' terms all the same."""
    from ultramem.layers import inference_cache

    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = build_model(tiny_cfg(memory_type), seed=1).eval()(tokens)
    with torch.inference_mode():
        model = build_model(tiny_cfg(memory_type), seed=1).eval()
        assert torch.equal(model(tokens), want)
        with inference_cache(model):
            assert torch.equal(model(tokens), want)


def test_bad_tokens_are_refused_naming_the_value():
    model = build_model(tiny_cfg("ultramem_v2"), seed=1)
    good = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.full((2, 5), 97))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(good.clone().index_fill_(1, torch.tensor([2]), -1))
    with pytest.raises(ValueError, match=r"shape \[batch, seq\], got torch.int64 \(5,\)"):
        model(good[0])
    with pytest.raises(ValueError, match=r"got torch.float32"):
        model(good.float())
    with pytest.raises(ValueError, match=r"sequence of 17 tokens: longer than model.max_seq_len=16"):
        model(torch.randint(0, 97, (1, 17)))
    with pytest.raises(ValueError, match=r"targets shape \(2, 4\) must equal tokens shape \(2, 5\)"):
        model(good, good[:, :4])
