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


def main() -> int:
    import torch

    import ultramem
    from ultramem.train.config import load_config
    from ultramem.train.trainer import build_trainer, setup_distributed, teardown_distributed

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    info = setup_distributed(device)
    trainer = None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "build":
                    trainer = build_trainer(load_config(cmd["config"], cmd["overrides"]), info)
                    trainer.prepare()
                    for _ in range(cmd["warmup"]):
                        trainer.train_step()
                    reply({"ultramem": str(Path(ultramem.__file__).resolve().parent)})
                elif cmd["cmd"] == "steps":
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(cmd["n"]):
                        trainer.train_step()
                    sync()
                    reply({"ms": (time.perf_counter() - t0) / cmd["n"] * 1e3})
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
