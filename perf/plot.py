"""`python -m perf plot`: PNGs from the results log.

  ops_vs_authors.png  each op at the 227M shapes: ours (the default), eager PyTorch, the authors'
                      kernels, and the copy-bandwidth floor (minimum bytes at the copy speed)
  e2e_vs_dense.png    UltraMemV2's training tokens/s against the dense model's: the newest runs,
                      and the ratio over the commits measured
  layer.png           one UltraMemV2 layer's GPU time per fwd + bwd over the commits, against
                      the block's FFN
  loss_curves.png     training loss per step of the newest trainer runs (loss_curve)

Each plot takes, per measurement, the newest record on the device (default: the most frequent
GPU in the log); smoke runs and reverted experiments are left out.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

from . import records
from .reference import LAYER_SHAPE, LOOKUP_SHAPE, RETRIEVAL_SHAPE
from .reference import ROWS as REFERENCE_ROWS

STAGED_SHAPE = "T=12288 E=32 D=192 N=2592000 L=20"  # perf/benches/staged_flush.py at the 227M shapes

# The defaults' variant names as perf/benches write them (update with the launchers' defaults).
# (label, bench, shape, variant); the first "ours" row of an op also gives the copy floor. A tuple
# of variants: the names the same default has had, newest first (the newest record among them).
OPS = [
    (
        "weighted_lookup fwd",
        [
            ("ours", "weighted_lookup_fwd", LOOKUP_SHAPE, "ours: the op (int64 ids)"),
            ("eager", "weighted_lookup_fwd", LOOKUP_SHAPE, "eager"),
            ("torch.compile", "weighted_lookup_fwd", LOOKUP_SHAPE, "torch.compile"),
        ],
    ),
    (
        "pre_value_gate fwd",
        [
            ("ours", "pre_value_gate_fwd", LOOKUP_SHAPE, "ours[T1,E4,D256,w1]"),
            ("eager", "pre_value_gate_fwd", LOOKUP_SHAPE, "eager"),
        ],
    ),
    (
        "gate + lookup fwd",
        [
            (
                "ours",
                "gate_lookup_fwd",
                LOOKUP_SHAPE,
                (
                    "ours fused[D64,P64,w1,chunksTrue,HOIST_V0,EVICT_FIRSTTrue]",
                    "ours fused[D64,P64,w1,chunksTrue,HOIST_V0,EVICT_FIRSTTrue,maxnregNone]",
                ),
            ),
            ("eager", "gate_lookup_fwd", LOOKUP_SHAPE, "eager (gate, GELU, lookup)"),
        ],
    ),
    (
        "weighted_lookup bwd",
        [
            ("ours", "weighted_lookup_bwd", LOOKUP_SHAPE, "ours (b) accumulate[T1,E8,D256,w4]"),
            (
                "ours, staged (+ flush share)",
                "staged_flush",
                STAGED_SHAPE,
                "lookup bwd, staged, per call with its flush share (F=4)",
            ),
            ("eager", "weighted_lookup_bwd", LOOKUP_SHAPE, "eager (dense, index_add_)"),
        ],
    ),
    (
        "pre_value_gate bwd",
        [
            ("ours", "pre_value_gate_bwd", LOOKUP_SHAPE, "ours (b) accumulate"),
            (
                "ours, staged (+ flush share)",
                "staged_flush",
                STAGED_SHAPE,
                "gate bwd, staged, per call with its flush share (F=4)",
            ),
            ("eager", "pre_value_gate_bwd", LOOKUP_SHAPE, "eager (dense, index_add_)"),
        ],
    ),
    (
        "gate + lookup bwd",
        [
            (
                "ours",
                "gate_lookup_bwd",
                LOOKUP_SHAPE,
                ("ours fused[D64,P64,w2,EVICT_FIRSTTrue]", "ours fused[D64,P64,w2,EVICT_FIRSTTrue,maxnregNone]"),
            ),
            ("ours, staged (+ flush share)", "staged_flush", STAGED_SHAPE, "F=4: staged per layer and micro-batch"),
        ],
    ),
    (
        "tdqkr_retrieval fwd",
        [
            ("ours", "tdqkr_retrieval_fwd", RETRIEVAL_SHAPE, "ours"),
            ("eager", "tdqkr_retrieval_fwd", RETRIEVAL_SHAPE, "eager (reference op body)"),
            ("torch.compile", "tdqkr_retrieval_fwd", RETRIEVAL_SHAPE, "torch.compile"),
        ],
    ),
    (
        "tdqkr_retrieval fwd + bwd",
        [
            ("ours", "tdqkr_retrieval_fwd+bwd", RETRIEVAL_SHAPE, "ours"),
            ("eager", "tdqkr_retrieval_fwd+bwd", RETRIEVAL_SHAPE, "eager (reference op body)"),
            ("torch.compile", "tdqkr_retrieval_fwd+bwd", RETRIEVAL_SHAPE, "torch.compile"),
        ],
    ),
]
COLORS = {
    "ours": "#1f77b4",
    "ours, staged (+ flush share)": "#17becf",
    "authors": "#ff7f0e",
    "eager": "#9a9a9a",
    "torch.compile": "#c7c7c7",
}


def usable(recs: list[dict], device: str) -> list[dict]:
    return [
        r
        for r in recs
        if r.get("device") == device
        and not r.get("small")
        and not r.get("reference")
        and not r.get("error")
        and not (r.get("extra") or {}).get("experiment")
    ]


def newest(recs: list[dict]) -> dict[tuple, dict]:
    """(suite, bench, shape, variant) -> the newest record."""
    out: dict[tuple, dict] = {}
    for r in sorted(recs, key=lambda r: r.get("date") or ""):
        out[(r["suite"], r["bench"], r["shape"], r["variant"])] = r
    return out


def _commit_label(r: dict) -> str:
    return f"{(r.get('commit') or '?')[:7]}\n{(r.get('date') or '')[5:10]}"


def plot_ops(plt, recs: list[dict], out: pathlib.Path) -> pathlib.Path:
    latest = newest(recs)
    refs = collections.defaultdict(list)
    for suite, bench, shape, variant, time, _unit, _ in REFERENCE_ROWS:
        if suite == "op":
            refs[(bench, shape)].append((variant, time))
    fig, ax = plt.subplots(figsize=(11, 7.5))
    y, ticks, labels, used = 0.0, [], [], set()
    for title, bars in OPS:
        rows, floor = [], None
        for label, bench, shape, variant in bars:
            names = variant if isinstance(variant, tuple) else (variant,)
            found = [latest[k] for k in (("op", bench, shape, name) for name in names) if k in latest]
            r = max(found, key=lambda x: x.get("date") or "", default=None)
            if r is None or r.get("time") is None:
                continue
            rows.append((label, r["time"], _commit_label(r).replace("\n", " ")))
            if floor is None and label == "ours" and r.get("frac_of_copy"):
                floor = r["time"] * r["frac_of_copy"]  # minimum bytes / copy bandwidth
        at = sum(1 for row in rows if row[0].startswith("ours"))  # the authors' bars after ours
        for variant, time in refs.get((bars[0][1], bars[0][2]), []):
            rows.insert(at, ("authors", time, variant))
            at += 1
        if not rows:
            continue
        start = y
        for label, time, where in rows:
            ax.barh(y, time, color=COLORS.get(label, "#555555"), height=0.8, label=label if label not in used else None)
            used.add(label)
            ax.text(
                time * 1.05,
                y,
                f"{time:,.0f} µs  ({where})" if time >= 100 else f"{time:.1f} µs  ({where})",
                va="center",
                fontsize=7,
            )
            y += 1
        if floor:
            ax.plot(
                [floor, floor],
                [start - 0.5, y - 0.5],
                color="black",
                linewidth=2,
                label="copy-bandwidth floor" if "floor" not in used else None,
            )
            used.add("floor")
        ticks.append((start + y - 1) / 2)
        labels.append(title)
        y += 0.8
    ax.set_xscale("log")
    ax.set_yticks(ticks, labels)
    ax.invert_yaxis()
    ax.set_xlabel("time per call, µs (log scale; GPU time, L2 flushed)")
    ax.set_title(
        "ultramem ops at the 227M shapes (T = 12,288, k = 32, D = 192, N = 2.59M, bf16), NVIDIA H200\n"
        "authors: their published numbers (torch 2.11), not re-measured",
        fontsize=10,
    )
    ax.set_xlim(right=ax.get_xlim()[1] * 6)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = out / "ops_vs_authors.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pairs(recs: list[dict]) -> list[tuple[dict, dict]]:
    """(UltraMemV2, dense) records of one run, bench and shape, for every end-to-end run."""
    from .trainer_gpu import DENSE_OF

    dense_of = {**DENSE_OF, "ultramem_v2_cudagraphs": "dense", "ultramem_v2": "dense"}
    by_run = collections.defaultdict(dict)
    for r in recs:
        if r["suite"] == "e2e" and r["bench"] in ("trainer", "throughput") and r.get("tokens_per_s"):
            by_run[(r["run"], r["bench"], r["shape"])][r["variant"]] = r
    out = []
    for variants in by_run.values():
        for v2, dense in dense_of.items():
            if v2 in variants and dense in variants:
                out.append((variants[v2], variants[dense]))
    return sorted(out, key=lambda p: p[0].get("date") or "")


def plot_e2e(plt, recs: list[dict], out: pathlib.Path) -> pathlib.Path | None:
    pairs = [p for p in _pairs(recs) if p[0]["variant"] in ("v2-graphs", "ultramem_v2_cudagraphs")]
    if not pairs:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    newest_per = {}
    for v2, dense in pairs:
        newest_per[(v2["bench"], v2["shape"])] = (v2, dense)
    names = []
    for i, ((bench, shape), (v2, dense)) in enumerate(sorted(newest_per.items())):
        ax1.bar(i - 0.2, dense["tokens_per_s"] / 1e3, 0.4, color="#9a9a9a", label="dense" if i == 0 else None)
        ax1.bar(i + 0.2, v2["tokens_per_s"] / 1e3, 0.4, color="#1f77b4", label="UltraMemV2" if i == 0 else None)
        ax1.text(
            i + 0.2,
            v2["tokens_per_s"] / 1e3 + 3,
            f"{v2['tokens_per_s'] / dense['tokens_per_s']:.2f}×",
            ha="center",
            fontsize=9,
        )
        mode = "training command" if bench == "trainer" else "in-process"
        names.append(f"{shape.replace('227m.toml ', '')}\n{mode}\n{v2['commit'][:7]}")
    ax1.set_xticks(range(len(names)), names, fontsize=8)
    ax1.set_ylabel("tokens/s (thousands)")
    ax1.set_title("227M, one H200, CUDA graphs: newest run of each setting", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    runs = sorted({(p[0]["date"], p[0]["commit"][:7]) for p in pairs})  # one x position per run, in date order
    x_of = {run: i for i, run in enumerate(runs)}
    for bench, marker in (("throughput", "o"), ("trainer", "s")):
        for shape in sorted({p[0]["shape"] for p in pairs if p[0]["bench"] == bench}):
            ps = [p for p in pairs if p[0]["bench"] == bench and p[0]["shape"] == shape]
            mode = "training command" if bench == "trainer" else "in-process"
            ax2.plot(
                [x_of[(p[0]["date"], p[0]["commit"][:7])] for p in ps],
                [p[0]["tokens_per_s"] / p[1]["tokens_per_s"] for p in ps],
                marker=marker,
                linestyle="-",
                label=f"{shape.replace('227m.toml ', '')} ({mode})",
            )
    ax2.set_xticks(range(len(runs)), [f"{c} {d[5:10]}" for d, c in runs], rotation=60, fontsize=7)
    ax2.axhline(0.75, color="#ff7f0e", linestyle="--", linewidth=1, label="target 0.75×")
    ax2.set_ylabel("UltraMemV2 tokens/s ÷ dense tokens/s (same run)")
    ax2.set_title("ratio to the dense model over the commits measured (in date order)", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "e2e_vs_dense.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer(plt, recs: list[dict], out: pathlib.Path) -> pathlib.Path | None:
    layer = [
        r for r in recs if r["suite"] == "layer" and r["bench"] == "layer_fwd_bwd_gpu" and r["shape"] == LAYER_SHAPE
    ]
    if not layer:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.8))
    runs = sorted({(r["date"], r["commit"][:7]) for r in layer})
    x_of = {run: i for i, run in enumerate(runs)}
    for variant, style, label in (
        ("layer_compiled", "o-", "layer, compiled"),
        ("layer_compiled_staged", "D", "layer, compiled, staged table gradients (flush not counted)"),
        ("ffn_compiled", "s--", "the block's SwiGLU FFN, compiled"),
    ):
        pts = sorted((x_of[(r["date"], r["commit"][:7])], r["time"]) for r in layer if r["variant"] == variant)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    # the authors' layer is event-timed (host time in it), so it goes in the title, not on this axis
    authors = [t for s, b, sh, v, t, u, _ in REFERENCE_ROWS if b == "layer_fwd_bwd"]
    ax.set_xticks(range(len(runs)), [f"{c}\n{d[5:10]}" for d, c in runs], fontsize=7)
    ax.set_ylabel("GPU time per fwd + bwd, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(
        "one UltraMemV2 layer at the 227M shapes (3 × 4096 tokens, 2.59M-row tables), NVIDIA H200"
        + (
            f"\nthe authors' layer (eager retrieval + their CUDA kernels): {authors[0]:.2f} ms fwd + bwd, "
            "event-timed, their number"
            if authors
            else ""
        ),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "layer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(plt, recs: list[dict], out: pathlib.Path) -> pathlib.Path | None:
    trainer = [r for r in recs if r["suite"] == "e2e" and r["bench"] == "trainer" and r["extra"].get("loss_curve")]
    if not trainer:
        return None
    newest_run = {}
    for r in sorted(trainer, key=lambda r: r.get("date") or ""):
        newest_run[r["shape"]] = r["run"]
    shapes = sorted(newest_run)
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for r in (r for r in trainer if r["run"] == newest_run[shape] and r["shape"] == shape):
            curve = r["extra"]["loss_curve"]
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                label=r["variant"],
                linestyle="--" if r["variant"].startswith("dense") else "-",
            )
            commit = r["commit"][:7]
        tokens = 3 * 4096 * int(shape.split("grad_accum=")[1]) if "grad_accum=" in shape else None
        ax.set_title(f"{shape} ({tokens:,} tokens per step), {commit}" if tokens else shape, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("227M training command on one H200: UltraMemV2 (v2-*) and dense, same data and seed", fontsize=10)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf plot",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--log", default=str(records.DEFAULT_LOG))
    parser.add_argument("--out", default=str(records.ROOT / "perf" / "plots"))
    parser.add_argument("--device", default=None, help="device name as logged (default: the most frequent GPU)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("python -m perf plot needs matplotlib (pip install -e '.[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = records.read(args.log)
    devices = collections.Counter(
        r["device"] for r in recs if r.get("device") not in (None, "cpu") and not r.get("reference")
    )
    device = args.device or (devices.most_common(1)[0][0] if devices else "cpu")
    recs = usable(recs, device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made = [f(plt, recs, out) for f in (plot_ops, plot_e2e, plot_layer, plot_losses)]
    for path in made:
        if path:
            print(path)
    print(f"{sum(p is not None for p in made)} plots from {len(recs)} records on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
