"""Like-for-like comparison: train several configs on the same token budget, validate them at the
same token counts, and tabulate and plot the results.

    python -m ultramem.compare --configs small-dense,small-moe,small-ultramem-v2 \\
        --tokens 16M --eval-every 1M --data data/sitepackages --out outputs/compare
    python -m ultramem.compare --configs small-ultramem-v2 --sweep optim.value_lr_mult=1,4 \\
        --tokens 16M --eval-every 1M --data data/sitepackages --out outputs/sweep-value-lr

Each config (and seed, and point of a --sweep) is trained by `python -m ultramem.train` (under
torchrun with --nproc > 1) in its own run directory DIR/<config>[-<key>-<value>...][-seed<k>],
with `train.max_steps` = ceil(tokens / tokens per step), tokens per step = batch_size · seq_len ·
grad_accum · nproc, and `train.eval_interval` = round(eval-every / tokens per step) steps.
Everything else comes from the config, --sweep and --extra.
The trainer's output goes to DIR/<run>/compare.log.

Written to DIR: results.md (a table), results.json (the same and every validation point),
loss_vs_tokens.png and loss_vs_time.png (validation loss against tokens trained and against
wall-clock time; PNGs need matplotlib, the `plot` extra).

Rerunning the same command skips the runs that finished; an interrupted or failed run is
started again and the trainer resumes it from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE_NAME = "compare.json"
LOG_NAME = "compare.log"
# keys the comparison sets itself; --extra may not
OWN_KEYS = ("train.max_steps", "train.eval_interval", "run.dir")
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


class CompareError(ValueError):
    """A comparison that cannot be planned; the message names the config and the rule."""


def parse_count(text: str) -> int:
    """'16000000', '16_000_000', '16M', '1.5k', '2e6' → an integer."""
    t = text.strip().replace("_", "").lower()
    mult = 1
    if t and t[-1] in _SUFFIXES:
        mult, t = _SUFFIXES[t[-1]], t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 16000000, 16M, 500k)") from None
    if value < 1 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return int(round(value))


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class RunPlan:
    name: str  # run directory name under --out
    config: str  # as given
    seed: int | None
    variant: str  # the name without the seed: what seeds are averaged over
    overrides: list[str]  # every --key=value passed to the trainer
    tokens_per_step: int
    max_steps: int
    eval_interval: int
    run_dir: Path
    cfg: object  # the resolved TrainConfig
    total_params: int = 0
    activated_params: int = 0

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step

    def command(self, nproc: int) -> list[str]:
        args = ["-m", "ultramem.train", "--config", self.config, *self.overrides]
        if nproc > 1:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(nproc),
                *args,
            ]
        return [sys.executable, *args]


def _config_stem(config: str) -> str:
    return Path(config).stem if config.endswith(".toml") else Path(config).name


def _name_part(value: str) -> str:
    """A swept value as part of a run directory's name: '/' and other path-unsafe characters
    (e.g. model.memory.insert=0:1/2:3) become '_'."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", value)


def plan_runs(
    configs: list[str],
    tokens: int,
    eval_every: int,
    out: Path,
    *,
    data: str | None = None,
    val_data: str | None = None,
    nproc: int = 1,
    extra: list[str] = (),
    seeds: list[int] | None = None,
    sweep: list[tuple[str, list[str]]] = (),
) -> list[RunPlan]:
    from ultramem.config import ConfigError
    from ultramem.model import build_model
    from ultramem.train.config import load_config, parse_overrides
    from ultramem.train.summary import summarize

    try:
        for key, _ in parse_overrides(list(extra)):
            if key in OWN_KEYS:
                raise CompareError(
                    f"--extra sets {key}, which the comparison sets itself (from --tokens, --eval-every, --out)"
                )
    except ConfigError as e:
        raise CompareError(f"--extra: {e}") from None
    swept = [key for key, _ in sweep]
    for key, values in sweep:
        if swept.count(key) > 1:
            raise CompareError(f"--sweep {key} is given twice; list all its values once: {key}=V1,V2,...")
        if key in OWN_KEYS:
            raise CompareError(f"--sweep {key}: the comparison sets it itself (from --tokens, --eval-every, --out)")
        if not values or len(set(values)) != len(values):
            raise CompareError(f"--sweep {key}={','.join(values)}: give distinct values, e.g. {key}=1,4")
    points = [[]]
    for key, values in sweep:
        points = [p + [(key, v)] for p in points for v in values]
    names = [_config_stem(c) for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CompareError(f"--configs names {', '.join(dupes)} twice: each config gets the run directory of its name")
    plans = []
    for (config, stem), point, seed in itertools.product(zip(configs, names), points, seeds or [None]):
        base = list(extra) + [f"--{key}={value}" for key, value in point]
        if data:
            base.append(f"--data.source={data}")
        if val_data:
            base.append(f"--data.val_source={val_data}")
        if seed is not None:
            base.append(f"--train.seed={seed}")
        variant = stem + "".join(f"-{key.rsplit('.', 1)[-1]}-{_name_part(value)}" for key, value in point)
        name = variant if seed is None else f"{variant}-seed{seed}"
        label = config + "".join(f" {key}={value}" for key, value in point)
        try:
            cfg0 = load_config(config, base, validate=False)
        except ConfigError as e:
            raise CompareError(f"config {label}: {e}") from None
        t = cfg0.train
        per_step = t.batch_size * t.seq_len * t.grad_accum * nproc
        steps = max(1, math.ceil(tokens / per_step))
        interval = max(1, round(eval_every / per_step))
        if cfg0.optim.warmup_steps > steps:
            raise CompareError(
                f"config {label}: {tokens:,d} tokens are {steps} steps of {per_step:,d} tokens, fewer than its "
                f"optim.warmup_steps={cfg0.optim.warmup_steps}; raise --tokens or pass --extra "
                f"'--optim.warmup_steps=N'"
            )
        run_dir = out / name
        overrides = base + [
            f"--train.max_steps={steps}",
            f"--train.eval_interval={interval}",
            f"--run.dir={run_dir}",
            "--metrics.progress=false",
        ]
        try:
            cfg = load_config(config, overrides)
        except ConfigError as e:
            raise CompareError(f"config {label}: {e}") from None
        s = summarize(build_model(cfg.model, device="meta"), cfg.model, cfg.train.seq_len)
        plans.append(
            RunPlan(
                name, config, seed, variant, overrides, per_step, steps, interval, run_dir, cfg, s.total, s.activated
            )
        )
    names = [p.name for p in plans]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise CompareError(
            f"two runs would share the directory {clash[0]!r}: give --sweep values that differ in letters or digits"
        )
    return plans


# ---------------------------------------------------------------------------------------------
# Running


def read_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, state: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_NAME}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, run_dir / STATE_NAME)


def _key_args(plan: RunPlan, nproc: int) -> list[str]:
    # what identifies a finished run: the trainer's arguments and the number of processes
    return [plan.config, *plan.overrides, f"nproc={nproc}"]


def is_done(plan: RunPlan, nproc: int) -> bool:
    state = read_state(plan.run_dir)
    if state.get("status") != "done" or state.get("args") != _key_args(plan, nproc):
        return False
    return any(r["step"] >= plan.max_steps for r in metric_records(plan.run_dir, "train"))


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def launch(plan: RunPlan, nproc: int, grace_s: float = 600.0) -> int:
    """Train one run to its end (the trainer resumes from the run directory's latest checkpoint)."""
    state = read_state(plan.run_dir)
    if state.get("args") not in (None, _key_args(plan, nproc)):
        log.info(
            "%s: the run there was started with other arguments; the trainer resumes it if its config allows", plan.name
        )
    segments = state.get("segments", [])  # earlier launches count in the run's wall-clock time
    cmd = plan.command(nproc)
    state = {
        "args": _key_args(plan, nproc),
        "command": cmd,
        "status": "running",
        "segments": segments,
        "max_steps": plan.max_steps,
        "tokens_per_step": plan.tokens_per_step,
    }
    write_state(plan.run_dir, state)
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(plan.run_dir / LOG_NAME, "a") as logf:
        logf.write(f"\n$ {shlex.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait()
        except BaseException:
            # a terminal's Ctrl-C reached the trainer too; SIGTERM covers a signal sent to us alone.
            # Either way the trainer saves a checkpoint and exits, and a rerun resumes it.
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            state["segments"].append([start, time.time()])
            state["status"] = "interrupted"
            write_state(plan.run_dir, state)
            raise
    state["segments"].append([start, time.time()])
    state["status"] = "done" if rc == 0 else "failed"
    state["returncode"] = rc
    write_state(plan.run_dir, state)
    return rc


# ---------------------------------------------------------------------------------------------
# Results


def metric_records(run_dir: Path, kind: str) -> list[dict]:
    """The run's metrics of `kind`, the last record of each step, in step order (a resumed run
    logs some steps again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if r.get("kind") == kind:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def steady_rate(rates: list[float]) -> float | None:
    """Median tokens/s after warm-up: the first fifth of the logged rates (at least one when
    there are two or more) covers compilation, CUDA-graph capture and cold caches."""
    if not rates:
        return None
    skip = max(1, len(rates) // 5) if len(rates) > 1 else 0
    return statistics.median(rates[skip:])


def elapsed_at(t: float, segments: list[list[float]]) -> float:
    """Seconds of the run's launches (start-up, compilation, evaluation included) before time t."""
    return sum(max(0.0, min(t, b) - a) for a, b in segments if t > a)


_train_tokens_cache: dict[tuple, int | None] = {}


def training_tokens(cfg) -> int | None:
    """Tokens in the run's training split (what one epoch is)."""
    from ultramem.data import load_token_splits

    d = cfg.data
    key = (d.source, d.vocab_size, d.max_corpus_bytes, d.val_fraction, d.val_source, d.cache_dir)
    if key not in _train_tokens_cache:
        try:
            kwargs = {"val_source": d.val_source} if d.val_source else {}
            splits = load_token_splits(
                d.source, d.vocab_size, d.max_corpus_bytes, d.val_fraction, d.cache_dir or None, **kwargs
            )
            _train_tokens_cache[key] = len(splits.train)
        except (OSError, ValueError) as e:
            log.warning("cannot count the training tokens of data.source=%r: %s", d.source, e)
            _train_tokens_cache[key] = None
    return _train_tokens_cache[key]


@dataclass
class RunResult:
    name: str
    config: str
    seed: int | None
    variant: str
    run_dir: str
    status: str
    total_params: int
    activated_params: int
    tokens_per_step: int
    max_steps: int
    steps: int
    tokens: int
    train_tokens: int | None
    epochs: float | None
    tokens_per_s: float | None
    wall_s: float
    final_val_loss: float | None
    best_val_loss: float | None
    best_val_tokens: int | None
    command: list[str] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)  # {step, tokens, seconds, loss}


def collect(plan: RunPlan, nproc: int) -> RunResult:
    state = read_state(plan.run_dir)
    segments = state.get("segments", [])
    train = [r for r in metric_records(plan.run_dir, "train") if r["step"] <= plan.max_steps]
    val = [r for r in metric_records(plan.run_dir, "val") if r["step"] <= plan.max_steps]
    t0 = segments[0][0] if segments else (train[0]["time"] if train else 0.0)
    points = [
        {
            "step": r["step"],
            "tokens": r["step"] * plan.tokens_per_step,
            "seconds": elapsed_at(r["time"], segments) if segments else r["time"] - t0,
            "loss": r["val/loss"],
        }
        for r in val
    ]
    steps = train[-1]["step"] if train else 0
    tokens = steps * plan.tokens_per_step
    avail = training_tokens(plan.cfg) if steps else None
    finite = [p for p in points if math.isfinite(p["loss"])]
    best = min(finite, key=lambda p: p["loss"]) if finite else None
    return RunResult(
        plan.name,
        plan.config,
        plan.seed,
        plan.variant,
        str(plan.run_dir),
        state.get("status", "not run"),
        plan.total_params,
        plan.activated_params,
        plan.tokens_per_step,
        plan.max_steps,
        steps,
        tokens,
        avail,
        tokens / avail if avail else None,
        steady_rate([r["train/tokens_per_s"] for r in train]),
        sum(b - a for a, b in segments),
        points[-1]["loss"] if points else None,
        best["loss"] if best else None,
        best["tokens"] if best else None,
        state.get("command", []),
        points,
    )


def _num(n: float | None, spec: str = ",d") -> str:
    return "–" if n is None else format(n, spec)


def _params(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,d}"


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def results_markdown(results: list[RunResult], meta: dict) -> str:
    lines = [
        f"# Comparison: {meta['tokens']:,d} tokens per run, validation every {meta['eval_every']:,d} tokens",
        "",
        f"Data: {meta['data']}"
        + (f"; validation: {meta['val_data']}" if meta.get("val_data") else "")
        + f". Processes per run: {meta['nproc']}."
        + (f" Extra overrides: `{meta['extra']}`." if meta["extra"] else "")
        + "".join(f" Swept: `{key}` = {', '.join(values)}." for key, values in (meta.get("sweep") or {}).items()),
        "",
        "| run | total params | activated params | tokens | epochs | tokens/s | wall | final val loss "
        "| best val loss (at tokens) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        best = f"{r.best_val_loss:.4f} ({r.best_val_tokens:,d})" if r.best_val_loss is not None else "–"
        lines.append(
            f"| {r.name} | {_params(r.total_params)} | {_params(r.activated_params)} | {r.tokens:,d} | "
            f"{_num(r.epochs, '.3g')} | {_num(r.tokens_per_s, ',.0f')} | {_duration(r.wall_s)} | "
            f"{_num(r.final_val_loss, '.4f')} | {best} | {r.status} |"
        )
    by_variant: dict[str, list[RunResult]] = {}
    for r in results:
        by_variant.setdefault(r.variant, []).append(r)
    if any(len(rs) > 1 for rs in by_variant.values()):
        lines += [
            "",
            "Over seeds (mean ± standard deviation of the final validation loss):",
            "",
            "| run | seeds | final val loss |",
            "|---|---:|---:|",
        ]
        for variant, rs in by_variant.items():
            vals = [r.final_val_loss for r in rs if r.final_val_loss is not None]
            spread = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
            shown = f"{statistics.mean(vals):.4f}{spread}" if vals else "–"
            lines.append(f"| {variant} | {len(vals)} | {shown} |")
    lines += [
        "",
        "- *activated params*: per token (dense weights, the table rows a token reads, the routed experts it "
        "runs), with the embedding; *total params*: every weight. From `python -m ultramem.train --dry-run`.",
        "- *epochs*: tokens trained / tokens in the training split. Above 1 the models see data again, and "
        "the memory models' value tables can memorize it: compare at one epoch or less.",
        "- *tokens/s*: median of the trainer's logged rates after the first fifth of them (warm-up), "
        "evaluation and checkpoints excluded; *wall*: the whole run, start-up and evaluation included.",
        "- *val loss*: the trainer's validation loss (LM cross-entropy, no auxiliary losses) on "
        "`train.eval_batches` fixed batches of the held-out split.",
    ]
    return "\n".join(lines) + "\n"


def write_plots(results: list[RunResult], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'ultramem[plot]')")
        return []
    written = []
    for name, key, label in (
        ("loss_vs_tokens.png", "tokens", "tokens trained"),
        ("loss_vs_time.png", "seconds", "wall-clock time (s)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in results:
            if r.val:
                ax.plot([p[key] for p in r.val], [p["loss"] for p in r.val], marker="o", markersize=3, label=r.name)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"validation loss vs {label.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        if any(r.val for r in results):
            ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, format="png")
        plt.close(fig)
        written.append(path)
    return written


def write_results(results: list[RunResult], out: Path, meta: dict) -> None:
    from dataclasses import asdict

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(results_markdown(results, meta))
    (out / "results.json").write_text(json.dumps({**meta, "runs": [asdict(r) for r in results]}, indent=1) + "\n")
    write_plots(results, out)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ultramem.compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--configs",
        required=True,
        help="comma-separated packaged config names or TOML paths (e.g. small-dense,small-moe)",
    )
    p.add_argument("--tokens", required=True, type=parse_count, help="training tokens per run (16000000, 16M)")
    p.add_argument(
        "--eval-every",
        required=True,
        type=parse_count,
        metavar="TOKENS",
        help="validate every this many training tokens (and at the end)",
    )
    p.add_argument("--out", required=True, help="directory for the runs and the results")
    p.add_argument("--data", help="data.source for every run (default: each config's own)")
    p.add_argument(
        "--val-data", help="data.val_source for every run (default: data.val_fraction of the data, see data.val_split)"
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help='more overrides for every run, e.g. --extra "--train.compile=false --optim.warmup_steps=20" '
        "(may be repeated)",
    )
    p.add_argument("--seeds", help="comma-separated train.seed values: each config runs once per seed")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="run each config once per value of a config key, e.g. --sweep optim.value_lr_mult=1,4 "
        "(repeat for a grid; run directories get -<last part of key>-<value>)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, parameters) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse takes a value that starts with "--" for an option: "--extra VALUE" → "--extra=VALUE"
    i = 0
    while i < len(argv) - 1:
        if argv[i] == "--extra":
            argv[i : i + 2] = [f"--extra={argv[i + 1]}"]
        i += 1
    args = parser.parse_args(argv)
    args.extra = " ".join(args.extra)
    from ultramem.eval import _cli_logging  # one logging set-up for both commands

    with _cli_logging():
        return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ultramem.data.shards import file_in_the_way

    out = Path(args.out).expanduser()
    blocker = file_in_the_way(out)
    if blocker is not None:
        parser.exit(2, f"error: --out {args.out!r}: {str(blocker)!r} is a file, not a directory\n")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs:
        parser.exit(2, "error: --configs names no config\n")
    if args.nproc < 1:
        parser.exit(2, f"error: --nproc {args.nproc} must be >= 1\n")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        parser.exit(2, f"error: --seeds {args.seeds!r}: comma-separated integers\n")
    sweep = []
    for item in args.sweep:
        key, eq, values = item.partition("=")
        if not eq or not key.strip() or not values.strip():
            parser.exit(2, f"error: --sweep {item!r}: write KEY=V1,V2,... (e.g. optim.value_lr_mult=1,4)\n")
        sweep.append((key.strip().removeprefix("--"), [v.strip() for v in values.split(",") if v.strip()]))
    for what, path in (("--data", args.data), ("--val-data", args.val_data)):
        if path and path != "stdlib" and not Path(path).expanduser().exists():
            parser.exit(2, f"error: {what} {path!r}: no such file or directory\n")
    try:
        plans = plan_runs(
            configs,
            args.tokens,
            args.eval_every,
            out,
            data=args.data,
            val_data=args.val_data,
            nproc=args.nproc,
            extra=shlex.split(args.extra),
            seeds=seeds,
            sweep=sweep,
        )
    except CompareError as e:
        parser.exit(2, f"error: {e}\n")
    for plan in plans:
        print(
            f"{plan.name}: {plan.max_steps} steps × {plan.tokens_per_step:,d} tokens = {plan.tokens:,d} tokens, "
            f"validation every {plan.eval_interval} steps; {_params(plan.activated_params)} activated / "
            f"{_params(plan.total_params)} total parameters → {plan.run_dir}",
            flush=True,
        )
    if args.dry_run:
        return 0
    meta = {
        "tokens": args.tokens,
        "eval_every": args.eval_every,
        "data": args.data or "each config's data.source",
        "val_data": args.val_data,
        "nproc": args.nproc,
        "extra": args.extra,
        "seeds": seeds,
        "sweep": {key: values for key, values in sweep},
        "configs": configs,
    }
    failed = []
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        for k, plan in enumerate(plans, 1):
            if is_done(plan, args.nproc):
                print(f"[{k}/{len(plans)}] {plan.name}: done before, skipped", flush=True)
                continue
            print(f"[{k}/{len(plans)}] {plan.name}: training (log: {plan.run_dir / LOG_NAME})", flush=True)
            t = time.time()
            rc = launch(plan, args.nproc)
            if rc != 0:
                text = (plan.run_dir / LOG_NAME).read_text()
                # exit code 2 is the trainer's for bad input. torchrun exits 1 and names its workers'
                # codes, or only a signal for a worker it stopped first: then the workers' error lines tell
                refused = rc == 2 or (
                    args.nproc > 1
                    and re.search(
                        r"exitcode\s*:\s*2\b|^\[rank \d+\] (config )?error: (?!training diverged)", text, re.M
                    )
                    is not None
                )
                failed.append((plan.name, refused))
                # a trainer stopped by a signal of its own saved a checkpoint: a rerun resumes it
                stopped = rc in (128 + signal.SIGINT, 128 + signal.SIGTERM) or (
                    args.nproc > 1 and re.search(r"stopped by SIG\w+ at step", text) is not None
                )
                tail = text.splitlines()[-15:]
                what = "STOPPED by a signal (it resumes on a rerun)" if stopped else "FAILED"
                print(
                    f"[{k}/{len(plans)}] {plan.name}: {what} with exit code {rc}; the end of its log:\n  "
                    + "\n  ".join(tail),
                    flush=True,
                )
            else:
                print(f"[{k}/{len(plans)}] {plan.name}: finished in {_duration(time.time() - t)}", flush=True)
    except (KeyboardInterrupt, _Terminated):
        write_results([collect(p, args.nproc) for p in plans], out, meta)
        print(f"interrupted; the partial results are in {out}; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    results = [collect(p, args.nproc) for p in plans]
    write_results(results, out, meta)
    print((out / "results.md").read_text())
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'loss_vs_tokens.png'}, {out / 'loss_vs_time.png'}"
    )
    if failed:
        refused = [name for name, bad_input in failed if bad_input]
        other = [name for name, bad_input in failed if not bad_input]
        if refused:
            print(
                f"error: the trainer refused the config of {', '.join(refused)} (exit code 2): fix what its "
                f"log says (e.g. with --extra), then run the same command again",
                file=sys.stderr,
            )
        if other:
            print(
                f"error: {len(other)} run(s) failed or were stopped: {', '.join(other)}; rerun to retry or resume them",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
