"""One UltraMemV2 layer of 227m.toml at decode shapes, compiled ahead of time with AOTInductor
(`torch.export`, then `torch._inductor.aoti_compile_and_package`) and called through its C++
runner, in a fresh process: no torch.compile wrapper in Python per call, and no CUDA graphs. The
runner is loaded as by default and single-threaded (`run_single_threaded=True`: no wait, at
the start of a call, for the previous call's GPU work).
Against, in the same run: the same module under torch.compile (default mode), and a module of
one add both ways (the host's floor of each). The layer runs as generation runs it: eval,
inference mode, bf16 weights inside `inference_cache`, and (on CUDA) inside
`inference_cache(..., decode=True)`, with the keys folded into the query projection. One export
per module, the token count dynamic; with `--static` one per token count (fixed shapes, as
Inductor's memory planning, TORCHINDUCTOR_MEMORY_PLANNING=1, may need to pool the buffers).

    PYTHONPATH=. python -m perf.diagnostics.decode_aoti [--tokens 1 8 64] [--log $OUT/log.jsonl]
        [--static] [--inductor-config max_autotune=True --inductor-config max_autotune_gemm_backends=TRITON]
    PYTHONPATH=. python -m perf.diagnostics.decode_aoti --small   # debug.toml on the CPU: the path only
    PYTHONPATH=. python -m perf.diagnostics.decode_aoti --small --device cuda   # small tables on the GPU
    PYTHONPATH=. python -m perf.diagnostics.decode_aoti --smoke [--device cpu]  # does a package load?

AOTInductor builds with the compiler in $CXX (else its default); one whose default links libstdc++
statically builds packages that crash on load, so give it another (`CXX=g++`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import os
import shutil
import signal
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


# the runner's timed ways and their columns: the package's __call__, its C++ loader, the loader of a
# single-threaded runner
_AOTI_MODES = {"AOTI": "AOTI", "AOTI, loader.run": "AOTI run", "AOTI, loader.run, single-threaded": "1-thread"}


def _wall_us(fn, calls: int, sync) -> float:
    for _ in range(5):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return 1e6 * (time.perf_counter() - t0) / calls


def aoti_package(
    module: nn.Module, x: torch.Tensor, package: Path, max_tokens: int | None, inductor_configs: dict | None = None
) -> str:
    """module exported with the token count (dim 1 of x) dynamic in [1, max(max_tokens, 2)] (a
    range of one value is no dimension), or fixed at x's with max_tokens None, and compiled by
    AOTInductor (with `inductor_configs`) into `package`; returns its path."""
    dynamic = None if max_tokens is None else ({1: torch.export.Dim("tokens", min=1, max=max(max_tokens, 2))},)
    with torch.no_grad():
        program = torch.export.export(module, (x,), dynamic_shapes=dynamic)
        return torch._inductor.aoti_compile_and_package(
            program, package_path=str(package), inductor_configs=inductor_configs
        )


def _config_item(text: str) -> tuple[str, object]:
    """'max_autotune=True' -> ("max_autotune", True): a value Python can read, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def smoke(device: str) -> int:
    """Where loading an AOTInductor package fails, with the one-add module: packaged here, then
    loaded and called in a fresh process, then in this one (which a crash ends). 0 when both
    work."""
    x = torch.ones(1, 3, 4, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = aoti_package(_OneAdd(), torch.zeros(1, 8, 4, device=device), tmp / "add.pt2", 64)
        print("packaged", flush=True)
        torch.save([x.cpu()], tmp / "inputs.pt")
        child = _run_package_in_child(path, tmp / "inputs.pt", tmp / "outputs.pt", device, calls=3)
        fresh = child is not None and torch.equal(child["outputs"][0].to(device), x + 1)
        print(f"a fresh process: {'loaded and called, output right' if fresh else 'failed'}", flush=True)
        here = torch.equal(torch._inductor.aoti_load_package(path)(x), x + 1)
        print(f"this process: loaded and called, output {'right' if here else 'wrong'}", flush=True)
    return 0 if fresh and here else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 1 8 64; 1 4 with --small)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument(
        "--static", action="store_true", help="a package per token count (no dynamic dimension), not one for all"
    )
    parser.add_argument(
        "--inductor-config",
        type=_config_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for the AOTI packages (repeatable), e.g. max_autotune=True",
    )
    parser.add_argument(
        "--layer-only", action="store_true", help="without the one-add reference: a shorter run (an A/B of two trees)"
    )
    parser.add_argument("--small", action="store_true", help="debug.toml, 2 token counts (on the CPU by default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu with --small, else cuda")
    parser.add_argument("--log", help="append the records to this results log")
    parser.add_argument("--smoke", action="store_true", help="only package a one-add module and load it (`smoke`)")
    parser.add_argument("--run-package", help=argparse.SUPPRESS)  # the runner's process (`run_package`)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.small else "cuda")
    if args.run_package:
        run_package(args.run_package, args.inputs, args.outputs, device, args.calls)
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print("decode_aoti needs a CUDA device (or --small)", file=sys.stderr)
        return 2
    if args.smoke:
        return smoke(device)
    config = "debug.toml" if args.small else "227m.toml"
    token_counts = args.tokens or ([1, 4] if args.small else [1, 8, 64])
    torch._dynamo.config.recompile_limit = 64  # the compiled reference: one graph per token count
    mcfg, layers, tables, _, _ = build_layers_227m(1, config=config, device=device, batch=1, seq=8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = layers[0].eval().to(dtype)
    with contextlib.ExitStack() as caches:  # each layer's weight terms computed once
        prefix = "bf16 weights, " if device == "cuda" else ""
        cached_layer = caches.enter_context(inference_cache(copy.deepcopy(layer)))
        modules = {f"{prefix}cached": _Decode(cached_layer, tables)}
        folded = caches.enter_context(inference_cache(copy.deepcopy(layer), decode=True))
        if "folded_weight" in folded._inference_cache:  # where the retrieval writes rows (CUDA)
            modules[f"{prefix}decode cache"] = _Decode(folded, tables)
        if not args.layer_only:
            modules["reference: one add"] = _OneAdd()
        if args.inductor_config:
            print("AOTI packages with " + ", ".join(f"{k}={v!r}" for k, v in args.inductor_config))
        head = f"{'UltraMemV2 layer, ' + config + ', eval':36} {'T':>4} {'compiled':>9} "
        head += " ".join(f"{column:>9}" for column in _AOTI_MODES.values())
        print(head + "  (µs per call)")
        recs = _time_modules(
            modules,
            lambda tokens: torch.randn(1, tokens, mcfg.dim, device=device, dtype=dtype),
            token_counts,
            args.calls,
            device,
            args.small,
            args.static,
            dict(args.inductor_config),
        )
    if args.log:
        records.append(args.log, recs)
    timed_aoti = sum(r["variant"].endswith(", AOTI") for r in recs)  # one per module and shape
    return 0 if timed_aoti == len(modules) * len(token_counts) else 1  # 1: a runner's process failed


def _time_modules(
    modules: dict,
    make_x,
    token_counts: list[int],
    calls: int,
    device: str,
    small: bool,
    static: bool = False,
    inductor_configs: dict | None = None,
) -> list[dict]:
    """Each module through torch.compile here and through AOTInductor's runner in a fresh process
    (`run_package`: a package that crashes on load ends only that process), at each token count
    (inputs make_x(tokens)): a line printed and a record per count and way (none for the runner
    when its process fails). One package with the token count dynamic, or one per count with
    `static`. inductor_configs: Inductor's options for the packages (named in the records)."""
    env = records.environment()
    options = "".join(f"; AOTI with {k}={v!r}" for k, v in (inductor_configs or {}).items())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    recs = []
    max_tokens = max(token_counts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (name, module) in enumerate(modules.items()):
            xs = [make_x(tokens) for tokens in token_counts]
            t0 = time.perf_counter()
            if static:  # a package per token count, each run in its own process
                aoti = {}
                for j, x in enumerate(xs):
                    package = aoti_package(module, x, tmp / f"module{i}_{j}.pt2", None, inductor_configs)
                    torch.save([x.cpu()], tmp / "inputs.pt")
                    one = _run_package_in_child(package, tmp / "inputs.pt", tmp / "outputs.pt", device, calls)
                    if one is None:
                        aoti = None
                        break
                    for key, got in one.items():
                        aoti.setdefault(key, []).extend(got)
            else:
                x_export = make_x(max(2, min(8, max_tokens)))
                package = aoti_package(module, x_export, tmp / f"module{i}.pt2", max_tokens, inductor_configs)
                torch.save([x.cpu() for x in xs], tmp / "inputs.pt")
                aoti = _run_package_in_child(package, tmp / "inputs.pt", tmp / "outputs.pt", device, calls)
            built_s = time.perf_counter() - t0  # the runs' processes included
            compiled = torch.compile(module, fullgraph=True, dynamic=False)
            for j, (tokens, x) in enumerate(zip(token_counts, xs)):
                with torch.inference_mode():
                    times = {"compiled": _wall_us(lambda: compiled(x), calls, sync)}
                    if aoti is not None:
                        times["AOTI"] = aoti["us"][j]
                        times["AOTI, loader.run"] = aoti["us_direct"][j]
                        times["AOTI, loader.run, single-threaded"] = aoti["us_single"][j]
                        diff = (aoti["outputs"][j].to(device).float() - compiled(x).float()).abs().max().item()
                if aoti is not None:
                    aoti_cols = " ".join(f"{times[mode]:9.1f}" for mode in _AOTI_MODES)
                    check = f"AOTI against compiled: max |diff| {diff:.3g}; "
                    if aoti["launches"][j] is not None:
                        check += f"{aoti['launches'][j]:g} launches, {aoti['gpu_us'][j]:.1f} µs GPU; "
                else:
                    aoti_cols = " ".join(f"{'failed' if i == 0 else '':>9}" for i in range(len(_AOTI_MODES)))
                    check = ""
                line = f"{name:36} {tokens:4d} {times['compiled']:9.1f} {aoti_cols}"
                print(f"{line}  ({check}built and run in {built_s:.0f} s)")
                if aoti is not None and aoti["kernels"][j]:
                    for kernel, us in aoti["kernels"][j].items():
                        print(f"    {us:6.1f} µs  {kernel[:100]}")
                    print("    single-threaded runner:")
                    for kernel, us in aoti["kernels_single"][j].items():
                        if kernel.startswith("host: "):
                            print(f"    {us:6.1f} µs  {kernel[:100]}")
                for mode, us in times.items():
                    note, extra = "wall time per forward, calls back to back; eval, inference mode", None
                    if mode.startswith("AOTI"):
                        note += "; the runner in a fresh process" + ("; a package per token count" if static else "")
                        note += options
                        if mode.startswith("AOTI, loader.run"):
                            note += "; the package's C++ loader called on the flat inputs"
                        if mode.endswith("single-threaded"):
                            note += "; loaded with run_single_threaded=True (no wait for the previous call's end)"
                        extra = {
                            "max_abs_diff_vs_compiled": diff,
                            "launches": aoti["launches"][j],
                            "gpu_us": aoti["gpu_us"][j],
                        }
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
                            note=note,
                            extra=extra,
                        )
                    )
    return recs


def _run_package_in_child(package: str, inputs: Path, outputs: Path, device: str, calls: int) -> dict | None:
    """`run_package` in a fresh process: {"us": [...], "outputs": [...]}, or None (printed why;
    a crash again under gdb where there is one, for the native backtrace)."""
    root = str(Path(__file__).resolve().parents[2])  # where `perf` imports from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-X", "faulthandler", "-m", "perf.diagnostics.decode_aoti", "--run-package", package]
    cmd += ["--inputs", str(inputs), "--outputs", str(outputs), "--device", device, "--calls", str(calls)]
    try:
        child = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    except subprocess.TimeoutExpired:
        print("the runner's process did not finish in 20 minutes", flush=True)
        return None
    if child.returncode != 0:
        print(f"the runner's process failed (exit {child.returncode}):\n{child.stderr[-3000:]}", flush=True)
        if child.returncode == -signal.SIGSEGV:
            # seen with a g++ whose default links libstdc++ statically: the runner's constructor
            # crashes in std::regex (perf/results/host-path-h100/aoti_load_crash_31f1644.txt)
            print(f"if the package's libstdc++ is static, build with another compiler: CXX={os.environ.get('CXX')}")
        gdb = shutil.which("gdb")
        if child.returncode < 0 and gdb:  # killed by a signal
            try:
                trace = subprocess.run(
                    [gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", *cmd],
                    capture_output=True,
                    text=True,
                    timeout=1200,
                    env=env,
                )
                print("under gdb:\n" + "\n".join((trace.stdout + trace.stderr).splitlines()[-60:]), flush=True)
            except subprocess.TimeoutExpired:
                print("under gdb: did not finish in 20 minutes", flush=True)
        return None
    return torch.load(outputs)


def run_package(package: str, inputs: Path, outputs: Path, device: str, calls: int) -> None:
    """Load an AOTInductor package, time its runner on each saved input (µs per call, calls back
    to back) and save those times with the outputs. The package is loaded twice: as loaded by
    default and with `run_single_threaded=True`."""
    runner = torch._inductor.aoti_load_package(package)
    # By default the runner records an event after each call and, with its one model instance,
    # waits for it at the start of the next call: a decode loop's calls never overlap the GPU's
    # work. A single-threaded runner skips that wait (one caller thread, one stream).
    single = torch._inductor.aoti_load_package(package, run_single_threaded=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # The package's __call__ parses its pytree specs on every call; a decode loop can call the
    # C++ loader on the flat inputs instead.
    direct, direct_single = runner.loader.run, single.loader.run
    keys = ("us", "us_direct", "us_single", "launches", "gpu_us", "kernels", "kernels_single", "outputs")
    result = {key: [] for key in keys}
    xs = [x.to(device) for x in torch.load(inputs)]
    with torch.inference_mode():
        for x in xs:
            result["outputs"].append(runner(x).cpu())
            assert torch.equal(direct([x])[0].cpu(), result["outputs"][-1])
            assert torch.equal(direct_single([x])[0].cpu(), result["outputs"][-1])
            result["us"].append(_wall_us(lambda: runner(x), calls, sync))
            result["us_direct"].append(_wall_us(lambda: direct([x]), calls, sync))
            result["us_single"].append(_wall_us(lambda: direct_single([x]), calls, sync))
        for x in xs:  # after every timing: a profiler session may leave the host slower
            if device == "cuda":
                launches, gpu_us, kernels = _kernels_per_call(lambda: direct([x]), device)
                kernels_single = _kernels_per_call(lambda: direct_single([x]), device)[2]
            else:
                launches, gpu_us, kernels, kernels_single = None, None, {}, {}
            result["launches"].append(launches)
            result["gpu_us"].append(gpu_us)
            result["kernels"].append(kernels)
            result["kernels_single"].append(kernels_single)
    torch.save(result, outputs)


def _kernels_per_call(fn, device: str, calls: int = 20) -> tuple[float, float, dict[str, float]]:
    """Kernels launched and their summed GPU time (µs) per call, under the profiler, and each
    kernel's GPU time per call by name; then, as "host: NAME (count)" entries, the host's
    recorded calls per model call (CUDA runtime and driver calls, allocations) with their µs,
    which the profiler inflates: a split of the host's time, not its size."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / calls
    host: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name != "cudaDeviceSynchronize":
            entry = host.setdefault(e.name, [0.0, 0.0])
            entry[0] += 1 / calls
            entry[1] += e.cpu_time_total / calls
    for name, (count, us) in sorted(host.items(), key=lambda item: -item[1][1]):
        by_name[f"host: {name} ({count:g} a call)"] = us
    return len(kernels) / calls, sum(e.device_time for e in kernels) / calls, by_name


if __name__ == "__main__":
    sys.exit(main())
