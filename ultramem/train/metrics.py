"""What a run reports: a log line per logging step, tensorboard scalars, a JSONL log in the run
directory, and a progress bar with ETA on a terminal. Only the main rank writes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the console's and train.log's lines
LOG_DATEFMT = "%H:%M:%S"


def run_log_handler(path: Path) -> logging.FileHandler:
    """A handler appending to a run's train.log, in the console's format."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    return handler


# Dense bf16 tensor-core peak (no sparsity), for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    def __init__(
        self, run_dir: Path | None, tensorboard_dir: Path | None, enabled: bool, max_steps: int, progress: bool
    ):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._bar = None
        self.max_steps = max_steps
        if not enabled:
            return
        self._tb_dir = tensorboard_dir  # the writer is made at `start`, which knows the step
        if run_dir is not None:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, unit="step", dynamic_ncols=True, leave=False)

    def start(self, step: int) -> None:
        """Before the first step, at `step` (> 0: resumed). A run killed after its checkpoint
        logged steps past it, and a run started afresh in the same directory finds another's:
        tensorboard drops their events from step + 1 on, and metrics.jsonl marks where a resumed
        run's records begin."""
        if not self.enabled:
            return
        if self._tb_dir is not None and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self._tb_dir), purge_step=step + 1)
        if step and self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": "resume", "step": step, "time": time.time()}) + "\n")
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._jsonl is not None:
            record = {"kind": kind, "step": step, "time": time.time(), **values}
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")

    def advance(self, step: int, postfix: str = "") -> None:
        if self._bar is not None:
            self._bar.n = step
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()

    def line(self, message: str) -> None:
        """A log line that does not tear the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.clear()
        log.info("%s", message)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
