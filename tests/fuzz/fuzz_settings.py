"""Settings shared by the fuzz tests: the mode (ULTRAMEM_FUZZ), the seed and the report file.

ULTRAMEM_FUZZ=ci (default)  a fixed seed, sized for the suite (well under 2 minutes)
ULTRAMEM_FUZZ=long          a different seed and many more cases (tens of minutes; e.g.
                            `ULTRAMEM_FUZZ=long nice python -m pytest tests/fuzz -q -s &`)
ULTRAMEM_FUZZ_SEED=N        another seed
ULTRAMEM_FUZZ_SECONDS=S     the op fuzzer's wall-time cap (it stops early and reports)
ULTRAMEM_FUZZ_REPORT=path   also write the reports there (JSON, one section per test)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MODE = os.environ.get("ULTRAMEM_FUZZ", "ci").strip().lower() or "ci"
if MODE not in ("ci", "long"):
    raise ValueError(f"ULTRAMEM_FUZZ={MODE!r}: must be 'ci' or 'long'")
LONG = MODE == "long"
SEED = int(os.environ.get("ULTRAMEM_FUZZ_SEED", "1" if LONG else "0"))

# op fuzzer: cases on the CPU kernels, on the Triton kernels (interpreter), wall-time cap
OPS = dict(cases=24000, triton_cases=2400, seconds=38 * 60) if LONG else dict(cases=600, triton_cases=40, seconds=60)
OPS["seconds"] = float(os.environ.get("ULTRAMEM_FUZZ_SECONDS", OPS["seconds"]))
# layer fuzzer: valid configs run, invalid configs refused, configs compiled (aot_eager)
LAYERS = dict(valid=3000, invalid=2000, compiled=8) if LONG else dict(valid=60, invalid=60, compiled=2)

REPO = Path(__file__).resolve().parents[2]


def write_report(section: str, data: dict) -> None:
    """Merge `data` under `section` into the ULTRAMEM_FUZZ_REPORT file, when one is named."""
    path = os.environ.get("ULTRAMEM_FUZZ_REPORT")
    if not path:
        return
    try:
        with open(path) as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        report = {}
    report[section] = dict(data, mode=MODE, seed=SEED)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
