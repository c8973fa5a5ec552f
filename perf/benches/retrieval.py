"""ultramem::tdqkr_retrieval (forward, backward) at the reference workload: T = 12,288 tokens, H = 1,
n = 1138 sub-keys per side, Tucker rank r = 2, M = 2 cores, k = 32, bf16 scores; plus other
shapes checked for correctness only (k = 1 .. 256, ranks 1-4, 1-4 cores, fp16/fp32, strided).

Checks (fresh random inputs, outputs' memory poisoned first): the kept ids against a float64
reference (a row may differ only by a near tie), per-core scores and all gradients against
float64 formulas at the kernel's ids, ids in range and distinct, rows sorted, gradients zero
outside the kept keys. Timed: the reference op (eager, and torch.compile with --compile), the
Triton kernels, and forward + backward through the op and autograd. Backward: also checked with
preallocated NaN-filled outputs (misaligned flat blocks; rank-strided), and the bare zero-fill of
both gradients by torch timed (the write floor).

Large k (`run_large_k`, also part of `run`): the forward at the PERF shape with k = 64, 100, 128,
256, checked against float64 on its first tokens, and timed with the launcher's module constants
as they are and patched (`_large_k_variants`: warps, register cap, candidate slots, row-tile
size; for k = 128 the grid held in registers in one 16384-entry tile); every variant with the
default's warps must give the default's ids and scores bit for bit.

Part of the op suite (`python -m perf run --only op`); `python -m perf.benches.retrieval [args]`
runs this module alone through perf/bench_ops.py, and `--large-k` the large-k part alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import sys
from unittest import mock

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from ultramem.ops import retrieval as ref_mod  # noqa: E402
from ultramem.ops._triton import retrieval as tri  # noqa: E402

OP = "tdqkr_retrieval"
ref_fwd = ref_mod.forward_reference
ref_bwd = ref_mod.backward_reference


def _shapes(small: bool) -> tuple[dict, list[dict]]:
    main = dict(t=12288, h=1, n_row=1138, n_col=1138, r=2, m=2, k=32, dtype=torch.bfloat16)
    extra = [
        dict(t=512, h=2, n_row=300, n_col=257, r=3, m=1, k=1, dtype=torch.float32),
        dict(t=512, h=1, n_row=1138, n_col=1138, r=2, m=4, k=7, dtype=torch.float16),
        dict(t=512, h=2, n_row=1138, n_col=900, r=1, m=2, k=64, dtype=torch.bfloat16),
        dict(t=256, h=1, n_row=700, n_col=1500, r=4, m=3, k=100, dtype=torch.float32),
        dict(t=128, h=1, n_row=300, n_col=4000, r=2, m=2, k=256, dtype=torch.bfloat16),
    ]
    if small:  # the script itself on CPU under TRITON_INTERPRET=1
        main = dict(main, t=4, n_row=100, n_col=90)
        extra = [dict(x, t=2, n_row=min(x["n_row"], 300), n_col=min(x["n_col"], 300)) for x in extra[:2]]
    return main, extra


def _label(s: dict) -> str:
    return (
        f"T={s['t']} H={s['h']} n={s['n_row']}x{s['n_col']} r={s['r']} M={s['m']} k={s['k']} "
        f"{str(s['dtype']).replace('torch.', '')}"
    )


def _inputs(s: dict, seed: int, device, strided: bool = False):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device)

    a = rnd(s["t"], s["h"], s["n_row"], s["r"]).to(s["dtype"])
    b = rnd(s["t"], s["h"], s["n_col"], s["r"]).to(s["dtype"])
    if strided:  # same values, strided views
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
        b = torch.cat([b, b], dim=-1)[..., : s["r"]]
    cores = rnd(s["h"], s["m"], s["r"], s["r"]) / s["r"]
    u = torch.nn.functional.normalize(rnd(s["h"], s["r"]), dim=-1)
    v = torch.nn.functional.normalize(rnd(s["h"], s["r"]), dim=-1)
    return a, b, cores, u, v


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def _pair_scores64(a, b, cores, ids):
    """Per-core scores in float64 at the given virtual ids: [T, H, k, M]."""
    n_col = b.shape[2]
    i, j = ids // n_col, ids % n_col
    a_sel = a.double().gather(2, i.unsqueeze(-1).expand(*i.shape, a.shape[-1]))
    b_sel = b.double().gather(2, j.unsqueeze(-1).expand(*j.shape, b.shape[-1]))
    return torch.einsum("ther,hmrs,thes->them", a_sel, cores.double(), b_sel)


def check_forward(ctx, s: dict, seed: int, strided: bool = False, check_tokens: int | None = None) -> dict:
    """`check_tokens`: run the kernel on all tokens, compare the first ones only (the float64
    reference holds a [T, H, k, k, M] grid)."""
    a, b, cores, u, v = _inputs(s, seed, ctx.device, strided)
    t, h, k, m = s["t"], s["h"], s["k"], s["m"]
    ctx.poison_allocator(t * h * k * 8)
    ctx.poison_allocator(t * h * k * m * a.element_size())
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k)  # through the registered entry point
    ctx.sync()
    if check_tokens is not None and check_tokens < t:
        t = check_tokens
        a, b, ids, scores = a[:t], b[:t], ids[:t], scores[:t]
    in_range = bool(((ids >= 0) & (ids < s["n_row"] * s["n_col"])).all())
    distinct = bool((ids.sort(-1).values.diff(dim=-1) != 0).all()) if k > 1 else True
    rids, _ = ref_fwd(a.double(), b.double(), cores.double(), u.double(), v.double(), k)
    same = (ids.sort(-1).values == rids.sort(-1).values).all(-1)
    mine64 = _pair_scores64(a, b, cores, ids.clamp(0, s["n_row"] * s["n_col"] - 1))
    tot_mine, tot_ref = mine64.sum(-1), _pair_scores64(a, b, cores, rids).sum(-1)
    # a differing row must be a near tie: our weakest kept total within 1e-4 of the reference's
    scale = tot_ref.abs().amax(-1).clamp_min(1e-30)
    not_near_tie = int((~same & ((tot_ref.amin(-1) - tot_mine.amin(-1)) / scale > 1e-4)).sum())
    ordered = bool((tot_mine.diff(dim=-1) <= 1e-5 * scale.unsqueeze(-1)).all()) if k > 1 else True
    rel = _rel(scores, mine64)
    tol = 1e-5 if s["dtype"] == torch.float32 else 1e-2
    tag = (" strided" if strided else "") + (f" (first {t} tokens checked)" if t < s["t"] else "")
    result = dict(
        name=f"{OP} fwd {_label(s)}{tag}",
        rel_err=rel,
        tol=tol,
        rows=t * h,
        rows_differing=int((~same).sum()),
        rows_not_near_tie=not_near_tie,
        in_range=in_range,
        distinct=distinct,
        sorted=ordered,
    )
    result["ok"] = in_range and distinct and ordered and not_near_tie == 0 and rel <= tol
    ctx.checks.append(result)
    return result


def _poisoned_out(a: torch.Tensor, b: torch.Tensor, kind: str):
    """NaN-filled (grad_row, grad_col) views for launch_backward(out=...): "padded" = views into
    larger buffers (token stride above n·r, storage offset 3: each [n, r] block is still one
    contiguous range, its start not 16-byte aligned); "strided" = rank stride 2 (the element-wise
    zero-fill fallback)."""
    views = []
    for x in (a, b):
        t, h, n, r = x.shape
        if kind == "padded":
            buf = torch.full((t, h, n * r + 8), float("nan"), dtype=x.dtype, device=x.device)
            views.append(buf[:, :, 3 : 3 + n * r].unflatten(-1, (n, r)))
        else:
            buf = torch.full((t, h, n, 2 * r), float("nan"), dtype=x.dtype, device=x.device)
            views.append(buf[..., ::2])
    return tuple(views)


def check_backward(ctx, s: dict, seed: int, strided: bool = False, out_kind: str | None = None) -> dict:
    a, b, cores, u, v = _inputs(s, seed, ctx.device, strided)
    t, h, k, m = s["t"], s["h"], s["k"], s["m"]
    ids, _ = ref_fwd(a, b, cores, u, v, k)
    if k > 1:  # one row twice with one column (a duplicate pair), on top of the usual shared rows
        ids[:, :, 1] = ids[:, :, 0]
    g = torch.randn(t, h, k, m, device=ctx.device, dtype=s["dtype"])
    if strided:
        g = torch.cat([g, g], dim=-1)[..., :m]
    ctx.poison_allocator(a.numel() * a.element_size())
    ctx.poison_allocator(b.numel() * b.element_size())
    if out_kind is None:  # through the registered entry point
        ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(g, a, b, cores, ids)
    else:
        ga, gb, gc = tri.launch_backward(g, a, b, cores, ids, out=_poisoned_out(a, b, out_kind))
    ctx.sync()
    ra, rb, rc = ref_bwd(g.double(), a.double(), b.double(), cores.double(), ids)
    zero_outside = bool((ga.double()[ra == 0] == 0).all() and (gb.double()[rb == 0] == 0).all())
    rel = max(_rel(ga, ra), _rel(gb, rb), _rel(gc, rc))
    tol = 1e-5 if s["dtype"] == torch.float32 else 1e-2
    tag = (" strided" if strided else "") + (f" out={out_kind}" if out_kind else "")
    result = dict(
        name=f"{OP} bwd {_label(s)}{tag}",
        rel_err=rel,
        tol=tol,
        grad_row_rel_err=_rel(ga, ra),
        grad_col_rel_err=_rel(gb, rb),
        grad_cores_rel_err=_rel(gc, rc),
        zero_outside=zero_outside,
    )
    result["ok"] = zero_outside and rel <= tol
    ctx.checks.append(result)
    return result


def min_bytes(s: dict, element_size: int) -> dict:
    """Least bytes: read both score blocks once, write ids and scores (fwd); write both
    gradients, read grad_scores, ids and the kept rows/columns (bwd)."""
    t, h, n_row, n_col, r, m, k = s["t"], s["h"], s["n_row"], s["n_col"], s["r"], s["m"], s["k"]
    es = element_size
    fwd = t * h * ((n_row + n_col) * r * es + k * 8 + k * m * es)
    bwd = t * h * ((n_row + n_col) * r * es + k * 8 + k * m * es + 2 * k * r * es)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


LARGE_K = (64, 100, 128, 256)
LARGE_K_CHECK_TOKENS = 256


def _large_k_variants(k: int) -> list[tuple[str, dict]]:
    """(label, launcher module constants to patch) timed at one large k; the first is the default."""
    block_k = tri._block_k(k)
    variants = [("ours (default)", {})]
    if block_k <= 64:  # the grid in registers by default
        variants += [
            ("in-register grid, 4 warps", dict(FWD_NUM_WARPS=4)),
            ("in-register grid, 16 warps", dict(FWD_NUM_WARPS=16)),
            ("candidates, 2 row tiles", dict(GRID_TILE=block_k * block_k // 2)),
        ]
        return variants
    factor = tri.CAND_TILE_FACTOR[block_k > 128]
    other = 2 if factor == 1 else 1
    variants += [
        ("candidates, no register cap", dict(FWD_MAXNREG_TILED=None)),
        (f"candidates, {other * block_k} slots per tile", dict(CAND_TILE_FACTOR=(other, other))),
    ]
    if k == 128:
        variants += [("in-register grid, grid_tile 16384, 16 warps", dict(GRID_TILE=16384, FWD_NUM_WARPS=16))]
    return variants


def _patched(consts: dict):
    """The launcher with these module constants patched (patch.multiple refuses none)."""
    return mock.patch.multiple(tri, **consts) if consts else contextlib.nullcontext()


def _compile_one(k: int, consts: dict) -> str:
    """Run one launch variant on a few tokens (a worker process: fills Triton's disk cache)."""
    try:
        s = dict(t=64, h=1, n_row=1138, n_col=1138, r=2, m=2, k=k, dtype=torch.bfloat16)
        a, b, cores, u, v = _inputs(s, 0, torch.device("cuda"))
        with _patched(consts):
            tri.launch_forward(a, b, cores, u, v, k)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # reported, and the variant fails again in the main process
        return repr(exc)[:300]


def _precompile(jobs: list[tuple[int, dict]]) -> None:
    """Compile the variants in parallel worker processes (Triton caches them on disk)."""
    workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (k, kw), res in zip(jobs, pool.map(_compile_one, *zip(*jobs))):
            if res != "ok":
                print(f"precompile k={k} {kw}: {res}", flush=True)


def run_large_k(ctx) -> list[dict]:
    """The forward at k = 64 .. 256 (PERF shape otherwise): checks, bit-identity of the variants, times."""
    ks = LARGE_K if not ctx.small else (64, 100)
    base = dict(t=12288, h=1, n_row=1138, n_col=1138, r=2, m=2, dtype=torch.bfloat16)
    if ctx.small:
        base = dict(base, t=2, n_row=150, n_col=140)
    if ctx.device.type == "cuda":
        _precompile([(k, kw) for k in ks for _, kw in _large_k_variants(k)])
    rows = []
    for k in ks:
        s = dict(base, k=k)
        check_forward(ctx, s, seed=70 + k, check_tokens=LARGE_K_CHECK_TOKENS)
        a, b, cores, u, v = _inputs(s, 80 + k, ctx.device)
        least = min_bytes(s, a.element_size())["fwd"]
        want = None
        for label, kw in _large_k_variants(k):
            ctx.poison_allocator(s["t"] * k * 8)
            with _patched(kw):
                got = tri.launch_forward(a, b, cores, u, v, k)
            ctx.sync()
            if want is None:
                want = got
            same = None
            # Same warps, same coarse layout: the kept keys land in the same slots, so even exact ties
            # (frequent with bf16 inputs) must resolve alike. Other warps order the keys otherwise.
            if "FWD_NUM_WARPS" not in kw:
                same = torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.int16), want[1].view(torch.int16))
                ctx.checks.append(
                    dict(
                        name=f"{OP} fwd {_label(s)} {label}: same ids and scores as the default",
                        rel_err=0.0 if same else float("inf"),
                        tol=0.0,
                        ok=same,
                    )
                )
            try:
                with _patched(kw):
                    us = ctx.do_bench(lambda: tri.launch_forward(a, b, cores, u, v, k))
                rows.append(ctx.row(f"{OP}_fwd", _label(s), label, us, least, identical=same))
            except Exception as exc:  # keep the other rows
                rows.append(
                    {
                        "op": f"{OP}_fwd",
                        "shape": _label(s),
                        "variant": label,
                        "median_us": None,
                        "error": repr(exc)[:300],
                    }
                )
    return rows


def run(ctx) -> list[dict]:
    main, extra = _shapes(ctx.small)
    for i, s in enumerate([main] + extra):
        check_forward(ctx, s, seed=10 + i)
        check_backward(ctx, s, seed=20 + i)
    check_forward(ctx, extra[1], seed=99, strided=True)
    check_backward(ctx, extra[1], seed=98, strided=True)
    for out_kind in ("padded", "strided"):  # preallocated outputs: misaligned flat blocks, strided
        check_backward(ctx, main, seed=50, out_kind=out_kind)
        check_backward(ctx, extra[0], seed=51, out_kind=out_kind)  # fp32, r = 3

    s = main
    a, b, cores, u, v = _inputs(s, 1234, ctx.device)
    t, h, m, k = s["t"], s["h"], s["m"], s["k"]
    least = min_bytes(s, a.element_size())
    ids, _ = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k)
    g = torch.randn(t, h, k, m, device=ctx.device, dtype=s["dtype"])
    grad_row, grad_col = torch.empty_like(a), torch.empty_like(b)  # the zero-fill floor row
    a_req, b_req, c_req = (x.detach().requires_grad_(True) for x in (a, b, cores))

    def through_op():
        _, sc = torch.ops.ultramem.tdqkr_retrieval(a_req, b_req, c_req, u, v, k)
        torch.autograd.grad(sc, (a_req, b_req, c_req), g)

    timed = [
        ("fwd", "eager (reference op body)", lambda: ref_fwd(a, b, cores, u, v, k)),
        ("fwd", "ours", lambda: tri.launch_forward(a, b, cores, u, v, k)),
        ("bwd", "eager (reference op body)", lambda: ref_bwd(g, a, b, cores, ids)),
        ("bwd", "ours", lambda: tri.launch_backward(g, a, b, cores, ids)),
        ("bwd_zero_fill", "torch zero_ of both gradients only", lambda: (grad_row.zero_(), grad_col.zero_())),
        ("fwd+bwd", "eager (reference op body)", lambda: ref_bwd(g, a, b, cores, ref_fwd(a, b, cores, u, v, k)[0])),
        ("fwd+bwd", "ours", lambda: tri.launch_backward(g, a, b, cores, tri.launch_forward(a, b, cores, u, v, k)[0])),
        ("fwd+bwd", "ours via op + autograd", through_op),
    ]
    if ctx.compile_variants:
        cf = torch.compile(ref_fwd, dynamic=False)
        cb = torch.compile(ref_bwd, dynamic=False)
        timed += [
            ("fwd", "torch.compile", lambda: cf(a, b, cores, u, v, k)),
            ("bwd", "torch.compile", lambda: cb(g, a, b, cores, ids)),
            ("fwd+bwd", "torch.compile", lambda: cb(g, a, b, cores, cf(a, b, cores, u, v, k)[0])),
        ]
    rows = []
    nbytes = {**least, "bwd_zero_fill": (grad_row.numel() + grad_col.numel()) * grad_row.element_size()}
    for phase, variant, fn in timed:
        try:
            us = ctx.do_bench(fn)
            rows.append(ctx.row(f"{OP}_{phase}", _label(s), variant, us, nbytes[phase]))
        except Exception as exc:  # keep the other rows
            rows.append(
                {
                    "op": f"{OP}_{phase}",
                    "shape": _label(s),
                    "variant": variant,
                    "median_us": None,
                    "error": repr(exc)[:300],
                }
            )
    return rows + run_large_k(ctx)


def _main_large_k(argv: list[str]) -> int:
    """The large-k part alone: checks, a table, and JSON under $OUT if set."""
    import logging

    from perf import bench_ops

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench_ops.patch_interpreter()
    ctx = bench_ops.Context(device, small="--small" in argv or device.type != "cuda", compile_variants=False)
    rows = run_large_k(ctx)
    failed = [c for c in ctx.checks if not c["ok"]]
    if os.environ.get("OUT"):  # the results log is for the op suite; this is a development aid
        with open(os.path.join(os.environ["OUT"], "retrieval_large_k.json"), "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "git_revision": bench_ops.git_revision(),
                    "checks": ctx.checks,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    print(f"\n{len(ctx.checks) - len(failed)}/{len(ctx.checks)} checks passed")
    for c in failed:
        print(f"CHECK FAILED: {c['name']} rel_err {c['rel_err']}")
    print(bench_ops.format_table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    if "--large-k" in sys.argv:
        sys.exit(_main_large_k(sys.argv[1:]))
    from perf import bench_ops

    sys.exit(bench_ops.main(["--only", "retrieval", *sys.argv[1:]]))
