"""Can the tables' gradient be cheaper if it is not added per micro-batch? (a feasibility bench)

Now each layer's backward adds its 393k entries into both persistent fp32 buffers with atomics:
every entry reads and writes a 768-byte row of each buffer (≈ 465 µs of the 483 µs fused
backward at the 227M shapes). Staged instead: the backward writes only what the table gradient
needs per entry (the row, act(g)·s per core, grad_g) and per token (grad_out, x) into a staging
area, and every F micro-batches one sorted pass over all staged entries of all L layers adds them
into the buffers, one writer per row in row order. A row picked in several micro-batches is then
read and written once per flush, not once per entry.

Measured here at the 227M shapes (T = 12,288, E = 32, D = 192, N = 2.59M, L = 20 windows of
1138² rows at offsets l·360², uniform picks): the fused backward with atomics and with staging,
the sort of F·L·T·E row ids, and the two segment passes; per layer and micro-batch
amortized: staged = kernel + copies + (sort + passes) / (F·L)."""
from __future__ import annotations

import torch

BF16 = torch.bfloat16


def _layer_rows(sh: dict, layer: int, gen: torch.Generator, dev) -> torch.Tensor:
    step = sh["offset"] // 10  # one layer's offset step (knum²)
    return ((torch.randint(0, sh["window"], (sh["T"], sh["E"]), generator=gen, device=dev) + layer * step)
            % sh["N"]).to(torch.int32)


def run(ctx) -> list[dict]:
    from ultramem.ops._triton import gate_lookup as tgl
    from ultramem.ops._triton import weighted_lookup as twl

    from .lookup import _shapes

    sh = _shapes(ctx.small)
    dev = ctx.device
    t, e, d, m, n = sh["T"], sh["E"], sh["D"], sh["M"], sh["N"]
    layers = 2 if ctx.small else 20
    gen = torch.Generator(device=dev).manual_seed(11)
    values = (0.02 * torch.randn(n, d, generator=gen, device=dev)).to(BF16)
    pre_values = (0.02 * torch.randn(n, d, generator=gen, device=dev)).to(BF16)
    buf_v = torch.zeros(n, d, device=dev)
    buf_p = torch.zeros(n, d, device=dev)
    rows0 = _layer_rows(sh, 0, gen, dev)
    scores = torch.randn(t, e, m, generator=gen, device=dev).to(BF16)
    x = torch.randn(t, d, generator=gen, device=dev).to(BF16)
    grad_out = torch.randn(t, d, generator=gen, device=dev).to(BF16)
    gate = torch.randn(t, e, generator=gen, device=dev).to(BF16)
    args = (grad_out, None, rows0, values, pre_values, x, scores, gate, True)
    out = []
    shape = f"T={t} E={e} D={d} N={n} L={layers}"

    # The per-layer kernels: atomics (today) and staging (no table writes).
    us_atomic = ctx.do_bench(lambda: tgl.gate_lookup_backward_cuda(*args, buf_v, buf_p))
    out.append(ctx.row("staged_flush", shape, "fused bwd, atomics (per layer)", us_atomic, None))
    eff = torch.empty(t, e, m, device=dev)
    grad_g = torch.empty(t, e, device=dev)
    us_stage = ctx.do_bench(lambda: tgl.gate_lookup_backward_cuda(*args, None, None, stage=(eff, grad_g)))
    out.append(ctx.row("staged_flush", shape, "fused bwd, staged (per layer)", us_stage, None))
    # The staging copies of the token rows (grad_out and x: the sources of both tables' rows).
    go_copy, x_copy = torch.empty_like(grad_out), torch.empty_like(x)
    us_copy = ctx.do_bench(lambda: (go_copy.copy_(grad_out), x_copy.copy_(x)))
    out.append(ctx.row("staged_flush", shape, "copy grad_out and x (per layer)", us_copy, 4 * t * d * 2))

    # Check the staged kernel + one flush against the atomics on one layer (fp32 buffers).
    buf_v.zero_(), buf_p.zero_()
    tgl.gate_lookup_backward_cuda(*args, buf_v, buf_p)
    ref_v, ref_p = buf_v.double(), buf_p.double()
    buf_v.zero_(), buf_p.zero_()
    tgl.gate_lookup_backward_cuda(*args, None, None, stage=(eff, grad_g))
    order = twl.sort_rows(rows0, n)
    twl.segment_scatter(rows0, grad_out, eff, buf_v, torch.float32, accumulate=True, order=order)
    twl.segment_scatter(rows0, x, grad_g, buf_p, torch.float32, accumulate=True, order=order)
    rel_v = ctx.check("staged flush V vs atomics", buf_v, ref_v, tol=1e-5)
    rel_p = ctx.check("staged flush P vs atomics", buf_p, ref_p, tol=1e-5)
    del ref_v, ref_p

    for f in ((1,) if ctx.small else (1, 4, 16)):
        tokens = f * layers * t
        try:
            rows = torch.cat([_layer_rows(sh, i % layers, gen, dev) for i in range(f * layers)])
            w_v = torch.randn(tokens, e, m, generator=gen, device=dev)
            w_p = torch.randn(tokens, e, generator=gen, device=dev)
            g_v = torch.randn(tokens, d, generator=gen, device=dev).to(BF16)
            g_p = torch.randn(tokens, d, generator=gen, device=dev).to(BF16)
            uniq = int(torch.unique(rows).numel())
            us_sort = ctx.do_bench(lambda: twl.sort_rows(rows, n), graph=False)
            order = twl.sort_rows(rows, n)
            us_v = ctx.do_bench(lambda: twl.segment_scatter(rows, g_v, w_v, buf_v, torch.float32, accumulate=True,
                                                            order=order), graph=False)
            us_p = ctx.do_bench(lambda: twl.segment_scatter(rows, g_p, w_p, buf_p, torch.float32, accumulate=True,
                                                            order=order), graph=False)
        except torch.OutOfMemoryError as exc:
            out.append(ctx.row("staged_flush", shape, f"F={f}: out of memory", float("nan"), None, error=str(exc)[:200]))
            break
        per = f * layers
        # floor of one pass: each distinct row read + written in fp32, each entry's bf16 source row
        floor = uniq * d * 8 + tokens * e * d * 2
        out.append(ctx.row("staged_flush", shape, f"F={f}: sort {tokens * e / 1e6:.0f}M ids", us_sort, None,
                           distinct_rows=uniq))
        out.append(ctx.row("staged_flush", shape, f"F={f}: segment pass V", us_v, floor))
        out.append(ctx.row("staged_flush", shape, f"F={f}: segment pass P", us_p, floor))
        amortized = us_stage + us_copy + (us_sort + us_v + us_p) / per
        out.append(ctx.row("staged_flush", shape, f"F={f}: staged per layer and micro-batch", amortized, None,
                           versus_atomics_us=round(us_atomic, 1)))
        del rows, w_v, w_p, g_v, g_p, order
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    return out
