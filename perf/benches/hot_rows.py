"""The fused gate + lookup backward when a few rows take many of the picks (as in training, where
retrieval concentrates on hot rows): fp32 atomics vs the sorted one-writer-per-row path, at the
227M shapes with a fraction of all entries sent to a handful of rows. A sorted segment lane once
walked its row's whole run alone (a hot row's run length set that path's time); runs are now cut
into pieces of SEGMENT_PIECE entries: this checks that the cut works on the GPU."""

from __future__ import annotations

import torch

from ultramem.ops._triton import gate_lookup as tgl
from ultramem.ops._triton import pre_value_gate as tpg

from .lookup import BF16, _shapes, gate_lookup_bwd_ref

# (fraction of entries sent to hot rows, number of hot rows)
SKEWS = [(0.0, 0), (0.01, 4), (0.05, 4), (0.2, 16)]


def run(ctx) -> list[dict]:
    sh = _shapes(ctx.small)
    dev = ctx.device
    t, e, d, m, n = sh["T"], sh["E"], sh["D"], sh["M"], sh["N"]
    g = torch.Generator(device=dev).manual_seed(77)
    values = torch.randn(n, d, generator=g, device=dev).to(BF16)
    pre_values = (torch.randn(n, d, generator=g, device=dev) / d**0.5).to(BF16)
    bufs = (torch.zeros(n, d, device=dev), torch.zeros(n, d, device=dev))
    rows_out = []
    for frac, hot in SKEWS:
        rows = torch.randint(0, n, (t, e), generator=g, device=dev)
        if hot:
            pick = torch.rand(t, e, generator=g, device=dev) < frac
            rows = torch.where(pick, torch.randint(0, hot, (t, e), generator=g, device=dev), rows)
        scores = torch.randn(t, e, m, generator=g, device=dev).to(BF16)
        x, grad_out = (torch.randn(t, d, generator=g, device=dev).to(BF16) for _ in range(2))
        grad_gate = torch.randn(t, e, generator=g, device=dev).to(BF16)
        gate = tpg.pre_value_gate_cuda(rows, pre_values, x)
        args = (grad_out, grad_gate, rows, values, pre_values, x, scores, gate)
        longest = int(torch.unique(rows, return_counts=True)[1].max())
        shape = f"T={t} E={e} D={d} hot: {frac:.0%} of entries on {hot} rows (longest run {longest})"
        refs = gate_lookup_bwd_ref(*args)
        for deterministic in (False, True):
            for b in bufs:
                b.zero_()
            grad_scores, grad_x = tgl.gate_lookup_backward_cuda(*args, True, *bufs, deterministic=deterministic)
            name = "sorted" if deterministic else "atomics"
            rel = max(
                ctx.check(f"hot rows {frac} {name} grad_values", bufs[0], refs[0]),
                ctx.check(f"hot rows {frac} {name} grad_pre_values", bufs[1], refs[1]),
                ctx.check(f"hot rows {frac} {name} grad_x", grad_x, refs[2]),
            )
            us = ctx.do_bench(lambda: tgl.gate_lookup_backward_cuda(*args, True, *bufs, deterministic=deterministic))
            rows_out.append(ctx.row("gate_lookup_bwd_hot_rows", shape, name, us, None, rel))
        del refs
    return rows_out
