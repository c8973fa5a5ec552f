"""Shape sweep of the fused gate + lookup forward: the column-chunk kernel against
the entry-block kernel, over entries per token, value widths and token counts, so the choice of
the default is not made at the 227M shape alone. Each kernel is checked against the float64
reference (on the first tokens: the reference gathers in float64) before it is timed.

    python -m perf.diagnostics.gate_lookup_sweep [--small]     # from the repository root
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

# ENTRY_BLOCK: the entry-block kernel's best config at the 227M shape, for comparison.
from perf.benches.lookup import BF16, ENTRY_BLOCK, fused_shape, gate_ref, lookup_ref, min_bytes
from ultramem.ops._triton import gate_lookup as tgl

CHECK_TOKENS = 512


def _shapes(small: bool) -> list[tuple[int, int, int]]:
    """(tokens, entries, value width); the pre-value width equals the value width as in the model."""
    if small:
        return [(16, 5, 24), (8, 33, 40)]
    grid = [(12288, e, d) for e in (8, 16, 32, 64, 128) for d in (128, 192, 384, 768)]
    return grid + [(1024, 32, 192), (65536, 32, 192), (12288, 256, 192)]


def run(ctx) -> list[dict]:
    dev = ctx.device
    n = 97 if ctx.small else 1_000_000
    m = 2
    out_rows: list[dict] = []
    g = torch.Generator(device=dev).manual_seed(4321)
    for t, e, d in _shapes(ctx.small):
        shape = f"T={t} E={e} D={d} M={m} N={n} bf16"
        values = torch.randn(n, d, generator=g, device=dev).to(BF16)
        pre_values = (torch.randn(n, d, generator=g, device=dev) / d**0.5).to(BF16)
        rows = torch.randint(0, n, (t, e), generator=g, device=dev)
        scores = torch.randn(t, e, m, generator=g, device=dev).to(BF16)
        x = torch.randn(t, d, generator=g, device=dev).to(BF16)
        c = min(t, CHECK_TOKENS)
        gate64 = gate_ref(rows[:c], pre_values, x[:c])
        ref = lookup_ref(rows[:c], values, scores[:c].double() * F.gelu(gate64).unsqueeze(-1))
        least = min_bytes(t, e, d, m, 0)["gate_lookup_fwd"]
        # each kernel forced at every shape (the launcher picks one by shape)
        for name, cfg in (("column-chunk", {"D_CHUNKS": True}), ("entry-block", ENTRY_BLOCK)):
            try:
                ctx.poison_allocator(t * d * 2)
                with fused_shape(cfg):
                    out, gate = tgl.gate_lookup_cuda(rows, values, pre_values, x, scores, True)
                    rel = max(
                        ctx.check(f"fused sweep {name} {shape} out", out[:c], ref),
                        ctx.check(f"fused sweep {name} {shape} gate", gate[:c], gate64),
                    )
                    us = ctx.do_bench(lambda: tgl.gate_lookup_cuda(rows, values, pre_values, x, scores, True))
                out_rows.append(ctx.row("gate_lookup_fwd_sweep", shape, name, us, least, rel))
            except Exception as exc:  # keep the other shapes' numbers
                out_rows.append(
                    {
                        "op": "gate_lookup_fwd_sweep",
                        "shape": shape,
                        "variant": name,
                        "median_us": None,
                        "error": repr(exc)[:300],
                    }
                )
        del values, pre_values
    return out_rows


if __name__ == "__main__":  # python -m perf.diagnostics.gate_lookup_sweep [--small] [--compile]
    from perf import bench_ops

    sys.exit(bench_ops.main(["--only", "gate_lookup_sweep", *sys.argv[1:]]))
