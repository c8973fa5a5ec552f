"""A seeded fuzzer of the ultramem:: ops against float64 formulas written here.

Each case draws one op family (weighted_lookup, pre_value_gate, gate_lookup, tdqkr_retrieval,
layer_stats_accumulate), a path (forward with the dense backward, autograd, the accumulate op, a
registered buffer id, a staging area) and random inputs: 0 to 6 tokens, 1-4 cores, duplicate rows
within and across tokens, ids at 0 and N-1, int32 / int64 ids, fp16 / bf16 / fp32 / fp64 tensors
(mixed), and contiguous, offset (a slice of a larger tensor), transposed or strided views. It runs
the case on the CPU kernels, or on the Triton launchers (run on CPU tensors when TRITON_INTERPRET=1
was set before Triton was imported), and compares every output with the float64 formula.

Errors are elementwise, relative to the same formula evaluated on absolute values (the size of
the sum before cancellation), so a bound holds for any input: with u(dtype) the unit roundoff,

    |got - want| <= SAFETY · (u(output) + u(rounded intermediates) + L · u(accumulation)) · scale

where L is the longest chain of additions into one output element (the reduction length).
The worst err/scale per (op, backend, dtype) goes to the report. Under the interpreter a cast
to bf16 truncates instead of rounding to nearest (checked: fp32 -> bf16 drops the low 16 bits),
so the Triton kernels' bf16 outputs get one more u(bf16); on a GPU the cast rounds. The kernels
upcast every load right away, so bf16 cases run under the interpreter; but its fp64 -> bf16 cast
gives garbage, so a Triton case mixing fp64 and bf16 runs its fp64 tensors in fp32 there (counted
under "skipped" in the report; the CPU kernels and --device cuda keep the mix).

As a script (the fuzz tests start it in a subprocess; see tests/fuzz/test_op_fuzz.py):

    TRITON_INTERPRET=1 python tests/fuzz/op_fuzz.py --cases 600 --triton-cases 60 --seconds 100 \\
        --report report.json
    TRITON_INTERPRET=1 python tests/fuzz/op_fuzz.py --case 0:1234    # rerun one case: seed:index
    python tests/fuzz/op_fuzz.py --device cuda --cases 0 --triton-cases 2000   # the kernels on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from ultramem import ops
from ultramem.ops import determinism
from ultramem.ops.gate_lookup import gate_lookup_backward_into
from ultramem.ops.layer_stats import _accumulate_cuda as layer_stats_cuda_path
from ultramem.ops.staged_grad import GradStaging, register_staging
from ultramem.ops.table_grad import (
    pre_value_gate_backward_accumulate,
    pre_value_gate_backward_into,
    register_grad_buffer,
    release_grad_buffer,
    weighted_lookup_backward_accumulate,
    weighted_lookup_backward_into,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# the Triton kernels run under the interpreter (CPU tensors) or on a GPU (--device cuda)
TRITON = INTERPRETED or torch.cuda.is_available()
if INTERPRETED:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, when run as a script
    from triton_interpreter import patch_index

    patch_index()
if TRITON:
    from ultramem.ops._triton import gate_lookup as tgl
    from ultramem.ops._triton import layer_stats as tls
    from ultramem.ops._triton import pre_value_gate as tpg
    from ultramem.ops._triton import retrieval as tri
    from ultramem.ops._triton import staged_grad as tsg
    from ultramem.ops._triton import weighted_lookup as twl

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Slack over the first-order bound: the bound counts each rounding once, the kernels' sums
# (products, then partial sums, then a cast) round a few times per term.
SAFETY = 8.0
FAMILIES = ("weighted_lookup", "pre_value_gate", "gate_lookup", "tdqkr_retrieval", "layer_stats_accumulate")
# Small launch blocks, so that the interpreter runs the masked edges of the kernels too.
SMALL_BLOCKS = {"BLOCK_T": 2, "BLOCK_E": 2, "BLOCK_D": 8, "num_warps": 1}


def _small_blocks(module, name: str, small: bool):
    """`module.name` (a launch-shape dict) with SMALL_BLOCKS over it when `small`."""
    return (
        mock.patch.multiple(module, **{name: {**getattr(module, name), **SMALL_BLOCKS}})
        if small
        else contextlib.nullcontext()
    )


def acc_unit(*dtypes: torch.dtype) -> float:
    return UNIT[torch.float64] if torch.float64 in dtypes else UNIT[torch.float32]


def tolerance(out: torch.dtype, length: int, inputs: tuple, mid: tuple = ()) -> float:
    """SAFETY · (u(out) + Σ u(mid) + L · u(acc)): the bound of the module doc, relative to scale."""
    return SAFETY * (UNIT[out] + sum(UNIT[d] for d in mid) + max(length, 1) * acc_unit(*inputs))


def dtype_label(*dtypes: torch.dtype) -> str:
    """The case's dtypes, each once, narrowest first: "bf16+fp32"."""
    return "+".join(NAME[d] for d in FLOATS if d in dtypes)


# --------------------------------------------------------------------------------- the report


@dataclass
class Report:
    cases: int = 0
    checks: int = 0
    by_backend: dict = field(default_factory=dict)
    worst: dict = field(default_factory=dict)  # (op, backend) -> dtype -> entry
    failures: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def count_case(self, backend: str) -> None:
        self.cases += 1
        self.by_backend[backend] = self.by_backend.get(backend, 0) + 1

    def record(self, op: str, backend: str, dtype: str, name: str, err: float, tol: float, case: str) -> None:
        self.checks += 1
        slot = self.worst.setdefault(f"{op}[{backend}]", {}).setdefault(
            dtype, {"checks": 0, "worst_err": 0.0, "tol": tol, "worst_ratio": 0.0, "at": ""}
        )
        slot["checks"] += 1
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
        if not ratio <= slot["worst_ratio"]:  # (NaN ratios replace too)
            slot.update(worst_err=err, tol=tol, worst_ratio=ratio, at=f"{case} {name}")
        if not err <= tol:
            self.failures.append(dict(op=op, backend=backend, dtype=dtype, check=name, err=err, tol=tol, case=case))

    def fail(self, op: str, backend: str, dtype: str, case: str, what: str) -> None:
        self.failures.append(
            dict(op=op, backend=backend, dtype=dtype, check="exception", err=math.inf, tol=0.0, case=case, error=what)
        )

    def as_json(self) -> dict:
        return dict(
            cases=self.cases,
            checks=self.checks,
            cases_by_backend=self.by_backend,
            worst=self.worst,
            failures=self.failures[:50],
            failure_count=len(self.failures),
            skipped=self.skipped,
        )

    def summary(self) -> str:
        lines = [
            f"op fuzz: {self.cases} cases ({', '.join(f'{k} {v}' for k, v in sorted(self.by_backend.items()))}),"
            f" {self.checks} checks, {len(self.failures)} failures"
        ]
        for key in sorted(self.worst):
            for dt, w in sorted(self.worst[key].items()):
                lines.append(
                    f"  {key:34s} {dt:10s} checks {w['checks']:6d}  worst err {w['worst_err']:.3e}"
                    f"  (tol {w['tol']:.1e}, {w['worst_ratio']:.3f} of it)"
                )
        for what, n in sorted(self.skipped.items()):
            lines.append(f"  skipped: {what}: {n}")
        return "\n".join(lines)


def rel_error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    """max |got - want| / max(scale, tiny of got's dtype) elementwise; inf for a NaN or a shape
    mismatch."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf
    if got.numel() == 0:
        return 0.0
    diff = (got.detach().cpu().double() - want).abs()
    if torch.isnan(diff).any():
        return math.inf
    floor = torch.finfo(got.dtype).tiny if got.is_floating_point() else 1.0
    return float((diff / scale.clamp_min(floor)).max())


# ----------------------------------------------------------------------------- random inputs


class Draw:
    """The random source of one case: Python's for choices, torch's for tensors."""

    def __init__(self, seed: int, device: str = "cpu"):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.notes: list[str] = []  # adjustments of the case (counted in the report)

    def choice(self, seq, weights=None):
        return self.rng.choices(list(seq), weights=weights)[0]

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def coin(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def tokens(self) -> int:
        return self.choice([0, 1, 2, 3, 4, 5, 6], weights=[2, 3, 3, 2, 2, 1, 1])

    def floats(self, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        return self.layout(x.to(dtype).to(self.device))

    def rows(self, t: int, e: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        rows = torch.randint(0, n, (t, e), generator=self.gen)
        if t * e:
            flat = rows.view(-1)
            # both ends of the table, and duplicates within and across tokens
            flat[self.int(0, flat.numel() - 1)] = 0
            flat[self.int(0, flat.numel() - 1)] = n - 1
            if e > 1:
                rows[0, 1] = rows[0, 0]
            if t > 1:
                rows[t - 1, 0] = rows[0, 0]
        return self.layout(rows.to(dtype).to(self.device))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """The same values as a contiguous tensor, a slice of a larger one (storage offset,
        padded strides), a transposed layout or a strided last dim; padding holds NaN (floats)
        or an id far out of range, so that a read outside the view shows."""
        kind = self.choice(["contiguous", "offset", "transposed", "strided"], weights=[4, 2, 1, 1])
        if x.dim() == 0 or kind == "contiguous":
            return x.clone()
        fill = float("nan") if x.is_floating_point() else 10**6
        if kind == "transposed":
            dims = list(range(x.dim()))[::-1]
            return x.permute(dims).contiguous().permute(dims)
        if kind == "strided":
            wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), fill, dtype=x.dtype, device=x.device)
            wide[..., ::2] = x
            return wide[..., ::2]
        pads = [self.int(0, 2) for _ in x.shape]
        big = torch.full([s + 2 * p for s, p in zip(x.shape, pads)], fill, dtype=x.dtype, device=x.device)
        index = tuple(slice(p, p + s) for s, p in zip(x.shape, pads))
        big[index] = x
        return big[index]


# ------------------------------------------------------------------------- float64 formulas


def gelu64(g: torch.Tensor) -> torch.Tensor:
    return g * 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0)))


def gelu_slope64(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2.0 * math.pi)


def per_column(scores: torch.Tensor, d: int) -> torch.Tensor:
    """[T, E, M] core weights as [T, E, D]: core m's weight on its D/M columns."""
    return scores.repeat_interleave(d // scores.shape[2], dim=2)


def chunk_sums(x: torch.Tensor, m: int) -> torch.Tensor:
    """[T, E, D] -> [T, E, M]: the sum over each core's columns."""
    t, e, d = x.shape
    return x.reshape(t, e, m, d // m).sum(-1)


def scatter_rows(n: int, rows: torch.Tensor, contrib: torch.Tensor) -> torch.Tensor:
    """[N, D] float64: Σ of contrib[t, e] into row rows[t, e]."""
    out = torch.zeros(n, contrib.shape[-1], dtype=torch.float64)
    return out.index_add_(0, rows.reshape(-1).long().cpu(), contrib.reshape(-1, contrib.shape[-1]))


def lookup64(rows, table, scores):
    """out, and grad_table / grad_scores given grad_out, of weighted_lookup (plain float64)."""
    vals = table[rows.long().cpu()]  # [T, E, D]
    return (vals * per_column(scores, table.shape[1])).sum(1)


def lookup_backward64(grad_out, rows, table, scores):
    vals = table[rows.long().cpu()]
    w = per_column(scores, table.shape[1])
    return scatter_rows(table.shape[0], rows, w * grad_out[:, None, :]), chunk_sums(
        vals * grad_out[:, None, :], scores.shape[2]
    )


def gate64(rows, table, x):
    return (table[rows.long().cpu()] * x[:, None, :]).sum(-1)


def gate_backward64(grad_gate, rows, table, x):
    return (
        scatter_rows(table.shape[0], rows, grad_gate[..., None] * x[:, None, :]),
        (grad_gate[..., None] * table[rows.long().cpu()]).sum(1),
    )


def activation64(g, gelu: bool, absolute: bool):
    """(act(g), act'(g)); absolute: upper bounds of |act|, |act'| at |g| (GELU(|g|) >= |GELU(g)|)."""
    if absolute:
        g = g.abs()
    if not gelu:
        return g, torch.ones_like(g)
    return gelu64(g), gelu_slope64(g)


def gate_lookup64(rows, values, pre_values, x, scores, gelu, absolute=False):
    g = gate64(rows, pre_values, x)
    act, _ = activation64(g, gelu, absolute)
    return lookup64(rows, values, scores * act[..., None]), g


def gate_lookup_backward64(grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu, absolute=False):
    """(grad_values, grad_pre_values, grad_x, grad_scores), the activation at the saved gate."""
    act, slope = activation64(gate, gelu, absolute)
    m = scores.shape[2]
    q = chunk_sums(values[rows.long().cpu()] * grad_out[:, None, :], m)  # [T, E, M]
    grad_values, _ = lookup_backward64(grad_out, rows, values, scores * act[..., None])
    grad_g = slope * (q * scores).sum(-1)
    if grad_gate is not None:
        grad_g = grad_g + grad_gate
    grad_pre, grad_x = gate_backward64(grad_g, rows, pre_values, x)
    return grad_values, grad_pre, grad_x, q * act[..., None]


def d64(x, absolute=False):
    """A float64 copy (of the absolute values)."""
    if x is None:
        return None
    y = x.detach().cpu().double()
    return y.abs() if absolute else y


# ------------------------------------------------------------------------------ op families


@dataclass
class Case:
    family: str
    backend: str
    seed: int
    index: int
    label: str = ""

    @property
    def tag(self) -> str:
        return f"{self.seed}:{self.index}"


class Checker:
    def __init__(self, report: Report, case: Case, op: str, dtypes: tuple):
        self.report, self.case, self.op, self.dtypes = report, case, op, dtypes
        self.dtype = dtype_label(*dtypes)

    def __call__(self, name: str, got, want_fn, length: int, mid: tuple = (), tol: float | None = None) -> None:
        """want_fn(absolute) -> the float64 formula (absolute: on absolute values, the scale).
        The tolerance: tolerance(got's dtype, length, the case's dtypes, mid), unless `tol`."""
        if tol is None:
            out = got.dtype if got is not None else torch.float64
            if out == torch.bfloat16 and self.case.backend == "triton" and INTERPRETED:
                mid = (*mid, torch.bfloat16)  # the interpreter's bf16 casts truncate (module doc)
            tol = tolerance(out, length, self.dtypes, mid)
        want, scale = want_fn(False), want_fn(True)
        err = math.inf if got is None else rel_error(got.detach(), want, scale)
        self.report.record(self.op, self.case.backend, self.dtype, name, err, tol, f"{self.case.tag} {self.case.label}")


class Buffers:
    """Registered fp32 (fp64 when the inputs are) gradient buffers starting from random values,
    optionally with a staging area; released on exit."""

    def __init__(self, draw: Draw, shapes, dtype: torch.dtype):
        self.start = [draw.floats(s, dtype).contiguous() for s in shapes]
        self.bufs = [s.clone() for s in self.start]
        self.ids = [register_grad_buffer(b) for b in self.bufs]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for i in self.ids:
            register_staging(i, None)
            release_grad_buffer(i)


def _buffer_dtype(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _pick_dtypes(draw: Draw, backend: str, k: int) -> list[torch.dtype]:
    """k dtypes: usually all the same, sometimes mixed (tables in half precision, the rest fp32)."""
    pool = FLOATS if backend == "cpu" or draw.coin(0.3) else FLOATS[:3]
    base = draw.choice(pool, weights=[2, 2, 3, 1][: len(pool)])
    if draw.coin(0.7):
        return [base] * k
    dtypes = [draw.choice(pool) for _ in range(k)]
    if (
        backend != "cpu"
        and INTERPRETED
        and draw.device == "cpu"
        and torch.bfloat16 in dtypes
        and torch.float64 in dtypes
    ):
        # The interpreter's fp64 -> bf16 cast gives garbage (NaN, denormals; fp64 -> fp16 and
        # fp32 -> bf16 are fine), and such a mix accumulates in fp64 with a bf16 output: fp32 here.
        draw.notes.append(
            "triton (interpreter): fp64 mixed with bf16 run as fp32 + bf16 (its fp64 -> bf16 cast is broken)"
        )
        dtypes = [torch.float32 if d == torch.float64 else d for d in dtypes]
    return dtypes


def _lookup_case(draw: Draw, backend: str):
    t, e = draw.tokens(), draw.choice([0, 1, 2, 3, 4, 5, 6], weights=[1, 3, 3, 3, 2, 1, 1])
    m = draw.int(1, 4)
    d = m * draw.int(1, 5)
    n = draw.int(1, 12)
    table_dt, scores_dt = _pick_dtypes(draw, backend, 2)
    idx = draw.choice([torch.int32, torch.int64])
    rows = draw.rows(t, e, n, idx)
    return dict(
        t=t,
        e=e,
        m=m,
        d=d,
        n=n,
        rows=rows,
        table=draw.floats((n, d), table_dt),
        scores=draw.floats((t, e, m), scores_dt),
        grad_out=draw.floats((t, d), scores_dt),
    )


def run_weighted_lookup(draw: Draw, case: Case, report: Report) -> None:
    c = _lookup_case(draw, case.backend)
    rows, table, scores, grad_out = c["rows"], c["table"], c["scores"], c["grad_out"]
    t, e, m, d, n = c["t"], c["e"], c["m"], c["d"], c["n"]
    dts = (table.dtype, scores.dtype)
    path = draw.choice(
        ["dense", "autograd", "accumulate", "into", "staged"]
        if case.backend == "cpu"
        else ["dense", "accumulate", "staged"]
    )
    deterministic = draw.coin()
    case.label = (
        f"weighted_lookup {path} T={t} E={e} M={m} D={d} N={n} {dtype_label(*dts)} {rows.dtype}"
        f"{' det' if deterministic and case.backend != 'cpu' else ''}"
    )
    check = Checker(report, case, "weighted_lookup", dts)
    fwd = lambda a: lookup64(rows, d64(table, a), d64(scores, a))  # noqa: E731
    bwd = lambda a: lookup_backward64(d64(grad_out, a), rows, d64(table, a), d64(scores, a))  # noqa: E731
    len_fwd, len_gs, len_gt = e, d // m, t * e + 1  # reduction lengths
    small = draw.coin(0.3)
    if path in ("dense", "autograd"):
        if case.backend == "cpu" and path == "dense":
            out = ops.weighted_lookup(rows, table, scores)
            grad_table, grad_scores = ops.weighted_lookup_backward(grad_out, rows, table, scores)
        elif case.backend == "cpu":
            tab, sc = table.detach().requires_grad_(), scores.detach().requires_grad_()
            out = ops.weighted_lookup(rows, tab, sc)
            out.backward(grad_out)
            grad_table, grad_scores = tab.grad, sc.grad
        else:
            with _small_blocks(twl, "FWD_CONFIG", small):
                out = twl.weighted_lookup_cuda(rows, table, scores)
            with _deterministic(deterministic):
                grad_table, grad_scores = twl.weighted_lookup_backward_cuda(grad_out, rows, table, scores)
        check("out", out, fwd, len_fwd)
        if grad_table is None:  # autograd with no entries: no gradient flows to the table
            grad_table = torch.zeros(n, d, dtype=_buffer_dtype(*dts))
        check("grad_table", grad_table, lambda a: bwd(a)[0], len_gt)
        check("grad_scores", grad_scores, lambda a: bwd(a)[1], len_gs)
        return
    with Buffers(draw, [(n, d)], _buffer_dtype(*dts)) as bufs:
        buf, start = bufs.bufs[0], bufs.start[0]
        staging = None
        if path == "staged":
            # room for all tokens, or too little (the backward then adds with atomics)
            staging = GradStaging(max(1, t + draw.choice([0, 1, -1])), max(e, 1), m, d, 0, grad_out.dtype, rows.device)
            register_staging(bufs.ids[0], staging)
        if case.backend == "cpu":
            if path == "accumulate":
                grad_scores = weighted_lookup_backward_accumulate(buf, grad_out, rows, table, scores)
            else:
                grad_scores = weighted_lookup_backward_into(grad_out, rows, table, scores, bufs.ids[0])
        elif path == "accumulate":
            with _deterministic(deterministic):
                grad_scores = twl.weighted_lookup_backward_accumulate_cuda(buf, grad_out, rows, table, scores)
        elif _stageable(rows, table, scores, grad_out):
            grad_scores = tsg.staged_lookup_backward_cuda(grad_out, rows, table, scores, buf, staging)
        else:
            report.skipped["triton staged lookup: fp64 or E = 0 (the op adds directly)"] = (
                report.skipped.get("triton staged lookup: fp64 or E = 0 (the op adds directly)", 0) + 1
            )
            grad_scores = twl.weighted_lookup_backward_accumulate_cuda(buf, grad_out, rows, table, scores)
        if staging is not None:
            staging.flush(buf, kernels=case.backend != "cpu")
        check("grad_scores", grad_scores, lambda a: bwd(a)[1], len_gs)
        check("buffer", buf, lambda a: d64(start, a) + bwd(a)[0], len_gt)


def _stageable(rows, table, *tensors) -> bool:
    """Whether the op would stage this backward (fp32 accumulation, entries to stage)."""
    return rows.shape[1] > 0 and all(x.dtype != torch.float64 for x in (table, *tensors))


class _deterministic:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.before = determinism._deterministic
        determinism.set_deterministic(self.on)

    def __exit__(self, *exc):
        determinism.set_deterministic(self.before)


def run_pre_value_gate(draw: Draw, case: Case, report: Report) -> None:
    t, e = draw.tokens(), draw.choice([0, 1, 2, 3, 4, 5, 6], weights=[1, 3, 3, 3, 2, 1, 1])
    d, n = draw.int(1, 9), draw.int(1, 12)
    table_dt, x_dt = _pick_dtypes(draw, case.backend, 2)
    rows = draw.rows(t, e, n, draw.choice([torch.int32, torch.int64]))
    table, x, grad_gate = draw.floats((n, d), table_dt), draw.floats((t, d), x_dt), draw.floats((t, e), x_dt)
    dts = (table_dt, x_dt)
    path = draw.choice(
        ["dense", "autograd", "accumulate", "into", "staged"]
        if case.backend == "cpu"
        else ["dense", "accumulate", "staged"]
    )
    deterministic = draw.coin()
    case.label = f"pre_value_gate {path} T={t} E={e} D={d} N={n} {dtype_label(*dts)} {rows.dtype}"
    check = Checker(report, case, "pre_value_gate", dts)
    fwd = lambda a: gate64(rows, d64(table, a), d64(x, a))  # noqa: E731
    bwd = lambda a: gate_backward64(d64(grad_gate, a), rows, d64(table, a), d64(x, a))  # noqa: E731
    len_fwd, len_gx, len_gt = d, e, t * e + 1
    small = draw.coin(0.3)
    if path in ("dense", "autograd"):
        if case.backend == "cpu" and path == "dense":
            gate = ops.pre_value_gate(rows, table, x)
            grad_table, grad_x = ops.pre_value_gate_backward(grad_gate, rows, table, x)
        elif case.backend == "cpu":
            tab, xx = table.detach().requires_grad_(), x.detach().requires_grad_()
            gate = ops.pre_value_gate(rows, tab, xx)
            gate.backward(grad_gate)
            grad_table, grad_x = tab.grad, xx.grad
        else:
            with _small_blocks(twl, "DOTS_CONFIG", small):
                gate = tpg.pre_value_gate_cuda(rows, table, x)
            with _deterministic(deterministic):
                grad_table, grad_x = tpg.pre_value_gate_backward_cuda(grad_gate, rows, table, x)
        check("gate", gate, fwd, len_fwd)
        if grad_table is None:
            grad_table = torch.zeros(n, d, dtype=_buffer_dtype(*dts))
        check("grad_table", grad_table, lambda a: bwd(a)[0], len_gt)
        check("grad_x", grad_x, lambda a: bwd(a)[1], len_gx)
        return
    with Buffers(draw, [(n, d)], _buffer_dtype(*dts)) as bufs:
        buf, start = bufs.bufs[0], bufs.start[0]
        staging = None
        if path == "staged":
            staging = GradStaging(max(1, t + draw.choice([0, 1, -1])), max(e, 1), 1, 0, d, x_dt, rows.device)
            register_staging(bufs.ids[0], staging)
        if case.backend == "cpu":
            if path == "accumulate":
                grad_x = pre_value_gate_backward_accumulate(buf, grad_gate, rows, table, x)
            else:
                grad_x = pre_value_gate_backward_into(grad_gate, rows, table, x, bufs.ids[0])
        elif path == "accumulate":
            with _deterministic(deterministic):
                grad_x = tpg.pre_value_gate_backward_accumulate_cuda(buf, grad_gate, rows, table, x)
        elif _stageable(rows, table, x, grad_gate):
            grad_x = tsg.staged_gate_backward_cuda(grad_gate, rows, table, x, buf, staging)
        else:
            key = "triton staged gate: fp64 or E = 0 (the op adds directly)"
            report.skipped[key] = report.skipped.get(key, 0) + 1
            grad_x = tpg.pre_value_gate_backward_accumulate_cuda(buf, grad_gate, rows, table, x)
        if staging is not None:
            staging.flush(None, buf, kernels=case.backend != "cpu")
        check("grad_x", grad_x, lambda a: bwd(a)[1], len_gx)
        check("buffer", buf, lambda a: d64(start, a) + bwd(a)[0], len_gt)


def run_gate_lookup(draw: Draw, case: Case, report: Report) -> None:
    t, e = draw.tokens(), draw.choice([0, 1, 2, 3, 4, 5, 6], weights=[1, 3, 3, 3, 2, 1, 1])
    m = draw.int(1, 4)
    dv, dp, n = m * draw.int(1, 4), draw.int(1, 9), draw.int(1, 12)
    v_dt, p_dt, x_dt, s_dt = _pick_dtypes(draw, case.backend, 4)
    gelu = draw.coin()
    rows = draw.rows(t, e, n, draw.choice([torch.int32, torch.int64]))
    values, pre_values = draw.floats((n, dv), v_dt), draw.floats((n, dp), p_dt)
    x, scores = draw.floats((t, dp), x_dt), draw.floats((t, e, m), s_dt)
    grad_out = draw.floats((t, dv), s_dt)
    grad_gate = draw.floats((t, e), x_dt) if draw.coin() else None
    dts = (v_dt, p_dt, x_dt, s_dt)
    path = draw.choice(
        ["autograd", "into", "staged"] if case.backend == "cpu" else ["atomics", "deterministic", "staged"]
    )
    case.label = (
        f"gate_lookup {path} gelu={gelu} T={t} E={e} M={m} Dv={dv} Dp={dp} N={n} {dtype_label(*dts)} "
        f"{rows.dtype} grad_gate={grad_gate is not None}"
    )
    check = Checker(report, case, "gate_lookup", dts)
    fwd = lambda a: gate_lookup64(rows, d64(values, a), d64(pre_values, a), d64(x, a), d64(scores, a), gelu, a)  # noqa: E731
    len_gate, len_out = dp, e + dp
    if case.backend == "cpu":
        out, gate = ops.gate_lookup(rows, values, pre_values, x, scores, gelu)
    else:
        # the launcher's choice of kernel, or the entry-block / column-chunk kernel on small blocks
        kernel = draw.choice([None, "entry-block", "column-chunk"])
        forced = contextlib.nullcontext()
        if kernel == "entry-block":
            shape = {**tgl.ENTRY_BLOCK_CONFIG, **SMALL_BLOCKS, "BLOCK_DP": 8}
            forced = mock.patch.multiple(tgl, _use_chunks=lambda *_: False, ENTRY_BLOCK_CONFIG=shape)
        elif kernel == "column-chunk":
            shape = {**tgl.CHUNKS_CONFIG, "BLOCK_D": 8, "BLOCK_DP": 8, "num_warps": 1}
            forced = mock.patch.multiple(tgl, _use_chunks=lambda *_: True, CHUNKS_CONFIG=shape)
        with forced:
            out, gate = tgl.gate_lookup_cuda(rows, values, pre_values, x, scores, gelu)
    check("out", out, lambda a: fwd(a)[0], len_out)
    check("gate", gate, lambda a: fwd(a)[1], len_gate)
    if case.backend != "cpu" and torch.float64 in dts:
        # the op's CUDA backward takes float64 through the composed lookup / gate backwards
        key = "triton gate_lookup backward: fp64 (the op composes the other ops' backwards)"
        report.skipped[key] = report.skipped.get(key, 0) + 1
        return
    # the backward at the saved gate (rounded to x's dtype, as the op saves it)
    saved = gate.detach()
    bwd = lambda a: gate_lookup_backward64(  # noqa: E731
        d64(grad_out, a),
        d64(grad_gate, a),
        rows,
        d64(values, a),
        d64(pre_values, a),
        d64(x, a),
        d64(scores, a),
        d64(saved),
        gelu,
        a,
    )
    buf_dt = _buffer_dtype(*dts)
    len_gv, len_gp, len_gs, len_gx = t * e + 1, t * e * (m * dv + 1) + 1, dv, e * (dv + 1)
    if path == "autograd":
        leaves = [z.detach().requires_grad_() for z in (values, pre_values, x, scores)]
        out2, gate2 = ops.gate_lookup(rows, *leaves, gelu)
        torch.autograd.backward(
            [out2, gate2] if grad_gate is not None else [out2],
            [grad_out, grad_gate] if grad_gate is not None else [grad_out],
        )
        gv, gp, gx, gs = (z.grad if z.grad is not None else torch.zeros_like(z, dtype=buf_dt) for z in leaves)
        # (the op's own backward saves its own gate: the same values as `saved`)
        check("grad_values", gv, lambda a: bwd(a)[0], len_gv)
        check("grad_pre_values", gp, lambda a: bwd(a)[1], len_gp)
        check("grad_x", gx, lambda a: bwd(a)[2], len_gx)
        check("grad_scores", gs, lambda a: bwd(a)[3], len_gs)
        return
    with Buffers(draw, [(n, dv), (n, dp)], buf_dt) as bufs:
        (buf_v, buf_p), (start_v, start_p) = bufs.bufs, bufs.start
        staging = None
        if path == "staged":
            staging = GradStaging(max(1, t + draw.choice([0, 1, -1])), max(e, 1), m, dv, dp, x_dt, rows.device)
            register_staging(bufs.ids[0], staging)
        if case.backend == "cpu":
            gs, gx = gate_lookup_backward_into(
                grad_out, grad_gate, rows, values, pre_values, x, scores, saved, gelu, *bufs.ids
            )
        else:
            use = (
                staging
                if staging is not None
                and _stageable(rows, values, pre_values, x, scores, grad_out)
                and staging.accepts(rows, grad_out, x, scores)
                else None
            )
            args = (grad_out, grad_gate, rows, values, pre_values, x, scores, saved, gelu, buf_v, buf_p)
            if use is not None:
                gs, gx = tsg.staged_gate_lookup_backward_cuda(*args, use)
            else:
                gs, gx = tgl.gate_lookup_backward_cuda(*args, deterministic=path == "deterministic")
        if staging is not None:
            staging.flush(buf_v, buf_p, kernels=case.backend != "cpu")
        check("grad_scores", gs, lambda a: bwd(a)[3], len_gs)
        check("grad_x", gx, lambda a: bwd(a)[2], len_gx)
        check("values_buffer", buf_v, lambda a: d64(start_v, a) + bwd(a)[0], len_gv)
        check("pre_values_buffer", buf_p, lambda a: d64(start_p, a) + bwd(a)[1], len_gp)


# --------------------------------------------------------------------------------- retrieval


def run_retrieval(draw: Draw, case: Case, report: Report) -> None:
    triton = case.backend != "cpu"
    t = draw.choice([0, 1, 2, 3], weights=[1, 3, 2, 1]) if triton else draw.choice([0, 1, 2, 3, 4, 6])
    h, r, m = draw.int(1, 2 if triton else 3), draw.int(1, 3), draw.int(1, 3)
    n_keys = draw.int(1, 20 if triton else 24)
    knn = draw.int(1, min(n_keys, 8))
    pad = draw.coin(0.3)
    n_row = n_keys + (draw.int(0, 3) if pad else 0)
    n_col = n_keys + (draw.int(0, 3) if pad else 0)
    if not pad:
        n_col = draw.int(knn, 24 if not triton else 20)
        n_row, n_keys = n_keys, -1
    a_dt, b_dt = _pick_dtypes(draw, case.backend, 2)
    c_dt = draw.choice([torch.float32, a_dt])
    a, b = draw.floats((t, h, n_row, r), a_dt), draw.floats((t, h, n_col, r), b_dt)
    cores = draw.floats((h, m, r, r), c_dt)
    u, v = draw.floats((h, r), c_dt), draw.floats((h, r), c_dt)
    nan = draw.coin(0.08)
    if nan:  # a NaN in the inputs: its (token, head)s get NaN scores (the op's rule)
        tgt = draw.choice([a, b, cores, u, v])
        if tgt.numel():
            tgt[tuple(draw.int(0, s - 1) for s in tgt.shape)] = float("nan")
    nk_row = n_row if n_keys == -1 else n_keys
    nk_col = n_col if n_keys == -1 else n_keys
    dts = (a_dt, b_dt, c_dt)
    case.label = (
        f"tdqkr_retrieval T={t} H={h} r={r} M={m} n=({n_row},{n_col}) n_keys={n_keys} k={knn} "
        f"{dtype_label(*dts)}{' nan' if nan else ''}"
    )
    check = Checker(report, case, "tdqkr_retrieval", dts)
    tiled = triton and draw.coin(0.3)  # the grid walked in row tiles (a small GRID_TILE)
    if not triton:
        ids, scores = ops.tdqkr_retrieval(a, b, cores, u, v, knn, n_keys)
    elif tiled and a_dt != torch.float64 and b_dt != torch.float64 and c_dt != torch.float64:
        av, bv = (a, b) if n_keys == -1 else (a[:, :, :n_keys], b[:, :, :n_keys])
        with mock.patch.multiple(tri, GRID_TILE=64):
            ids, scores = tri.launch_forward(av, bv, cores, u, v, knn)
    else:
        ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, knn, n_keys)
    _check_selection(check, ids, scores, a[:, :, :nk_row], b[:, :, :nk_col], cores, u, v, knn, dts)
    if nan or t == 0 and draw.coin(0.5):
        return
    # the backward at the kept ids, one of them doubled
    ids = ids.clone()
    if t and knn > 1:
        ids[0, 0, 1] = ids[0, 0, 0]
    ids = draw.layout(ids.to(draw.choice([torch.int32, torch.int64])))
    grad = draw.floats((t, h, knn, m), a_dt)
    if triton:
        ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids, n_keys)
    else:
        ga, gb, gc = ops.tdqkr_retrieval_backward(grad, a, b, cores, ids, n_keys)
    want = lambda x: retrieval_backward64(d64(grad, x), d64(a, x), d64(b, x), d64(cores, x), ids, nk_col)  # noqa: E731
    check("grad_row_scores", ga, lambda x: want(x)[0], knn * m * r)
    check("grad_col_scores", gb, lambda x: want(x)[1], knn * m * r)
    check("grad_cores", gc, lambda x: want(x)[2], t * knn + 1)


def retrieval_backward64(grad, a, b, cores, ids, n_col):
    """d(Σ grad · scores)/d(a, b, cores) at the given ids (float64; a, b padded as given)."""
    t, h, k = ids.shape
    ids = ids.cpu()
    i, j = ids.long() // n_col, ids.long() % n_col
    hh = torch.arange(h).view(1, h, 1).expand(t, h, k)
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, k)
    a_sel, b_sel = a[tt, hh, i], b[tt, hh, j]  # [T, H, k, r]
    ga_sel = torch.einsum("thkm,hmpq,thkq->thkp", grad, cores, b_sel)
    gb_sel = torch.einsum("thkm,hmpq,thkp->thkq", grad, cores, a_sel)
    ga, gb = torch.zeros_like(a), torch.zeros_like(b)
    ga.index_put_((tt, hh, i), ga_sel, accumulate=True)
    gb.index_put_((tt, hh, j), gb_sel, accumulate=True)
    return ga, gb, torch.einsum("thkm,thkp,thkq->hmpq", grad, a_sel, b_sel)


def _measured(n: int):
    """want_fn for a quantity already measured in units of its scale: want 0, scale 1."""
    return lambda absolute: torch.ones(n, dtype=torch.float64) if absolute else torch.zeros(n, dtype=torch.float64)


def _check_selection(check: Checker, ids, scores, a, b, cores, u, v, knn, dts) -> None:
    """ids / scores must be a top-k selection of the float64 formula (ties within rounding may
    pick either side), or all NaN where a NaN input reaches the (token, head)."""
    t, h, n_row, r = a.shape
    n_col = b.shape[2]
    m = cores.shape[1]
    ids, scores = ids.cpu(), scores.cpu()
    ok_shape = (
        tuple(ids.shape) == (t, h, knn)
        and tuple(scores.shape) == (t, h, knn, m)
        and ids.dtype == torch.int64
        and scores.dtype == a.dtype
    )
    check("shapes", torch.tensor([float(not ok_shape)]), _measured(1), 0, tol=0.0)
    if not ok_shape or t == 0:
        return
    a64, b64, c64, u64, v64 = (d64(z) for z in (a, b, cores, u, v))
    poisoned = (
        a64.isnan().flatten(2).any(-1)
        | b64.isnan().flatten(2).any(-1)
        | (c64.isnan().flatten(1).any(-1) | u64.isnan().any(-1) | v64.isnan().any(-1))[None, :]
    )
    valid = ((ids >= 0) & (ids < n_row * n_col)).all(-1)
    distinct = torch.tensor([[len(set(ids[ti, hi].tolist())) == knn for hi in range(h)] for ti in range(t)])
    check("ids_in_range_and_distinct", (~(valid & distinct)).double().flatten(), _measured(t * h), 0, tol=0.0)
    nan_rows = scores.isnan().flatten(2)
    check(
        "nan_rule",
        ((nan_rows.all(-1) != poisoned) | (nan_rows.any(-1) & ~poisoned)).double().flatten(),
        _measured(t * h),
        0,
        tol=0.0,
    )
    keep = ~poisoned & valid
    if not keep.any():
        return
    ids_c = ids.clamp(0, n_row * n_col - 1)
    i, j = ids_c // n_col, ids_c % n_col
    hh = torch.arange(h).view(1, h, 1).expand(t, h, knn)
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, knn)

    def pair_scores(x):
        aa, bb, cc = (z.abs() if x else z for z in (a64, b64, c64))
        return torch.einsum("thkp,hmpq,thkq->thkm", aa[tt, hh, i], cc, bb[tt, hh, j])

    # per-core scores of the kept pairs (a sum of r² products, rounded to a's dtype)
    check("scores", scores[keep], lambda x: pair_scores(x)[keep], r * r + r)
    # the kept rows / columns are in the coarse top-k, within the coarse scores' rounding
    ca, cb = torch.einsum("thnr,hr->thn", a64, u64), torch.einsum("thnr,hr->thn", b64, v64)
    sa = torch.einsum("thnr,hr->thn", a64.abs(), u64.abs())
    sb = torch.einsum("thnr,hr->thn", b64.abs(), v64.abs())
    tol_c = tolerance(torch.float32, r, dts)
    kth_a = ca.sort(-1, descending=True).values[..., knn - 1 : knn]
    kth_b = cb.sort(-1, descending=True).values[..., knn - 1 : knn]
    short_a = ((kth_a - ca.gather(2, i)) / sa.gather(2, i).clamp_min(1e-300)).clamp_min(0)
    short_b = ((kth_b - cb.gather(2, j)) / sb.gather(2, j).clamp_min(1e-300)).clamp_min(0)
    check("coarse_rank", torch.maximum(short_a, short_b)[keep].amax(-1), _measured(int(keep.sum())), 0, tol=tol_c)
    # sorted by the total, and the totals those of the float64 top-k (when no coarse near-tie
    # makes the candidate grid itself ambiguous)
    totals = pair_scores(False).sum(-1)
    totals_abs = pair_scores(True).sum(-1)
    tol_t = tolerance(torch.float32, r * r + m + r, dts)
    step_up = ((totals[..., 1:] - totals[..., :-1]) / totals_abs[..., 1:].clamp_min(1e-300)).clamp_min(0)
    if knn > 1:
        check("sorted", step_up[keep].amax(-1), _measured(int(keep.sum())), 0, tol=tol_t)
    worst = 0.0
    for ti in range(t):
        for hi in range(h):
            if not keep[ti, hi]:
                continue
            near_tie = False
            for c, s in ((ca[ti, hi], sa[ti, hi]), (cb[ti, hi], sb[ti, hi])):
                if c.numel() > knn:
                    top = c.sort(descending=True)
                    gap = float(top.values[knn - 1] - top.values[knn])
                    near_tie |= gap <= 4 * tol_c * float(s.max())
            if near_tie:
                continue
            rows_k = ca[ti, hi].sort(descending=True).indices[:knn]
            cols_k = cb[ti, hi].sort(descending=True).indices[:knn]
            grid = torch.einsum("ip,mpq,jq->ij", a64[ti, hi, rows_k], c64[hi], b64[ti, hi, cols_k]).flatten()
            grid_abs = torch.einsum(
                "ip,mpq,jq->ij", a64[ti, hi, rows_k].abs(), c64[hi].abs(), b64[ti, hi, cols_k].abs()
            ).flatten()
            best = grid.sort(descending=True).values[:knn]
            got = totals[ti, hi].sort(descending=True).values
            worst = max(worst, float(((got - best).abs() / grid_abs.max().clamp_min(1e-300)).max()))
    check("totals_optimal", torch.tensor([worst], dtype=torch.float64), _measured(1), 0, tol=tol_t)


def run_layer_stats(draw: Draw, case: Case, report: Report) -> None:
    """The statistics op: hits[ids] += 1 and the six sums, added into counters that start from
    random values (the hit counts from integers, which stay exact)."""
    t, h, k, m = draw.tokens(), draw.int(1, 2), draw.int(1, 5), draw.int(1, 3)
    n, d = draw.int(1, 12), draw.int(1, 9)
    y_dt, s_dt = _pick_dtypes(draw, case.backend, 2)
    ids = draw.rows(t * h, k, n, draw.choice([torch.int32, torch.int64]))
    y, scores = draw.floats((t, d), y_dt), draw.floats((t * h, k, m), s_dt)
    hits0 = torch.randint(0, 5, (n,), generator=draw.gen).double().to(ids.device)
    sums0 = draw.floats((6,), torch.float64).contiguous()
    hits, sums = hits0.clone(), sums0.clone()
    deterministic = draw.coin()
    case.label = f"layer_stats_accumulate T={t} H={h} k={k} M={m} N={n} D={d} {dtype_label(y_dt, s_dt)} {ids.dtype}"
    if case.backend == "cpu":
        ops.layer_stats_accumulate(hits, sums, ids, y, scores)
    else:
        small = {"Y_BLOCK": 4, "Y_TILES": 2, "R_BLOCK": 4, "ID_BLOCK": 8} if draw.coin(0.5) else {}
        with mock.patch.dict(tls.LAUNCH, small), _deterministic(deterministic):
            layer_stats_cuda_path(hits, sums, ids, y, scores)
    check = Checker(report, case, "layer_stats_accumulate", (y_dt, s_dt))
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=n).double()
    check("hits", hits, lambda a: d64(hits0) + counts, 0, tol=0.0)

    def want(a):
        y64, s64 = d64(y, a).reshape(-1), d64(scores, a)
        add = [y64.sum(), (y64 * y64).sum(), y.numel(), s64[:, 0].sum(), s64[:, -1].sum(), t * h]
        return d64(sums0, a) + torch.tensor([float(v) for v in add], dtype=torch.float64)

    # each sum with its own accumulation: y's and the scores' (at least fp32 each), the counts fp64
    parts = {"y sums": ([0, 1], y.numel() + 1, y_dt), "counts": ([2, 5], 1, torch.float64)}
    parts["score sums"] = ([3, 4], t * h + 1, s_dt)
    for name, (at, length, dt) in parts.items():
        check(name, sums[at], lambda a, at=at: want(a)[at], length, tol=tolerance(torch.float64, length, (dt,)))


RUNNERS = {
    "weighted_lookup": run_weighted_lookup,
    "pre_value_gate": run_pre_value_gate,
    "gate_lookup": run_gate_lookup,
    "tdqkr_retrieval": run_retrieval,
    "layer_stats_accumulate": run_layer_stats,
}
# Share of the cases per family (the retrieval's interpreted kernel is the slowest).
WEIGHTS = {"cpu": [3, 2, 3, 2, 1], "triton": [3, 2, 3, 1, 1]}


def case_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) % (2**62)


def run_case(seed: int, index: int, backend: str, report: Report, device: str = "cpu") -> None:
    draw = Draw(case_seed(seed, index) + (1 if backend == "triton" else 0), device if backend == "triton" else "cpu")
    family = draw.choice(FAMILIES, weights=WEIGHTS[backend])
    case = Case(family, backend, seed, index)
    report.count_case(backend)
    try:
        RUNNERS[family](draw, case, report)
    except Exception:  # noqa: BLE001  (a crash is a failure of the case, with its traceback)
        report.fail(family, backend, "?", f"{case.tag} {case.label}", traceback.format_exc(limit=6)[-2000:])
    for note in draw.notes:
        report.skipped[note] = report.skipped.get(note, 0) + 1


def run(seed: int, cpu_cases: int, triton_cases: int, seconds: float, report: Report, device: str = "cpu") -> dict:
    """Triton cases first (each is slow under the interpreter), both within `seconds` of wall time."""
    start = time.monotonic()
    done = {"cpu": 0, "triton": 0}
    runnable = INTERPRETED if device == "cpu" else TRITON
    plan = [("triton", triton_cases if runnable else 0), ("cpu", cpu_cases)]
    if triton_cases and not runnable:
        report.skipped["triton cases (neither TRITON_INTERPRET=1 nor a GPU)"] = triton_cases
    stopped = False
    for backend, count in plan:
        # the Triton share gets at most 60% of the time, so the CPU cases always run
        limit = start + (0.6 * seconds if backend == "triton" else seconds)
        for index in range(count):
            if time.monotonic() > limit:
                stopped = True
                break
            run_case(seed, index, backend, report, device)
            done[backend] += 1
    return dict(
        seed=seed,
        device=device,
        planned=dict(cpu=cpu_cases, triton=triton_cases if runnable else 0),
        done=done,
        stopped_by_time=stopped,
        seconds=round(time.monotonic() - start, 1),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=500, help="cases on the CPU kernels")
    p.add_argument("--triton-cases", type=int, default=50, help="cases on the Triton kernels (interpreter)")
    p.add_argument("--seconds", type=float, default=100.0, help="wall-time budget; stops early past it")
    p.add_argument("--report", help="write the report here (JSON)")
    p.add_argument("--case", help="rerun one case, seed:index[:backend]")
    p.add_argument("--device", default="cpu", help="where the Triton cases run: cpu (TRITON_INTERPRET=1) or cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    report = Report()
    if args.case:
        parts = args.case.split(":")
        run_case(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "cpu", report, args.device)
        run_info = dict(case=args.case)
    else:
        run_info = run(args.seed, args.cases, args.triton_cases, args.seconds, report, args.device)
    out = dict(run_info, **report.as_json())
    print(report.summary())
    for f in report.failures[:10]:
        print("FAIL", json.dumps(f)[:3000])
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(out, fh, indent=1)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
