"""The op fuzzer (op_fuzz.py) in the suite: random cases of every op on the CPU kernels and, under
Triton's interpreter, on the Triton kernels, against float64 formulas. Its report (cases run, the
worst error per op, backend and dtype) is printed with -s; see fuzz_settings.py for the modes.

The fuzzer runs in a subprocess with TRITON_INTERPRET=1: the variable must be set before Triton
is imported, which the rest of the suite has done by then.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import subproc
from fuzz_settings import LONG, OPS, REPO, SEED, write_report

HERE = REPO / "tests" / "fuzz"
MIN_CASES = 20000 if LONG else 500


@pytest.mark.timeout(int(OPS["seconds"]) + 600)
def test_op_fuzz(tmp_path):
    try:
        import triton  # noqa: F401

        triton_cases = OPS["triton_cases"]
    except ImportError:  # a CPU-only install: the CPU kernels alone
        triton_cases = 0
    out = tmp_path / "ops.json"
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        str(HERE / "op_fuzz.py"),
        "--seed",
        str(SEED),
        "--cases",
        str(OPS["cases"]),
        "--triton-cases",
        str(triton_cases),
        "--seconds",
        str(OPS["seconds"]),
        "--report",
        str(out),
    ]
    proc = subproc.run(cmd, timeout=OPS["seconds"] + 500, cwd=REPO, env=env)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    print()
    print(proc.stdout.strip())
    print(
        f"op fuzz: {'stopped by the time cap' if report['stopped_by_time'] else 'all planned cases run'} "
        f"({report['done']} of {report['planned']}) in {report['seconds']} s; seed {SEED}; "
        f"rerun one case: python tests/fuzz/op_fuzz.py --case SEED:INDEX[:triton]"
    )
    write_report("ops", report)
    failures = report["failures"]
    assert not failures, "\n".join(json.dumps(f)[:1500] for f in failures[:5])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["cases"] >= MIN_CASES or (LONG and report["stopped_by_time"]), report["done"]
