"""Where a 227M training step's GPU time goes, dense and UltraMemV2, with the trainer's own step
(CUDA graphs, bf16, the config's compile): the step's wall time, the GPU's busy time (sum of
kernel times: whatever is left is the GPU waiting on the host), and the kernels grouped by name,
per micro-batch; with --waits, which CPU ranges the GPU waited on. Writes
$OUT/train_step_profile.json.

    ULTRAMEM_GIT_REV=<rev> python -m perf.diagnostics.train_step_profile [--grad-accum 8]   # CUDA only
        [--override=--train.compile_mode=default]                                          # without graphs
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

from ultramem.train.config import load_config
from ultramem.train.trainer import build_trainer, setup_distributed, teardown_distributed

log = logging.getLogger("train_step_profile")


def gpu_waits(trace: dict, min_us: float = 20.0, innermost: bool = False) -> dict:
    """Where the GPU waited for the host in a profiled step (a chrome trace with CPU and CUDA
    activity): each gap of at least min_us between the end of one kernel and the start of the
    next, charged to the outermost CPU range (a compiled region, the optimizer step, an eager op)
    that launched the next kernel, or with `innermost` to the innermost one (the op or kernel
    call). The profiler slows the host, so the charges are relative."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ranges = collections.defaultdict(list)  # thread → its CPU ranges, outermost first at each start
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            ranges[e["tid"]].append(e)
    for rs in ranges.values():
        rs.sort(key=lambda e: (e["ts"], -e["dur"]))

    def enclosing(launch: dict) -> str:
        found = "(no CPU range)"
        for r in ranges.get(launch["tid"], ()):
            if r["ts"] > launch["ts"]:
                break
            if r["ts"] + r["dur"] >= launch["ts"] + launch["dur"]:
                found = r["name"][:100]
                if not innermost:
                    break
        return found

    charged = collections.defaultdict(lambda: [0.0, 0])
    total_gap = 0.0
    for prev, nxt in zip(gpu, gpu[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap < min_us:
            continue
        total_gap += gap
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        name = enclosing(launch) if launch is not None else "(launch not traced)"
        charged[name][0] += gap
        charged[name][1] += 1
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"] if gpu else 0.0
    top = sorted(charged.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "span_ms": span / 1000,
        "gaps_ms": total_gap / 1000,
        "by_range": [{"range": k, "gap_ms": round(v[0] / 1000, 3), "gaps": v[1]} for k, v in top],
    }


def time_config(name: str, overrides: list[str], grad_accum: int, info, warmup_steps: int = 2, timed_steps: int = 5):
    """A trainer for the 227M config with these overrides, warmed up (compilation, CUDA-graph
    recording), and its step's wall times: (trainer, cfg, step times in s)."""
    cfg = load_config(
        "227m.toml",
        overrides
        + [
            f"--train.grad_accum={grad_accum}",
            "--train.log_interval=1",
            "--train.eval_interval=0",
            "--model.memory.log_interval=100000",
            "--optim.warmup_steps=2",
            "--train.max_steps=100",
        ],
    )
    trainer = build_trainer(cfg, info)
    trainer.prepare()
    for _ in range(warmup_steps):
        trainer.train_step()
    step_times = []
    for _ in range(timed_steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
    log.info("%s: step %.1f ms (median of %d)", name, 1000 * statistics.median(step_times), timed_steps)
    return trainer, cfg, step_times


def profile_config(name: str, trainer, cfg, step_times: list[float], trace_waits: bool = False) -> dict:
    """One step of a timed trainer under the profiler: its kernels, and (trace_waits) with CPU
    activity, where the GPU waited."""
    grad_accum = cfg.train.grad_accum
    step_s = statistics.median(step_times)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        torch.cuda.synchronize()
    waits = None
    if trace_waits:
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as traced:
            trainer.train_step()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            traced.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                waits = gpu_waits(json.load(f))
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            kernels[e.key][0] += e.self_device_time_total
            kernels[e.key][1] += e.count
    busy_us = sum(us for us, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:60]
    out = {
        "grad_accum": grad_accum,
        "step_ms": 1000 * step_s,
        "step_ms_each": [round(1000 * t, 2) for t in step_times],
        "tokens_per_s": cfg.train.batch_size * cfg.train.seq_len * grad_accum / step_s,
        "gpu_busy_ms_per_step": busy_us / 1000,
        "gpu_busy_fraction": busy_us / 1e6 / step_s,
        "per_micro_batch_ms": 1000 * step_s / grad_accum,
        "gpu_waits": waits,
        "kernels_us_per_micro_batch": [
            {"kernel": k[:160], "us": round(us / grad_accum, 1), "calls": round(c / grad_accum, 2)}
            for k, (us, c) in top
        ],
    }
    log.info(
        "%s: step %.1f ms (%d micro-batches), %.0f tokens/s, GPU busy %.1f%%",
        name,
        out["step_ms"],
        grad_accum,
        out["tokens_per_s"],
        100 * out["gpu_busy_fraction"],
    )
    for row in out["kernels_us_per_micro_batch"][:30]:
        log.info("  %9.1f us  x%-6g %s", row["us"], row["calls"], row["kernel"][:110])
    if waits is not None:
        log.info(
            "%s, profiled with CPU activity: GPU span %.1f ms, waiting %.1f ms",
            name,
            waits["span_ms"],
            waits["gaps_ms"],
        )
        for row in waits["by_range"]:
            log.info("  %9.3f ms  x%-5d %s", row["gap_ms"], row["gaps"], row["range"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=["dense", "ultramem_v2"])
    parser.add_argument("--override", action="append", default=[], help="a config override for every run")
    parser.add_argument("--waits", action="store_true", help="also trace a step with CPU activity: where the GPU waits")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_step_profile.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("train_step_profile needs a CUDA device", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    runs = {
        "dense": ["--model.memory.type=none"],
        "ultramem_v2": [],
        "ultramem_v2_unstaged": ["--train.table_grad_flush=0"],  # tables' gradients added at once
        "ultramem_v2_no_pre_values": ["--model.memory.pre_vdim=0"],
        "ultramem_v2_no_pre_values_unstaged": ["--model.memory.pre_vdim=0", "--train.table_grad_flush=0"],
        "memory_plus": ["--model.memory.type=memory_plus"],
        "memory_plus_unstaged": ["--model.memory.type=memory_plus", "--train.table_grad_flush=0"],
    }
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "git_revision": os.environ.get("ULTRAMEM_GIT_REV"),
        "overrides": args.override,
        "runs": {},
    }
    # Every run is timed before the first profiler session (one may leave the host slower), so
    # the trainers stay alive together until all are profiled.
    info = setup_distributed(torch.device("cuda"))
    try:
        timed = {name: time_config(name, runs[name] + args.override, args.grad_accum, info) for name in args.only}
        for name, (trainer, cfg, step_times) in timed.items():
            result["runs"][name] = profile_config(name, trainer, cfg, step_times, trace_waits=args.waits)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        teardown_distributed(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
