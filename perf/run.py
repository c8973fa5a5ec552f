"""`python -m perf run`: the op, layer and end-to-end benchmarks in one command, one record per
measurement appended to the results log (perf/records.py has the format).

Suites (each wraps existing bench code; nothing here times a kernel itself):
  op     perf/bench_ops.py with every module of perf/benches/ (or --benches): GPU µs per call,
         fraction of the copy bandwidth, float64 checks; plus the authors' reference rows
  layer  perf/gpu_e2e.py's layer section: one UltraMemV2 layer at the 227M shapes, eager and
         compiled, fwd and fwd + bwd (ms, event-timed) and GPU time per fwd + bwd (profiler), next
         to the block's SwiGLU FFN
  e2e    perf/trainer_gpu.py: `python -m ultramem.train` subprocesses, UltraMemV2 and dense,
         tokens/s, MFU, loss curve; with --e2e throughput also gpu_e2e's in-process runs of
         the config's 256 micro-batches

--small runs tiny shapes on whatever device there is (CPU: Triton under TRITON_INTERPRET=1,
debug.toml for the layer and training): it checks that the benchmarks run, not their speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile
import time
import traceback

from . import records
from .reference import reference_records

log = logging.getLogger("perf.run")
SUITES = ("op", "layer", "e2e")
KERNEL_ROWS_KEPT = 15  # per-kernel breakdowns: the top ones go into the record's extra


# ------------------------------------------------------------------------ rows -> records
# Shared with perf/legacy.py, which maps the old per-run JSON files the same way.


def op_records(env: dict, rows: list[dict], small: bool) -> list[dict]:
    out = []
    for r in rows:
        if r.get("op") == "info":  # a description of the inputs, not a measurement
            continue
        extra = {
            k: v
            for k, v in r.items()
            if k not in ("op", "shape", "variant", "median_us", "frac_of_ceiling", "frac_ceiling", "error")
            and v is not None
        }
        out.append(
            records.record(
                env,
                "op",
                r["op"],
                r.get("shape", ""),
                r.get("variant", ""),
                time=r.get("median_us"),
                unit="us",
                frac_of_copy=r.get("frac_of_ceiling", r.get("frac_ceiling")),
                small=small,
                error=r.get("error"),
                extra=extra,
            )
        )
    return out


def copy_record(env: dict, gbps: float, nbytes: int | None, small: bool) -> dict:
    us = 2 * nbytes / (gbps * 1e9) * 1e6 if (nbytes and gbps) else None
    return records.record(
        env,
        "op",
        "device_copy",
        f"{nbytes} bytes" if nbytes else "",
        "torch copy_ (event-timed)",
        time=us,
        unit="us",
        frac_of_copy=1.0 if us else None,
        small=small,
        extra={"gbps": round(gbps, 1), "bytes_counted": "read + written"},
    )


LAYER_BENCHES = (
    ("_gpu_time_per_fwd_bwd_ms", "layer_fwd_bwd_gpu"),
    ("_fwd_bwd_ms", "layer_fwd_bwd"),
    ("_fwd_ms", "layer_fwd"),
)
LAYER_NOTES = {
    "layer_fwd": "event-timed calls (host launch time included where longer)",
    "layer_fwd_bwd": "event-timed calls (host launch time included where longer)",
    "layer_fwd_bwd_gpu": "sum of kernel times per call (profiler): GPU time, no host time",
}


def layer_records(env: dict, rows: dict, shape: str, small: bool) -> list[dict]:
    """gpu_e2e.time_layer's dict -> one record per (bench, variant): layer_eager, layer_compiled,
    layer_compiled_staged, ffn_eager, ffn_compiled (the block's FFN, what the layer is held against)."""
    info = {
        k: rows[k]
        for k in ("tokens", "N", "table_dtype", "gather_dtype", "layer_input_dtype", "ffn_input_dtype")
        if k in rows
    }
    out = []
    for key, value in rows.items():
        for suffix, bench in LAYER_BENCHES:
            if key.endswith(suffix) and isinstance(value, (int, float)):
                variant = key[: -len(suffix)]
                extra = dict(info)
                kernels = rows.get(f"{variant}_kernels_us")
                if bench == "layer_fwd_bwd_gpu" and kernels:
                    extra["kernels_us"] = kernels[:KERNEL_ROWS_KEPT]
                out.append(
                    records.record(
                        env,
                        "layer",
                        bench,
                        shape,
                        variant,
                        time=value,
                        unit="ms",
                        small=small,
                        note=LAYER_NOTES[bench],
                        extra=extra,
                    )
                )
                break
    return out


def throughput_records(env: dict, runs: dict, config: str, small: bool, bench: str = "throughput") -> list[dict]:
    """gpu_e2e.throughput_227m's dict (in-process run_training) -> one record per run."""
    out = []
    dense = runs.get("dense", {}).get("tokens_per_s")
    for name, run in runs.items():
        extra = {k: v for k, v in run.items() if k not in ("tokens_per_s", "note", "git_revision") and v is not None}
        if dense and name != "dense" and run.get("tokens_per_s") and "vs_dense" not in extra:
            extra["vs_dense"] = run["tokens_per_s"] / dense
        shape = f"{config} grad_accum={run.get('grad_accum', '?')}"
        out.append(
            records.record(
                env,
                "e2e",
                bench,
                shape,
                name,
                tokens_per_s=run.get("tokens_per_s"),
                small=small,
                note=run.get("note"),
                extra=extra,
            )
        )
    return out


def trainer_records(
    env: dict,
    runs: dict,
    config: str,
    grad_accum: int,
    small: bool,
    warmup: int | None = None,
    dense_of: dict | None = None,
) -> list[dict]:
    """trainer_gpu's per-variant summaries (subprocess runs of the training command) -> records."""
    from .trainer_gpu import DENSE_OF

    dense_of = DENSE_OF if dense_of is None else dense_of
    out = []
    for name, info in runs.items():
        extra = {k: v for k, v in info.items() if k not in ("tokens_per_s", "log_tail") and v is not None}
        extra["grad_accum"] = grad_accum
        if warmup is not None:
            extra["warmup_steps_left_out"] = warmup
        dense = runs.get(dense_of.get(name, ""), {}).get("tokens_per_s")
        if dense and info.get("tokens_per_s"):
            extra["vs_dense"] = info["tokens_per_s"] / dense
        error = None
        if info.get("rc"):
            tail = (info.get("log_tail") or "").strip().splitlines()
            error = f"exit status {info['rc']}" + (f": {tail[-1][:300]}" if tail else "")
        out.append(
            records.record(
                env,
                "e2e",
                "trainer",
                f"{config} grad_accum={grad_accum}",
                name,
                tokens_per_s=info.get("tokens_per_s"),
                small=small,
                error=error,
                extra=extra,
            )
        )
    return out


# ------------------------------------------------------------------------ the suites


def run_op(env: dict, args, sink) -> bool:
    from . import bench_ops

    names = args.benches or bench_ops.module_names()

    def on_module(name, rows, result):
        sink(op_records(env, rows, result["small"]))

    result, ctx = bench_ops.run_modules(names, args.small, args.compile, on_module=on_module)
    failed = [c for c in ctx.checks if not c["ok"]]
    checks = records.record(
        env,
        "op",
        "float64_checks",
        "",
        "all modules run",
        small=result["small"],
        error=f"{len(failed)} of {len(ctx.checks)} failed" if failed else None,
        extra={
            "passed": len(ctx.checks) - len(failed),
            "total": len(ctx.checks),
            "failed": [c["name"] for c in failed],
            "modules": result["modules_done"],
        },
    )
    sink([copy_record(env, ctx.ceiling_gbps, result["copy_bytes"], result["small"]), checks])
    sink(reference_records(env, "op"))
    for c in failed:
        print(f"CHECK FAILED: {c['name']} rel_err {c['rel_err']:.3e} > {c['tol']}")
    return not failed


def run_layer(env: dict, args, sink) -> bool:
    from . import gpu_e2e

    result: dict = {}
    gpu_e2e.time_layer(result, cudagraphs=args.cudagraphs, small=args.small)
    rows = result["layer_227m"]
    sink(layer_records(env, rows, rows["shape"], args.small))
    sink(reference_records(env, "layer"))
    return True


def run_e2e(env: dict, args, sink) -> bool:
    from . import gpu_e2e, trainer_gpu

    small = args.small
    ok = True
    if "trainer" in args.e2e:
        work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="perf-trainer-"))
        work.mkdir(parents=True, exist_ok=True)
        config = "debug.toml" if small else "227m.toml"
        runs = trainer_gpu.run_variants(
            args.e2e_variants, args.steps, args.grad_accum, args.warmup, work, args.timeout, small=small
        )
        recs = trainer_records(env, runs, config, args.grad_accum, small, warmup=args.warmup)
        ok = not any(r["error"] for r in recs)
        sink(recs)
    if "throughput" in args.e2e:
        result: dict = {}
        if small:
            gpu_e2e.throughput_227m(
                result,
                steps=3,
                only=("dense", "ultramem_v2"),
                config="debug.toml",
                overrides=("--train.device=cpu", "--optim.warmup_steps=1"),
            )
        else:
            gpu_e2e.throughput_227m(result, steps=args.throughput_steps, only=("dense", "ultramem_v2_cudagraphs"))
        sink(throughput_records(env, result["throughput_227m"], "debug.toml" if small else "227m.toml", small))
    return ok


RUNNERS = {"op": run_op, "layer": run_layer, "e2e": run_e2e}


# ------------------------------------------------------------------------ output


def _num(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else ""


def format_records(recs: list[dict]) -> str:
    lines = [f"{'suite':<5} {'bench':<28} {'variant':<46} {'time':>10} {'unit':<4} {'copy':>5} {'tokens/s':>9}"]
    for r in recs:
        line = " ".join(
            [
                f"{r['suite']:<5}",
                f"{r['bench'][:28]:<28}",
                f"{r['variant'][:46]:<46}",
                f"{_num(r['time'], '10.2f'):>10}",
                f"{r['unit'] or '':<4}",
                f"{_num(r['frac_of_copy'], '5.2f'):>5}",
                f"{_num(r['tokens_per_s'], '9.0f'):>9}",
            ]
        )
        if r["reference"]:
            line += "  (reference, not measured here)"
        if r["error"]:
            line += f"  ERROR {r['error'][:120]}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--small", action="store_true", help="tiny shapes: checks the benchmarks run, not speed")
    parser.add_argument("--only", default=",".join(SUITES), help="suites, comma-separated (default: all)")
    parser.add_argument(
        "--log",
        default=None,
        help="results log to append to (default: perf/results/log.jsonl; "
        "with --small a scratch file in the temp directory)",
    )
    group = parser.add_argument_group("op suite")
    group.add_argument("--benches", default=None, help="perf/benches modules, comma-separated (default: all)")
    group.add_argument("--compile", action="store_true", help="also torch.compile baselines (minutes of compiling)")
    group = parser.add_argument_group("layer suite")
    group.add_argument("--cudagraphs", action="store_true", help="also the compiled layer under CUDA graphs")
    group = parser.add_argument_group("e2e suite")
    group.add_argument(
        "--e2e",
        default="trainer",
        help="trainer (the training command, default) and/or throughput (in-process, the config's 256 micro-batches)",
    )
    group.add_argument(
        "--e2e-variants",
        default="v2-graphs,dense-graphs",
        help="perf/trainer_gpu.py variants (default: v2-graphs,dense-graphs)",
    )
    group.add_argument("--steps", type=int, default=None, help="training steps per variant (default 40; small 3)")
    group.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 4; small 1)")
    group.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 10; small 1)")
    group.add_argument("--throughput-steps", type=int, default=4, help="steps of the in-process runs")
    group.add_argument("--work", default=None, help="run directories of the training subprocesses")
    group.add_argument("--timeout", type=float, default=540, help="seconds per training subprocess")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: Triton's CPU interpreter

    suites = [s for s in args.only.split(",") if s]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    args.benches = [b for b in args.benches.split(",") if b] if args.benches else None
    args.e2e = [e for e in args.e2e.split(",") if e]
    if set(args.e2e) - {"trainer", "throughput"}:
        parser.error("--e2e takes trainer and/or throughput")
    args.e2e_variants = [v for v in args.e2e_variants.split(",") if v]
    args.steps = args.steps or (3 if args.small else 40)
    args.grad_accum = args.grad_accum or (1 if args.small else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 10)
    log_path = (
        pathlib.Path(args.log)
        if args.log
        else (pathlib.Path(tempfile.gettempdir()) / "ultramem-perf-smoke.jsonl" if args.small else records.DEFAULT_LOG)
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    env = records.environment()
    if env["commit"] == "unknown":  # e.g. a copy of the tree without .git on the GPU machine
        log.warning("the commit is unknown: set ULTRAMEM_GIT_REV=$(git rev-parse HEAD) where the tree was copied")
    log.info(
        "run %s: commit %s%s on %s, torch %s, triton %s -> %s",
        env["run"],
        env["commit"][:12],
        " (uncommitted changes)" if env["dirty"] else "",
        env["device"],
        env["torch"],
        env["triton"],
        log_path,
    )
    written: list[dict] = []

    def sink(recs: list[dict]) -> None:
        records.append(log_path, recs)  # as it goes: a run cut short keeps what it measured
        written.extend(recs)

    ok = True
    for suite in suites:
        t0 = time.time()
        try:
            ok &= RUNNERS[suite](env, args, sink)
        except Exception as exc:  # keep the other suites' numbers
            traceback.print_exc()
            sink([records.record(env, suite, f"{suite}_suite", "", "suite", small=args.small, error=repr(exc)[:300])])
            ok = False
        log.info("suite %s took %.0f s", suite, time.time() - t0)
    print()
    print(format_records(written))
    errors = sum(1 for r in written if r["error"])
    print(f"\n{len(written)} records appended to {log_path} (run {env['run']}); {errors} with errors")
    return 0 if ok and not errors else 1
