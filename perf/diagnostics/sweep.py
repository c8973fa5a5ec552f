"""Shape sweep of every ultramem op around the 227M point, one axis at a time.

    python -m perf.diagnostics.sweep [--compile] [--small]     # from the repository root

The kernels' block configs, and the fused gate + lookup kernel's choice, were tuned at the 227M
shapes (T = 12,288 tokens, E = 32 entries per token, D = 192, M = 2 cores, bf16). This module
shows how ours, eager PyTorch (and torch.compile of it, with --compile) scale when one of those
moves, the others kept at the 227M point (not the full cross product):

  entries per token E (= knn)      16, 32, 64, 128
  value width D (vdim = pre_vdim)  128, 192, 384, 768
  tokens T                         1024, 12288, 65536

Lookup ops (N = 1,000,000 table rows instead of 2,592,000, so that making the tables stays
cheap; ids uniform over the table): weighted_lookup forward; weighted_lookup backward and
pre_value_gate backward, both accumulating into a persistent fp32 gradient buffer (ours: fp32
atomics; eager: index_add_ into the same buffer); the fused gate_lookup forward with the kernel
its launcher picks by default. "ours" is what the op's CUDA kernel runs, called directly so that
--small runs it on CPU under TRITON_INTERPRET=1 too (for the backwards: the atomic path that the
accumulate ops take unless deterministic mode is on).
tdqkr_retrieval (H = 1, n = 1138 x 1138 sub-keys, r = 2, M = 2, bf16): forward and forward +
backward for k over the entries axis and T over the tokens axis (vdim does not apply); eager is
the reference op body.

Every kernel of ours, and every lookup baseline, is checked against a float64 reference on
fresh random inputs before it is timed (the retrieval baseline is the reference op itself),
outputs poisoned first: forward outputs on their first CHECK_TOKENS tokens (the kernel
still runs on all tokens), table gradients on the whole buffer (accumulated onto random start
values), retrieval gradients on all tokens. Calls slower than SLOW_CALL_MS (eager at the large
shapes) are timed by CUDA events only: their host launch time is negligible there, and the ~160
CUDA-graph replays of ctx.do_bench would dominate the module's run time. With --compile each
eager baseline is compiled with static shapes, once per shape (48 compiles: minutes).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from perf.benches import retrieval as bench_retrieval
from perf.benches.lookup import (
    BF16,
    Inputs,
    gate_bwd_eager,
    gate_bwd_ref,
    gate_lookup_eager,
    gate_ref,
    lookup_bwd_eager,
    lookup_bwd_ref,
    lookup_eager,
    lookup_ref,
    min_bytes,
)
from ultramem.ops._triton import gate_lookup as tgl
from ultramem.ops._triton import pre_value_gate as tpg
from ultramem.ops._triton import retrieval as tri
from ultramem.ops._triton import weighted_lookup as twl

log = logging.getLogger("bench_ops.sweep")

CHECK_TOKENS = 512
CHECK_TOKENS_SMALL = 1  # --small: fewer than the tokens run, so the subset path runs too
SLOW_CALL_MS = 10.0
CORES = 2


def _axis_shapes(base: dict, axes: dict) -> list[tuple[dict, str]]:
    """Every shape that moves one axis off `base` (the base point once), with the axes it lies on."""
    shapes: dict[tuple, list[str]] = {}
    for axis, values in axes.items():
        for value in values:
            shape = {**base, axis: value}
            shapes.setdefault(tuple(sorted(shape.items(), key=str)), []).append(axis)
    return [(dict(key), ",".join(on)) for key, on in shapes.items()]


def lookup_shapes(small: bool) -> tuple[int, list[tuple[dict, str]]]:
    """(table rows N, [(shape {T, E, D}, axes)])."""
    if small:
        return 97, _axis_shapes({"T": 8, "E": 5, "D": 24}, {"E": (5, 33), "D": (24, 40), "T": (3, 8)})
    return 1_000_000, _axis_shapes(
        {"T": 12288, "E": 32, "D": 192}, {"E": (16, 32, 64, 128), "D": (128, 192, 384, 768), "T": (1024, 12288, 65536)}
    )


def retrieval_shapes(small: bool) -> list[tuple[dict, str]]:
    """Shapes in the form perf/benches/retrieval.py takes (t, h, n_row, n_col, r, m, k, dtype)."""
    base = dict(t=12288, h=1, n_row=1138, n_col=1138, r=2, m=CORES, k=32, dtype=BF16)
    axes = {"k": (16, 32, 64, 128), "t": (1024, 12288, 65536)}
    if small:
        base = dict(base, t=2, n_row=100, n_col=90, k=8)
        axes = {"k": (8, 64), "t": (1, 2)}  # k = 64: the kernels' k > 32 path
    return _axis_shapes(base, axes)


class _Sweep:
    """Rows, timing and error handling shared by the lookup and retrieval parts."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.rows: list[dict] = []
        self._seed = iter(range(10_000, 1_000_000))
        self.check_tokens = CHECK_TOKENS_SMALL if ctx.small else CHECK_TOKENS

    def seed(self) -> int:
        return next(self._seed)

    def bench(self, fn) -> tuple[float, dict]:
        """ctx.do_bench, or CUDA events only for a call slower than SLOW_CALL_MS."""
        ctx = self.ctx
        ctx._last_timing = {}  # nothing left over from a variant that failed after timing
        if ctx.device.type != "cuda":
            return ctx.do_bench(fn), {}
        fn()  # compile / warm up before judging the speed
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        wall_ms = 1000.0 * (time.perf_counter() - t0)
        if wall_ms > SLOW_CALL_MS:
            us = ctx.do_bench(fn, graph=False)
            return us, {"events_us": round(us, 2), "timing": f"events only (one call {wall_ms:.0f} ms)"}
        return ctx.do_bench(fn), {}

    def add(self, op: str, shape: str, variant: str, fn, nbytes, rel=None, **extra) -> None:
        us, timing = self.bench(fn)
        self.rows.append(self.ctx.row(op, shape, variant, us, nbytes, rel, **timing, **extra))

    def guarded(self, op: str, shape: str, variant: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # one failure keeps the other variants' and shapes' numbers
            traceback.print_exc()
            self.rows.append(
                {"op": op, "shape": shape, "variant": variant, "median_us": None, "error": repr(exc)[:300]}
            )

    def free(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _compiled(ctx) -> dict:
    """torch.compile of each eager baseline (static shapes: one compile per shape), or {}."""
    if not ctx.compile_variants:
        return {}
    return {
        name: torch.compile(fn, dynamic=False)
        for name, fn in (
            ("lookup_fwd", lookup_eager),
            ("lookup_bwd", lookup_bwd_eager),
            ("gate_bwd", gate_bwd_eager),
            ("gate_lookup", gate_lookup_eager),
            ("retrieval_fwd", bench_retrieval.ref_fwd),
            ("retrieval_bwd", bench_retrieval.ref_bwd),
        )
    }


# ---------------------------------------------------------------------------- lookup ops


def _lookup_shape(sw: _Sweep, n: int, t: int, e: int, d: int, axes: str, compiled: dict) -> None:
    ctx, dev, m = sw.ctx, sw.ctx.device, CORES
    sh = {"T": t, "E": e, "D": d, "M": m, "N": n, "window": n, "offset": 0}
    shape = f"T={t} E={e} D={d} M={m} N={n} bf16"
    c = min(t, sw.check_tokens)
    g = torch.Generator(device=dev).manual_seed(sw.seed())
    # Pre-values at a scale where <P, x> is O(1), so the GELU of the fused op is exercised.
    tables = (
        torch.randn(n, d, generator=g, device=dev).to(BF16),
        (torch.randn(n, d, generator=g, device=dev) / d**0.5).to(BF16),
    )
    values, pre_values = tables

    def fresh() -> Inputs:
        return Inputs(sh, sw.seed(), dev, tables)

    probe = fresh()
    uniq = int(probe.rows.unique().numel())
    del probe
    least = min_bytes(t, e, d, m, uniq)
    extra = {"axis": axes, "unique_rows": uniq}

    def add(op, variant, fn, nbytes, rel):
        sw.add(op, shape, variant, fn, nbytes, rel, **extra)

    # ------------------------------------------------------------ weighted_lookup forward
    op = "weighted_lookup_fwd_sweep"

    def lookup_fwd_base(variant, fn):
        inp = fresh()
        ref = lookup_ref(inp.rows[:c], values, inp.scores[:c])
        rel = ctx.check(f"sweep lookup fwd {variant} {shape}", fn(inp.rows, values, inp.scores)[:c], ref)
        add(op, variant, lambda: fn(inp.rows, values, inp.scores), least["lookup_fwd"], rel)

    def lookup_fwd_ours():
        inp = fresh()
        ref = lookup_ref(inp.rows[:c], values, inp.scores[:c])
        ctx.poison_allocator(t * d * 2)
        out = twl.weighted_lookup_cuda(inp.rows, values, inp.scores)
        rel = ctx.check(f"sweep lookup fwd ours {shape}", out[:c], ref)
        add(op, "ours", lambda: twl.weighted_lookup_cuda(inp.rows, values, inp.scores), least["lookup_fwd"], rel)

    sw.guarded(op, shape, "eager", lambda: lookup_fwd_base("eager", lookup_eager))
    if "lookup_fwd" in compiled:
        sw.guarded(op, shape, "torch.compile", lambda: lookup_fwd_base("torch.compile", compiled["lookup_fwd"]))
    sw.guarded(op, shape, "ours", lookup_fwd_ours)

    # The accumulate backwards add into one persistent fp32 buffer per table.
    buf = torch.empty((n, d), dtype=torch.float32, device=dev)

    def check_acc(name, grad_other, ref_table, ref_other, start) -> float:
        rel_t = ctx.check(f"{name} grad_table", buf.double() - start.double(), ref_table)
        rel_o = ctx.check(f"{name} {'grad_scores' if grad_other.dim() == 3 else 'grad_x'}", grad_other, ref_other)
        return max(rel_t, rel_o)

    # ------------------------------------------------------------ accumulate backwards
    def accumulate_bwd(op, what, make_args, ref_fn, eager_fn, compiled_key, ours_fn, poison_bytes, least_key):
        """One accumulate backward (lookup or gate): eager, torch.compile, ours into `buf`."""

        def one(variant, fn, poison: bool):
            args = make_args(fresh())
            ref_table, ref_other = ref_fn(*args)
            buf.normal_()
            start = buf.clone()
            if poison:
                ctx.poison_allocator(poison_bytes)
            other = fn(*args)
            rel = check_acc(f"sweep {what} bwd {variant} {shape}", other, ref_table, ref_other, start)
            del ref_table, ref_other, start, other
            add(op, variant, lambda: fn(*args), least[least_key], rel)

        def into_buf(fn):
            return lambda *args: fn(*args, buf)[1]

        sw.guarded(op, shape, "eager (index_add_)", lambda: one("eager (index_add_)", into_buf(eager_fn), False))
        if compiled_key in compiled:
            sw.guarded(
                op, shape, "torch.compile", lambda: one("torch.compile", into_buf(compiled[compiled_key]), False)
            )
        sw.guarded(op, shape, "ours (accumulate, atomics)", lambda: one("ours (accumulate, atomics)", ours_fn, True))

    accumulate_bwd(
        "weighted_lookup_bwd_sweep",
        "lookup",
        lambda inp: (inp.grad_out, inp.rows, values, inp.scores),
        lookup_bwd_ref,
        lookup_bwd_eager,
        "lookup_bwd",
        lambda *args: twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=False),
        t * e * m * 2,
        "lookup_bwd_acc",
    )
    accumulate_bwd(
        "pre_value_gate_bwd_sweep",
        "gate",
        lambda inp: (inp.grad_gate, inp.rows, pre_values, inp.x),
        gate_bwd_ref,
        gate_bwd_eager,
        "gate_bwd",
        lambda *args: tpg.gate_table_grad(*args, buf, accumulate=True, deterministic=False),
        t * d * 2,
        "gate_bwd_acc",
    )
    del buf

    # ------------------------------------------------------------ fused gate_lookup forward
    op = "gate_lookup_fwd_sweep"
    kernel = "column-chunk" if tgl._use_chunks(e, d, d) else "entry-block"

    def fused(variant, fn, poison: bool):
        inp = fresh()
        gate64 = gate_ref(inp.rows[:c], pre_values, inp.x[:c])
        ref = lookup_ref(inp.rows[:c], values, inp.scores[:c].double() * F.gelu(gate64).unsqueeze(-1))
        if poison:
            ctx.poison_allocator(t * d * 2)
            ctx.poison_allocator(t * e * 2)
        out, gate = fn(inp.rows, values, pre_values, inp.x, inp.scores)
        rel = max(
            ctx.check(f"sweep fused fwd {variant} {shape} out", out[:c], ref, tol=2e-2),
            ctx.check(f"sweep fused fwd {variant} {shape} gate", gate[:c], gate64),
        )
        add(op, variant, lambda: fn(inp.rows, values, pre_values, inp.x, inp.scores), least["gate_lookup_fwd"], rel)

    def fused_ours(rows, values, pre_values, x, scores):
        return tgl.gate_lookup_cuda(rows, values, pre_values, x, scores, True)

    sw.guarded(
        op, shape, "eager (gate, GELU, lookup)", lambda: fused("eager (gate, GELU, lookup)", gate_lookup_eager, False)
    )
    if "gate_lookup" in compiled:
        sw.guarded(op, shape, "torch.compile", lambda: fused("torch.compile", compiled["gate_lookup"], False))
    sw.guarded(op, shape, f"ours (default: {kernel})", lambda: fused(f"ours (default: {kernel})", fused_ours, True))


# ---------------------------------------------------------------------------- retrieval


def _retrieval_shape(sw: _Sweep, s: dict, axes: str, compiled: dict) -> None:
    ctx = sw.ctx
    shape = bench_retrieval._label(s)
    k = s["k"]
    fwd_op, both_op = f"{bench_retrieval.OP}_fwd_sweep", f"{bench_retrieval.OP}_fwd+bwd_sweep"
    try:  # the kernels at this shape, before any timing
        fwd = bench_retrieval.check_forward(ctx, s, seed=sw.seed(), check_tokens=sw.check_tokens)
        bwd = bench_retrieval.check_backward(ctx, s, seed=sw.seed())
        rel_fwd, rel_both = fwd["rel_err"], max(fwd["rel_err"], bwd["rel_err"])
    except Exception as exc:
        traceback.print_exc()
        sw.rows.append({"op": fwd_op, "shape": shape, "variant": "checks", "median_us": None, "error": repr(exc)[:300]})
        return
    a, b, cores, u, v = bench_retrieval._inputs(s, sw.seed(), ctx.device)
    g = torch.randn(s["t"], s["h"], k, s["m"], device=ctx.device, dtype=s["dtype"])
    least = bench_retrieval.min_bytes(s, a.element_size())
    ref_fwd, ref_bwd = bench_retrieval.ref_fwd, bench_retrieval.ref_bwd

    def ours_fwd():
        return tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k)

    def ours_both():
        return tri.tdqkr_retrieval_backward_cuda(g, a, b, cores, ours_fwd()[0])

    timed = [
        (fwd_op, "eager (reference op body)", lambda: ref_fwd(a, b, cores, u, v, k), None),
        (fwd_op, "ours", ours_fwd, rel_fwd),
        (both_op, "eager (reference op body)", lambda: ref_bwd(g, a, b, cores, ref_fwd(a, b, cores, u, v, k)[0]), None),
        (both_op, "ours", ours_both, rel_both),
    ]
    if compiled:
        cf, cb = compiled["retrieval_fwd"], compiled["retrieval_bwd"]
        timed += [
            (fwd_op, "torch.compile", lambda: cf(a, b, cores, u, v, k), None),
            (both_op, "torch.compile", lambda: cb(g, a, b, cores, cf(a, b, cores, u, v, k)[0]), None),
        ]
    for op, variant, fn, rel in timed:
        nbytes = least["fwd"] if op == fwd_op else least["fwd+bwd"]
        sw.guarded(op, shape, variant, lambda: sw.add(op, shape, variant, fn, nbytes, rel, axis=axes))


# ---------------------------------------------------------------------------- the run


def run(ctx) -> list[dict]:
    sw = _Sweep(ctx)
    compiled = _compiled(ctx)
    # Static compiles of the same functions at every shape: above dynamo's default limit of 8.
    limit = torch._dynamo.config.patch(recompile_limit=64) if compiled else contextlib.nullcontext()
    n, shapes = lookup_shapes(ctx.small)
    with limit:
        for sh, axes in shapes:
            t0 = time.time()
            shape = f"T={sh['T']} E={sh['E']} D={sh['D']}"
            sw.guarded(
                "lookup_sweep", shape, "shape", lambda: _lookup_shape(sw, n, sh["T"], sh["E"], sh["D"], axes, compiled)
            )
            sw.free()
            log.info("sweep %s (%s) took %.1f s", shape, axes, time.time() - t0)
        for s, axes in retrieval_shapes(ctx.small):
            t0 = time.time()
            sw.guarded(
                "tdqkr_retrieval_sweep",
                bench_retrieval._label(s),
                "shape",
                lambda: _retrieval_shape(sw, s, axes, compiled),
            )
            sw.free()
            log.info("sweep %s (%s) took %.1f s", bench_retrieval._label(s), axes, time.time() - t0)
    return sw.rows


if __name__ == "__main__":  # python -m perf.diagnostics.sweep [--small] [--compile]
    from perf import bench_ops

    sys.exit(bench_ops.main(["--only", "sweep", *sys.argv[1:]]))
