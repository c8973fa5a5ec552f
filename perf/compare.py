"""`python -m perf compare A B`: the measurements A and B have in common, side by side; exits 1
when any of them got worse than A by more than the threshold (time up, or tokens/s down).

A and B each select records. A selection is one or more terms joined by commas:
  a commit            7529ac6, HEAD, HEAD~1 (resolved by git), matched by prefix
  latest / previous   the newest commit in the log (by date) / the newest one before it
  a log file          any path to a .jsonl log (default: perf/results/log.jsonl, or --log)
  key=value           a filter on any record field, shell-style wildcards allowed:
                      device=*H200*, suite=op, bench=weighted_lookup*, run=20261205T*
e.g.  python -m perf compare 7529ac6 HEAD
      python -m perf compare old.jsonl new.jsonl --threshold 0.05
      python -m perf compare previous latest --only op

Records match on (suite, bench, shape, variant, device, small). Several records of one key on a
side (repeated runs) count as their median. The authors' reference rows are never compared.
Exit status: 0 no regression, 1 a regression (or a measurement that now fails), 2 nothing to
compare.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys

from . import records

KEY = ("suite", "bench", "shape", "variant", "device", "small")


def _same_commit(stored: str | None, wanted: str) -> bool:
    if not stored or stored == "unknown":
        return False
    n = min(len(stored), len(wanted))
    return n >= 4 and stored[:n] == wanted[:n]


def _by_date(recs: list[dict]) -> list[str]:
    """Commits, newest first (by their newest record)."""
    newest: dict[str, str] = {}
    for r in recs:
        if r.get("commit") and not r.get("reference"):
            newest[r["commit"]] = max(newest.get(r["commit"], ""), r.get("date") or "")
    return sorted(newest, key=newest.get, reverse=True)


def select(spec: str, default_log: str) -> tuple[list[dict], str]:
    """(records, a description) of one selection."""
    files = [t for t in spec.split(",") if t and os.path.isfile(t)]
    terms = [t for t in spec.split(",") if t and t not in files]
    recs = [r for path in (files or [default_log]) for r in records.read(path)]
    what = []
    for term in terms:
        if "=" in term:
            key, pattern = term.split("=", 1)
            if key not in records.KEYS:
                raise SystemExit(f"unknown field {key!r} in {term!r}; fields: {', '.join(records.KEYS)}")
            if key == "commit" and not any(c in pattern for c in "*?["):
                recs = [r for r in recs if _same_commit(r.get("commit"), records.resolve_commit(pattern) or pattern)]
            else:
                recs = [r for r in recs if fnmatch.fnmatchcase(str(r.get(key)), pattern)]
            what.append(term)
            continue
        if term in ("latest", "previous"):
            commits = _by_date(recs)
            index = 0 if term == "latest" else 1
            if len(commits) <= index:
                raise SystemExit(f"{term!r}: the selection has {len(commits)} commit(s)")
            commit = commits[index]
        else:
            commit = records.resolve_commit(term) or term
        recs = [r for r in recs if _same_commit(r.get("commit"), commit)]
        what.append(f"{term} ({commit[:12]})" if commit[:12] != term else term)
    return recs, " ".join([*files, *what]) or default_log


def _metric(r: dict) -> tuple[str, float] | None:
    """(metric, value): time (lower is better), else tokens/s (higher is better)."""
    if r.get("time") is not None:
        return f"time_{r['unit']}", r["time"]
    if r.get("tokens_per_s") is not None:
        return "tokens_per_s", r["tokens_per_s"]
    return None


def summarize(recs: list[dict]) -> dict:
    """{(key, metric): median value or None where every record of the key failed}."""
    values: dict[tuple, list[float]] = {}
    failed: set[tuple] = set()
    for r in recs:
        if r.get("reference"):
            continue
        key = tuple(r.get(k) for k in KEY)
        m = _metric(r)
        if m is None:
            if r.get("error"):
                failed.add(key)
            continue
        values.setdefault((key, m[0]), []).append(m[1])
    out = {k: statistics.median(v) for k, v in values.items()}
    for key in failed:  # a failed measurement where the same key has no value on this side
        if not any(k[0] == key for k in out):
            out[(key, None)] = None
    return out


def compare(a: dict, b: dict, threshold: float) -> list[dict]:
    rows = []
    for (key, metric), va in a.items():
        if va is None:
            continue
        if (key, metric) in b:
            vb = b[(key, metric)]
        elif (key, None) in b:
            vb = None  # measured in A, failed in B
        else:
            continue
        row = dict(zip(KEY, key), metric=metric, a=va, b=vb, change=None, status="")
        if vb is None:
            row["status"] = "FAILED"
        elif va > 0:
            change = (vb - va) / va
            worse = change if metric.startswith("time") else -change
            row["change"] = change
            row["status"] = "REGRESSED" if worse > threshold else ("improved" if worse < -threshold else "")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["suite"], r["bench"], r["shape"], r["variant"]))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def format_table(rows: list[dict], changes_only: bool) -> str:
    lines = []
    group = None
    for r in rows:
        if changes_only and not r["status"]:
            continue
        g = (r["suite"], r["bench"], r["shape"], r["device"], r["metric"])
        if g != group:
            unit = r["metric"].replace("time_", "") if r["metric"] else ""
            lines.append(
                f"\n{r['suite']} / {r['bench']}  [{r['shape']}]  {r['device']}"
                f"{' (small)' if r['small'] else ''}  {unit}"
            )
            group = g
        change = f"{100 * r['change']:+.1f}%" if r["change"] is not None else ""
        lines.append(f"  {r['variant'][:56]:<56} {_fmt(r['a']):>12} {_fmt(r['b']):>12} {change:>8}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("a", help="the baseline selection")
    parser.add_argument("b", help="the selection compared with it")
    parser.add_argument("--threshold", type=float, default=0.1, help="relative change counted (default 0.1 = 10%%)")
    parser.add_argument("--log", default=str(records.DEFAULT_LOG), help="log for selections without a file")
    parser.add_argument("--only", default=None, help="suites, comma-separated (op, layer, e2e)")
    parser.add_argument("--changes-only", action="store_true", help="list only rows past the threshold")
    args = parser.parse_args(argv)

    (ra, what_a), (rb, what_b) = select(args.a, args.log), select(args.b, args.log)
    if args.only:
        suites = set(args.only.split(","))
        ra, rb = [r for r in ra if r.get("suite") in suites], [r for r in rb if r.get("suite") in suites]
    rows = compare(summarize(ra), summarize(rb), args.threshold)
    print(f"A: {what_a}: {len(ra)} records\nB: {what_b}: {len(rb)} records")
    if not rows:
        devices = lambda rs: sorted({str(r.get("device")) for r in rs if not r.get("reference")})  # noqa: E731
        print(f"no measurement in common (devices: A {devices(ra)}, B {devices(rb)})")
        return 2
    print(f"{len(rows)} measurements in common; threshold {100 * args.threshold:.0f}%; columns: A, B, change")
    print(format_table(rows, args.changes_only))
    bad = [r for r in rows if r["status"] in ("REGRESSED", "FAILED")]
    better = sum(r["status"] == "improved" for r in rows)
    print(
        f"\n{len(bad)} regressed or failed, {better} improved, {len(rows) - len(bad) - better} within "
        f"{100 * args.threshold:.0f}%"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
