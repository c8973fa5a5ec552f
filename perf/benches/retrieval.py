"""GPU check and timing of ultramem::tdqkr_retrieval (forward, backward) against the reference.

`run(ctx)` is called by perf/bench_ops.py; standalone: `python perf/benches/retrieval.py [out.json]`.
Correctness first, on fresh random inputs with the outputs' memory poisoned (NaN / -1) before each
call: kept ids against a float64 reference (a differing row must be a near tie), per-core scores
and gradients against float64 formulas at the kernel's ids. Then times (median, CUDA events)
of the reference op in eager mode, under torch.compile, and of the Triton kernels.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from ultramem.ops import retrieval as ref_mod  # noqa: E402
from ultramem.ops._triton import retrieval as tri  # noqa: E402

OP = "tdqkr_retrieval"
# PERF.md workload: one UltraMemV2 layer, 3 × 4096 tokens, n = 1138 keys per side.
MAIN = dict(t=12288, h=1, n_row=1138, n_col=1138, r=2, m=2, k=32, dtype=torch.bfloat16)
# Other shapes checked for correctness only (k tiles, ranks, heads, cores, dtypes).
EXTRA = [
    dict(t=512, h=2, n_row=300, n_col=257, r=3, m=1, k=1, dtype=torch.float32),
    dict(t=512, h=1, n_row=1138, n_col=1138, r=2, m=4, k=7, dtype=torch.float16),
    dict(t=512, h=2, n_row=1138, n_col=900, r=1, m=2, k=64, dtype=torch.bfloat16),
    dict(t=256, h=1, n_row=700, n_col=1500, r=4, m=3, k=100, dtype=torch.float32),
    dict(t=128, h=1, n_row=300, n_col=4000, r=2, m=2, k=256, dtype=torch.bfloat16),
]
# A dry run of this script on CPU under TRITON_INTERPRET=1: RETRIEVAL_BENCH_DEVICE=cpu (tiny shapes).
DEV = os.environ.get("RETRIEVAL_BENCH_DEVICE", "cuda")
if DEV == "cpu":
    MAIN = dict(MAIN, t=4, n_row=100, n_col=90)
    EXTRA = [dict(x, t=2, n_row=min(x["n_row"], 300), n_col=min(x["n_col"], 300)) for x in EXTRA[:2]]
ref_fwd = tri._reference(ref_mod.tdqkr_retrieval)
ref_bwd = tri._reference(ref_mod.tdqkr_retrieval_backward)


def _label(s: dict) -> str:
    return (f"T={s['t']} H={s['h']} n={s['n_row']}x{s['n_col']} r={s['r']} M={s['m']} k={s['k']} "
            f"{str(s['dtype']).replace('torch.', '')}")


def _inputs(s: dict, seed: int, noncontig: bool = False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    dev = DEV

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    a = rnd(s["t"], s["h"], s["n_row"], s["r"]).to(s["dtype"])
    b = rnd(s["t"], s["h"], s["n_col"], s["r"]).to(s["dtype"])
    if noncontig:  # same values, strided views
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
        b = torch.cat([b, b], dim=-1)[..., : s["r"]]
    cores = rnd(s["h"], s["m"], s["r"], s["r"]) / s["r"]
    u = torch.nn.functional.normalize(rnd(s["h"], s["r"]), dim=-1)
    v = torch.nn.functional.normalize(rnd(s["h"], s["r"]), dim=-1)
    return a, b, cores, u, v


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _poison(*specs):
    """Fill and free blocks of the outputs' sizes so that the caching allocator hands poisoned
    memory to the next allocations."""
    bufs = [torch.full(shape, val, dtype=dt, device=DEV) for shape, dt, val in specs]
    del bufs


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def _pair_scores64(a, b, cores, ids):
    """Per-core scores in float64 at the given virtual ids: [T, H, k, M]."""
    n_col = b.shape[2]
    i, j = ids // n_col, ids % n_col
    a_sel = a.double().gather(2, i.unsqueeze(-1).expand(*i.shape, a.shape[-1]))
    b_sel = b.double().gather(2, j.unsqueeze(-1).expand(*j.shape, b.shape[-1]))
    return torch.einsum("ther,hmrs,thes->them", a_sel, cores.double(), b_sel)


def check_forward(s: dict, seed: int, noncontig: bool = False) -> dict:
    a, b, cores, u, v = _inputs(s, seed, noncontig)
    t, h, k, m = s["t"], s["h"], s["k"], s["m"]
    _poison(((t, h, k), torch.int64, -1), ((t, h, k, m), s["dtype"], float("nan")))
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k)
    _sync()
    in_range = bool(((ids >= 0) & (ids < s["n_row"] * s["n_col"])).all())
    distinct = bool((ids.sort(-1).values.diff(dim=-1) != 0).all()) if k > 1 else True
    finite = bool(torch.isfinite(scores.float()).all())
    rids, _ = ref_fwd(a.double(), b.double(), cores.double(), u.double(), v.double(), k)
    same = (ids.sort(-1).values == rids.sort(-1).values).all(-1)
    mine64 = _pair_scores64(a, b, cores, ids.clamp(0, s["n_row"] * s["n_col"] - 1))
    ref64 = _pair_scores64(a, b, cores, rids)
    # a differing row must be a near tie: our weakest kept total within tol of the reference's
    tot_mine, tot_ref = mine64.sum(-1), ref64.sum(-1)
    scale = tot_ref.abs().amax(-1).clamp_min(1e-30)
    gap = (tot_ref.amin(-1) - tot_mine.amin(-1)) / scale
    bad_rows = int((~same & (gap > 1e-4)).sum())
    ordered = bool((tot_mine.diff(dim=-1) <= 1e-5 * scale.unsqueeze(-1)).all()) if k > 1 else True
    out = dict(shape=_label(s) + (" strided" if noncontig else ""), rows=t * h,
               rows_differing=int((~same).sum()), rows_not_near_tie=bad_rows,
               in_range=in_range, distinct=distinct, finite=finite, sorted=ordered,
               scores_rel_err=_rel(scores, mine64))
    out["ok"] = (in_range and distinct and finite and ordered and bad_rows == 0
                 and out["scores_rel_err"] < (2e-2 if s["dtype"] != torch.float32 else 1e-5))
    return out


def check_backward(s: dict, seed: int, noncontig: bool = False) -> dict:
    a, b, cores, u, v = _inputs(s, seed, noncontig)
    t, h, k, m = s["t"], s["h"], s["k"], s["m"]
    ids, _ = ref_fwd(a, b, cores, u, v, k)
    # duplicates across entries are the norm (one row with several columns); force some more
    if k > 1:
        ids[:, :, 1] = ids[:, :, 0]
    g = torch.randn(t, h, k, m, device=DEV, dtype=s["dtype"])
    if noncontig:
        g = torch.cat([g, g], dim=-1)[..., :m]
    _poison((a.shape, a.dtype, float("nan")), (b.shape, b.dtype, float("nan")))
    ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(g, a, b, cores, ids)
    _sync()
    ra, rb, rc = ref_bwd(g.double(), a.double(), b.double(), cores.double(), ids)
    tol = 2e-2 if s["dtype"] != torch.float32 else 1e-5
    out = dict(shape=_label(s) + (" strided" if noncontig else ""),
               finite=bool(torch.isfinite(ga.float()).all() and torch.isfinite(gb.float()).all()
                           and torch.isfinite(gc.float()).all()),
               zero_outside=bool((ga.double()[ra == 0] == 0).all() and (gb.double()[rb == 0] == 0).all()),
               grad_row_rel_err=_rel(ga, ra), grad_col_rel_err=_rel(gb, rb), grad_cores_rel_err=_rel(gc, rc))
    out["ok"] = (out["finite"] and out["zero_outside"] and max(out["grad_row_rel_err"], out["grad_col_rel_err"],
                                                                  out["grad_cores_rel_err"]) < tol)
    return out


def _bench(ctx, fn) -> float:
    """Median µs."""
    if ctx is not None and hasattr(ctx, "do_bench"):
        return float(ctx.do_bench(fn))
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    import triton.testing
    return 1e3 * float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _ceiling_gbps(ctx) -> float:
    if ctx is not None and getattr(ctx, "ceiling_gbps", None):
        return float(ctx.ceiling_gbps)
    src = torch.empty(1 << 30 if DEV == "cuda" else 1 << 20, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    us = _bench(None, lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def time_main(ctx, ceiling: float, compile_ref: bool = True) -> list[dict]:
    s = MAIN
    a, b, cores, u, v = _inputs(s, 1234)
    k, m = s["k"], s["m"]
    t, h, n_row, n_col, r = s["t"], s["h"], s["n_row"], s["n_col"], s["r"]
    es = a.element_size()
    fwd_bytes = t * h * ((n_row + n_col) * r * es + k * 8 + k * m * es)
    bwd_bytes = t * h * ((n_row + n_col) * r * es + k * 8 + k * m * es + 2 * k * r * es)
    ids, _ = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k)
    g = torch.randn(t, h, k, m, device=DEV, dtype=s["dtype"])
    ref_ids, _ = ref_fwd(a, b, cores, u, v, k)
    fwd_err = float((ids.sort(-1).values != ref_ids.sort(-1).values).any(-1).float().mean())

    variants = {
        ("fwd", "eager"): lambda: ref_fwd(a, b, cores, u, v, k),
        ("fwd", "ours"): lambda: tri.launch_forward(a, b, cores, u, v, k),
        ("fwd", "ours coarse only"): lambda: tri.launch_forward(a, b, cores, u, v, k, phases=1),
        ("fwd", "ours coarse+grid"): lambda: tri.launch_forward(a, b, cores, u, v, k, phases=2),
        ("bwd", "eager"): lambda: ref_bwd(g, a, b, cores, ids),
        ("bwd", "ours"): lambda: tri.launch_backward(g, a, b, cores, ids),
        ("fwd+bwd", "eager"): lambda: ref_bwd(g, a, b, cores, ref_fwd(a, b, cores, u, v, k)[0]),
        ("fwd+bwd", "ours"): lambda: tri.launch_backward(g, a, b, cores, tri.launch_forward(a, b, cores, u, v, k)[0]),
    }
    # launch-shape variants (RETRIEVAL_BENCH_VARIANTS="bound:2,bisect:4,..." ; bound = group-maximum bound)
    for spec in filter(None, os.environ.get("RETRIEVAL_BENCH_VARIANTS", "").split(",")):
        path, nw = spec.split(":")
        variants[("fwd", f"ours {path} nw={nw}")] = (
            lambda bound=(path == "bound"), nw=int(nw): tri.launch_forward(a, b, cores, u, v, k, num_warps=nw,
                                                                           bound=bound))
    a_req = a.detach().requires_grad_(True)
    b_req = b.detach().requires_grad_(True)
    c_req = cores.detach().requires_grad_(True)

    def through_op():
        _, sc = torch.ops.ultramem.tdqkr_retrieval(a_req, b_req, c_req, u, v, k)
        torch.autograd.grad(sc, (a_req, b_req, c_req), g)

    variants[("fwd+bwd", "ours via op+autograd")] = through_op
    if compile_ref:
        t0 = time.time()
        cf = torch.compile(ref_fwd, dynamic=False)
        cb = torch.compile(ref_bwd, dynamic=False)
        cf(a, b, cores, u, v, k)
        cb(g, a, b, cores, ids)
        _sync()
        print(f"torch.compile of the reference: {time.time() - t0:.1f} s", flush=True)
        variants[("fwd", "torch.compile")] = lambda: cf(a, b, cores, u, v, k)
        variants[("bwd", "torch.compile")] = lambda: cb(g, a, b, cores, ids)
        variants[("fwd+bwd", "torch.compile")] = lambda: cb(g, a, b, cores, cf(a, b, cores, u, v, k)[0])
    rows = []
    for (phase, variant), fn in variants.items():
        us = _bench(ctx, fn)
        nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[phase]
        gbps = nbytes / (us * 1e-6) / 1e9
        rows.append(dict(op=f"{OP} {phase}", shape=_label(s), variant=variant, median_us=round(us, 2),
                         min_bytes=nbytes, gbps=round(gbps, 1), frac_ceiling=round(gbps / ceiling, 3),
                         rel_err=fwd_err if (phase == "fwd" and variant == "ours") else None))
    return rows


def run(ctx=None) -> list[dict]:
    ceiling = _ceiling_gbps(ctx)
    checks = []
    jobs = [(check_forward, s, 10 + i, False) for i, s in enumerate([MAIN] + EXTRA)]
    jobs += [(check_backward, s, 20 + i, False) for i, s in enumerate([MAIN] + EXTRA)]
    jobs += [(check_forward, EXTRA[1], 99, True), (check_backward, EXTRA[1], 98, True)]
    for fn, s, seed, strided in jobs:
        try:
            c = fn(s, seed, strided)
        except Exception as exc:  # keep going: one broken shape must not hide the others
            c = dict(check=fn.__name__, shape=_label(s), ok=False, error=repr(exc)[:500])
        c["check"] = fn.__name__
        checks.append(c)
        print(json.dumps(c), flush=True)
    rows = time_main(ctx, ceiling, compile_ref=os.environ.get("RETRIEVAL_BENCH_COMPILE", "1") != "0")
    for row in rows:
        row["checks_ok"] = all(c["ok"] for c in checks)
    run.checks = checks
    run.ceiling = ceiling
    return rows


def _main() -> None:
    import triton
    rows = run(None)
    out = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "triton": triton.__version__,
           "git_revision": os.environ.get("GIT_REVISION", "unknown"), "ceiling_gbps": run.ceiling,
           "checks": run.checks, "rows": rows}
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "retrieval.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\ncopy ceiling {run.ceiling:.0f} GB/s; all checks ok: {all(c['ok'] for c in run.checks)}")
    print(f"{'op':28} {'variant':24} {'median µs':>10} {'GB/s':>8} {'ceil':>6}")
    for r in rows:
        print(f"{r['op']:28} {r['variant']:24} {r['median_us']:>10.1f} {r['gbps']:>8.0f} {r['frac_ceiling']:>6.2f}")


if __name__ == "__main__":
    _main()
