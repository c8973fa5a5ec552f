"""Launch-shape sweep of the gather kernels at the 227M shapes, and a one-launch-each mode for
Nsight Compute. A tuning aid beside perf/benches/lookup.py (which holds the reported numbers).
From the repository root, CUDA only:

    python -m perf.diagnostics.sweep_lookup            # check + time (GPU time) every config
    ncu --clock-control none -k regex:_kernel python -m perf.diagnostics.sweep_lookup --once fwd:T1,E32,D256,w4
"""

from __future__ import annotations

import argparse
import sys

import torch

from perf.bench_ops import gpu_time_us
from perf.benches.lookup import fused_shape, launch_shape
from ultramem.ops._triton import gate_lookup as tgl
from ultramem.ops._triton import weighted_lookup as twl

T, E, D, M, N = 12288, 32, 192, 2, 2_592_000
WINDOW, OFFSET = 1138 * 1138, 10 * 360 * 360
BF16 = torch.bfloat16


def parse_cfg(text: str) -> dict:
    keys = {
        "T": "BLOCK_T",
        "E": "BLOCK_E",
        "D": "BLOCK_D",
        "P": "BLOCK_DP",
        "J": "BLOCK_J",
        "w": "num_warps",
        "F": "D_FASTEST",
        "H": "HOIST_V",
        "V": "EVICT_FIRST",
        "C": "D_CHUNKS",
    }
    return {keys[part[0]]: int(part[1:]) for part in text.split(",")}


def make_inputs(seed: int, pattern: str = "random"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = (torch.randint(0, WINDOW, (T, E), generator=g, device="cuda") + OFFSET) % N
    if pattern == "sequential":  # consecutive entries read consecutive rows: the DRAM-friendly case
        rows = torch.arange(T * E, device="cuda").view(T, E) % N
    values = torch.randn(N, D, generator=g, device="cuda").to(BF16)
    pre = (torch.randn(N, D, generator=g, device="cuda") / D**0.5).to(BF16)
    scores = torch.randn(T, E, M, generator=g, device="cuda").to(BF16)
    x = torch.randn(T, D, generator=g, device="cuda").to(BF16)
    return rows, values, pre, scores, x


def shape_of(kind: str, cfg: dict):
    """The launcher constants patched to run `cfg` (its keys over the kind's launch shape)."""
    if kind == "fused":
        return fused_shape(cfg)
    name = {"fwd": "FWD_CONFIG", "gate": "DOTS_CONFIG", "bwd": "BWD_CONFIG", "seg": "SEGMENT_CONFIG"}[kind]
    return launch_shape(twl, name, cfg)


def launcher(kind: str, cfg: dict, inp):
    """(output, fn): fn launches `kind` with `cfg`; the output is written (fn runs once here)."""
    if kind not in ("fwd", "gate", "fused", "bwd", "seg"):
        raise ValueError(f"unknown kernel kind {kind!r}; expected fwd, gate, fused, bwd or seg")
    rows, values, pre, scores, x = inp
    box = {}
    if kind == "fwd":
        box["out"] = torch.full((T, D), float("nan"), dtype=BF16, device="cuda")

        def launch():
            twl.weighted_gather(rows, values, scores, box["out"], torch.float32)
    elif kind == "gate":
        box["out"] = torch.full((T, E), float("nan"), dtype=BF16, device="cuda")

        def launch():
            twl.gather_dots_scatter(rows, x, 1, torch.float32, table=pre, dots=box["out"])
    elif kind == "fused":

        def launch():
            box["out"] = tgl.gate_lookup_cuda(rows, values, pre, x, scores, True)[0]
    else:
        buf = torch.zeros(N, D, dtype=torch.float32, device="cuda")
        order = twl.sort_rows(rows, N)

        def launch():  # grad_out = x; the check looks at grad_scores
            box["out"] = twl.lookup_table_grad(
                x, rows, values, scores, buf, accumulate=True, deterministic=kind == "seg", order=order
            )

    def fn():
        with shape_of(kind, cfg):
            launch()

    fn()
    return box, fn


def reference(kind: str, inp):
    rows, values, pre, scores, x = inp
    flat = rows.reshape(-1)
    if kind == "gate":
        return torch.einsum("ted,td->te", pre.index_select(0, flat).double().view(T, E, D), x.double())
    vals = values.index_select(0, flat).double().view(T, E, M, -1)
    if kind in ("bwd", "seg"):  # grad_scores with grad_out = x
        return (vals * x.double().view(T, 1, M, -1)).sum(-1)
    s = scores.double()
    if kind == "fused":
        gate = torch.einsum("ted,td->te", pre.index_select(0, flat).double().view(T, E, D), x.double())
        s = s * torch.nn.functional.gelu(gate).unsqueeze(-1)
    return (vals * s.unsqueeze(-1)).sum(1).reshape(T, D)


SWEEP = {
    "fwd": [
        "T1,E32,D64,w1,V1",
        "T1,E32,D64,w1",
        "T1,E32,D128,w1,V1",
        "T1,E32,D256,w1,V1",
        "T1,E16,D64,w1,V1",
        "T1,E32,D64,w2,V1",
        "T1,E32,D256,w4",
    ],
    "gate": ["T1,E4,D256,w1", "T1,E8,D256,w1", "T1,E2,D256,w1", "T1,E32,D256,w4", "T1,E4,D256,w2", "T2,E4,D256,w2"],
    # entry-block kernel (C0): E entries at a time, D/P columns per program
    "fused": [
        "C0,T1,E8,D256,P256,w1,H1,V0",
        "C0,T1,E8,D256,P256,w1,H1,V1",
        "C0,T1,E8,D256,P256,w1,H0,V1",
        "C0,T1,E4,D256,P256,w1,H1,V1",
        "C0,T1,E16,D256,P256,w1,H1,V1",
        "C0,T1,E8,D256,P256,w2,H1,V1",
        "C0,T1,E8,D64,P256,w1,H1,V1,F1",
        "C0,T1,E16,D128,P256,w1,H1,V1,F1",
        "C0,T1,E8,D128,P128,w1,H1,V1,F1",
        # column-chunk kernel (C1): one warp per token with all entries, columns in chunks of D (V)
        # and P (P); H = V chunks issued before the gate
        "C1,D64,P64,w1,H0,V1",
        "C1,D64,P64,w1,H1,V1",
        "C1,D64,P64,w1,H0,V0",
        "C1,D32,P32,w1,H0,V1",
        "C1,D64,P64,w2,H0,V1",
    ],
    "bwd": ["T1,E8,D256,w4", "T1,E4,D256,w4", "T1,E8,D256,w2", "T1,E16,D256,w4"],
    "seg": ["J2,D256,w1", "J4,D256,w1", "J1,D256,w1", "J8,D256,w2", "J16,D256,w4"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", nargs="*", help="kind:config launches for a profiler (one each after warm-up)")
    parser.add_argument("--kinds", nargs="*", default=list(SWEEP))
    parser.add_argument("--pattern", default="random", choices=["random", "sequential"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sweep_lookup needs a CUDA device", file=sys.stderr)
        return 2
    inp = make_inputs(0, args.pattern)
    if args.once:
        for item in args.once:
            kind, cfg = item.split(":")
            _, fn = launcher(kind, parse_cfg(cfg), inp)
            fn()
            torch.cuda.synchronize()
        return 0
    results = []
    for kind in args.kinds:
        inp = make_inputs(len(results) + 1, args.pattern)
        ref = reference(kind, inp)
        for text in SWEEP[kind]:
            out, fn = launcher(kind, parse_cfg(text), inp)
            fn()
            got = out["out"]
            rel = float((got.double() - ref).norm() / ref.norm()) if torch.isfinite(got).all() else float("inf")
            us = gpu_time_us(fn)
            results.append((kind, text, us, rel))
            print(f"{kind:6} {text:22} {us:8.1f} us  rel_err {rel:.2e}", flush=True)
    print("\nbest per kind:")
    for kind in args.kinds:
        best = min((r for r in results if r[0] == kind and r[3] < 1e-2), key=lambda r: r[2], default=None)
        print(f"  {kind:6} {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
