"""The GPU benchmark script runs end to end on CPU (Triton interpreter, tiny shapes): its
modules' float64 checks pass and it writes its JSON. Timings are meaningless here; the point
is that the script the GPU evidence comes from does not rot."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["table_scatter", "staged_flush"])
def test_bench_ops_small_runs_and_checks(module, tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "perf/bench_ops.py", "--small", "--only", module, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["modules_done"] == [module]
    assert result["checks"] and all(c["ok"] for c in result["checks"])
    rows = [r for r in result["rows"] if r["op"] == module]
    assert rows and not any(r.get("error") for r in result["rows"])
