"""Compiled regions of the trainer's model: a block and the memory layers reading it in one
region (without FSDP, `Transformer.compile_stages`) against one region per block and one per
memory layer (the FSDP layout), timed in one process and alternating, so that a host whose speed
drifts slows both alike.

    PYTHONPATH=. python -m perf.diagnostics.compile_regions              # CPU: debug.toml, 8 blocks, 8 tokens
    PYTHONPATH=. python -m perf.diagnostics.compile_regions --config 227m.toml --batch 3 --seq 4096 \\
        --log $OUT/log.jsonl                                             # CUDA: the 227M micro-batch

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
from ultramem.train.config import load_config
from ultramem.train.parallelize import apply_compile
from ultramem.train.trainer import build_training_model

LAYOUTS = {"stage": False, "module": True}  # layout → apply_compile's fsdp flag


def build(config: str, overrides: list[str], layout: str, device: torch.device):
    cfg = load_config(config, overrides + ["--train.compile=true", "--train.compile_mode=default"])
    model = build_training_model(cfg, device)
    if model.memory_tables is not None:
        model.memory_tables.refresh_compute_copy()
    apply_compile(model, "default", fsdp=LAYOUTS[layout])
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
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    overrides = list(args.override)
    if args.config == "debug.toml" and not any(o.startswith("--model.n_layers") for o in overrides):
        overrides.append("--model.n_layers=8")

    models = {layout: build(args.config, overrides, layout, device) for layout in LAYOUTS}
    cfg = models["stage"][0]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(layout: str, steps: int) -> float:
        _, model, autocast = models[layout]
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            with autocast():
                loss, _ = model(tokens, tokens)
            loss.backward()
        sync()
        return (time.perf_counter() - t0) / steps * 1e3

    for layout in LAYOUTS:  # compile, then warm up
        run(layout, 3)
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    for r in range(args.rounds):
        order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
        for layout in order:
            times[layout].append(run(layout, args.steps))

    shape = " ".join([args.config, *overrides, f"{args.batch}x{args.seq}"])
    med = {layout: statistics.median(ts) for layout, ts in times.items()}
    print(f"{shape} on {device.type}, ms per step (forward + backward), {args.steps} steps a round")
    print(f"{'layout':8} {'median':>8}  rounds")
    for layout, ts in times.items():
        print(f"{layout:8} {med[layout]:8.2f}  " + " ".join(f"{t:.2f}" for t in ts))
    print(f"stage / module: {med['stage'] / med['module']:.3f}")
    if args.log:
        env = records.environment()
        recs = [
            records.record(
                env,
                "e2e",
                "compile_regions",
                shape,
                layout,
                time=med[layout],
                unit="ms",
                note="one step: forward + backward of one micro-batch, compiled in the default mode",
                extra={"rounds_ms": [round(t, 3) for t in ts], "steps_per_round": args.steps},
            )
            for layout, ts in times.items()
        ]
        records.append(args.log, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
