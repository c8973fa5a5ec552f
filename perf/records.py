"""The results log: one JSON object per line, one line per measurement (perf/results/README.md).

A record (every key is always there, null when it does not apply):

    schema        1
    run           one invocation of `python -m perf run` (or "legacy/<file>" for converted results)
    commit        the measured revision (full hash where known), dirty: uncommitted changes or null
    date          ISO 8601, UTC
    device, torch, triton
    suite         "op" | "layer" | "e2e"
    bench         what was measured, e.g. "weighted_lookup_fwd", "layer_fwd_bwd", "trainer_227m"
    shape, variant
    time, unit    the time and its unit, "us" (ops) or "ms" (layers, training steps)
    frac_of_copy  minimum bytes / time / copy bandwidth of the same run (benches that count bytes)
    tokens_per_s  end-to-end training throughput
    small         smoke-run shapes: checks that the bench runs, says nothing about speed
    reference     the authors' published numbers, repeated in every op run; not measured here
    note, error   free text; error: the measurement failed (time is then null)
    extra         whatever else the bench reports (bytes, GB/s, rel_err, MFU, loss curve, ...);
                  measured records' extra has `host`, the CPU model and the cores usable
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import secrets
import subprocess

SCHEMA = 1
ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_LOG = ROOT / "perf" / "results" / "log.jsonl"
KEYS = (
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
)


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def resolve_commit(rev: str) -> str | None:
    """Full hash of a revision name (HEAD~1, a short hash, a branch), or None outside a checkout."""
    return _git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}")


def commit_date(rev: str) -> str | None:
    out = _git("show", "-s", "--format=%cI", rev)
    if not out:
        return None
    return datetime.datetime.fromisoformat(out).astimezone(datetime.timezone.utc).isoformat(timespec="seconds")


def current_commit() -> tuple[str, bool | None]:
    """(commit, dirty). ULTRAMEM_GIT_REV wins: the GPU machine gets a copy of the tree without .git."""
    env = os.environ.get("ULTRAMEM_GIT_REV")
    if env:
        return resolve_commit(env) or env, None
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown", None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head, (bool(status) if status is not None else None)


def host() -> str:
    """The CPU that launched the work and the cores this process may use: host-bound timings
    (compiled code without CUDA graphs) differ between machines of one GPU kind."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def environment() -> dict:
    """Commit, date, device, host and versions shared by every record of one run."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = current_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "run": f"{now:%Y%m%dT%H%M%SZ}-{commit[:7]}-{secrets.token_hex(2)}",
        "commit": commit,
        "dirty": dirty,
        "date": now.isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "host": host(),
    }


def record(
    env: dict,
    suite: str,
    bench: str,
    shape: str,
    variant: str,
    *,
    time: float | None = None,
    unit: str | None = None,
    frac_of_copy: float | None = None,
    tokens_per_s: float | None = None,
    small: bool = False,
    reference: bool = False,
    note: str | None = None,
    error: str | None = None,
    extra: dict | None = None,
) -> dict:
    if time is not None and unit not in ("us", "ms"):
        raise ValueError(f"a time needs its unit, 'us' or 'ms' (got {unit!r})")
    rec = {
        "schema": SCHEMA,
        **{k: env.get(k) for k in ("run", "commit", "dirty", "date", "device", "torch", "triton")},
        "suite": suite,
        "bench": bench,
        "shape": shape,
        "variant": variant,
        "time": _round(time),
        "unit": unit if time is not None else None,
        "frac_of_copy": _round(frac_of_copy, 4),
        "tokens_per_s": _round(tokens_per_s, 1),
        "small": bool(small),
        "reference": bool(reference),
        "note": note,
        "error": error,
        # the host goes with measurements, not with the authors' published numbers
        "extra": ({} if reference or not env.get("host") else {"host": env["host"]}) | (extra or {}),
    }
    return rec


def _round(x, digits: int = 3):
    if x is None or x != x:  # NaN: the measurement did not happen
        return None
    return round(float(x), digits)


def append(path: str | os.PathLike, records: list[dict]) -> None:
    """Append whole lines (a run stopped midway keeps what it finished)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")


def read(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not a JSON line ({exc})") from None
    return out
