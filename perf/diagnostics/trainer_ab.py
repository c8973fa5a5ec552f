"""Trainer configurations timed against each other in one process, their steps alternating.

The GPU machine's host speed drifts from run to run by more than most host-side changes are
worth (a 227M dense step under FSDP took 359 ms in one run and 272 ms in the next), so a
host-bound setting is compared only within one process: each variant builds its own trainer
(model, optimizer, data), all are compiled and warmed up, then rounds of a few steps alternate
between them, reversing the order every round.

    PYTHONPATH=. python -m perf.diagnostics.trainer_ab --common=--train.compile_mode=default \\
        --variant dense=--model.memory.type=none --variant v2= [--rounds 5 --steps 3]
    # FSDP2 on one GPU: the same under
    # WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 ... --common=--parallel.mode=fsdp

`--variant NAME=OVERRIDES` takes the config overrides of one variant, separated by spaces (none
after the `=`: the config as it is). `--tree NAME=PATH` runs that variant's trainer on another
checkout's `ultramem` (e.g. `git worktree add ../old <commit>`): then every variant runs in a
process of its own (`trainer_ab_worker.py`, this checkout's for those without a tree), built
one after another, its steps still alternating with the others', so two commits compare on one
machine. In a copy of the tree without .git, unpack the commit into a folder of the working
tree (`git archive <commit> | tar -x -C old/`); the records then name the folder.
`--env NAME=VAR=VALUE` sets an environment variable in that variant's worker alone (Inductor
options read at import, e.g. TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1); as with
`--tree`, every variant then runs in a worker.
Records go to the results log (suite "e2e", bench "trainer_ab") with --log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch._dynamo.config

from perf import records
from ultramem.train.distributed import env_dist_info, resolve_device
from ultramem.train.trainer import setup_distributed, teardown_distributed

from . import trainer_ab_worker

ROOT = Path(__file__).resolve().parents[2]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {spec!r}: expected NAME=OVERRIDES")
    return name, rest.split()


def tree_revision(tree: Path) -> str:
    """The checkout's commit (for the records, which name no paths), or its folder's name where
    it is not a checkout of its own (an unpacked commit inside another repository)."""
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--show-toplevel", "--short", "HEAD"], capture_output=True, text=True
    )
    top, _, commit = out.stdout.strip().partition("\n")
    return commit if out.returncode == 0 and Path(top).resolve() == tree.resolve() else tree.name


def parse_env(spec: str) -> tuple[str, str, str]:
    name, _, assignment = spec.partition("=")
    var, sep, value = assignment.partition("=")
    if not name or not var or not sep:
        raise SystemExit(f"--env {spec!r}: expected NAME=VAR=VALUE")
    return name, var, value


def parse_tree(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not (Path(path) / "ultramem" / "__init__.py").is_file():
        raise SystemExit(f"--tree {spec!r}: expected NAME=PATH, PATH a checkout with ultramem/")
    return name, Path(path).resolve()


class InProcess:
    """The variants' trainers in this process."""

    def __init__(self):
        # the variants' models run the same code: past Dynamo's default limit a later one would run eager
        torch._dynamo.config.recompile_limit = 64
        cuda = torch.cuda.is_available()
        device = resolve_device("cuda", env_dist_info().local_rank) if cuda else torch.device("cpu")
        self.info = setup_distributed(device)
        self.trainers = {}

    def build(self, name: str, config: str, overrides: list[str], warmup: int) -> None:
        self.trainers[name] = trainer_ab_worker.build_warm(config, overrides, self.info, warmup)

    def steps(self, name: str, n: int) -> float:
        return trainer_ab_worker.timed_steps(self.trainers[name], n)

    def close(self) -> None:
        teardown_distributed(self.info)


class Workers:
    """One worker process per variant, its `ultramem` from its tree (this checkout by default).
    Each gets its own rendezvous port, as FSDP runs on one rank need a process group each."""

    def __init__(self, trees: dict[str, Path], envs: dict[str, dict[str, str]]):
        self.trees = trees
        self.envs = envs
        self.procs: dict[str, subprocess.Popen] = {}

    def _ask(self, name: str, cmd: dict) -> dict:
        proc = self.procs[name]
        try:
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died before reading (e.g. at startup): its output ends below
        for line in proc.stdout:
            if not line.startswith(trainer_ab_worker.MARK):
                sys.stderr.write(line)  # the trainer's own lines
            else:
                answer = json.loads(line[len(trainer_ab_worker.MARK) :])
                if "error" in answer:
                    raise SystemExit(f"variant {name}: {answer['error']}")
                return answer
        raise SystemExit(f"variant {name}: its worker exited (rc {proc.wait()})")

    def build(self, name: str, config: str, overrides: list[str], warmup: int) -> None:
        env = {**os.environ, **self.envs.get(name, {})}
        tree = self.trees.get(name, ROOT)
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
        if "WORLD_SIZE" in env:
            env["MASTER_PORT"] = str(int(env.get("MASTER_PORT", "29500")) + 1 + len(self.procs))
        self.procs[name] = subprocess.Popen(
            [sys.executable, str(Path(trainer_ab_worker.__file__))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )
        answer = self._ask(name, {"cmd": "build", "config": config, "overrides": overrides, "warmup": warmup})
        if Path(answer["ultramem"]) != tree / "ultramem":
            raise SystemExit(f"variant {name}: its worker imported ultramem from {answer['ultramem']}, not {tree}")

    def steps(self, name: str, n: int) -> float:
        return self._ask(name, {"cmd": "steps", "n": n})["ms"]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                proc.stdin.flush()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="227m.toml")
    p.add_argument("--common", action="append", default=[], help="a config override for every variant")
    p.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (repeat)")
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH: that variant on another checkout")
    p.add_argument("--env", action="append", default=[], help="NAME=VAR=VALUE: set for that variant's worker")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (compilation)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    p.add_argument("--log", help="append the records to this results log")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("--variant names must differ")
    trees = dict(parse_tree(t) for t in args.tree)
    envs: dict[str, dict[str, str]] = {}
    for name, var, value in map(parse_env, args.env):
        if var in envs.setdefault(name, {}):
            raise SystemExit(f"--env {name}={var}=...: given twice")
        envs[name][var] = value
    if set(trees) - {name for name, _ in variants}:
        raise SystemExit(f"--tree names {sorted(set(trees) - {n for n, _ in variants})} are not variants")
    if set(envs) - {name for name, _ in variants}:
        raise SystemExit(f"--env names {sorted(set(envs) - {n for n, _ in variants})} are not variants")
    runner = Workers(trees, envs) if trees or envs else InProcess()
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    try:
        with tempfile.TemporaryDirectory(prefix="trainer-ab-") as tmp:
            for name, overrides in variants:
                runner.build(
                    name,
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
                    args.warmup,
                )
            names = [name for name, _ in variants]
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    times[name].append(runner.steps(name, args.steps))
    finally:
        runner.close()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    first = next(iter(med))
    # rounds are paired: the median of the per-round ratios discounts drift between rounds
    paired = {name: statistics.median(a / b for a, b in zip(times[first], ts)) for name, ts in times.items()}
    shape = " ".join([args.config, *args.common, f"grad_accum={args.grad_accum}"])
    print(f"{shape}: ms per step, median of {args.rounds} rounds of {args.steps} steps; host {records.host()}")
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
                        "tree": tree_revision(trees[name]) if name in trees else None,
                        "env": envs.get(name, {}),
                    },
                )
                for name, ts in times.items()
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
