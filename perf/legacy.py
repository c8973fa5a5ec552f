"""One-off: how perf/results/log.jsonl's legacy records were made from the per-run JSON files that
perf/results held until the results log (they stay in git history; `--git REV` reads them there).

    python -m perf convert-legacy --git <a commit that still has them> --out perf/results/log.jsonl
    python -m perf convert-legacy --src some/dir/of/old/json --out converted-log.jsonl

Each file becomes the records it maps to without guessing: the commit is the revision the file
names (per section where it names several), the date the file's (else the commit's date, marked
in extra.date_from), the rest as the run wrote it. What does not map (compile checks, notes on
inputs, a number copied from another file) is listed per file on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

from . import records
from .gpu_e2e import layer_shape
from .run import KERNEL_ROWS_KEPT, copy_record, layer_records, op_records, throughput_records, trainer_records

CONFIG_GRAD_ACCUM = 256  # 227m.toml's grad_accum at every commit these files come from


def _env(name: str, d: dict, rev: str | None = None) -> dict:
    rev = rev or d.get("git_revision") or d.get("git_rev")
    commit = records.resolve_commit(rev) if rev else None
    date, date_from = d.get("date"), "file"
    if date and "T" in date:
        date = datetime.datetime.fromisoformat(date).astimezone(datetime.timezone.utc).isoformat(timespec="seconds")
    elif not date:
        date, date_from = records.commit_date(commit or rev) if (commit or rev) else None, "commit"
    env = {
        "run": f"legacy/{name}",
        "commit": commit or rev,
        "dirty": None,
        "date": date,
        "device": d.get("device"),
        "torch": d.get("torch"),
        "triton": d.get("triton"),
    }
    env["_date_from"] = date_from
    return env


def _finish(env: dict, recs: list[dict], note: str | None = None) -> list[dict]:
    for r in recs:
        if env["_date_from"] == "commit":
            r["extra"]["date_from"] = "commit date of the measured revision (the file has no date)"
        if note and not r["note"]:
            r["note"] = note
    return recs


def _rows_file(name: str, d: dict) -> tuple[list[dict], list[str]]:
    """bench_ops-style files (op, shape, variant, median_us rows), and the two early retrieval runs."""
    env = _env(name, d)
    rows = []
    for r in d["rows"]:
        r = dict(r)
        r["op"] = r["op"].replace(" ", "_")  # "tdqkr_retrieval fwd" in the early retrieval runs
        rows.append(r)
    note = None
    if "ceiling_gbps" in d:  # retrieval_h200_*: before bench_ops' CUDA-graph timer
        note = "event-timed (triton.testing.do_bench around each call), before the CUDA-graph timer"
    recs = op_records(env, rows, small=bool(d.get("small")))
    gbps = d.get("copy_ceiling_gbps") or d.get("ceiling_gbps")
    if gbps:
        recs.append(copy_record(env, gbps, None, False))
    checks = d.get("checks") or []
    failed = [c["name"] for c in checks if not c.get("ok", True)]
    if checks:
        recs.append(
            records.record(
                env,
                "op",
                "float64_checks",
                "",
                "all modules run",
                error=f"{len(failed)} of {len(checks)} failed" if failed else None,
                extra={
                    "passed": len(checks) - len(failed),
                    "total": len(checks),
                    "failed": failed,
                    "modules": d.get("modules_done"),
                },
            )
        )
    skipped = (
        [f"{sum(r['op'] == 'info' for r in rows)} 'info' rows (descriptions of the inputs)"]
        if any(r["op"] == "info" for r in rows)
        else []
    )
    return _finish(env, recs, note), skipped + ["per-check details (names of failed checks kept)"] * bool(checks)


def _layer(name: str, d: dict) -> list[dict]:
    env = _env(name, d)
    rows = d["layer_227m"]
    shape = layer_shape("227m.toml", rows["tokens"], 3, 4096, rows["N"])
    return _finish(env, layer_records(env, rows, shape, small=False))


def _layer_stack(name: str, d: dict) -> list[dict]:
    """gpu_e2e's stack section: per-layer times of the config's layers compiled as one function."""
    env = _env(name, d)
    rows = d["layer_stack_227m"]
    recs = layer_records(env, rows, rows["shape"], small=False)
    for r in recs:
        r["note"] = f"per layer, {rows['layers']} layers compiled as one function; " + r["note"]
    return _finish(env, recs)


def _throughput(name: str, d: dict) -> tuple[list[dict], list[str]]:
    runs = {k: dict(v) for k, v in d["throughput_227m"].items()}
    for run in runs.values():
        run.setdefault("grad_accum", CONFIG_GRAD_ACCUM)
    out, skipped = [], []
    if "sections_git_revision" in d:  # e2e_h200.json: sections from two revisions, each named
        by_rev: dict[str, dict] = {}
        for k, v in runs.items():
            rev = v.get("git_revision") or ("e3e6d98" if k == "dense" else d["git_revision"])
            by_rev.setdefault(rev, {})[k] = v
        for rev, rs in by_rev.items():
            env = _env(name, d, rev)
            out += _finish(env, throughput_records(env, rs, "227m.toml", small=False))
        for r in out:  # each section's ratio as the file gave it, not across revisions
            if r["variant"] != "dense" and "vs_dense" in r["extra"] and "vs_dense" not in runs[r["variant"]]:
                del r["extra"]["vs_dense"]
        return out, skipped
    if "deterministic" in name:  # ULTRAMEM_DETERMINISTIC=1 for this run (the file name says so)
        runs = {f"{k} (deterministic)": v for k, v in runs.items()}
    env = _env(name, d)
    return _finish(env, throughput_records(env, runs, "227m.toml", small=False), d.get("note")), skipped


def _training(name: str, d: dict, rev: str | None = None) -> list[dict]:
    """The debug model's loss curves: CPU fp32 reference, GPU bf16 compiled, GPU with CUDA graphs."""
    env = _env(name, d, rev)
    tr, gr = d["training"], d.get("training_cudagraphs", {})
    overrides = " ".join(tr.get("overrides", []))
    shape = f"debug.toml {tr['steps']} steps" + (f" {overrides}" if overrides else "")
    stats = {k: tr[k] for k in ("max_abs_diff", "mean_abs_diff", "last10_cpu", "last10_gpu", "first10_gpu")}
    recs = [
        records.record(
            env,
            "e2e",
            "debug_training",
            shape,
            "cpu_fp32",
            extra={"loss_curve": tr["cpu_fp32_loss"], "wall_s": tr["cpu_seconds"]},
        ),
        records.record(
            env,
            "e2e",
            "debug_training",
            shape,
            "gpu_bf16_compiled",
            tokens_per_s=tr.get("gpu_tokens_per_s_last"),
            note="tokens/s of the last step",
            extra={"loss_curve": tr["gpu_bf16_compiled_loss"], "wall_s": tr["gpu_seconds"], "vs_cpu_fp32": stats},
        ),
    ]
    if gr:
        recs.append(
            records.record(
                env,
                "e2e",
                "debug_training",
                shape,
                "gpu_bf16_cudagraphs",
                tokens_per_s=gr.get("tokens_per_s_last"),
                note="tokens/s of the last step",
                extra={
                    "loss_curve": gr["gpu_bf16_cudagraphs_loss"],
                    "wall_s": gr["seconds"],
                    "mean_abs_diff_vs_gpu_bf16_compiled": gr["mean_abs_diff_vs_gpu_compiled"],
                    "last10": gr["last10"],
                },
            )
        )
    return _finish(env, recs)


def _cudagraph_check(name: str, d: dict) -> tuple[list[dict], list[str]]:
    """cudagraph_training_check: the debug model with grad_accum 2 both ways, then 227M throughput
    (grad_accum 4, median of the last 3 of 6 steps) with and without CUDA graphs."""
    env = _env(name, d)
    dbg = d["debug_grad_accum2"]
    recs = [
        records.record(
            env,
            "e2e",
            "debug_training",
            "debug.toml 30 steps grad_accum=2",
            variant,
            extra={
                "loss_curve": dbg["losses"][mode],
                "mean_abs_diff_between": dbg["mean_abs_diff"],
                "max_abs_diff_between": dbg["max_abs_diff"],
            },
        )
        for mode, variant in (("default", "gpu_bf16_compiled"), ("reduce-overhead", "gpu_bf16_cudagraphs"))
    ]
    runs = {
        "ultramem_v2_cudagraphs": {**d["227m_reduce-overhead"], "grad_accum": 4, "compile_mode": "reduce-overhead"},
        "ultramem_v2_compile_default": {**d["227m_default"], "grad_accum": 4, "compile_mode": "default"},
    }
    recs += throughput_records(env, runs, "227m.toml", small=False)
    return _finish(env, recs), ["dense_227m_tokens_per_s_same_gpu_e2e_h200_json (a copy of e2e_h200.json's number)"]


def _train_step_profile(name: str, d: dict) -> list[dict]:
    env = _env(name, d)
    recs = []
    for variant, run in d["runs"].items():
        extra = {k: v for k, v in run.items() if k not in ("step_ms", "tokens_per_s", "kernels_us_per_micro_batch")}
        extra["kernels_us_per_micro_batch"] = run["kernels_us_per_micro_batch"][:KERNEL_ROWS_KEPT]
        recs.append(
            records.record(
                env,
                "e2e",
                "train_step_profile",
                f"227m.toml grad_accum={run['grad_accum']}",
                variant,
                time=run["step_ms"],
                unit="ms",
                tokens_per_s=run["tokens_per_s"],
                note="one step after warm-up, CUDA graphs; GPU busy time from the profiler",
                extra=extra,
            )
        )
    return _finish(env, recs)


def _trainer(name: str, d: dict) -> list[dict]:
    env = _env(name, d)
    runs = {k: v for k, v in d.items() if isinstance(v, dict)}
    recs = trainer_records(env, runs, "227m.toml", d["grad_accum"], small=False, warmup=d.get("warmup_steps_left_out"))
    for r in recs:
        r["extra"]["steps_run"] = d["steps"]
    return _finish(env, recs)


COMPILE_KEYS = ("cuda_kernels_registered", "graph_breaks", "graphs", "compile_vs_eager")


# Runs of code that did not stay: their records say so (plots of "today's numbers" leave them out).
EXPERIMENTS = {"owners": "row owners in the fused backward, reverted in 65d2ea4"}


def convert(name: str, d: dict) -> tuple[list[dict], list[str]]:
    """(records, what in the file was not mapped)."""
    recs, skipped = _convert(name, d)
    for key, what in EXPERIMENTS.items():
        if key in name:
            for r in recs:
                r["extra"]["experiment"] = what
    return recs, skipped


def _convert(name: str, d: dict) -> tuple[list[dict], list[str]]:
    recs: list[dict] = []
    skipped: list[str] = []
    if "rows" in d:
        return _rows_file(name, d)
    if name.startswith("cudagraph_training"):
        return _cudagraph_check(name, d)
    if name.startswith("train_step_profile"):
        return _train_step_profile(name, d), skipped
    if name.startswith("trainer_gpu"):
        return _trainer(name, d), ["log_tail of each run (kept in git history)"]
    if "layer_227m" in d:
        recs += _layer(name, d)
        skipped.append(f"per-kernel lists beyond the top {KERNEL_ROWS_KEPT}")
    if "layer_stack_227m" in d:
        recs += _layer_stack(name, d)
    if "throughput_227m" in d:
        r, s = _throughput(name, d)
        recs += r
        skipped += s
    if "training" in d:
        rev = "e3e6d98" if "sections_git_revision" in d else None
        recs += _training(name, d, rev)
    found = [k for k in COMPILE_KEYS if k in d]
    if found:
        skipped.append(f"compile checks ({', '.join(found)}): correctness evidence, not measurements")
    if d.get("errors"):
        skipped.append(f"errors: {sorted(d['errors'])}")
    return recs, skipped


def _load_dir(src: pathlib.Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(src.glob("*.json"))}


def _load_git(rev: str) -> dict[str, dict]:
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "perf/results/"],
        cwd=records.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    out = {}
    for path in names:
        if path.endswith(".json"):
            text = subprocess.run(
                ["git", "show", f"{rev}:{path}"], cwd=records.ROOT, capture_output=True, text=True, check=True
            ).stdout
            out[pathlib.Path(path).name] = json.loads(text)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf convert-legacy", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="a directory of the old JSON files")
    src.add_argument("--git", help="a commit whose perf/results/ still has them")
    parser.add_argument("--out", required=True, help="the log to write (must not exist unless --force)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists (--force replaces it)")
    files = _load_git(args.git) if args.git else _load_dir(pathlib.Path(args.src))
    all_recs = []
    for name, d in files.items():
        recs, skipped = convert(name, d)
        for r in recs:
            r["extra"] = {k: v for k, v in r["extra"].items() if v is not None}
        all_recs += recs
        print(f"{name}: {len(recs)} records" + (f"; not mapped: {'; '.join(skipped)}" if skipped else ""))
    all_recs.sort(key=lambda r: (r["date"] or "", r["run"]))
    out.unlink(missing_ok=True)
    records.append(out, all_recs)
    print(f"{len(all_recs)} records from {len(files)} files -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
