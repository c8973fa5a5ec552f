"""One UltraMemV2 layer of 227m.toml at decode shapes, compiled ahead of time with AOTInductor
(`torch.export`, then `torch._inductor.aoti_compile_and_package`) and called through its C++
runner: no torch.compile wrapper in Python per call, and no CUDA graphs. Against, in the same
run: the same module under torch.compile (default mode), and a module of one add both ways (the
host's floor of each). The layer runs as generation runs it: eval, inference mode, bf16 weights
inside `inference_cache`. One export per module, the token count dynamic.

    PYTHONPATH=. python -m perf.diagnostics.decode_aoti [--tokens 1 8 64] [--log $OUT/log.jsonl]
    PYTHONPATH=. python -m perf.diagnostics.decode_aoti --small   # debug.toml on the CPU: the path only
    PYTHONPATH=. python -m perf.diagnostics.decode_aoti --small --device cuda   # small tables on the GPU
    PYTHONPATH=. python -m perf.diagnostics.decode_aoti --smoke [--device cpu]  # does a package load?
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo.config
from torch import nn

from perf import records
from perf.gpu_e2e import build_layers_227m
from ultramem.layers import inference_cache


class _Decode(nn.Module):
    """layer(x, tables)[0] as a module of one tensor (export takes tensors, not the tables)."""

    def __init__(self, layer, tables):
        super().__init__()
        self.layer, self.tables = layer, tables

    def forward(self, x):
        return self.layer(x, self.tables)[0]


class _OneAdd(nn.Module):
    def forward(self, x):
        return x + 1


def _wall_us(fn, calls: int, sync) -> float:
    for _ in range(5):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return 1e6 * (time.perf_counter() - t0) / calls


def aoti_package(module: nn.Module, x: torch.Tensor, package: Path, max_tokens: int) -> str:
    """module exported with the token count (dim 1 of x) dynamic in [1, max_tokens] and compiled
    by AOTInductor into `package`; returns its path."""
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    with torch.no_grad():
        program = torch.export.export(module, (x,), dynamic_shapes=({1: tokens},))
        return torch._inductor.aoti_compile_and_package(program, package_path=str(package))


def aoti_runner(module: nn.Module, x: torch.Tensor, package: Path, max_tokens: int):
    """`aoti_package`, loaded: a callable of x."""
    return torch._inductor.aoti_load_package(aoti_package(module, x, package, max_tokens))


# A fresh process that loads a package (argv: path, device) and checks one call of the one add.
_LOAD_AND_CALL = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.ones(1, 3, 4, device=sys.argv[2])
assert torch.equal(runner(x), x + 1)
print("loaded and called")
"""


def smoke(device: str) -> int:
    """Where loading an AOTInductor package fails, with the one-add module: packaged here, then
    loaded and called in a fresh process, then in this one (which a crash ends). 0 when both
    work."""
    with tempfile.TemporaryDirectory() as tmp:
        path = aoti_package(_OneAdd(), torch.zeros(1, 8, 4, device=device), Path(tmp) / "add.pt2", 64)
        print("packaged", flush=True)
        child = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", _LOAD_AND_CALL, path, device],
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(f"a fresh process: exit {child.returncode}", child.stdout.strip(), child.stderr[-2000:], flush=True)
        runner = torch._inductor.aoti_load_package(path)
        x = torch.ones(1, 3, 4, device=device)
        same = torch.equal(runner(x), x + 1)
        print(f"this process: loaded and called, output {'right' if same else 'wrong'}", flush=True)
    return 0 if child.returncode == 0 and same else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--small", action="store_true", help="debug.toml, 2 token counts (on the CPU by default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu with --small, else cuda")
    parser.add_argument("--log", help="append the records to this results log")
    parser.add_argument("--smoke", action="store_true", help="only package a one-add module and load it (`smoke`)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.small else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("decode_aoti needs a CUDA device (or --small)", file=sys.stderr)
        return 2
    if args.smoke:
        return smoke(device)
    config, token_counts = ("debug.toml", [1, 4]) if args.small else ("227m.toml", args.tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch._dynamo.config.recompile_limit = 64  # the compiled reference: one graph per token count
    mcfg, layers, tables, _, _ = build_layers_227m(1, config=config, device=device, batch=1, seq=8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = layers[0].eval().to(dtype)
    with inference_cache(copy.deepcopy(layer)) as cached_layer:  # weight terms computed once
        modules = {
            "bf16 weights, cached" if device == "cuda" else "cached": _Decode(cached_layer, tables),
            "reference: one add": _OneAdd(),
        }
        print(f"{'UltraMemV2 layer, ' + config + ', eval':36} {'T':>4} {'compiled':>9} {'AOTI':>9}  (µs per call)")
        recs = _time_modules(
            modules,
            lambda tokens: torch.randn(1, tokens, mcfg.dim, device=device, dtype=dtype),
            token_counts,
            args.calls,
            sync,
            args.small,
        )
    if args.log:
        records.append(args.log, recs)
    return 0


def _time_modules(modules: dict, make_x, token_counts: list[int], calls: int, sync, small: bool) -> list[dict]:
    """Each module through AOTInductor's runner and torch.compile at each token count (inputs
    make_x(tokens)): a line printed and two records per count."""
    env = records.environment()
    recs = []
    max_tokens = max(token_counts)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, module) in enumerate(modules.items()):
            x0 = make_x(max(2, min(8, max_tokens)))
            t0 = time.perf_counter()
            runner = aoti_runner(module, x0, Path(tmp) / f"module{i}.pt2", max_tokens)
            built_s = time.perf_counter() - t0
            compiled = torch.compile(module, fullgraph=True, dynamic=False)
            for tokens in token_counts:
                x = make_x(tokens)
                with torch.inference_mode():
                    diff = (runner(x).float() - compiled(x).float()).abs().max().item()
                    times = {
                        "compiled": _wall_us(lambda: compiled(x), calls, sync),
                        "AOTI": _wall_us(lambda: runner(x), calls, sync),
                    }
                print(
                    f"{name:36} {tokens:4d} {times['compiled']:9.1f} {times['AOTI']:9.1f}  "
                    f"(AOTI against compiled: max |diff| {diff:.3g}; built in {built_s:.0f} s)"
                )
                for mode, us in times.items():
                    recs.append(
                        records.record(
                            env,
                            "layer",
                            "decode_aoti",
                            f"T={tokens}",
                            f"{name}, {mode}",
                            time=us,
                            unit="us",
                            small=small,
                            note="wall time per forward, calls back to back; eval, inference mode",
                            extra={"max_abs_diff_vs_compiled": diff} if mode == "AOTI" else None,
                        )
                    )
    return recs


if __name__ == "__main__":
    sys.exit(main())
