"""One variant of `perf.diagnostics.trainer_ab` in a process of its own, so that its `ultramem`
can come from another checkout (the parent puts that checkout first on PYTHONPATH). Run as a
script; it imports only torch and the trainer's long-standing entry points (load_config,
build_trainer, setup_distributed), which older checkouts have too.

Commands arrive as JSON lines on stdin; each answer is one JSON line on stdout after MARK (the
trainer prints its own lines there too):
  {"cmd": "build", "config": ..., "overrides": [...], "warmup": N}  → {"ultramem": <its folder>}
  {"cmd": "steps", "n": N}                                            → {"ms": <ms per step>}
  {"cmd": "exit"}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MARK = "@@trainer_ab "


def reply(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def build_warm(config: str, overrides: list[str], info, warmup: int):
    """A trainer for the config, prepared and past `warmup` steps (compilation)."""
    from ultramem.train.config import load_config
    from ultramem.train.trainer import build_trainer

    trainer = build_trainer(load_config(config, overrides), info)
    trainer.prepare()
    for _ in range(warmup):
        trainer.train_step()
    return trainer


def timed_steps(trainer, n: int) -> float:
    """ms per step over n steps, the device synchronized before and after."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> int:
    import torch

    import ultramem
    from ultramem.train.trainer import setup_distributed, teardown_distributed

    cuda = torch.cuda.is_available()
    info = setup_distributed(torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    trainer = None
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "build":
                    trainer = build_warm(cmd["config"], cmd["overrides"], info, cmd["warmup"])
                    reply({"ultramem": str(Path(ultramem.__file__).resolve().parent)})
                elif cmd["cmd"] == "steps":
                    reply({"ms": timed_steps(trainer, cmd["n"])})
                else:
                    break
            except Exception as exc:  # the parent reports it and stops
                reply({"error": f"{type(exc).__name__}: {exc}"})
                return 1
    finally:
        teardown_distributed(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
