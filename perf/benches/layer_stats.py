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

import torch

from ultramem.ops import layer_stats as ls

# (Y_TILES, num_warps) tried beside the product's LAUNCH
CONFIGS = [(4, 4), (64, 4), (16, 8), (64, 8)]


def _patched(tls, **launch):
    """The launcher with LAUNCH updated by `launch` for the duration of each call."""

    def call(*args):
        saved = dict(tls.LAUNCH)
        tls.LAUNCH.update(launch)
        try:
            tls.layer_stats_accumulate_cuda(*args)
        finally:
            tls.LAUNCH.clear()
            tls.LAUNCH.update(saved)

    return call


def _shapes(small: bool) -> dict:
    if small:
        return {"T": 64, "D": 16, "K": 4, "M": 2, "N": 100}
    return {"T": 12288, "D": 768, "K": 32, "M": 2, "N": 1138 * 1138}


def run(ctx) -> list[dict]:
    sh = _shapes(ctx.small)
    dev = ctx.device
    t, d, k, m, n = sh["T"], sh["D"], sh["K"], sh["M"], sh["N"]
    g = torch.Generator(device=dev).manual_seed(5)
    ids = torch.randint(0, n, (t, 1, k), generator=g, device=dev)
    y = torch.randn(t, d, generator=g, device=dev).to(torch.bfloat16)
    scores = torch.randn(t, k, m, generator=g, device=dev).to(torch.bfloat16)
    y64, s64 = y.double(), scores.double()
    want_hits = torch.bincount(ids.reshape(-1), minlength=n).double()
    totals = [y64.sum(), y64.square().sum(), y.numel(), s64[:, 0].sum(), s64[:, -1].sum(), t]
    want_sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in totals])
    min_bytes = y.numel() * y.element_size() + ids.numel() * ids.element_size() + 2 * t * m * scores.element_size()
    shape = f"T={t} D={d} k={k} M={m} N={n}"

    variants = {
        "triton": ls._triton_layer_stats.layer_stats_accumulate_cuda,
        "reference, eager": ls.accumulate_reference,
    }
    if ctx.compile_variants:
        variants["reference, compiled"] = torch.compile(ls.accumulate_reference, fullgraph=True)
    rows = []
    for name, fn in variants.items():
        hits = torch.zeros(n, dtype=torch.float64, device=dev)
        sums = torch.zeros(6, dtype=torch.float64, device=dev)
        fn(hits, sums, ids, y, scores)
        rel = max(
            ctx.check(f"layer_stats {name} hits", hits, want_hits, tol=0.0),
            ctx.check(f"layer_stats {name} sums", sums, want_sums, tol=1e-6),
        )
        us = ctx.do_bench(lambda fn=fn, hits=hits, sums=sums: fn(hits, sums, ids, y, scores))
        rows.append(ctx.row("layer_stats", shape, name, us, min_bytes, rel))
    return rows
