"""Command line: `python -m ultramem.train --config NAME_OR_PATH [--dry-run] [--section.key=value ...]`.

Also runs under `torchrun --nproc_per_node N -m ultramem.train ...`. `--dry-run` builds the model
on the meta device, prints its parameter / FLOP / memory summary and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ultramem.config import ConfigError


def _setup_logging() -> None:
    from ultramem.train.metrics import LOG_DATEFMT, LOG_FORMAT

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, format=LOG_FORMAT, datefmt=LOG_DATEFMT
    )


def _exit(parser: argparse.ArgumentParser, code: int, message: str, run_dir: Path | None) -> None:
    """One line on stderr, and in the run's train.log when it has one (the console has it once),
    unless another run holds that directory: its log is its own."""
    log_file = run_dir / "train.log" if run_dir is not None else None
    if log_file is not None and log_file.is_file() and os.environ.get("RANK", "0") == "0":
        from ultramem.train.metrics import run_log_handler
        from ultramem.train.trainer import RunDirLock

        lock = RunDirLock(log_file.parent)
        if lock.acquire() is None:
            handler = run_log_handler(log_file)
            handler.emit(logging.LogRecord("ultramem.train", logging.ERROR, __file__, 0, message, None, None))
            handler.close()
            lock.release()
    parser.exit(code, f"{_prefix()}{message}\n")


def _keys_epilog() -> str:
    from ultramem.train.config import config_help

    rows = config_help()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in the TOML file, or override with --section.key=value):", ""]
    section = None
    for key, default, meaning in rows:
        top = key.split(".")[0]
        if top != section:
            if section is not None:
                lines.append("")
            section = top
        lines.append(f"  {key:<{width}}  {default:<14} {meaning}")
    return "\n".join(lines)


def _prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ultramem.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an ultramem language model, alone or under torchrun. Any --section.key=value after "
        "the known options overrides a config value (e.g. --model.memory.knn=16).",
        epilog=_keys_epilog(),
    )
    parser.add_argument(
        "--config", default=None, help="packaged config name (e.g. 227m or debug.toml) or path to a TOML file"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="build the model on the meta device, print its summary, exit"
    )
    parser.add_argument(
        "--resume",
        metavar="PATH",
        default=None,
        help="resume from this checkpoint (or the latest in this directory or run directory); by default a run "
        "resumes from the latest checkpoint in its own run directory",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if the run directory has checkpoints (the new run removes them at its first save)",
    )
    args, rest = parser.parse_known_args(argv)
    _setup_logging()
    from ultramem.train.config import load_config

    if args.config is None:
        parser.exit(
            2, f"{_prefix()}config error: --config is required (packaged: debug.toml, 227m.toml, ...; see --help)\n"
        )
    if args.resume is not None and args.no_resume:
        parser.exit(2, f"{_prefix()}config error: --resume {args.resume!r} and --no-resume: choose one\n")
    if args.resume is not None and not args.resume.strip():  # an unset shell variable: not a fresh start
        parser.exit(2, f"{_prefix()}config error: --resume needs a checkpoint path, got an empty one\n")
    if args.resume is not None:
        rest = rest + [f"--run.resume={args.resume}"]
    if args.no_resume:
        rest = rest + ["--run.resume="]
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        parser.exit(2, f"{_prefix()}config error: {e}\n")
    if not cfg.run.dir:
        from ultramem.train.config import default_run_dir

        cfg.run.dir = default_run_dir(args.config)

    if args.dry_run:
        from ultramem.model import build_model
        from ultramem.train.summary import format_summary, summarize

        model = build_model(cfg.model, device="meta")
        # the CLI's output is the summary itself, so it goes to stdout as plain text
        print(format_summary(summarize(model, cfg.model, cfg.train.seq_len), cfg.model))
        return 0

    from ultramem.train.checkpoint import CheckpointError, CheckpointWriteError
    from ultramem.train.trainer import TrainingDiverged, output_dirs, run_trainer

    run_dir = output_dirs(cfg)[0]
    try:
        trainer = run_trainer(cfg)
    except (ConfigError, FileNotFoundError, CheckpointError) as e:  # bad input found late: no traceback
        _exit(parser, 2, f"error: {e}", run_dir)
    except CheckpointWriteError as e:
        _exit(parser, 1, f"error: {e}", run_dir)
    except TrainingDiverged as e:
        _exit(parser, 3, f"error: training diverged: {e}", run_dir)
    except KeyboardInterrupt:
        parser.exit(130, f"{_prefix()}interrupted\n")
    # stopped by a signal after its checkpoint: the shell's code for that signal, not "done"
    return 128 + trainer.stopped_by if trainer.stopped_by else 0


if __name__ == "__main__":
    sys.exit(main())
