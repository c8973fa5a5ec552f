"""One UltraMemV2 layer of 227m.toml at decode shapes, run as generation runs it: eval mode,
inference mode, compiled in the default mode (no CUDA graphs). Per token count: the wall time per
call back to back, the GPU time (the kernels' sum under the profiler), the kernels launched per
call, and the same forward under CUDA graphs: `reduce-overhead` mode (graph trees, with their
bookkeeping per call) and a bare `torch.cuda.CUDAGraph.replay()` of the compiled call, the floor
of any graph-replaying decode loop. Weights in fp32 under bf16 autocast, or cast to bf16, the
latter also inside `inference_cache` (the weight-only terms computed once, not per call). Then
the kernels of one call at the smallest token count. Two references on the same host set the
floor: a compiled function of one add, and the block's SwiGLU FFN in bf16.

    PYTHONPATH=. python -m perf.diagnostics.decode_layer [--tokens 1 8 64] [--log $OUT/log.jsonl]   # CUDA only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys

import torch
import torch._dynamo.config

from perf import records
from perf.diagnostics.host_path import wall_us
from perf.gpu_e2e import build_layer_227m, kernel_times
from ultramem.layers import inference_cache
from ultramem.model import FeedForward


def replay_us(fn, calls: int) -> float:
    """Wall time of one bare replay of `fn` captured in a CUDA graph (NaN where it does not capture)."""
    side = torch.cuda.Stream()  # warm-up off the default stream, as capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        print(f"  capture failed: {str(err).splitlines()[0][:120]}")
        return float("nan")
    return wall_us(graph.replay, calls)


class OneAdd(torch.nn.Module):
    def forward(self, x, tables=None):
        return x + 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--log", help="append the records to this results log")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_layer needs a CUDA device", file=sys.stderr)
        return 2
    # each variant compiles once per token count, with and without graphs
    torch._dynamo.config.recompile_limit = 64
    mcfg, layer, tables, _, _ = build_layer_227m()
    layer.eval()
    bf16_layer = copy.deepcopy(layer).to(torch.bfloat16)
    ffn = FeedForward(mcfg.dim, mcfg.ffn_hidden).to("cuda", torch.bfloat16).eval()
    cached = contextlib.ExitStack()  # a copy inside inference_cache for the whole run
    variants = {  # name: (module, autocast)
        "fp32 weights, autocast": (layer, True),
        "bf16 weights": (bf16_layer, False),
        "bf16 weights, cached": (cached.enter_context(inference_cache(copy.deepcopy(bf16_layer))), False),
        "reference: one add": (OneAdd(), False),
        "reference: FFN, bf16 weights": (lambda x, tables: ffn(x), False),
    }
    env = records.environment()
    recs = []
    head = ("eager", "compiled", "graphs", "replay", "GPU")
    print(f"{'UltraMemV2 layer, 227m.toml, eval':36} {'T':>4} " + " ".join(f"{h:>9}" for h in head) + " launches")
    timed = []  # (name, tokens, times, the compiled call): all timed before the first profiler session
    for name, (mod, autocast) in variants.items():
        compiled = torch.compile(mod, fullgraph=True, dynamic=False)
        graphed = torch.compile(mod, fullgraph=True, dynamic=False, mode="reduce-overhead")
        for tokens in args.tokens:
            x = torch.randn(1, tokens, mcfg.dim, device="cuda", dtype=torch.bfloat16)

            def call(m, graphs=False, x=x, autocast=autocast):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with torch.inference_mode(), amp:
                    m(x, tables)

            times = {
                "eager": wall_us(lambda: call(mod), args.calls),
                "compiled": wall_us(lambda: call(compiled), args.calls),
                "graphs": wall_us(lambda: call(graphed, True), args.calls),
                "replay": replay_us(lambda: call(compiled), args.calls),
            }
            timed.append((name, tokens, times, lambda call=call, compiled=compiled: call(compiled)))
    kernel_rows = {}
    for name, tokens, times, compiled_call in timed:
        ks = kernel_times(compiled_call, 20)
        gpu = sum(us for _, us, _ in ks)
        launches = sum(n for _, _, n in ks)
        cells = " ".join(f"{times[h]:9.1f}" for h in head[:-1])
        print(f"{name:36} {tokens:4d} {cells} {gpu:9.1f} {launches:8.1f}")
        for mode, us in times.items():
            if us != us:  # a graph that did not capture
                continue
            recs.append(
                records.record(
                    env,
                    "layer",
                    "decode_layer",
                    f"T={tokens}",
                    f"{name}, {mode}",
                    time=us,
                    unit="us",
                    note="wall time per forward, calls back to back; eval, inference mode",
                    extra={"gpu_us": gpu, "launches": launches} if mode == "compiled" else None,
                )
            )
        if tokens == min(args.tokens):
            kernel_rows[name] = ks
    # the compiled calls again, after the profiler sessions: what a session leaves behind on the host
    print("compiled calls timed again after the profiler (µs; before → after):")
    for name, tokens, times, compiled_call in timed:
        if tokens == min(args.tokens):
            print(f"  {name:36} {tokens:4d} {times['compiled']:9.1f} → {wall_us(compiled_call, args.calls):9.1f}")
    for name, ks in kernel_rows.items():
        print(f"  {name}: kernels of one compiled call at T={min(args.tokens)} (GPU µs, launches):")
        for key, us, n in ks:
            print(f"  {us:8.2f} {n:5.1f}  {key[:100]}")
    cached.close()
    if args.log:
        records.append(args.log, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
