"""Running the trainer as users do, in subprocesses that never outlive their test.

Each command runs in its own session (process group); on a timeout its whole process tree is
killed, torchrun's workers (in sessions of their own) included. Timeouts are sized from the
work: a base for interpreter and torch start-up per process plus a per-step allowance, both
generous for a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import subproc
from subproc import kill_group  # noqa: F401  (tests import it from here)

# One process: ~10 s to import torch and build on a busy machine; ~1 s per tiny step.
START_S = 45.0
STEP_S = 6.0


def timeout_for(steps: int, procs: int = 1) -> float:
    return START_S * procs + STEP_S * steps * procs


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    out = dict(
        os.environ,
        ULTRAMEM_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TORCH_CPP_LOG_LEVEL="ERROR",
    )
    out.update(extra)
    return out


def run(cmd: list[str], timeout: float, cwd: Path, environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subproc.run(cmd, timeout, cwd, environ)


def train_cmd(args: list[str], nproc: int = 0) -> list[str]:
    """`python -m ultramem.train ...`, or under torchrun with `nproc` processes when nproc > 0."""
    if nproc:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--standalone",
            "-m",
            "ultramem.train",
            *args,
        ]
    return [sys.executable, "-m", "ultramem.train", *args]


def token_shards(directory: Path, vocab: int = 300, n: int = 60_000, seed: int = 0) -> Path:
    """A directory with one random token shard: training data that needs no tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # a repeating pattern under the noise gives the model something to learn
    base = rng.integers(0, vocab, size=997)
    tokens = np.where(rng.random(n) < 0.7, np.resize(base, n), rng.integers(0, vocab, size=n))
    np.save(directory / "tokens.npy", tokens.astype(np.uint16))
    return directory


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    """step → training loss, the last record of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["train/loss"] for r in records(run_dir)}


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.2)
    return False
