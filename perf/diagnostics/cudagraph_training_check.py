"""Training with CUDA graphs (train.compile_mode="reduce-overhead") against the same run compiled
without them: the debug config with gradient accumulation (loss curves must agree), then the
227M UltraMemV2 config's throughput both ways. Writes $OUT/cudagraph_training.json.

    ULTRAMEM_GIT_REV=<rev> python -m perf.diagnostics.cudagraph_training_check   # repository root; CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from ultramem.train.config import load_config
from ultramem.train.trainer import run_training


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("cudagraph_training_check needs a CUDA device", file=sys.stderr)
        return 2
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "git_revision": os.environ.get("ULTRAMEM_GIT_REV"),
    }
    path = os.path.join(os.environ.get("OUT", "."), "cudagraph_training.json")
    debug = [
        "--train.device=cuda",
        "--train.dtype=bfloat16",
        "--train.compile=true",
        "--train.max_steps=30",
        "--train.grad_accum=2",
        "--train.log_interval=1",
        "--train.eval_interval=0",
    ]
    runs = {}
    for mode in ("default", "reduce-overhead"):
        runs[mode] = [r.loss for r in run_training(load_config("debug.toml", debug + [f"--train.compile_mode={mode}"]))]
        torch._dynamo.reset()
    diffs = [abs(a - b) for a, b in zip(runs["default"], runs["reduce-overhead"])]
    out["debug_grad_accum2"] = {"losses": runs, "mean_abs_diff": sum(diffs) / len(diffs), "max_abs_diff": max(diffs)}
    print(
        "debug grad_accum=2: mean |diff| %.4f max %.4f; last losses %.4f / %.4f"
        % (out["debug_grad_accum2"]["mean_abs_diff"], max(diffs), runs["default"][-1], runs["reduce-overhead"][-1]),
        flush=True,
    )
    json.dump(out, open(path, "w"), indent=1)
    steps = 6
    common = [
        f"--train.max_steps={steps}",
        "--train.grad_accum=4",
        "--train.log_interval=1",
        "--train.eval_interval=0",
        "--model.memory.log_interval=1000",
        "--optim.warmup_steps=2",
    ]
    for mode in ("reduce-overhead", "default"):
        t0 = time.perf_counter()
        rec = run_training(load_config("227m.toml", common + [f"--train.compile_mode={mode}"]))
        tps = statistics.median(r.tokens_per_s for r in rec[steps // 2 :])
        out[f"227m_{mode}"] = {"tokens_per_s": tps, "losses": [r.loss for r in rec], "wall_s": time.perf_counter() - t0}
        print(f"227m {mode}: {tps:.0f} tokens/s, losses {[round(r.loss, 3) for r in rec]}", flush=True)
        json.dump(out, open(path, "w"), indent=1)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
