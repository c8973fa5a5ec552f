"""Command line: `python -m ultramem.train --config NAME_OR_PATH [--dry-run] [--section.key=value ...]`.

Also runs under `torchrun --nproc_per_node N -m ultramem.train ...`. `--dry-run` builds the model
on the meta device, prints its parameter / FLOP / memory summary and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ultramem.config import ConfigError


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ultramem.train",
        description="Train an ultramem language model. Any --section.key=value after the known "
                    "options overrides a config value (e.g. --model.memory.knn=16).")
    parser.add_argument("--config", default=None,
                        help="packaged config name (e.g. 227m or debug.toml) or path to a TOML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, print its summary, exit")
    args, rest = parser.parse_known_args(argv)
    _setup_logging()
    from ultramem.train.config import load_config

    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")

    if args.dry_run:
        from ultramem.model import build_model
        from ultramem.train.summary import format_summary, summarize

        model = build_model(cfg.model, device="meta")
        # the CLI's output is the summary itself, so it goes to stdout as plain text
        print(format_summary(summarize(model, cfg.model, cfg.train.seq_len), cfg.model))
        return 0

    from ultramem.train.trainer import run_training

    try:
        run_training(cfg)
    except (ConfigError, FileNotFoundError) as e:  # bad input found late (e.g. a data shard): no traceback
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
