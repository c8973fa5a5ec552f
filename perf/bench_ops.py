"""The op benchmarks' library and a CLI for one module at a time: measures the copy ceiling, then
runs modules of perf/benches/ (each exposes `run(ctx) -> list[dict]`), prints one table.

    PYTHONPATH=. python perf/bench_ops.py [--only lookup] [--out bench.json] [--compile] [--small]

The suite runner, `python -m perf run --only op`, calls the same code and appends the rows to the
results log; use this CLI to look at one module. `--only` also takes the diagnostic modules with
the same interface (perf/diagnostics/sweep.py, gate_lookup_sweep.py, table_scatter.py).

Every kernel is checked against a float64 reference on fresh random inputs (outputs poisoned
with NaN first) before it is timed. Times are GPU times from CUDA-graph replays (an L2 flush
before every call, its time subtracted); the median of event-timed single Python calls
(`triton.testing.do_bench`, which also counts host launch time when that is the longer part) is
kept beside them as `events_us`. A row: op, shape, variant, median µs, minimum bytes, GB/s
(minimum bytes / time), fraction of the copy ceiling, relative error. `--small` runs tiny
shapes (on CPU under TRITON_INTERPRET=1 too) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

log = logging.getLogger("bench_ops")


def gpu_time_us(fn, calls: int = 10, reps: int = 7, flush_bytes: int = 256 << 20) -> float:
    """GPU time of fn() in µs without the host's launch overhead: `calls` x (L2 flush, fn) captured
    in one CUDA graph, replayed `reps` times (median), minus the same graph with the flushes only.
    The ops launch from Python, so plain event timing of one short call can include host time."""
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture (compilation, allocator)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(graph)

    def replay_ms(graph) -> float:
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    work, flush_only = replay_ms(graphs[0]), replay_ms(graphs[1])
    del graphs
    return 1000.0 * (work - flush_only) / calls


class Context:
    """What a benchmark module gets: device, timing, checking, and the row format."""

    def __init__(self, device: torch.device, small: bool, compile_variants: bool):
        self.device = device
        self.small = small
        self.compile_variants = compile_variants
        self.ceiling_gbps = float("nan")
        self.checks: list[dict] = []
        self._last_timing: dict = {}

    # -- timing
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def do_bench(self, fn, warmup_ms: float = 25, rep_ms: float = 100, graph: bool = True) -> float:
        """GPU time of fn() in µs: CUDA-graph replays with an L2 flush before each call (see
        gpu_time_us). Also times it with triton.testing.do_bench (events around each Python call,
        median), which includes host launch time where that exceeds the flush; the row gets both.
        On CPU one wall-clock call (smoke runs only)."""
        if self.device.type == "cuda":
            import triton.testing

            events_us = 1000.0 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
            if not graph:
                return events_us
            try:
                graph_us = gpu_time_us(fn)
            except Exception as exc:  # not capturable: keep the event time
                log.warning("graph timing failed (%s); using event timing", exc)
                graph_us = None
            self._last_timing = {
                "events_us": round(events_us, 2),
                "graph_us": round(graph_us, 2) if graph_us is not None else None,
            }
            return graph_us if graph_us is not None else events_us
        # CPU: smoke runs only (under TRITON_INTERPRET=1 a call costs seconds), so one timed call
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)

    # -- checking
    def poison_allocator(self, nbytes: int) -> None:
        """Fill a block of that size with NaN and free it, so the next allocations of that size
        come back poisoned from the caching allocator (kernels must write every element)."""
        if self.device.type == "cuda":
            torch.empty(nbytes // 4 + 1, dtype=torch.float32, device=self.device).fill_(float("nan"))

    def check(self, name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> float:
        """‖out − ref‖ / ‖ref‖ in float64; non-finite output counts as a failure (inf)."""
        out64 = out.detach().to(torch.float64)
        if not torch.isfinite(out64).all():
            rel = math.inf
        else:
            rel = float((out64 - ref.to(torch.float64)).norm() / ref.to(torch.float64).norm().clamp_min(1e-300))
        ok = rel <= tol
        self.checks.append({"name": name, "rel_err": rel, "tol": tol, "ok": ok})
        log.info("check %-48s rel_err %.3e %s", name, rel, "ok" if ok else "FAILED")
        return rel

    # -- rows
    def row(
        self,
        op: str,
        shape: str,
        variant: str,
        us: float,
        min_bytes: float | None,
        rel_err: float | None = None,
        **extra,
    ) -> dict:
        gbps = (min_bytes / (us * 1e-6) / 1e9) if (min_bytes and us and us > 0) else None
        frac = (gbps / self.ceiling_gbps) if (gbps and self.ceiling_gbps == self.ceiling_gbps) else None
        row = {
            "op": op,
            "shape": shape,
            "variant": variant,
            "median_us": round(us, 2) if us else us,
            "min_bytes": min_bytes,
            "gbps": round(gbps, 1) if gbps else None,
            "frac_of_ceiling": round(frac, 3) if frac else None,
            "rel_err": rel_err,
            **self._last_timing,
            **extra,
        }
        self._last_timing = {}
        log.info(
            "%-22s %-30s %9.1f us %s", op, variant, us or float("nan"), f"{gbps:7.0f} GB/s {frac:5.2f}" if frac else ""
        )
        return row


COPY_BYTES, COPY_BYTES_SMALL = 2 << 30, 1 << 20


def measure_copy_ceiling(ctx: Context) -> float:
    """Device-to-device copy of a large buffer: (bytes read + bytes written) / time, in GB/s."""
    nbytes = COPY_BYTES_SMALL if ctx.small else COPY_BYTES
    src = torch.randn(nbytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    # Event-timed: a copy captured in a CUDA graph becomes a memcpy node that ran at ~2.7 TB/s
    # (copy engine) against ~4.25 TB/s for the kernel copy_ launches eagerly.
    us = ctx.do_bench(lambda: dst.copy_(src), graph=False)
    del src, dst
    return 2 * nbytes / (us * 1e-6) / 1e9


def git_revision() -> str:
    from perf.records import current_commit

    return current_commit()[0]


def _fmt(value, spec: str, width: int) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value is not None else " " * width


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<24} {'variant':<44} {'us':>9} {'GB/s':>7} {'ceil':>5} {'rel_err':>9} {'events_us':>9}"]
    for r in rows:
        line = " ".join(
            [
                f"{r['op']:<24}",
                f"{r['variant']:<44}",
                _fmt(r.get("median_us"), "9.1f", 9),
                _fmt(r.get("gbps"), "7.0f", 7),
                _fmt(r.get("frac_of_ceiling"), "5.2f", 5),
                _fmt(r.get("rel_err"), "9.2e", 9),
                _fmt(r.get("events_us"), "9.1f", 9),
            ]
        )
        if r.get("error"):
            line += f"  ERROR {r['error']}"
        lines.append(line)
    return "\n".join(lines)


def module_names() -> list[str]:
    """The op benchmark modules: every perf/benches/*.py."""
    return sorted(p.stem for p in (HERE / "benches").glob("*.py") if not p.stem.startswith("_"))


def import_module(name: str):
    """perf.benches.<name>, else perf.diagnostics.<name> (the sweeps share the interface)."""
    if (HERE / "benches" / f"{name}.py").exists():
        return importlib.import_module(f"perf.benches.{name}")
    if (HERE / "diagnostics" / f"{name}.py").exists():
        return importlib.import_module(f"perf.diagnostics.{name}")
    raise SystemExit(f"no benchmark module {name!r} in perf/benches or perf/diagnostics")


def patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.triton_interpreter import patch_index

        patch_index()


def run_modules(names: list[str], small: bool, compile_variants: bool, on_module=None) -> tuple[dict, Context]:
    """Copy ceiling, then each module's rows. on_module(name, its rows, result so far) after every
    module: a run stopped by a time limit keeps what it finished. Returns (result, ctx)."""
    patch_interpreter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(device, small=small or device.type != "cuda", compile_variants=compile_variants)
    ctx.ceiling_gbps = measure_copy_ceiling(ctx)
    log.info("copy ceiling: %.0f GB/s", ctx.ceiling_gbps)
    ctx._last_timing = {}
    import triton

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_ceiling_gbps": round(ctx.ceiling_gbps, 1),
        "copy_bytes": COPY_BYTES_SMALL if ctx.small else COPY_BYTES,
        "small": ctx.small,
        "compile": compile_variants,
        "modules_done": [],
        "checks": ctx.checks,
        "rows": [],
    }
    rows: list[dict] = result["rows"]
    for name in names:
        t0 = time.time()
        start = len(rows)
        try:
            rows.extend(import_module(name).run(ctx))
        except Exception as exc:  # one broken module must not cost the others their numbers
            traceback.print_exc()
            rows.append({"op": name, "shape": "", "variant": "module", "median_us": None, "error": repr(exc)[:300]})
        log.info("module %s took %.0f s", name, time.time() - t0)
        result["modules_done"].append(name)
        if on_module is not None:
            on_module(name, rows[start:], result)
    return result, ctx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="modules to run (default: all in perf/benches)")
    parser.add_argument("--out", default=None, help="also write the result as one JSON file")
    parser.add_argument("--small", action="store_true", help="tiny shapes: checks the script, not the speed")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile baselines (slow to build)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    def save(name, rows, result):
        if args.out:
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

    result, ctx = run_modules(args.only or module_names(), args.small, args.compile, on_module=save)
    failed = [c for c in ctx.checks if not c["ok"]]
    print(
        f"\ncopy ceiling {ctx.ceiling_gbps:.0f} GB/s on {result['device']}; torch {result['torch']}, "
        f"triton {result['triton']}; {len(ctx.checks) - len(failed)}/{len(ctx.checks)} checks passed"
    )
    for c in failed:
        print(f"CHECK FAILED: {c['name']} rel_err {c['rel_err']:.3e} > {c['tol']}")
    print(format_table(result["rows"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
