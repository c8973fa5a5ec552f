"""A memory layer's statistics per training forward (`ultramem::layer_stats_accumulate`) at the
227M shapes: y [12288, 768] bf16, 32 logical ids per token among 1138² values, scores
[12288, 32, 2] bf16. The Triton kernel (one launch) against the reference, eager (ATen ops) and,
with --compile, compiled by Inductor (the layer's formulation before the op: 7 launches alone, 6
inside the layer, where the scatter fused into the rows' kernel). At full shapes also
a few launch configurations of the kernel (LAUNCH patched for the call: y elements per program,
warps), to settle the product's.

min_bytes counts what must be read: y, the ids and the two score columns. The hit counters
(10.4 MB of fp64) take atomics that stay in the L2 at this size, and are not counted."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import torch

from ultramem.ops import layer_stats as ls

# (Y_TILES, num_warps) tried beside the product's LAUNCH
CONFIGS = [(4, 4), (16, 4), (64, 4), (64, 8)]


def _patched(tls, **launch):
    """The launcher with LAUNCH updated by `launch` for the duration of each call."""

    def call(*args):
        with mock.patch.dict(tls.LAUNCH, launch):
            tls.layer_stats_accumulate_cuda(*args)

    return call


def _shapes(small: bool) -> dict:
    if small:
        return {"T": 64, "D": 16, "K": 4, "M": 2, "N": 100}
    return {"T": 12288, "D": 768, "K": 32, "M": 2, "N": 1138 * 1138}


def stats_case(small: bool, device, seed: int = 5) -> SimpleNamespace:
    """One call's arguments at the 227M shapes (tiny ones if small) and what it adds, in float64:
    ids [T, 1, k] among N values, y [T, D] and scores [T, k, M] in bf16; want_hits [N],
    want_sums [6]."""
    sh = _shapes(small)
    t, d, k, m, n = sh["T"], sh["D"], sh["K"], sh["M"], sh["N"]
    g = torch.Generator(device=device).manual_seed(seed)
    c = SimpleNamespace(n=n, shape=f"T={t} D={d} k={k} M={m} N={n}")
    c.ids = torch.randint(0, n, (t, 1, k), generator=g, device=device)
    c.y = torch.randn(t, d, generator=g, device=device).to(torch.bfloat16)
    c.scores = torch.randn(t, k, m, generator=g, device=device).to(torch.bfloat16)
    y64, s64 = c.y.double(), c.scores.double()
    c.want_hits = torch.bincount(c.ids.reshape(-1), minlength=n).double()
    totals = [y64.sum(), y64.square().sum(), c.y.numel(), s64[:, 0].sum(), s64[:, -1].sum(), t]
    c.want_sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in totals])
    return c


def run(ctx) -> list[dict]:
    c = stats_case(ctx.small, ctx.device)
    ids, y, scores = c.ids, c.y, c.scores
    min_bytes = y.numel() * y.element_size() + ids.numel() * ids.element_size()
    min_bytes += 2 * scores.shape[0] * scores.shape[2] * scores.element_size()
    tls = ls._triton_layer_stats
    variants = {"triton": tls.layer_stats_accumulate_cuda, "reference, eager": ls.accumulate_reference}
    if not ctx.small:
        for tiles, warps in CONFIGS:
            variants[f"triton, Y_TILES={tiles} num_warps={warps}"] = _patched(tls, Y_TILES=tiles, num_warps=warps)
    if ctx.compile_variants:
        variants["reference, compiled"] = torch.compile(ls.accumulate_reference, fullgraph=True)
    rows = []
    for name, fn in variants.items():
        hits = torch.zeros(c.n, dtype=torch.float64, device=ctx.device)
        sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
        fn(hits, sums, ids, y, scores)
        # each sum on its own (one norm over all six would be the counts')
        rel = max(
            ctx.check(f"layer_stats {name} hits", hits, c.want_hits, tol=0.0),
            *(ctx.check(f"layer_stats {name} sums[{i}]", sums[i], c.want_sums[i], tol=1e-5) for i in range(6)),
        )
        us = ctx.do_bench(lambda fn=fn, hits=hits, sums=sums: fn(hits, sums, ids, y, scores))
        rows.append(ctx.row("layer_stats", c.shape, name, us, min_bytes, rel))
    return rows
