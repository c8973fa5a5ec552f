"""The training command on one GPU, as users run it: UltraMemV2 (227m.toml) and the dense
baseline in the same trainer and the same call, with CUDA graphs, activation checkpointing on
and off, and FSDP2 (torchrun, one rank, plain compile). Each variant is a real
`python -m ultramem.train` (or torchrun) subprocess; tokens/s, MFU and peak memory are read back
from its metrics.jsonl, over the steps after the warm-up.

    PYTHONPATH=. python perf/trainer_gpu.py --out $OUT/trainer_gpu.json --steps 200 \\
        --variants v2-graphs,dense-graphs,v2-graphs-ac,dense-graphs-ac

A smoke mode (`--smoke`) runs debug.toml on the GPU instead: compile with CUDA graphs, AC,
FSDP, and a checkpoint save and exact resume, in a minute or two. `python -m perf run --only e2e`
runs the variants through run_variants() and appends them to the results log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON_227M = [
    "--config",
    "227m.toml",
    "--train.eval_interval=0",
    "--model.memory.log_interval=100000",
    "--optim.warmup_steps=10",
    "--data.vocab_size=8192",
    "--data.max_corpus_bytes=2000000",
    "--checkpoint.enabled=false",
    "--metrics.tensorboard=false",
    "--metrics.progress=false",
]

# The smoke mode of `python -m perf run --small`: debug.toml on the CPU, same variants' overrides.
COMMON_SMALL = [
    "--config",
    "debug.toml",
    "--train.device=cpu",
    "--train.eval_interval=0",
    "--model.memory.log_interval=100000",
    "--optim.warmup_steps=1",
    "--checkpoint.enabled=false",
    "--metrics.tensorboard=false",
    "--metrics.progress=false",
]

VARIANTS = {
    "v2-graphs": (0, []),
    "dense-graphs": (0, ["--model.memory.type=none"]),
    "v2-graphs-ac": (0, ["--train.ac=full"]),
    "dense-graphs-ac": (0, ["--model.memory.type=none", "--train.ac=full"]),
    "v2-default": (0, ["--train.compile_mode=default"]),
    "dense-default": (0, ["--model.memory.type=none", "--train.compile_mode=default"]),
    "v2-fsdp": (1, ["--parallel.mode=fsdp", "--train.compile_mode=default"]),
    "dense-fsdp": (1, ["--model.memory.type=none", "--parallel.mode=fsdp", "--train.compile_mode=default"]),
    "v2-ddp-graphs": (1, ["--parallel.mode=ddp"]),
}


def launch(args: list[str], nproc: int, run_dir: Path, log_path: Path, timeout: float) -> dict:
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--standalone",
            "-m",
            "ultramem.train",
            *args,
            f"--run.dir={run_dir}",
        ]
    else:
        cmd = [sys.executable, "-m", "ultramem.train", *args, f"--run.dir={run_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, start_new_session=True
        )
    return {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": time.perf_counter() - t0}


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summarize(records: list[dict], warmup: int) -> dict:
    train = [r for r in records if r["kind"] == "train"]
    tail = [r for r in train if r["step"] > warmup] or train
    out = {"steps": len(train)}
    if not tail:
        return out
    out["tokens_per_s"] = statistics.median(r["train/tokens_per_s"] for r in tail)
    if "train/mfu" in tail[-1]:
        out["mfu"] = statistics.median(r["train/mfu"] for r in tail)
    if "train/peak_memory_gb" in tail[-1]:
        out["peak_memory_gb"] = max(r["train/peak_memory_gb"] for r in train)
    out["loss_first"], out["loss_last"] = train[0]["train/loss"], train[-1]["train/loss"]
    out["loss_curve"] = [round(r["train/loss"], 4) for r in train]
    return out


def smoke(work: Path, result: dict) -> None:
    """debug.toml on the GPU: every trainer path in small."""
    common = [
        "--config",
        "debug.toml",
        "--train.device=cuda",
        "--train.dtype=bfloat16",
        "--train.compile=true",
        "--train.max_steps=20",
        "--train.eval_interval=10",
        "--checkpoint.interval=10",
        "--metrics.progress=false",
    ]
    runs = {
        "graphs": (0, ["--train.compile_mode=reduce-overhead"]),
        "graphs-ac": (0, ["--train.compile_mode=reduce-overhead", "--train.ac=full"]),
        "fsdp": (1, ["--parallel.mode=fsdp"]),
        "ddp-graphs": (1, ["--parallel.mode=ddp", "--train.compile_mode=reduce-overhead"]),
    }
    for name, (nproc, extra) in runs.items():
        run_dir = work / f"smoke-{name}"
        info = launch(common + extra, nproc, run_dir, work / f"smoke-{name}.log", 600)
        info.update(summarize(read_records(run_dir), 5))
        info["val"] = [r["val/loss"] for r in read_records(run_dir) if r["kind"] == "val"]
        info["log_tail"] = (work / f"smoke-{name}.log").read_text()[-1500:]
        result[f"smoke-{name}"] = info
        print(name, {k: v for k, v in info.items() if k not in ("log_tail", "loss_curve")}, flush=True)
    # exact resume on the GPU: from the graphs run's step-10 checkpoint, steps 11-20 again
    src = work / "smoke-graphs"
    run_dir = work / "smoke-graphs-resumed"
    info = launch(
        common + ["--train.compile_mode=reduce-overhead", f"--run.resume={src / 'checkpoints' / 'step_00000010'}"],
        0,
        run_dir,
        work / "smoke-resume.log",
        600,
    )
    full = {r["step"]: r["train/loss"] for r in read_records(src) if r["kind"] == "train"}
    resumed = {r["step"]: r["train/loss"] for r in read_records(run_dir) if r["kind"] == "train"}
    info["max_abs_diff_vs_uninterrupted"] = max((abs(resumed[s] - full[s]) for s in resumed), default=None)
    info["steps"] = sorted(resumed)
    info["log_tail"] = (work / "smoke-resume.log").read_text()[-1500:]
    result["smoke-resume"] = info
    print("resume", {k: v for k, v in info.items() if k != "log_tail"}, flush=True)


def run_variants(
    names: list[str],
    steps: int,
    grad_accum: int,
    warmup: int,
    work: Path,
    timeout: float,
    small: bool = False,
    on_variant=None,
) -> dict:
    """Each variant as a training subprocess; {name: summary}. on_variant(name, summary) after each."""
    out = {}
    for name in names:
        nproc, extra = VARIANTS[name]
        if small and nproc:
            raise SystemExit(f"variant {name} needs torchrun and a GPU; the smoke mode runs single-process ones")
        run_dir = work / name
        overrides = [f"--train.max_steps={steps}", f"--train.grad_accum={grad_accum}", "--train.log_interval=1", *extra]
        info = launch(
            (COMMON_SMALL if small else COMMON_227M) + overrides, nproc, run_dir, work / f"{name}.log", timeout
        )
        info.update(summarize(read_records(run_dir), warmup))
        info["log_tail"] = (work / f"{name}.log").read_text()[-1200:]
        out[name] = info
        print(name, {k: v for k, v in info.items() if k not in ("log_tail", "loss_curve", "cmd")}, flush=True)
        if on_variant is not None:
            on_variant(name, info)
    return out


# UltraMemV2 variant -> the dense run it is compared with
DENSE_OF = {
    "v2-graphs": "dense-graphs",
    "v2-graphs-ac": "dense-graphs-ac",
    "v2-default": "dense-default",
    "v2-fsdp": "dense-fsdp",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the medians")
    parser.add_argument("--variants", default="v2-graphs,dense-graphs")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "trainer_gpu"))
    parser.add_argument("--timeout", type=float, default=540)
    args = parser.parse_args()
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "git_rev": os.environ.get("ULTRAMEM_GIT_REV", ""),
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "grad_accum": args.grad_accum,
        "warmup_steps_left_out": args.warmup,
    }
    out = Path(args.out)
    if args.smoke:
        smoke(work, result)
    else:
        result["tokens_per_step"] = 3 * 4096 * args.grad_accum

        def save(name, info):
            result[name] = info
            out.write_text(json.dumps(result, indent=1))

        run_variants(
            args.variants.split(","), args.steps, args.grad_accum, args.warmup, work, args.timeout, on_variant=save
        )
        for v2, dense in DENSE_OF.items():
            if "tokens_per_s" in result.get(v2, {}) and "tokens_per_s" in result.get(dense, {}):
                result[f"ratio {v2} / {dense}"] = result[v2]["tokens_per_s"] / result[dense]["tokens_per_s"]
                print(f"ratio {v2} / {dense}: {result[f'ratio {v2} / {dense}']:.3f}")
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
