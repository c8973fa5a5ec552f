"""The host path of the memory ops and of one UltraMemV2 layer on CUDA, compiled without CUDA graphs.

1. Per op, at a tiny shape where the GPU time is negligible: host time per call of the eager op
   and of the op inside a compiled function (torch.compile, default mode, fullgraph).
2. One UltraMemV2 layer of 227m.toml: wall time per call (calls back to back, one sync at the end)
   for the training shape (12,288 tokens, forward + backward) and for decode shapes (1, 8, 64
   tokens, forward only), eager, compiled, and compiled with CUDA graphs (whose wall time is the
   GPU time: no host work between the kernels).

Each compiled case runs twice: with the ops' opaque calls and with inline Triton launches
(`ultramem.ops.set_inline_triton`, set while the case compiles).

    PYTHONPATH=. python -m perf.diagnostics.host_path --log $OUT/log.jsonl   # CUDA only

Records go to the results log (suite "layer", bench "host_path_op" and "host_path_layer").
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch._dynamo.config
import torch._functorch.config

import ultramem.ops as ops
from perf import records
from perf.gpu_e2e import build_layer_227m
from ultramem.ops._triton import _launch


def wall_us(fn, iters: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / iters


def op_cases(dev: str = "cuda") -> dict:
    t, e, d, n, m = 64, 8, 64, 4096, 2
    g = torch.Generator(device=dev).manual_seed(0)
    rows = torch.randint(0, n, (t, e), device=dev, generator=g)
    table = torch.randn(n, d, device=dev, dtype=torch.bfloat16, generator=g)
    scores = torch.randn(t, e, m, device=dev, dtype=torch.bfloat16, generator=g)
    x = torch.randn(t, d, device=dev, dtype=torch.bfloat16, generator=g)
    a = torch.randn(t, 1, 40, 2, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(t, 1, 40, 2, device=dev, dtype=torch.bfloat16, generator=g)
    cores, u, v = (torch.randn(*s, device=dev, generator=g) for s in ((1, 2, 2, 2), (1, 2), (1, 2)))
    return {
        "tdqkr_retrieval": (lambda a, b, c, u, v: ops.tdqkr_retrieval(a, b, c, u, v, 8), (a, b, cores, u, v)),
        "weighted_lookup": (lambda r, tb, s: ops.weighted_lookup(r, tb, s), (rows, table, scores)),
        "pre_value_gate": (lambda r, tb, x: ops.pre_value_gate(r, tb, x), (rows, table, x)),
        "gate_lookup": (
            lambda r, tv, tp, x, s: ops.gate_lookup(r, tv, tp, x, s, True),
            (rows, table, table, x, scores),
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", help="append the records to this results log")
    parser.add_argument("--skip-layer", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_path needs a CUDA device", file=sys.stderr)
        return 2
    # AOTAutograd's cache keys on the Dynamo graph, the same with inline launches on and off: the
    # second variant would run the first one's graph
    torch._functorch.config.enable_autograd_cache = False
    # 4 compiled variants x 4 shapes of one forward: past the default limit Dynamo runs eager
    torch._dynamo.config.recompile_limit = 64
    env = records.environment()
    recs = []
    print(f"{'op (64 tokens)':28} {'eager us':>10} {'compiled us':>12} {'compiled inline us':>19}")
    for name, (fn, inputs) in op_cases().items():
        times = {}
        for variant, inline in (("eager", None), ("compiled", False), ("compiled inline", True)):
            try:
                with inline_launches(inline):
                    call = fn if inline is None else torch.compile(fn, fullgraph=True)
                    times[variant] = wall_us(lambda: call(*inputs), 300)
            except Exception as exc:  # one case's failure is a finding, not the end of the run
                print(f"{name} {variant}: failed: {type(exc).__name__}: {exc}".splitlines()[0])
                recs.append(
                    records.record(env, "layer", "host_path_op", "T=64", f"{name} {variant}", error=repr(exc)[:300])
                )
                continue
            recs.append(
                records.record(
                    env, "layer", "host_path_op", "T=64", f"{name} {variant}", time=times[variant], unit="us"
                )
            )
        print(
            f"{name:28} "
            + " ".join(
                f"{times.get(v, float('nan')):{w}.1f}"
                for v, w in (("eager", 10), ("compiled", 12), ("compiled inline", 19))
            )
        )
    if not args.skip_layer:
        recs += layer_rows(env)
    if args.log:
        records.append(args.log, recs)
    return 0


class inline_launches:
    """Sets _launch.INLINE_TRITON for the duration (None: leaves it). Each compiled variant is its
    own torch.compile call, so dynamo's backend guard keeps the variants' graphs apart."""

    def __init__(self, inline: bool | None):
        self.inline = inline

    def __enter__(self):
        self.saved = _launch.INLINE_TRITON
        if self.inline is not None:
            ops.set_inline_triton(self.inline)

    def __exit__(self, *exc):
        ops.set_inline_triton(self.saved)


def layer_rows(env: dict) -> list[dict]:
    mcfg, layer, tables, u, grad_y = build_layer_227m()
    u = u.detach().to(torch.bfloat16).requires_grad_()
    variants = {  # name: (module, inline launches while it compiles)
        "eager": (layer, None),
        "compiled": (torch.compile(layer, fullgraph=True, dynamic=False), False),
        "compiled inline": (torch.compile(layer, fullgraph=True, dynamic=False), True),
        "compiled, CUDA graphs": (
            torch.compile(layer, fullgraph=True, dynamic=False, mode="reduce-overhead"),
            False,
        ),
        "compiled inline, CUDA graphs": (
            torch.compile(layer, fullgraph=True, dynamic=False, mode="reduce-overhead"),
            True,
        ),
    }
    out = []

    def train_step(mod, graphs: bool):
        def fn():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = mod(u, tables)[0]
            u.grad = None
            y.backward(grad_y)

        return fn

    def decode(mod, x, graphs: bool):
        def fn():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                mod(x, tables)

        return fn

    shapes = [("T=12288 fwd+bwd", None)] + [(f"T={t} fwd", t) for t in (1, 8, 64)]
    print(f"\n{'UltraMemV2 layer, 227m.toml':28} " + " ".join(f"{v:>22}" for v in variants))
    for label, tokens in shapes:
        times = {}
        for name, (mod, inline) in variants.items():
            graphs = "graphs" in name
            if tokens is None:
                fn = train_step(mod, graphs)
            else:
                fn = decode(mod, torch.randn(1, tokens, mcfg.dim, device="cuda", dtype=torch.bfloat16), graphs)
            try:
                with inline_launches(inline):
                    times[name] = wall_us(fn, 20 if tokens is None else 200)
            except Exception as exc:
                print(f"{label} {name}: failed: {type(exc).__name__}: {exc}".splitlines()[0])
                out.append(records.record(env, "layer", "host_path_layer", label, name, error=repr(exc)[:300]))
                continue
            out.append(records.record(env, "layer", "host_path_layer", label, name, time=times[name], unit="us"))
        print(f"{label:28} " + " ".join(f"{times.get(v, float('nan')):19.1f} us" for v in variants))
    return out


if __name__ == "__main__":
    sys.exit(main())
