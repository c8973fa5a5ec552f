"""Host (CPU) time per call of each ultramem op on CUDA at tiny shapes, where the GPU time is
negligible: the op through the dispatcher, its Triton launcher alone, and an empty Triton
kernel, then a cProfile of the slowest op. A diagnostic for host-bound layers.

    python -m perf.diagnostics.op_host_overhead        # from the repository root; CUDA only
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch
import triton
import triton.language as tl

import ultramem.ops as ops
from ultramem.ops._triton import retrieval as tri
from ultramem.ops._triton import weighted_lookup as twl


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    pass


def host_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", nargs="*", default=None, help="cases to cProfile (default: the slowest op)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("op_host_overhead needs a CUDA device (it times host launch overhead)", file=sys.stderr)
        return 2
    dev = "cuda"
    t, e, d, n, m = 64, 8, 64, 4096, 2
    rows = torch.randint(0, n, (t, e), device=dev)
    table = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    scores = torch.randn(t, e, m, device=dev, dtype=torch.bfloat16)
    x = torch.randn(t, d, device=dev, dtype=torch.bfloat16)
    buf = torch.zeros(n, d, device=dev)
    gid = ops.register_grad_buffer(buf)
    a = torch.randn(t, 1, 40, 2, device=dev, dtype=torch.bfloat16)
    b = torch.randn(t, 1, 40, 2, device=dev, dtype=torch.bfloat16)
    cores = torch.randn(1, 2, 2, 2, device=dev)
    u = torch.randn(1, 2, device=dev)
    v = torch.randn(1, 2, device=dev)
    gout = torch.randn(t, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty(t, d, device=dev, dtype=torch.bfloat16)
    ids, sc = ops.tdqkr_retrieval(a, b, cores, u, v, 8)
    pre_buf = torch.zeros(n, d, device=dev)
    pre_gid = ops.register_grad_buffer(pre_buf)
    _, gate = ops.gate_lookup(rows, table, table, x, scores, True)
    cases = {
        "empty triton kernel": lambda: _empty_kernel[(1,)](x, 1, BLOCK=16),
        "torch.add (one aten kernel)": lambda: torch.add(x, x),
        "weighted_lookup op": lambda: torch.ops.ultramem.weighted_lookup(rows, table, scores, -1),
        "weighted_gather launcher": lambda: twl.weighted_gather(rows, table, scores, out, torch.float32),
        "pre_value_gate op": lambda: torch.ops.ultramem.pre_value_gate(rows, table, x, -1),
        "weighted_lookup_backward_into op": lambda: torch.ops.ultramem.weighted_lookup_backward_into(
            gout, rows, table, scores, gid
        ),
        "tdqkr_retrieval op": lambda: torch.ops.ultramem.tdqkr_retrieval(a, b, cores, u, v, 8),
        "tdqkr_retrieval launch_forward": lambda: tri.launch_forward(a, b, cores, u, v, 8),
        "tdqkr_retrieval_backward op": lambda: torch.ops.ultramem.tdqkr_retrieval_backward(sc, a, b, cores, ids),
        "gate_lookup op": lambda: torch.ops.ultramem.gate_lookup(rows, table, table, x, scores, True, gid, pre_gid),
        "gate_lookup_backward_into op": lambda: torch.ops.ultramem.gate_lookup_backward_into(
            gout, None, rows, table, table, x, scores, gate, True, gid, pre_gid
        ),
    }
    results = {}
    for name, fn in cases.items():
        results[name] = host_us(fn)
        print(f"{name:40} {results[name]:8.1f} us/call (host)", flush=True)
    chosen = args.profile or [max((k for k in results if k.endswith(" op")), key=results.get)]
    for name in chosen:
        print(f"\ncProfile of {name!r} x200:")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(18)
        stats.sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
