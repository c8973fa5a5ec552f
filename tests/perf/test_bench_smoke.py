"""The GPU benchmark suite runs end to end on CPU (Triton interpreter, tiny shapes) and appends to
a results log; `compare` fails on a regression. Timings are meaningless here; the point is that
the commands the GPU evidence comes from do not rot."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = {
    "schema",
    "run",
    "commit",
    "dirty",
    "date",
    "device",
    "torch",
    "triton",
    "suite",
    "bench",
    "shape",
    "variant",
    "time",
    "unit",
    "frac_of_copy",
    "tokens_per_s",
    "small",
    "reference",
    "note",
    "error",
    "extra",
}


def _perf(*args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    env.pop("OUT", None)
    return subprocess.run(
        [sys.executable, "-m", "perf", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _read(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_small_appends_op_layer_e2e_records(tmp_path):
    pytest.importorskip("triton")
    log = tmp_path / "log.jsonl"
    earlier = {"schema": 1, "note": "a line from an earlier run"}
    log.write_text(json.dumps(earlier) + "\n")
    # two short op modules (the others: python -m perf run --small --only op)
    proc = _perf(
        "run",
        "--small",
        "--only",
        "op,layer,e2e",
        "--benches",
        "staged_flush,layer_stats",
        "--log",
        str(log),
        "--work",
        str(tmp_path / "work"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = _read(log)
    assert lines[0] == earlier  # appended, not rewritten
    recs = lines[1:]
    assert all(set(r) == KEYS for r in recs)
    assert len({r["run"] for r in recs}) == 1 and all(r["commit"] and r["date"] for r in recs)
    assert {r["suite"] for r in recs} == {"op", "layer", "e2e"}
    assert not any(r["error"] for r in recs)
    measured = [r for r in recs if not r["reference"]]
    assert all(r["small"] for r in measured)
    assert all(r["extra"]["host"].endswith(" cores") for r in measured)
    assert not any("host" in r["extra"] for r in recs if r["reference"])

    by = {(r["bench"], r["variant"]): r for r in recs}
    staged = [r for r in measured if r["bench"] == "staged_flush"]
    assert staged and all(r["unit"] == "us" and r["time"] > 0 for r in staged)
    assert {r["variant"] for r in measured if r["bench"] == "layer_stats"} == {"triton", "reference, eager"}
    checks = by[("float64_checks", "all modules run")]
    assert checks["extra"]["total"] > 0 and checks["extra"]["passed"] == checks["extra"]["total"]
    assert by[("device_copy", "torch copy_ (event-timed)")]["frac_of_copy"] == 1.0
    ref = by[("weighted_lookup_fwd", "authors-cuda")]
    assert ref["reference"] and ref["time"] == 60.9 and "not re-measured" in ref["note"]

    layer = by[("layer_fwd_bwd", "layer_eager")]
    assert layer["unit"] == "ms" and layer["time"] > 0 and ("layer_fwd_bwd", "ffn_eager") in by

    v2, dense = by[("trainer", "v2-graphs")], by[("trainer", "dense-graphs")]
    assert v2["tokens_per_s"] > 0 and dense["tokens_per_s"] > 0
    assert v2["extra"]["vs_dense"] == pytest.approx(v2["tokens_per_s"] / dense["tokens_per_s"], rel=1e-3)
    assert len(v2["extra"]["loss_curve"]) == 3


def test_layer_stack_runs_every_layer_and_its_records_are_per_layer():
    import torch

    from perf import gpu_e2e, legacy

    torch.manual_seed(0)
    result: dict = {}
    gpu_e2e.time_layer_stack(result, small=True)
    rows = result["layer_stack_227m"]
    assert rows["layers"] == gpu_e2e.load_config("debug.toml").model.n_layers > 1
    assert rows["stack_layer_fwd_bwd_ms"] > 0 and rows["stack_ffn_fwd_bwd_ms"] > 0
    env = {"device": "cpu", "torch": "t", "triton": "t", "git_revision": "abc", "date": "2026-12-05T00:00:00+00:00"}
    recs, _ = legacy.convert("e2e", {**env, **result})
    by = {r["variant"]: r for r in recs}
    assert set(by) == {"stack_layer", "stack_ffn"}
    assert by["stack_layer"]["time"] == pytest.approx(rows["stack_layer_fwd_bwd_ms"], rel=1e-3)
    assert by["stack_layer"]["note"].startswith(f"per layer, {rows['layers']} layers")


def _rec(commit: str, bench: str, variant: str, **fields) -> dict:
    rec = {k: None for k in KEYS}
    rec.update(
        schema=1,
        run=f"r-{commit}",
        commit=commit * 10,
        date=f"2026-12-0{1 if commit == 'a' else 2}",
        device="NVIDIA H200",
        suite="op",
        bench=bench,
        shape="T=12288",
        variant=variant,
        small=False,
        reference=False,
        extra={},
    )
    rec.update(fields)
    return rec


def _log(path: pathlib.Path, recs: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_compare_exits_nonzero_on_a_planted_regression(tmp_path):
    base = [
        _rec("a", "weighted_lookup_fwd", "ours", time=43.0, unit="us"),
        _rec("a", "gate_lookup_fwd", "ours", time=82.0, unit="us"),
        _rec("a", "trainer", "v2-graphs", suite="e2e", tokens_per_s=160000.0),
        _rec("a", "weighted_lookup_fwd", "authors-cuda", time=60.9, unit="us", reference=True),
    ]
    same = [dict(r, commit="b" * 40, run="r-b", date="2026-12-02") for r in base]
    slower = [dict(r, time=50.0) if r["variant"] == "ours" and r["bench"] == "weighted_lookup_fwd" else r for r in same]
    fewer_tokens = [dict(r, tokens_per_s=120000.0) if r["suite"] == "e2e" else r for r in same]
    a = _log(tmp_path / "a.jsonl", base)

    proc = _perf("compare", str(a), str(_log(tmp_path / "same.jsonl", same)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 measurements in common" in proc.stdout  # the reference row is not compared

    proc = _perf("compare", str(a), str(_log(tmp_path / "slower.jsonl", slower)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSED" in proc.stdout and "+16.3%" in proc.stdout
    assert _perf("compare", str(a), str(tmp_path / "slower.jsonl"), "--threshold", "0.2").returncode == 0

    proc = _perf("compare", str(a), str(_log(tmp_path / "tokens.jsonl", fewer_tokens)))
    assert proc.returncode == 1 and "-25.0%" in proc.stdout, proc.stdout + proc.stderr

    # commits selected within one log; a measurement that now fails counts as a regression
    failing = [
        dict(r, time=None, unit=None, error="RuntimeError") if r["bench"] == "gate_lookup_fwd" else r for r in same
    ]
    both = _log(tmp_path / "both.jsonl", base + failing)
    proc = _perf("compare", "aaaaaaa", "bbbbbbb", "--log", str(both))
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout + proc.stderr
    proc = _perf("compare", "commit=aaaa*,suite=e2e", "commit=bbbb,suite=e2e", "--log", str(both))
    assert proc.returncode == 0 and "1 measurements in common" in proc.stdout, proc.stdout + proc.stderr

    proc = _perf("compare", str(a), str(_log(tmp_path / "cpu.jsonl", [dict(r, device="cpu") for r in same])))
    assert proc.returncode == 2 and "no measurement in common" in proc.stdout


def test_plot_draws_the_pngs_from_the_committed_log(tmp_path):
    pytest.importorskip("matplotlib")
    proc = _perf("plot", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "e2e_vs_dense.png",
        "layer.png",
        "loss_curves.png",
        "ops_vs_authors.png",
    ]


def test_gpu_waits_charges_each_gap_to_the_range_that_launched_the_next_kernel():
    from perf.diagnostics.train_step_profile import gpu_waits

    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    trace = {
        "traceEvents": [
            x("cpu_op", "region", 0, 1000),
            x("cpu_op", "ultramem::op", 100, 300),
            x("cuda_runtime", "cuLaunchKernel", 150, 10, correlation=1),
            x("cuda_runtime", "cuLaunchKernel", 500, 10, correlation=2),  # in the region only
            x("kernel", "k1", 200, 50, correlation=1),
            x("kernel", "k2", 600, 50, correlation=2),  # 350 us after k1 ends
            x("kernel", "k3", 660, 50, correlation=3),  # a 10 us gap: under min_us
        ]
    }
    outer, inner = gpu_waits(trace), gpu_waits(trace, innermost=True)
    assert outer["span_ms"] == pytest.approx(0.51) and outer["gaps_ms"] == pytest.approx(0.35)
    assert outer["by_range"] == [{"range": "region", "gap_ms": 0.35, "gaps": 1}]
    assert inner["by_range"] == [{"range": "region", "gap_ms": 0.35, "gaps": 1}]
    trace["traceEvents"][3]["ts"] = 300  # now launched inside the op
    assert gpu_waits(trace, innermost=True)["by_range"][0]["range"] == "ultramem::op"
    assert gpu_waits(trace)["by_range"][0]["range"] == "region"
