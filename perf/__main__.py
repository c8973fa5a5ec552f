"""python -m perf run | compare | plot, from the repository root.

    python -m perf run [--small] [--only op,layer,e2e] [--log perf/results/log.jsonl]
    python -m perf compare A B [--threshold 0.1]      # A, B: commits, log files or filters
    python -m perf plot [--log perf/results/log.jsonl] [--out perf/plots]

Each command has --help. The results log's format is in perf/records.py and perf/results/README.md.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "run": "perf.run",
    "compare": "perf.compare",
    "plot": "perf.plot",
    "convert-legacy": "perf.legacy",  # one-off: how the old per-run JSON files became log records
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
