"""The timed pairs behind the ratio budgets: each is (candidate, baseline), both built here at
small CPU shapes, and measured interleaved by `perf_harness.measure_pairs`. Used by
test_timing_ratios.py and by ratio_variability.py, so the two always time the same thing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from perf_harness import Ratio, measure_pairs, no_new_compiles

from ultramem.ops import gate_lookup, register_grad_buffer, release_grad_buffer, tdqkr_retrieval, weighted_lookup

# ---------------------------------------------------------------------------------------------
# Each op against the plain tensor formula it stands for. Shapes: about a millisecond a call on
# one core, so the kernel's work, not the dispatch, is what is compared.

T, E, M, D, DP, N = 256, 16, 2, 64, 32, 4096  # tokens, entries, cores, value dim, pre-value dim, rows
H, NK, R, K = 2, 64, 2, 8  # retrieval: heads, keys per side, rank, knn


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _lookup_inputs(g):
    rows = torch.randint(0, N, (T, E), generator=g)
    values = torch.randn(N, D, generator=g)
    scores = torch.randn(T, E, M, generator=g)
    return rows, values, scores


def naive_lookup(rows, values, scores):
    """Gather, multiply, sum: out[t, chunk m] = Σ_e scores[t, e, m] · values[rows[t, e], chunk m]."""
    t, e = rows.shape
    m = scores.shape[2]
    return (values[rows].view(t, e, m, -1) * scores.unsqueeze(-1)).sum(1).reshape(t, -1)


def naive_gate_lookup(rows, values, pre_values, x, scores):
    g = (pre_values[rows] * x.unsqueeze(1)).sum(-1)
    return naive_lookup(rows, values, scores * F.gelu(g).unsqueeze(-1)), g


def naive_retrieval(a, b, cores, u, v, knn):
    """Coarse top-k per side, the k×k grid of Tucker scores, the top k of its totals."""
    n_col = b.shape[2]
    top_i = torch.einsum("thnr,hr->thn", a, u).topk(knn, dim=-1).indices
    top_j = torch.einsum("thnr,hr->thn", b, v).topk(knn, dim=-1).indices
    a_sel = a.gather(2, top_i.unsqueeze(-1).expand(*top_i.shape, a.shape[-1]))
    b_sel = b.gather(2, top_j.unsqueeze(-1).expand(*top_j.shape, b.shape[-1]))
    grid = torch.einsum("thir,hmrs,thjs->thijm", a_sel, cores, b_sel).flatten(2, 3)
    best = grid.sum(-1).topk(knn, dim=-1).indices
    ids = top_i.gather(2, best // knn) * n_col + top_j.gather(2, best % knn)
    return ids, grid.gather(2, best.unsqueeze(-1).expand(*best.shape, grid.shape[-1]))


def op_pairs() -> dict:
    """name → (op call, naive call), inputs fixed."""
    g = _gen(1)
    rows, values, scores = _lookup_inputs(g)
    pre_values = torch.randn(N, DP, generator=g)
    x = torch.randn(T, DP, generator=g)
    a = torch.randn(T, H, NK, R, generator=g)
    b = torch.randn(T, H, NK, R, generator=g)
    cores = torch.rand(H, M, R, R, generator=g)
    u, v = torch.randn(H, R, generator=g), torch.randn(H, R, generator=g)

    # forward + backward: the op adds the table gradient into a persistent buffer; the formula's
    # autograd makes a dense one (what the buffer replaces)
    table = values.clone().requires_grad_()
    train_scores = scores.clone().requires_grad_()
    buf = torch.zeros_like(values)
    handle = register_grad_buffer(buf)
    gy = torch.randn(T, D, generator=g)

    def op_train(_keep=buf):  # (the registry holds the buffer weakly)
        weighted_lookup(rows, table, train_scores, handle).backward(gy)

    def naive_train():
        naive_lookup(rows, table, train_scores).backward(gy)
        table.grad = None

    pairs = {
        "weighted_lookup_vs_naive": (
            lambda: weighted_lookup(rows, values, scores),
            lambda: naive_lookup(rows, values, scores),
        ),
        "gate_lookup_vs_naive": (
            lambda: gate_lookup(rows, values, pre_values, x, scores, True),
            lambda: naive_gate_lookup(rows, values, pre_values, x, scores),
        ),
        "tdqkr_retrieval_vs_naive": (
            lambda: tdqkr_retrieval(a, b, cores, u, v, K),
            lambda: naive_retrieval(a, b, cores, u, v, K),
        ),
        "weighted_lookup_train_vs_naive": (op_train, naive_train),
    }
    pairs["_cleanup"] = lambda: release_grad_buffer(handle)
    return pairs


# ---------------------------------------------------------------------------------------------
# A memory layer against the block's FFN on the same tokens (debug.toml's widths, eager)

LAYER_TOKENS = (2, 64)


def layer_vs_ffn_pair():
    from ultramem.layers import build_memory
    from ultramem.model import FeedForward
    from ultramem.train.config import load_config

    cfg = load_config("debug", []).model
    tables, layers = build_memory(cfg, cfg.n_layers)
    g = _gen(2)
    for layer in layers:
        layer.reset_parameters(g, tables)
    tables.use_grad_buffers()  # as the trainer
    layer = layers[0].train()
    ffn = FeedForward(cfg.dim, cfg.ffn_hidden)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0.0, cfg.std, generator=g)
    x = torch.randn(*LAYER_TOKENS, cfg.dim, generator=g).requires_grad_()
    gy = torch.randn(*LAYER_TOKENS, cfg.dim, generator=g)

    def mem():
        y, _ = layer(x, tables)
        y.backward(gy)

    def dense():
        ffn(x).backward(gy)

    return mem, dense


# ---------------------------------------------------------------------------------------------
# The trainer's compiled memory layer against the same layer run eagerly


def compiled_vs_eager_pair(trainer):
    """fwd + bwd of the trainer's first memory layer (its gradient buffers and staging as the
    trainer wires them), compiled on its own (Inductor, default mode) against the same module
    run eagerly. The trainer compiles it inside its block's region; alone, the layer's own code
    is what the ratio isolates."""
    model, cfg = trainer.model, trainer.cfg
    layer, tables = model.memory_layers[0], model.memory_tables
    compiled = torch.compile(layer)
    g = _gen(3)
    shape = (cfg.train.batch_size, cfg.train.seq_len, cfg.model.dim)
    x = torch.randn(*shape, generator=g).requires_grad_()
    gy = torch.randn(*shape, generator=g)

    def call(module):
        tables.zero_grad_buffers()  # also empties the staging area, so every call stages alike
        y, _ = module(x, tables)
        y.backward(gy)

    return (lambda: call(compiled)), (lambda: call(layer))


def measure(name: str, pair, pairs: int) -> Ratio:
    a, b = pair
    return Ratio(name, *measure_pairs(a, b, pairs))


def measure_all(trainer, pairs: int, names=None) -> dict[str, Ratio]:
    """Every ratio of the budgets (or those in `names`), measured once each."""
    out = {}

    def want(name: str) -> bool:
        return names is None or name in names

    ops = op_pairs()
    try:
        for name, pair in ops.items():
            if not name.startswith("_") and want(name):
                out[name] = measure(name, pair, pairs)
    finally:
        ops["_cleanup"]()
    if want("ultramem_v2_layer_vs_ffn"):
        out["ultramem_v2_layer_vs_ffn"] = measure("ultramem_v2_layer_vs_ffn", layer_vs_ffn_pair(), pairs)
    if trainer is not None and want("compiled_layer_vs_eager"):
        with no_new_compiles():
            out["compiled_layer_vs_eager"] = measure("compiled_layer_vs_eager", compiled_vs_eager_pair(trainer), pairs)
        trainer.model.zero_grad(set_to_none=True)
        trainer.model.memory_tables.zero_grad_buffers()
    return out


def geometric_spread(values) -> float:
    """max/min of a list of positive numbers (1.0: no spread)."""
    return max(values) / min(values) if values and min(values) > 0 else math.inf
