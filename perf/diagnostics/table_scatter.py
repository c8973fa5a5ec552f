"""Where the table-gradient scatter's time goes (the largest kernel of the layer's backward):
adding w[t, e] · g[t, :] into rows ids[t, e] of a persistent fp32 [N, D] buffer, at the 227M
shapes (T = 12,288 tokens, E = 32, D = 192, N = 2,592,000), in isolation, several ways:

  atomics v4        one program per token, red.global.add.v4.f32 (what the fused backward does)
  atomics, sorted   the same with the entries processed in row order
  TMA reduce        one program per token, one bulk tensor reduce (cp.reduce.async.bulk.tensor
                    .add.f32) per entry and column block: whole rows reduced in L2
  plain RMW         load, add, store with unique ids (wrong with duplicates: a speed-of-light
                    figure for one writer per row), in random order and in row order

The bytes counted are the floor of an fp32 accumulate: each entry's row read and written
(2 · 4 · D) plus its bf16 source row (2 · D). The kernels here are the experiment's own, not the
ops', so this is a diagnostic, not part of the op suite.

    python -m perf.diagnostics.table_scatter [--small]         # from the repository root
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

BLOCK_D = 64


@triton.jit
def _scatter_rows_kernel(
    ids_ptr,
    w_ptr,
    g_ptr,
    buf_ptr,
    E,
    D,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKS: tl.constexpr,
    PLAIN: tl.constexpr,
):
    """One program per token: atomics, or (PLAIN) load + add + store, correct only without
    duplicate ids."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    ids = tl.load(ids_ptr + t * E + e, mask=e_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + t * E + e, mask=e_ok, other=0.0)
    for c in tl.static_range(CHUNKS):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        g = tl.load(g_ptr + t * D + d, mask=d < D, other=0.0).to(tl.float32)
        ptrs = buf_ptr + ids[:, None] * D + d[None, :]
        m = e_ok[:, None] & (d < D)[None, :]
        if PLAIN:
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + w[:, None] * g[None, :], mask=m)
        else:
            tl.atomic_add(ptrs, w[:, None] * g[None, :], mask=m, sem="relaxed")


@triton.jit
def _scatter_tma_kernel(
    ids_ptr, w_ptr, g_ptr, buf_desc, E, D, E_CONST: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    gs = ()
    for c in tl.static_range(CHUNKS):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        gs = gs + (tl.load(g_ptr + t * D + d, mask=d < D, other=0.0).to(tl.float32),)
    for e in tl.static_range(E_CONST):
        row = tl.load(ids_ptr + t * E + e).to(tl.int32)
        w = tl.load(w_ptr + t * E + e)
        for c in tl.static_range(CHUNKS):
            buf_desc.atomic_add([row, c * BLOCK_D], (w * gs[c])[None, :])


def scatter(
    kind: str,
    ids: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    buf: torch.Tensor,
    num_warps: int = 2,
    block_d: int = BLOCK_D,
) -> None:
    t, e = ids.shape
    d = g.shape[1]
    chunks = triton.cdiv(d, block_d)
    if kind == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(buf, block_shape=[1, block_d])
        _scatter_tma_kernel[(t,)](ids, w, g, desc, e, d, E_CONST=e, BLOCK_D=block_d, CHUNKS=chunks, num_warps=num_warps)
        return
    _scatter_rows_kernel[(t,)](
        ids,
        w,
        g,
        buf,
        e,
        d,
        BLOCK_E=triton.next_power_of_2(e),
        BLOCK_D=block_d,
        CHUNKS=chunks,
        PLAIN=kind == "plain",
        num_warps=num_warps,
    )


def run(ctx) -> list[dict]:
    from perf.benches.lookup import _shapes

    sh = _shapes(ctx.small)
    dev = ctx.device
    t, e, d, n = sh["T"], sh["E"], sh["D"], sh["N"]
    gen = torch.Generator(device=dev).manual_seed(5)
    ids_random = torch.randint(0, n, (t, e), generator=gen, device=dev)  # duplicates as in training
    unique = torch.randperm(n, generator=gen, device=dev)[: t * e].view(t, e)
    w = torch.randn(t, e, generator=gen, device=dev)
    g = torch.randn(t, d, generator=gen, device=dev).to(torch.bfloat16)
    buf = torch.zeros(n, d, device=dev)
    min_bytes = t * e * d * (2 * 4 + 2)
    shape = f"T={t} E={e} D={d} N={n} fp32 buffer"

    def sorted_by_row(ids):
        # Entries in row order, regrouped as "tokens" of E entries: each keeps its own weight and source row.
        order = torch.argsort(ids.reshape(-1), stable=True)
        return ids.reshape(-1)[order].view(t, e), order

    def ref(ids):
        out = torch.zeros(n, d, dtype=torch.float64, device=dev)
        out.index_add_(0, ids.reshape(-1), (w.double().unsqueeze(-1) * g.double().unsqueeze(1)).reshape(t * e, d))
        return out

    variants = [
        ("atomics v4", "atomics", ids_random, 2),
        ("atomics v4", "atomics", ids_random, 4),
        ("plain RMW, unique ids", "plain", unique, 2),
    ]
    if dev.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9:
        variants += [("TMA reduce", "tma", ids_random, 1), ("TMA reduce", "tma", ids_random, 4)]
    rows = []
    for name, kind, ids, warps in variants:
        buf.zero_()
        scatter(kind, ids, w, g, buf, warps)
        rel = ctx.check(f"table_scatter {name} w{warps}", buf, ref(ids))
        us = ctx.do_bench(lambda: scatter(kind, ids, w, g, buf, warps))
        rows.append(ctx.row("table_scatter", shape, f"{name} [w{warps}]", us, min_bytes, rel))
    # Row order: the same entries sorted by row (weights and source rows follow their entries).
    for name, kind, ids in (
        ("atomics v4, row order", "atomics", ids_random),
        ("plain RMW, unique ids, row order", "plain", unique),
    ):
        ids_s, order = sorted_by_row(ids)
        tok = order // e
        g_s = g[tok].view(t, e, d)[:, 0].contiguous()  # timing only: one source row per group of E
        w_s = w.reshape(-1)[order].view(t, e).contiguous()
        us = ctx.do_bench(lambda: scatter(kind, ids_s, w_s, g_s, buf, 2))
        rows.append(ctx.row("table_scatter", shape, f"{name} [w2] (timing only)", us, min_bytes, None))
    return rows


if __name__ == "__main__":  # python -m perf.diagnostics.table_scatter [--small] [--compile]
    from perf import bench_ops

    sys.exit(bench_ops.main(["--only", "table_scatter", *sys.argv[1:]]))
