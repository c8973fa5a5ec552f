"""Compiled regions of the trainer's model (`parallelize.compile_regions`): the whole model as
one region against one region per block and one per memory layer (the FSDP layout), timed in one
process and alternating, so that a host whose speed drifts slows both alike.

    PYTHONPATH=. python -m perf.diagnostics.compile_regions              # CPU: debug.toml, 8 blocks, 8 tokens
    PYTHONPATH=. python -m perf.diagnostics.compile_regions --config 227m.toml --batch 3 --seq 4096 \\
        --log $OUT/log.jsonl                                             # CUDA: the 227M micro-batch

`--variant NAME=LAYOUT[,OPTION=VALUE...]` adds Inductor options to a layout (e.g.
`--variant combo=model,combo_kernels=1`), or `layer_stats=off` (no memory-layer statistics);
variants replace the two layouts, and each compiles its own regions.

A step is one micro-batch of the trainer: forward with the loss, backward (bf16 autocast where
the config trains in bf16 on CUDA), no optimizer. Without CUDA graphs a memory model's step is
paced by the host, and each compiled region costs host time to enter in the forward and in the
backward. Records go to the results log (suite "e2e", bench "compile_regions").
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from perf import records
from ultramem.layers._common import LayerStats
from ultramem.train.config import load_config
from ultramem.train.parallelize import COMPILE_REGIONS, apply_compile
from ultramem.train.trainer import build_training_model, staged_flush_interval

STATS = ("on", "off")


def parse_variant(spec: str) -> tuple[str, str, dict]:
    """'name=layout[,option=value...]' → (name, layout, options); a bare layout names itself.
    Options are Inductor's, or `layer_stats=` one of STATS: the memory layers' statistics
    collected or not."""
    name, _, rest = spec.partition("=")
    layout, *opts = (rest or name).split(",")
    if layout not in COMPILE_REGIONS:
        raise SystemExit(f"--variant {spec!r}: layout {layout!r} is not one of {COMPILE_REGIONS}")
    defaults = {**torch._inductor.config.get_config_copy(), "layer_stats": "on"}
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in defaults:
            raise SystemExit(f"--variant {spec!r}: {key!r} is not an Inductor option")
        if key == "layer_stats" and value not in STATS:
            raise SystemExit(f"--variant {spec!r}: layer_stats={value!r} is not one of {STATS}")
        kind = type(defaults[key])
        options[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return name, layout, options


def build(config: str, overrides: list[str], layout: str, device: torch.device, options: dict):
    cfg = load_config(config, overrides + ["--train.compile=true", "--train.compile_mode=default"])
    model = build_training_model(cfg, device)
    if model.memory_tables is not None:
        model.memory_tables.refresh_compute_copy()
    options = dict(options)
    mode = options.pop("layer_stats", "on")
    for stats in (m for m in model.modules() if isinstance(m, LayerStats)):
        stats.enabled = mode != "off"
    apply_compile(model, "default", layout, options=options)
    bf16 = device.type == "cuda" and cfg.train.dtype == "bfloat16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return cfg, model, autocast


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="debug.toml")
    p.add_argument("--override", action="append", default=[], help="a config override, e.g. --override=--train.ac=full")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per layout and round")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (a CPU run times the host's work)")
    p.add_argument("--log", help="append records to this results log")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=LAYOUT[,OPTION=VALUE...]: a layout with these Inductor options (repeat; replaces the layouts)",
    )
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    overrides = list(args.override)
    if args.config == "debug.toml" and not any(o.startswith("--model.n_layers") for o in overrides):
        overrides.append("--model.n_layers=8")

    variants = [parse_variant(v) for v in args.variant] or [(layout, layout, {}) for layout in COMPILE_REGIONS]
    models = {name: build(args.config, overrides, layout, device, options) for name, layout, options in variants}
    names = list(models)
    cfg = models[names[0]][0]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(layout: str, steps: int) -> float:
        cfg, model, autocast = models[layout]
        tables = model.memory_tables
        flush_every = staged_flush_interval(cfg, device)
        sync()
        t0 = time.perf_counter()
        for step in range(steps):
            with autocast():
                loss, _ = model(tokens, tokens)
            loss.backward()
            if flush_every and (step + 1) % flush_every == 0:  # as the trainer: staged gradients added
                tables.flush_grad_staging(wait=False)
        sync()
        return (time.perf_counter() - t0) / steps * 1e3

    for name in names:  # compile, then warm up
        run(name, 3)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(run(name, args.steps))

    shape = " ".join([args.config, *overrides, f"{args.batch}x{args.seq}"])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{shape} on {device.type}, ms per step (forward + backward), {args.steps} steps a round")
    print(f"{'variant':12} {'median':>8}  rounds")
    for name, ts in times.items():
        print(f"{name:12} {med[name]:8.2f}  " + " ".join(f"{t:.2f}" for t in ts))
    for name in names[1:]:
        print(f"{name} / {names[0]}: {med[name] / med[names[0]]:.3f}")
    if args.log:
        env = records.environment()
        specs = {name: (layout, options) for name, layout, options in variants}
        recs = [
            records.record(
                env,
                "e2e",
                "compile_regions",
                shape,
                name,
                time=med[name],
                unit="ms",
                note="one step: forward + backward of one micro-batch, compiled in the default mode",
                extra={
                    "rounds_ms": [round(t, 3) for t in ts],
                    "steps_per_round": args.steps,
                    "layout": specs[name][0],
                    "inductor_options": specs[name][1],
                },
            )
            for name, ts in times.items()
        ]
        records.append(args.log, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
