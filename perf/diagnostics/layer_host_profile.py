"""Where the host time of one compiled UltraMemV2 layer (227M shapes) goes, forward + backward:
the Inductor code's calls (kernels, GEMMs, custom ops, with the tensors they take) and a cProfile
of the Python side. A diagnostic beside perf/gpu_e2e.py (which holds the reported times).

    python -m perf.diagnostics.layer_host_profile      # from the repository root; CUDA only

--opaque compiles with the triton_ops calling their opaque twins; --decode T profiles a forward of T tokens
(no grad) instead of the training step; --staged stages the table gradients as the trainer does
(the fill level reset before each step, as perf/gpu_e2e.py times it); --layers N profiles the first N
layers compiled as one function (gpu_e2e's `LayerStack`, as its stack section times them).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import sys
import tempfile

import torch
from torch._inductor.utils import run_and_get_code

import ultramem.ops as ops
from perf.diagnostics.train_step_profile import gpu_waits
from perf.gpu_e2e import LayerStack, build_layers_227m, cuda_time_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opaque", action="store_true", help="compile with the ops' opaque calls, not inline launches")
    parser.add_argument("--decode", type=int, default=0, metavar="T", help="profile a forward of T tokens")
    parser.add_argument("--staged", action="store_true", help="stage the table gradients (training step only)")
    parser.add_argument("--layers", type=int, default=1, metavar="N", help="profile N layers compiled as one function")
    args = parser.parse_args(argv)
    if args.decode and (args.staged or args.layers != 1):
        parser.error("--staged and --layers profile the training step: they do not go with --decode")
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: need at least 1")
    if not torch.cuda.is_available():
        print("layer_host_profile needs a CUDA device", file=sys.stderr)
        return 2
    ops.set_inline_triton(not args.opaque)
    mcfg, layers, tables, u, grad_y = build_layers_227m(args.layers)
    if args.staged:
        tables.use_grad_staging(args.layers * u.shape[0] * u.shape[1], *mcfg.memory.lookup_shape, torch.bfloat16)
    if args.layers > 1:
        stack = torch.compile(LayerStack(layers, tables), fullgraph=True)
        grad_h = grad_y.float()
    else:
        compiled = torch.compile(layers[0], fullgraph=True)
    x = torch.randn(1, max(args.decode, 1), mcfg.dim, device="cuda", dtype=torch.bfloat16)

    def step():
        if args.decode:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                compiled(x, tables)
            return
        if args.staged:
            tables.grad_staging.fill.zero_()  # every step stages (no flush in between)
        if args.layers > 1:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = stack(u)
            h.backward(grad_h)
            return
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = compiled(u, tables)[0]
        y.backward(grad_y)

    _, codes = run_and_get_code(step)
    wanted = re.compile(r"extern_kernels|torch\.ops\.|\.run\(|def call|empty_strided_cuda\(\(12288|reinterpret_tensor")
    for code in codes:
        print("=" * 100)
        for line in code.splitlines():
            if wanted.search(line) and not line.lstrip().startswith(("#", "from", "import")):
                print(line.strip()[:230])
    # the call's wall time as perf/gpu_e2e.py times it, before any profiler slows it down
    print(f"event-timed step: {cuda_time_ms(step):.3f} ms (median of 20)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    # CUDA runtime calls (launches, allocations, syncs) with their host time
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as tprof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    # where the GPU waits for the host: each gap charged to the CPU range that launched the next kernel
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        tprof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    for innermost in (False, True):
        waits = gpu_waits(trace, innermost=innermost)
        print(
            f"GPU waits ({'innermost' if innermost else 'outermost'} range), 5 steps: span {waits['span_ms']:.2f} ms, "
            f"gaps of 20 us or more {waits['gaps_ms']:.2f} ms"
        )
        for row in waits["by_range"][:15]:
            print(f"  {row['gap_ms']:8.3f} ms  x{row['gaps']:<4d} {row['range']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
