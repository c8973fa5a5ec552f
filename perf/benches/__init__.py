"""The op suite's modules (`python -m perf run --only op`, through perf/bench_ops.py), one per op family.

Each module exposes `run(ctx) -> list[dict]`, where ctx (perf.bench_ops.Context) gives:
- `ctx.device`, `ctx.small` (tiny shapes: a smoke run of the script, e.g. on CPU under
  TRITON_INTERPRET=1), `ctx.compile_variants` (time torch.compile baselines too),
  `ctx.ceiling_gbps` (measured copy bandwidth, bytes read + written);
- `ctx.do_bench(fn) -> µs` (median, CUDA events, L2 flushed between calls);
- `ctx.check(name, out, ref, tol) -> rel_err` (‖out − ref‖/‖ref‖ in float64; NaN fails);
- `ctx.poison_allocator(nbytes)` (NaN-fill memory the next allocation will reuse);
- `ctx.row(op, shape, variant, us, min_bytes, rel_err=None, **extra) -> dict` (adds GB/s and the
  fraction of the ceiling).
Check every variant on fresh random inputs before timing it.
"""
