"""The authors' public CUDA kernels (and their eager retrieval and layer) at the 227M shapes, as
they published them: fixed reference rows next to our measurements, never re-measured here.

Timer as for our op rows (median, L2 flushed, each call replayed from a CUDA graph); where they
also gave an event-timed number it is in the note.
"""

from __future__ import annotations

from . import records

NOTE = "reference: the authors' number, measured on an NVIDIA H200 with torch 2.11; not re-measured"
REFERENCE_ENV = {"run": None, "device": "NVIDIA H200", "torch": "2.11", "triton": None}

# Shape strings exactly as perf/benches/lookup.py, retrieval.py and perf/gpu_e2e.py write them, so the
# reference rows line up with ours in tables, comparisons and plots.
LOOKUP_SHAPE = "T=12288 E=32 D=192 M=2 N=2592000 bf16"
RETRIEVAL_SHAPE = "T=12288 H=1 n=1138x1138 r=2 M=2 k=32 bfloat16"
LAYER_SHAPE = "227m.toml layer: T=12288 (3x4096) N=2592000"

# (suite, bench, shape, variant, time, unit, detail)
ROWS = [
    ("op", "weighted_lookup_fwd", LOOKUP_SHAPE, "authors-cuda", 60.9, "us", "event-timed: 60.5 us"),
    ("op", "pre_value_gate_fwd", LOOKUP_SHAPE, "authors-cuda", 96.2, "us", "event-timed: 97 us"),
    ("op", "gate_lookup_fwd", LOOKUP_SHAPE, "authors-cuda", 162.7, "us", "two kernels + GELU/multiply"),
    (
        "op",
        "weighted_lookup_bwd",
        LOOKUP_SHAPE,
        "authors-cuda",
        287.2,
        "us",
        "atomics into a persistent fp32 buffer; event-timed: 288 us",
    ),
    (
        "op",
        "weighted_lookup_bwd",
        LOOKUP_SHAPE,
        "authors-cuda (dense: zero-fill + atomics)",
        712.0,
        "us",
        "a fresh zero-filled fp32 gradient per call, as their autograd does",
    ),
    (
        "op",
        "pre_value_gate_bwd",
        LOOKUP_SHAPE,
        "authors-cuda",
        277.4,
        "us",
        "atomics into a persistent fp32 buffer; event-timed: 278 us",
    ),
    (
        "op",
        "gate_lookup_bwd",
        LOOKUP_SHAPE,
        "authors-cuda",
        564.6,
        "us",
        "their lookup bwd + gate bwd (two kernels); 989 us as their autograd runs them (dense lookup grad)",
    ),
    (
        "op",
        "tdqkr_retrieval_fwd",
        RETRIEVAL_SHAPE,
        "authors (eager PyTorch)",
        1823.0,
        "us",
        "their retrieval has no CUDA kernel: eager PyTorch, event-timed",
    ),
    (
        "layer",
        "layer_fwd",
        LAYER_SHAPE,
        "authors-cuda (eager retrieval + CUDA gate/lookup)",
        2.164,
        "ms",
        "event-timed",
    ),
    (
        "layer",
        "layer_fwd_bwd",
        LAYER_SHAPE,
        "authors-cuda (eager retrieval + CUDA gate/lookup)",
        5.697,
        "ms",
        "event-timed",
    ),
    # the same layer with the gate and lookup in eager PyTorch too
    ("layer", "layer_fwd", LAYER_SHAPE, "authors (all eager PyTorch)", 2.644, "ms", "event-timed"),
    ("layer", "layer_fwd_bwd", LAYER_SHAPE, "authors (all eager PyTorch)", 7.593, "ms", "event-timed"),
]


def reference_records(env: dict, suite: str) -> list[dict]:
    """The reference rows of one suite, carrying the run's id, commit and date (so they come with the
    run's output) but the authors' device and torch."""
    out = []
    for row_suite, bench, shape, variant, time, unit, detail in ROWS:
        if row_suite != suite:
            continue
        ref_env = {**env, **{k: v for k, v in REFERENCE_ENV.items() if k != "run"}}
        out.append(
            records.record(
                ref_env, suite, bench, shape, variant, time=time, unit=unit, reference=True, note=f"{NOTE} ({detail})"
            )
        )
    return out
