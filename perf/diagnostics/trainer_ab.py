"""Trainer configurations timed against each other in one process, their steps alternating.

The lent machine's host speed drifts from run to run by more than most host-side changes are
worth (a 227M dense step under FSDP took 359 ms in one run and 272 ms in the next), so a
host-bound setting is compared only within one process: each variant builds its own trainer
(model, optimizer, data), all are compiled and warmed up, then rounds of a few steps alternate
between them, reversing the order every round.

    PYTHONPATH=. python -m perf.diagnostics.trainer_ab --common=--train.compile_mode=default \\
        --variant dense=--model.memory.type=none --variant v2= [--rounds 5 --steps 3]
    # FSDP2 on one GPU: the same under
    # WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 ... --common=--parallel.mode=fsdp

`--variant NAME=OVERRIDES` takes the config overrides of one variant, separated by spaces (none
after the `=`: the config as it is). Records go to the results log (suite "e2e", bench
"trainer_ab") with --log.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
import torch._dynamo.config

from perf import records
from ultramem.train.config import load_config
from ultramem.train.distributed import env_dist_info, resolve_device
from ultramem.train.trainer import build_trainer, setup_distributed, teardown_distributed


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {spec!r}: expected NAME=OVERRIDES")
    return name, rest.split()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="227m.toml")
    p.add_argument("--common", action="append", default=[], help="a config override for every variant")
    p.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (repeat)")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (compilation)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    p.add_argument("--log", help="append the records to this results log")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("--variant names must differ")
    cuda = torch.cuda.is_available()
    # the variants' models run the same code: past Dynamo's default limit a later one would run eager
    torch._dynamo.config.recompile_limit = 64
    info = setup_distributed(resolve_device("cuda", env_dist_info().local_rank) if cuda else torch.device("cpu"))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    try:
        with tempfile.TemporaryDirectory(prefix="trainer-ab-") as tmp:
            trainers = {}
            for name, overrides in variants:
                cfg = load_config(
                    args.config,
                    args.common
                    + overrides
                    + [
                        f"--train.grad_accum={args.grad_accum}",
                        "--train.eval_interval=0",
                        "--train.max_steps=100000",
                        "--model.memory.log_interval=100000",
                        "--optim.warmup_steps=2",
                        f"--run.dir={tmp}/{name}",
                        "--run.resume=",
                        "--checkpoint.enabled=false",
                        "--metrics.tensorboard=false",
                    ],
                )
                trainer = build_trainer(cfg, info)
                trainer.prepare()
                for _ in range(args.warmup):
                    trainer.train_step()
                trainers[name] = trainer
            names = list(trainers)
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        trainers[name].train_step()
                    sync()
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    finally:
        teardown_distributed(info)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    first = next(iter(med))
    # rounds are paired: the median of the per-round ratios discounts drift between rounds
    paired = {name: statistics.median(a / b for a, b in zip(times[first], ts)) for name, ts in times.items()}
    shape = " ".join([args.config, *args.common, f"grad_accum={args.grad_accum}"])
    print(f"{shape}: ms per step, median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':20} {'median':>8}  speed vs the first (medians, per round)  rounds")
    for name, ts in times.items():
        rounds = " ".join(f"{t:.1f}" for t in ts)
        print(f"{name:20} {med[name]:8.1f}  {med[first] / med[name]:.3f}x  {paired[name]:.3f}x  {rounds}")
    if args.log:
        env = records.environment()
        specs = dict(variants)
        records.append(
            args.log,
            [
                records.record(
                    env,
                    "e2e",
                    "trainer_ab",
                    shape,
                    name,
                    time=med[name],
                    unit="ms",
                    note="one optimizer step, variants alternating in one process",
                    extra={
                        "overrides": specs[name],
                        "rounds_ms": [round(t, 2) for t in ts],
                        "steps_per_round": args.steps,
                        "warmup_steps": args.warmup,
                        "speed_vs_first_per_round": paired[name],
                    },
                )
                for name, ts in times.items()
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
