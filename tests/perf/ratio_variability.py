"""How much the timing ratios of test_timing_ratios.py move from run to run on this machine.

    OMP_NUM_THREADS=1 python tests/perf/ratio_variability.py [--repeats 10] [--pairs 30]

Measures every ratio `--repeats` times (the compiled-layer one on the trainer's compiled step,
built once) and prints, per ratio, the values of both statistics (median of paired ratios,
ratio of minima), their median and their spread max/min. The margins in budgets.toml come
from these spreads: a budget must sit above the slowest value seen, and below twice the
typical one, so that a 2× slower candidate fails."""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from perf_harness import build_compiled_trainer, load_budgets  # noqa: E402
from perf_ratios import geometric_spread, measure_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=None, help="pairs per measurement (default: the tests')")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled-layer ratio (no compile)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the raw values here")
    args = ap.parse_args()
    budgets = load_budgets()["timing"]
    pairs = args.pairs or budgets["pairs"]
    trainer = None
    if not args.no_compiled:
        t0 = time.perf_counter()
        trainer = build_compiled_trainer()
        trainer.train_step()  # compiles
        print(f"trainer compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, dict[str, list[float]]] = {}
    for i in range(args.repeats):
        t0 = time.perf_counter()
        for name, r in measure_all(trainer, pairs).items():
            runs.setdefault(name, {"ratio": [], "ratio_of_minima": []})
            runs[name]["ratio"].append(r.value)
            runs[name]["ratio_of_minima"].append(r.of_minima)
        print(f"repeat {i + 1}/{args.repeats}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\n{'ratio':34s} {'stat':16s} {'median':>7s} {'min':>7s} {'max':>7s} {'spread':>7s} {'budget':>7s}")
    for name, stats in runs.items():
        for stat, values in stats.items():
            budget = budgets.get(name, {}).get("max", float("nan")) if stat == "ratio" else float("nan")
            print(
                f"{name:34s} {stat:16s} {statistics.median(values):7.3f} {min(values):7.3f} {max(values):7.3f} "
                f"{geometric_spread(values):7.3f} {budget:7.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
