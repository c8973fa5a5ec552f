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
the sort of F·L·T·E row ids, the two block-add passes and the whole flush; per layer and
micro-batch amortized: staged = kernel + flush / (F·L)."""

from __future__ import annotations

import torch

BF16 = torch.bfloat16


def _layer_rows(sh: dict, layer: int, gen: torch.Generator, dev) -> torch.Tensor:
    step = sh["offset"] // 10  # one layer's offset step (knum²)
    return (
        (torch.randint(0, sh["window"], (sh["T"], sh["E"]), generator=gen, device=dev) + layer * step) % sh["N"]
    ).to(torch.int32)


def run(ctx) -> list[dict]:
    from ultramem.ops._triton import gate_lookup as tgl
    from ultramem.ops._triton import staged_grad as tsg
    from ultramem.ops.staged_grad import GradStaging

    from .lookup import _shapes, launch_shape

    sh = _shapes(ctx.small)
    dev = ctx.device
    t, e, d, m, n = sh["T"], sh["E"], sh["D"], sh["M"], sh["N"]
    layers = 2 if ctx.small else 20
    kernels = dev.type == "cuda"
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

    # One layer's backward: atomics (without staging), staged (room left; the fill level is reset
    # before each call), and the fallback when the staging area is full (atomics again).
    us_atomic = ctx.do_bench(lambda: tgl.gate_lookup_backward_cuda(*args, buf_v, buf_p))
    out.append(ctx.row("staged_flush", shape, "fused bwd, atomics (per layer)", us_atomic, None))
    one = GradStaging(t, e, m, d, d, BF16, dev)

    def staged_call():
        one.fill.zero_()
        tsg.staged_gate_lookup_backward_cuda(*args, buf_v, buf_p, one)

    us_stage = ctx.do_bench(staged_call)
    out.append(ctx.row("staged_flush", shape, "fused bwd, staged (per layer, with a fill reset)", us_stage, None))
    us = ctx.do_bench(lambda: one.fill.zero_())
    out.append(ctx.row("staged_flush", shape, "(the fill reset alone)", us, None))
    one.fill.fill_(1)
    us_full = ctx.do_bench(lambda: tsg.staged_gate_lookup_backward_cuda(*args, buf_v, buf_p, one))
    out.append(ctx.row("staged_flush", shape, "fused bwd, staging full: atomics", us_full, None))

    # Check: one staged layer + its flush against the atomics (fp32 buffers).
    buf_v.zero_(), buf_p.zero_()
    tgl.gate_lookup_backward_cuda(*args, buf_v, buf_p)
    ref_v, ref_p = buf_v.double(), buf_p.double()
    buf_v.zero_(), buf_p.zero_()
    one.fill.zero_()
    tsg.staged_gate_lookup_backward_cuda(*args, buf_v, buf_p, one)
    one.flush(buf_v, buf_p, kernels=kernels)
    ctx.check("staged + flush V vs atomics", buf_v, ref_v, tol=1e-5)
    ctx.check("staged + flush P vs atomics", buf_p, ref_p, tol=1e-5)
    del ref_v, ref_p, one

    for f in (1,) if ctx.small else (1, 4, 16):
        tokens = f * layers * t
        try:
            st = GradStaging(tokens, e, m, d, d, BF16, dev)
            st.rows.copy_(torch.cat([_layer_rows(sh, i % layers, gen, dev) for i in range(f * layers)]))
            st.eff.normal_(generator=gen)
            st.grad_g.normal_(generator=gen)
            st.grad_out.normal_(generator=gen)
            st.x.normal_(generator=gen)
            uniq = int(torch.unique(st.rows).numel())
            us_sort = ctx.do_bench(lambda: tsg.sort_rows(st.rows, n), graph=False)
            order = tsg.sort_rows(st.rows, n)
            us_v = ctx.do_bench(
                lambda: tsg.sorted_block_add(st.rows, st.grad_out, st.eff, buf_v, torch.float32, order=order),
                graph=False,
            )
            us_p = ctx.do_bench(
                lambda: tsg.sorted_block_add(st.rows, st.x, st.grad_g, buf_p, torch.float32, order=order), graph=False
            )

            def flush():
                st.fill.fill_(tokens)
                st.flush(buf_v, buf_p, kernels=kernels)

            us_flush = ctx.do_bench(flush, graph=False)
            if f == 4:  # launch shapes of the block add (the default is BLOCK_ADD_CONFIG)
                base = {"BLOCK_J": 32, "BLOCK_D": 64, "CHUNKS": 3, "num_warps": 1}
                # 128-column chunks: one lane holds a column strip of all 32 entries, so the
                # segmented scan runs in registers instead of through shuffles
                for cfg in (
                    {**base, "PROGRAMS_PER_SM": 0},
                    {**base, "PROGRAMS_PER_SM": 16},
                    {**base, "BLOCK_D": 128, "CHUNKS": 1, "PROGRAMS_PER_SM": 16},
                    {**base, "BLOCK_D": 128, "CHUNKS": 2, "PROGRAMS_PER_SM": 16},
                    {**base, "BLOCK_D": 128, "CHUNKS": 2, "PROGRAMS_PER_SM": 8},
                    {**base, "BLOCK_J": 16, "BLOCK_D": 128, "CHUNKS": 2, "PROGRAMS_PER_SM": 16},
                    {**base, "BLOCK_D": 256, "CHUNKS": 1, "PROGRAMS_PER_SM": 16},
                    {**base, "BLOCK_J": 64, "BLOCK_D": 128, "CHUNKS": 1, "PROGRAMS_PER_SM": 16},
                ):
                    with launch_shape(tsg, "BLOCK_ADD_CONFIG", cfg):
                        us = ctx.do_bench(
                            lambda: tsg.sorted_block_add(
                                st.rows, st.grad_out, st.eff, buf_v, torch.float32, order=order
                            ),
                            graph=False,
                        )
                    out.append(ctx.row("staged_flush", shape, f"F={f}: block add V {cfg}", us, None))
        except torch.OutOfMemoryError as exc:
            out.append(
                ctx.row("staged_flush", shape, f"F={f}: out of memory", float("nan"), None, error=str(exc)[:200])
            )
            break
        per = f * layers
        # floor of one pass: each distinct row read + written in fp32, each entry's bf16 source row
        floor = uniq * d * 8 + tokens * e * d * 2
        out.append(
            ctx.row(
                "staged_flush", shape, f"F={f}: sort {tokens * e / 1e6:.0f}M ids", us_sort, None, distinct_rows=uniq
            )
        )
        out.append(ctx.row("staged_flush", shape, f"F={f}: block add V", us_v, floor))
        out.append(ctx.row("staged_flush", shape, f"F={f}: block add P", us_p, floor))
        out.append(ctx.row("staged_flush", shape, f"F={f}: whole flush", us_flush, 2 * floor))
        out.append(
            ctx.row(
                "staged_flush",
                shape,
                f"F={f}: staged per layer and micro-batch",
                us_stage + us_flush / per,
                None,
                versus_atomics_us=round(us_atomic, 1),
            )
        )
        del st, order
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    del values, pre_values, buf_p
    out += _one_table(ctx, sh, layers, gen, buf_v)
    return out


def _one_table(ctx, sh: dict, layers: int, gen: torch.Generator, buf: torch.Tensor) -> list[dict]:
    """The standalone ops' backwards (`weighted_lookup`: Memory+, UltraMemV2 without
    pre-values; `pre_value_gate`) with atomics and staged into a one-table staging area, and
    the flush of F = 4 micro-batches × L layers of one table; per call amortized: staged =
    kernel + flush / (F·L)."""
    from ultramem.ops._triton import pre_value_gate as tpg
    from ultramem.ops._triton import staged_grad as tsg
    from ultramem.ops._triton import weighted_lookup as twl
    from ultramem.ops.staged_grad import GradStaging

    from .lookup import fused_shape, launch_shape

    dev = ctx.device
    t, e, d, m, n = sh["T"], sh["E"], sh["D"], sh["M"], sh["N"]
    kernels = dev.type == "cuda"
    table = (0.02 * torch.randn(n, d, generator=gen, device=dev)).to(BF16)
    rows0 = _layer_rows(sh, 0, gen, dev)
    scores = torch.randn(t, e, m, generator=gen, device=dev).to(BF16)
    grad_gate = torch.randn(t, e, generator=gen, device=dev).to(BF16)
    x = torch.randn(t, d, generator=gen, device=dev).to(BF16)
    grad_out = torch.randn(t, d, generator=gen, device=dev).to(BF16)
    shape = f"T={t} E={e} D={d} N={n} L={layers}"
    out = []
    ops = {
        "lookup": (
            lambda: twl.weighted_lookup_backward_accumulate_cuda(buf, grad_out, rows0, table, scores),
            lambda st: tsg.staged_lookup_backward_cuda(grad_out, rows0, table, scores, buf, st),
            GradStaging(t, e, m, d, 0, BF16, dev),
            m,
        ),
        "gate": (
            lambda: tpg.pre_value_gate_backward_accumulate_cuda(buf, grad_gate, rows0, table, x),
            lambda st: tsg.staged_gate_backward_cuda(grad_gate, rows0, table, x, buf, st),
            GradStaging(t, e, 1, 0, d, BF16, dev),
            1,
        ),
    }
    f = 1 if ctx.small else 4
    tokens = f * layers * t
    for name, (atomics, staged, one, cores) in ops.items():
        us_atomic = ctx.do_bench(atomics)
        out.append(ctx.row("staged_flush", shape, f"{name} bwd, atomics", us_atomic, None))

        def staged_call():
            one.fill.zero_()
            return staged(one)

        us_stage = ctx.do_bench(staged_call)
        out.append(ctx.row("staged_flush", shape, f"{name} bwd, staged (with a fill reset)", us_stage, None))
        # launch shapes: the keys over gate_lookup's BWD_CONFIG, the warps over the staged gate's too
        for cfg in ({"num_warps": 1}, {"num_warps": 4}, {"num_warps": 1, "GROUP_CHUNKS": 1}):
            gate_warps = {"num_warps": cfg["num_warps"]}
            with fused_shape(cfg, backward=True), launch_shape(tsg, "STAGED_GATE_CONFIG", gate_warps):
                us = ctx.do_bench(staged_call)
            out.append(ctx.row("staged_flush", shape, f"{name} bwd, staged {cfg}", us, None))
        # check: staged + flush against the atomics, and the same grad_scores / grad_x
        buf.zero_()
        want_grad = atomics().double()
        want = buf.double()
        buf.zero_()
        got_grad = staged_call()
        one.flush(buf if name == "lookup" else None, None if name == "lookup" else buf, kernels=kernels)
        ctx.check(f"{name}: staged + flush vs atomics", buf, want, tol=1e-5)
        ctx.check(f"{name}: staged grad vs atomics path", got_grad, want_grad, tol=1e-2)
        del want, want_grad
        # the flush of F micro-batches of L layers of this one table
        st = GradStaging(tokens, e, cores, d if name == "lookup" else 0, 0 if name == "lookup" else d, BF16, dev)
        st.rows.copy_(torch.cat([_layer_rows(sh, i % layers, gen, dev) for i in range(f * layers)]))
        for part in (st.eff, st.grad_out, st.grad_g, st.x):
            if part is not None:
                part.normal_(generator=gen)

        def flush():
            st.fill.fill_(tokens)
            st.flush(buf if name == "lookup" else None, None if name == "lookup" else buf, kernels=kernels)

        us_flush = ctx.do_bench(flush, graph=False)
        out.append(ctx.row("staged_flush", shape, f"{name}: F={f} flush of one table", us_flush, None))
        out.append(
            ctx.row(
                "staged_flush",
                shape,
                f"{name} bwd, staged, per call with its flush share (F={f})",
                us_stage + us_flush / (f * layers),
                None,
                versus_atomics_us=round(us_atomic, 1),
            )
        )
        del st
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out
