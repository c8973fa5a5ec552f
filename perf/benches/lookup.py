"""weighted_lookup, pre_value_gate and the fused gate_lookup at the 227M shapes (the reference workload):
T = 12,288 tokens, k = 32 entries (H = 1), vdim = pre_vdim = 192, M = 2, N = 2,592,000 rows,
bf16 tables, ids of one layer's window (n² = 1,295,044 rows from offset 10·360²).

Backward variants of the table gradient (issue 3):
  dense      the reference contract: a zero-filled [N, D] fp32 gradient per call + atomics
  accumulate into a persistent fp32 buffer with atomics (no zero-fill)
  det-*      deterministic: entries sorted by row, one writer per row (sort timed inside,
             or "presorted" with the order computed once for the gate and the lookup)
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from ultramem.ops._triton import gate_lookup as tgl
from ultramem.ops._triton import pre_value_gate as tpg
from ultramem.ops._triton import weighted_lookup as twl

BF16 = torch.bfloat16


def _shapes(small: bool) -> dict:
    if small:
        return {"T": 16, "E": 5, "D": 24, "M": 2, "N": 97, "window": 60, "offset": 70}
    return {"T": 12288, "E": 32, "D": 192, "M": 2, "N": 2_592_000, "window": 1138 * 1138, "offset": 10 * 360 * 360}


def _cfg_name(cfg: dict) -> str:
    short = {
        "BLOCK_T": "T",
        "BLOCK_E": "E",
        "BLOCK_D": "D",
        "BLOCK_DP": "P",
        "BLOCK_J": "J",
        "num_warps": "w",
        "D_CHUNKS": "chunks",
    }
    return ",".join(f"{short.get(k, k)}{v}" for k, v in cfg.items())


def launch_shape(module, name: str, keys: dict):
    """`module.name` (a launch-shape dict) with `keys` over it, for the duration."""
    return mock.patch.multiple(module, **{name: {**getattr(module, name), **keys}})


def fused_shape(cfg: dict, backward: bool = False):
    """gate_lookup's launches with a variant's keys: over BWD_CONFIG (`backward`), or over the
    launch shape of the forward kernel that D_CHUNKS names (the launcher's choice by shape
    overridden); GROUP_CHUNKS 1 runs one column chunk per group."""
    keys, consts = dict(cfg), {}
    group_chunks = keys.pop("GROUP_CHUNKS", None)
    if group_chunks is not None:
        if group_chunks != 1:
            raise ValueError(f"GROUP_CHUNKS {group_chunks}: only 1 (CHUNK_GROUP 0) is expressible")
        consts["CHUNK_GROUP"] = 0
    if backward:
        consts["BWD_CONFIG"] = {**tgl.BWD_CONFIG, **keys}
    else:
        chunks = bool(keys.pop("D_CHUNKS"))
        name = "CHUNKS_CONFIG" if chunks else "ENTRY_BLOCK_CONFIG"
        consts.update({name: {**getattr(tgl, name), **keys}, "_use_chunks": lambda *_: chunks})
    return mock.patch.multiple(tgl, **consts)


class Inputs:
    """Fresh random inputs for one check or timing (never zeros)."""

    def __init__(self, sh: dict, seed: int, device: torch.device, tables: tuple[torch.Tensor, torch.Tensor]):
        g = torch.Generator(device=device).manual_seed(seed)
        t, e, d, m = sh["T"], sh["E"], sh["D"], sh["M"]
        self.rows = (torch.randint(0, sh["window"], (t, e), generator=g, device=device) + sh["offset"]) % sh["N"]
        self.values, self.pre_values = tables
        self.scores = torch.randn(t, e, m, generator=g, device=device).to(BF16)
        self.x = torch.randn(t, d, generator=g, device=device).to(BF16)
        self.grad_out = torch.randn(t, d, generator=g, device=device).to(BF16)
        self.grad_gate = torch.randn(t, e, generator=g, device=device).to(BF16)


# ------------------------------------------------------------------ float64 references


def _gathered64(rows, table):
    return table.index_select(0, rows.reshape(-1)).double().view(*rows.shape, -1)


def lookup_ref(rows, table, scores):
    t, e, m = scores.shape
    vals = _gathered64(rows, table).view(t, e, m, -1)
    return (vals * scores.double().unsqueeze(-1)).sum(1).reshape(t, -1)


def lookup_bwd_ref(grad_out, rows, table, scores):
    t, e, m = scores.shape
    g = grad_out.double().view(t, 1, m, -1)
    grad_scores = (_gathered64(rows, table).view(t, e, m, -1) * g).sum(-1)
    grad_table = torch.zeros(table.shape, dtype=torch.float64, device=table.device)
    grad_table.index_add_(0, rows.reshape(-1), (scores.double().unsqueeze(-1) * g).reshape(t * e, -1))
    return grad_table, grad_scores


def gate_ref(rows, table, x):
    return torch.einsum("ted,td->te", _gathered64(rows, table), x.double())


def gate_bwd_ref(grad_gate, rows, table, x):
    t, e = rows.shape
    gg = grad_gate.double()
    grad_x = torch.einsum("te,ted->td", gg, _gathered64(rows, table))
    grad_table = torch.zeros(table.shape, dtype=torch.float64, device=table.device)
    grad_table.index_add_(0, rows.reshape(-1), (gg.unsqueeze(-1) * x.double().unsqueeze(1)).reshape(t * e, -1))
    return grad_table, grad_x


# ------------------------------------------------------------------ eager baselines (bf16)


def lookup_eager(rows, table, scores):
    t, e, m = scores.shape
    vals = F.embedding(rows, table).view(t, e, m, -1)
    return torch.einsum("temd,tem->tmd", vals, scores).reshape(t, -1)


def lookup_bwd_eager(grad_out, rows, table, scores, grad_table=None):
    """Dense: a zero-filled fp32 gradient per call; with `grad_table`, accumulates into it."""
    t, e, m = scores.shape
    g = grad_out.float().view(t, 1, m, -1)
    flat = rows.reshape(-1)
    grad_scores = (table.index_select(0, flat).float().view(t, e, m, -1) * g).sum(-1).to(scores.dtype)
    if grad_table is None:
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    grad_table.index_add_(0, flat, (scores.float().unsqueeze(-1) * g).reshape(t * e, -1))
    return grad_table, grad_scores


def gate_eager(rows, table, x):
    return torch.einsum("ted,td->te", F.embedding(rows, table), x)


def gate_bwd_eager(grad_gate, rows, table, x, grad_table=None):
    """Dense: a zero-filled fp32 gradient per call; with `grad_table`, accumulates into it."""
    t, e = rows.shape
    flat = rows.reshape(-1)
    grad_x = torch.einsum("te,ted->td", grad_gate, F.embedding(rows, table))
    if grad_table is None:
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    grad_table.index_add_(0, flat, (grad_gate.float().unsqueeze(-1) * x.float().unsqueeze(1)).reshape(t * e, -1))
    return grad_table, grad_x


def gate_lookup_eager(rows, values, pre_values, x, scores):
    gate = gate_eager(rows, pre_values, x)
    return lookup_eager(rows, values, scores * F.gelu(gate).unsqueeze(-1)), gate


def gate_lookup_bwd_ref(grad_out, grad_gate, rows, values, pre_values, x, scores, gate):
    """float64: (grad_values, grad_pre_values, grad_x, grad_scores), GELU taken at the saved gate."""
    t, e, m = scores.shape
    g = gate.double()
    cdf = 0.5 * (1.0 + torch.erf(g / 2**0.5))
    act, slope = g * cdf, cdf + g * torch.exp(-0.5 * g * g) / (2 * torch.pi) ** 0.5
    go = grad_out.double().view(t, 1, m, -1)
    s = scores.double()
    flat = rows.reshape(-1)
    q = (_gathered64(rows, values).view(t, e, m, -1) * go).sum(-1)
    grad_values = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    grad_values.index_add_(0, flat, ((s * act.unsqueeze(-1)).unsqueeze(-1) * go).reshape(t * e, -1))
    grad_g = (q * s).sum(-1) * slope + grad_gate.double()
    grad_x = torch.einsum("te,ted->td", grad_g, _gathered64(rows, pre_values))
    grad_pre = torch.zeros(pre_values.shape, dtype=torch.float64, device=values.device)
    grad_pre.index_add_(0, flat, (grad_g.unsqueeze(-1) * x.double().unsqueeze(1)).reshape(t * e, -1))
    return grad_values, grad_pre, grad_x, q * act.unsqueeze(-1)


# ------------------------------------------------------------------ least bytes moved


def min_bytes(t: int, e: int, d: int, m: int, uniq: int) -> dict:
    """Least bytes each op moves with bf16 tables/activations, int64 ids and an fp32 gradient
    buffer: every entry's row read once, each of the `uniq` touched gradient rows read and
    written once (accumulate), the per-token tensors once."""
    ids_b, s_b, tok_b = t * e * 8, t * e * m * 2, t * d * 2
    row_b = t * e * d * 2  # every entry's row, bf16
    grad_rows_b = uniq * d * 4  # the touched fp32 gradient rows, once
    return {
        "lookup_fwd": row_b + ids_b + s_b + tok_b,
        "lookup_bwd_acc": row_b + 2 * grad_rows_b + ids_b + 2 * s_b + tok_b,
        "gate_fwd": row_b + ids_b + tok_b + t * e * 2,
        "gate_bwd_acc": row_b + 2 * grad_rows_b + ids_b + 2 * tok_b + t * e * 2,
        "gate_lookup_fwd": 2 * row_b + ids_b + s_b + 2 * tok_b + t * e * 2,
        # both tables' rows and gradient rows; grad_out, x, grad_x; scores, grad_scores, gate, grad_gate
        "gate_lookup_bwd_acc": 2 * row_b + 4 * grad_rows_b + ids_b + 2 * s_b + 3 * tok_b + 2 * t * e * 2,
    }


# ------------------------------------------------------------------ the run

# The defaults of the launchers first, then a few neighbours (perf/diagnostics/sweep_lookup.py has more),
# each run with its keys over the launcher's module constant (as the variant names show them).
FWD_CONFIGS = [
    {"BLOCK_T": 1, "BLOCK_E": 32, "BLOCK_D": 64, "num_warps": 1, "EVICT_FIRST": True},
    {"BLOCK_T": 1, "BLOCK_E": 32, "BLOCK_D": 64, "num_warps": 1},
    {"BLOCK_T": 1, "BLOCK_E": 32, "BLOCK_D": 256, "num_warps": 4},
]
BWD_CONFIGS = [
    {"BLOCK_T": 1, "BLOCK_E": 8, "BLOCK_D": 256, "num_warps": 4},
    {"BLOCK_T": 1, "BLOCK_E": 32, "BLOCK_D": 256, "num_warps": 4},
]
DOTS_CONFIGS = [
    {"BLOCK_T": 1, "BLOCK_E": 4, "BLOCK_D": 256, "num_warps": 1},
    {"BLOCK_T": 1, "BLOCK_E": 32, "BLOCK_D": 256, "num_warps": 4},
]
SEGMENT_CONFIGS = [
    {"BLOCK_J": 4, "BLOCK_D": 256, "num_warps": 1},
    {"BLOCK_J": 2, "BLOCK_D": 256, "num_warps": 1},
]
FUSED_BWD_CONFIGS = [
    tgl.BWD_CONFIG,  # 2 warps
    {**tgl.BWD_CONFIG, "num_warps": 1},
    {**tgl.BWD_CONFIG, "num_warps": 4},
    {**tgl.BWD_CONFIG, "GROUP_CHUNKS": 1},
    {**tgl.BWD_CONFIG, "BLOCK_D": 32, "BLOCK_DP": 32},
]
# D_CHUNKS names the kernel (`fused_shape`).
CHUNKS = {"BLOCK_D": 64, "BLOCK_DP": 64, "num_warps": 1, "D_CHUNKS": True, "HOIST_V": 0, "EVICT_FIRST": True}
ENTRY_BLOCK = {
    "BLOCK_T": 1,
    "BLOCK_E": 8,
    "BLOCK_D": 256,
    "BLOCK_DP": 256,
    "num_warps": 1,
    "HOIST_V": True,
    "EVICT_FIRST": True,
    "D_CHUNKS": False,
}
FUSED_CONFIGS = [
    CHUNKS,  # the column-chunk kernel (the default): one warp per token, all entries, 64-column chunks
    {**CHUNKS, "BLOCK_D": 32, "BLOCK_DP": 32},
    ENTRY_BLOCK,  # the entry-block kernel (the default before)
    {**ENTRY_BLOCK, "EVICT_FIRST": False},
]


def run(ctx) -> list[dict]:
    sh = _shapes(ctx.small)
    dev = ctx.device
    t, e, d, m, n = sh["T"], sh["E"], sh["D"], sh["M"], sh["N"]
    shape = f"T={t} E={e} D={d} M={m} N={n} bf16"
    g = torch.Generator(device=dev).manual_seed(1234)
    # Values and pre-values at a scale where <P, x> is O(1), so the GELU is exercised.
    tables = (
        torch.randn(n, d, generator=g, device=dev).to(BF16),
        (torch.randn(n, d, generator=g, device=dev) / d**0.5).to(BF16),
    )
    seed = iter(range(1, 10_000))
    rows_out: list[dict] = []

    def fresh():
        return Inputs(sh, next(seed), dev, tables)

    probe = fresh()
    uniq = int(probe.rows.unique().numel())
    ids_b, s_b, tok_b = t * e * 8, t * e * m * 2, t * d * 2
    row_b = t * e * d * 2  # every entry's row, bf16
    grad_rows_b = uniq * d * 4  # the touched fp32 gradient rows, once
    dense_b = n * d * 4  # a whole fp32 gradient
    least = min_bytes(t, e, d, m, uniq)
    rows_out.append(ctx.row("info", shape, f"unique rows {uniq} of {t * e} entries", 0.0, None))

    def add(op, variant, us, nbytes, rel=None, **extra):
        rows_out.append(ctx.row(op, shape, variant, us, nbytes, rel, **extra))

    def guarded(op, variant, fn):
        try:
            fn()
        except Exception as exc:  # keep the other variants' numbers
            import traceback

            traceback.print_exc()
            rows_out.append({"op": op, "shape": shape, "variant": variant, "median_us": None, "error": repr(exc)[:300]})

    # ---------------------------------------------------------------- lookup forward
    fwd_bytes = least["lookup_fwd"]

    def lookup_fwd():
        inp = fresh()
        ref = lookup_ref(inp.rows, inp.values, inp.scores)
        rel = ctx.check("lookup fwd eager", lookup_eager(inp.rows, inp.values, inp.scores), ref)
        add(
            "weighted_lookup_fwd",
            "eager",
            ctx.do_bench(lambda: lookup_eager(inp.rows, inp.values, inp.scores)),
            fwd_bytes,
            rel,
        )
        if ctx.compile_variants:
            compiled = torch.compile(lookup_eager)
            rel = ctx.check("lookup fwd compile", compiled(inp.rows, inp.values, inp.scores), ref)
            add(
                "weighted_lookup_fwd",
                "torch.compile",
                ctx.do_bench(lambda: compiled(inp.rows, inp.values, inp.scores)),
                fwd_bytes,
                rel,
            )
        for cfg in FWD_CONFIGS:
            inp = fresh()
            ref = lookup_ref(inp.rows, inp.values, inp.scores)
            out = torch.full((t, d), float("nan"), dtype=BF16, device=dev)
            with launch_shape(twl, "FWD_CONFIG", cfg):
                twl.weighted_gather(inp.rows, inp.values, inp.scores, out, torch.float32)
                rel = ctx.check(f"lookup fwd {_cfg_name(cfg)}", out, ref)
                us = ctx.do_bench(lambda: twl.weighted_gather(inp.rows, inp.values, inp.scores, out, torch.float32))
            add("weighted_lookup_fwd", f"ours[{_cfg_name(cfg)}]", us, fwd_bytes, rel)
        inp = fresh()
        ref = lookup_ref(inp.rows, inp.values, inp.scores)
        for ids in (inp.rows, inp.rows.to(torch.int32)):
            name = "int32" if ids.dtype == torch.int32 else "int64"
            ctx.poison_allocator(t * d * 2)
            rel = ctx.check(
                f"lookup fwd op {name} ids", torch.ops.ultramem.weighted_lookup(ids, inp.values, inp.scores), ref
            )
            add(
                "weighted_lookup_fwd",
                f"ours: the op ({name} ids)",
                ctx.do_bench(lambda: torch.ops.ultramem.weighted_lookup(ids, inp.values, inp.scores)),
                fwd_bytes - (ids_b // 2 if name == "int32" else 0),
                rel,
            )

    guarded("weighted_lookup_fwd", "all", lookup_fwd)

    # ---------------------------------------------------------------- lookup backward
    acc_bytes = least["lookup_bwd_acc"]
    det_acc_bytes = uniq * d * 2 + 2 * grad_rows_b + ids_b + 2 * s_b + tok_b
    dense_bytes = dense_b + row_b + ids_b + 2 * s_b + tok_b

    def check_bwd(name, grad_table, grad_scores, ref_table, ref_scores, start=None):
        got = grad_table.double() - start.double() if start is not None else grad_table
        rel_t = ctx.check(f"{name} grad_table", got, ref_table)
        rel_s = ctx.check(f"{name} grad_scores", grad_scores, ref_scores)
        return max(rel_t, rel_s)

    def lookup_bwd():
        inp = fresh()
        ref_table, ref_scores = lookup_bwd_ref(inp.grad_out, inp.rows, inp.values, inp.scores)
        args = (inp.grad_out, inp.rows, inp.values, inp.scores)
        rel = check_bwd("lookup bwd eager", *lookup_bwd_eager(*args), ref_table, ref_scores)
        add(
            "weighted_lookup_bwd",
            "eager (dense, index_add_)",
            ctx.do_bench(lambda: lookup_bwd_eager(*args)),
            dense_bytes,
            rel,
        )
        ctx.poison_allocator(t * e * m * 2)
        rel = check_bwd("lookup bwd dense", *twl.weighted_lookup_backward_cuda(*args), ref_table, ref_scores)
        add(
            "weighted_lookup_bwd",
            "ours (a) dense: zero-fill + atomics",
            ctx.do_bench(lambda: twl.weighted_lookup_backward_cuda(*args)),
            dense_bytes,
            rel,
        )
        zero_us = ctx.do_bench(lambda: torch.zeros(inp.values.shape, dtype=torch.float32, device=dev))
        add("weighted_lookup_bwd", "  of which zero-fill of [N, D] fp32", zero_us, dense_b)
        del ref_table, ref_scores
        buf = torch.empty(inp.values.shape, dtype=torch.float32, device=dev)
        for cfg in BWD_CONFIGS:
            inp = fresh()
            args = (inp.grad_out, inp.rows, inp.values, inp.scores)
            ref_table, ref_scores = lookup_bwd_ref(*args)
            buf.normal_()
            start = buf.clone()
            ctx.poison_allocator(t * e * m * 2)
            with launch_shape(twl, "BWD_CONFIG", cfg):
                grad_scores = twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=False)
                rel = check_bwd(f"lookup bwd acc {_cfg_name(cfg)}", buf, grad_scores, ref_table, ref_scores, start)
                del ref_table, ref_scores, start
                us = ctx.do_bench(lambda: twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=False))
            add("weighted_lookup_bwd", f"ours (b) accumulate[{_cfg_name(cfg)}]", us, acc_bytes, rel)
        # Atomics reorder the adds: how far apart are two runs?
        twice = []
        for _ in range(2):
            buf.zero_()
            twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=False)
            twice.append(buf.clone())
        atomic_spread = float((twice[0] - twice[1]).abs().max())
        del twice
        # Decomposition: the scores' dots alone, the scatter alone.
        gs = torch.empty_like(inp.scores)
        add(
            "weighted_lookup_bwd",
            "  part: grad_scores dots only",
            ctx.do_bench(
                lambda: twl.gather_dots_scatter(inp.rows, inp.grad_out, m, torch.float32, table=inp.values, dots=gs)
            ),
            row_b + ids_b + s_b + tok_b,
        )
        add(
            "weighted_lookup_bwd",
            "  part: atomic scatter only",
            ctx.do_bench(
                lambda: twl.gather_dots_scatter(
                    inp.rows, inp.grad_out, m, torch.float32, scores=inp.scores, grad_table=buf
                )
            ),
            2 * grad_rows_b + ids_b + s_b + tok_b,
            atomic_max_abs_diff_between_runs=atomic_spread,
        )
        # Deterministic.
        for key in (torch.int64, torch.int32):
            r = inp.rows.to(key)
            add(
                "sort_rows",
                f"torch.sort stable ({str(key).split('.')[-1]} ids)",
                ctx.do_bench(lambda: twl.sort_rows(r)),
                None,
            )
        for cfg in SEGMENT_CONFIGS:
            with launch_shape(twl, "SEGMENT_CONFIG", cfg):
                inp = fresh()
                args = (inp.grad_out, inp.rows, inp.values, inp.scores)
                ref_table, ref_scores = lookup_bwd_ref(*args)
                buf.normal_()
                start = buf.clone()
                grad_scores = twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=True)
                rel = check_bwd(f"lookup bwd det {_cfg_name(cfg)}", buf, grad_scores, ref_table, ref_scores, start)
                del ref_table, ref_scores
                results = []
                for _ in range(2):
                    buf.copy_(start)
                    gsc = twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=True)
                    results.append((buf.clone(), gsc))
                bitwise = bool(torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]))
                ctx.checks.append(
                    {
                        "name": f"lookup bwd det {_cfg_name(cfg)} bitwise repeatable",
                        "rel_err": 0.0,
                        "tol": 0.0,
                        "ok": bitwise,
                    }
                )
                del results, start
                add(
                    "weighted_lookup_bwd",
                    f"ours (c) det-accumulate[{_cfg_name(cfg)}]",
                    ctx.do_bench(lambda: twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=True)),
                    det_acc_bytes,
                    rel,
                    bitwise_repeatable=bitwise,
                )
                order = twl.sort_rows(inp.rows, n)
                add(
                    "weighted_lookup_bwd",
                    f"ours (c) det-accumulate presorted[{_cfg_name(cfg)}]",
                    ctx.do_bench(
                        lambda: twl.lookup_table_grad(*args, buf, accumulate=True, deterministic=True, order=order)
                    ),
                    det_acc_bytes,
                )
        inp = fresh()
        args = (inp.grad_out, inp.rows, inp.values, inp.scores)
        ref_table, ref_scores = lookup_bwd_ref(*args)
        gt = torch.zeros(inp.values.shape, dtype=torch.float32, device=dev)
        gsc = twl.lookup_table_grad(*args, gt, accumulate=False, deterministic=True)
        rel = check_bwd("lookup bwd det dense", gt, gsc, ref_table, ref_scores)
        del gt, ref_table, ref_scores

        def det_dense():
            gt = torch.zeros(inp.values.shape, dtype=torch.float32, device=dev)
            twl.lookup_table_grad(*args, gt, accumulate=False, deterministic=True)

        add(
            "weighted_lookup_bwd",
            "ours det-dense: zero-fill + sorted",
            ctx.do_bench(det_dense),
            dense_b + uniq * d * 2 + ids_b + 2 * s_b + tok_b,
            rel,
        )
        del buf

    guarded("weighted_lookup_bwd", "all", lookup_bwd)

    # ---------------------------------------------------------------- gate forward / backward
    gate_bytes = least["gate_fwd"]

    def gate_fwd():
        inp = fresh()
        ref = gate_ref(inp.rows, inp.pre_values, inp.x)
        rel = ctx.check("gate fwd eager", gate_eager(inp.rows, inp.pre_values, inp.x), ref)
        add(
            "pre_value_gate_fwd",
            "eager",
            ctx.do_bench(lambda: gate_eager(inp.rows, inp.pre_values, inp.x)),
            gate_bytes,
            rel,
        )
        for cfg in DOTS_CONFIGS:
            inp = fresh()
            ref = gate_ref(inp.rows, inp.pre_values, inp.x)
            out = torch.full((t, e), float("nan"), dtype=BF16, device=dev)
            with launch_shape(twl, "DOTS_CONFIG", cfg):
                twl.gather_dots_scatter(inp.rows, inp.x, 1, torch.float32, table=inp.pre_values, dots=out)
                rel = ctx.check(f"gate fwd {_cfg_name(cfg)}", out, ref)
                us = ctx.do_bench(
                    lambda: twl.gather_dots_scatter(inp.rows, inp.x, 1, torch.float32, table=inp.pre_values, dots=out)
                )
            add("pre_value_gate_fwd", f"ours[{_cfg_name(cfg)}]", us, gate_bytes, rel)

    guarded("pre_value_gate_fwd", "all", gate_fwd)

    gate_acc_bytes = least["gate_bwd_acc"]

    def gate_bwd():
        inp = fresh()
        args = (inp.grad_gate, inp.rows, inp.pre_values, inp.x)
        ref_table, ref_x = gate_bwd_ref(*args)
        rel = check_bwd("gate bwd eager", *gate_bwd_eager(*args), ref_table, ref_x)
        add(
            "pre_value_gate_bwd",
            "eager (dense, index_add_)",
            ctx.do_bench(lambda: gate_bwd_eager(*args)),
            dense_b + row_b + ids_b + 2 * tok_b + t * e * 2,
            rel,
        )
        ctx.poison_allocator(t * d * 2)
        rel = check_bwd("gate bwd dense", *tpg.pre_value_gate_backward_cuda(*args), ref_table, ref_x)
        add(
            "pre_value_gate_bwd",
            "ours (a) dense: zero-fill + atomics",
            ctx.do_bench(lambda: tpg.pre_value_gate_backward_cuda(*args)),
            dense_b + row_b + ids_b + 2 * tok_b + t * e * 2,
            rel,
        )
        del ref_table, ref_x
        buf = torch.empty(inp.pre_values.shape, dtype=torch.float32, device=dev)
        for deterministic in (False, True):
            inp = fresh()
            args = (inp.grad_gate, inp.rows, inp.pre_values, inp.x)
            ref_table, ref_x = gate_bwd_ref(*args)
            buf.normal_()
            start = buf.clone()
            ctx.poison_allocator(t * d * 2)
            grad_x = tpg.gate_table_grad(*args, buf, accumulate=True, deterministic=deterministic)
            name = "det-accumulate" if deterministic else "accumulate"
            rel = check_bwd(f"gate bwd {name}", buf, grad_x, ref_table, ref_x, start)
            del ref_table, ref_x, start
            add(
                "pre_value_gate_bwd",
                f"ours ({'c' if deterministic else 'b'}) {name}",
                ctx.do_bench(lambda: tpg.gate_table_grad(*args, buf, accumulate=True, deterministic=deterministic)),
                gate_acc_bytes,
                rel,
            )
        order = twl.sort_rows(inp.rows, n)
        add(
            "pre_value_gate_bwd",
            "ours (c) det-accumulate presorted",
            ctx.do_bench(lambda: tpg.gate_table_grad(*args, buf, accumulate=True, deterministic=True, order=order)),
            gate_acc_bytes,
        )
        del buf

    guarded("pre_value_gate_bwd", "all", gate_bwd)

    # ---------------------------------------------------------------- fused gate + lookup forward
    fused_bytes = least["gate_lookup_fwd"]

    def fused():
        inp = fresh()
        gate64 = gate_ref(inp.rows, inp.pre_values, inp.x)
        ref = lookup_ref(inp.rows, inp.values, inp.scores.double() * F.gelu(gate64).unsqueeze(-1))
        out, gate = gate_lookup_eager(inp.rows, inp.values, inp.pre_values, inp.x, inp.scores)
        rel = ctx.check("fused fwd eager", out, ref, tol=2e-2)
        add(
            "gate_lookup_fwd",
            "eager (gate, GELU, lookup)",
            ctx.do_bench(lambda: gate_lookup_eager(inp.rows, inp.values, inp.pre_values, inp.x, inp.scores)),
            fused_bytes,
            rel,
        )

        def unfused():
            gate = tpg.pre_value_gate_cuda(inp.rows, inp.pre_values, inp.x)
            return twl.weighted_lookup_cuda(inp.rows, inp.values, inp.scores * F.gelu(gate).unsqueeze(-1)), gate

        rel = ctx.check("fused fwd unfused-ours", unfused()[0], ref, tol=2e-2)
        add("gate_lookup_fwd", "ours unfused (gate op, GELU, lookup op)", ctx.do_bench(unfused), fused_bytes, rel)
        for cfg in FUSED_CONFIGS:
            inp = fresh()
            gate64 = gate_ref(inp.rows, inp.pre_values, inp.x)
            ref = lookup_ref(inp.rows, inp.values, inp.scores.double() * F.gelu(gate64).unsqueeze(-1))
            ctx.poison_allocator(t * d * 2)
            with fused_shape(cfg):
                out, gate = tgl.gate_lookup_cuda(inp.rows, inp.values, inp.pre_values, inp.x, inp.scores, True)
                rel = max(
                    ctx.check(f"fused fwd {_cfg_name(cfg)} out", out, ref),
                    ctx.check(f"fused fwd {_cfg_name(cfg)} gate", gate, gate64),
                )
                us = ctx.do_bench(
                    lambda: tgl.gate_lookup_cuda(inp.rows, inp.values, inp.pre_values, inp.x, inp.scores, True)
                )
            add("gate_lookup_fwd", f"ours fused[{_cfg_name(cfg)}]", us, fused_bytes, rel)

    guarded("gate_lookup_fwd", "all", fused)

    # ---------------------------------------------------------------- fused gate + lookup backward
    fused_bwd_bytes = least["gate_lookup_bwd_acc"]

    def fused_bwd():
        bufs = (
            torch.empty(inp.values.shape, dtype=torch.float32, device=dev),
            torch.empty(inp.pre_values.shape, dtype=torch.float32, device=dev),
        )

        def composed(a):  # what the layer ran before: lookup accumulate, glue, gate accumulate
            grad_out, grad_gate, rows, values, pre_values, x, scores, gate = a
            g = gate.float()
            act, slope = F.gelu(g), torch.ops.aten.gelu_backward(torch.ones_like(g), g)
            grad_eff = twl.lookup_table_grad(
                grad_out,
                rows,
                values,
                scores.float() * act.unsqueeze(-1),
                bufs[0],
                accumulate=True,
                deterministic=False,
            )
            grad_g = (grad_eff * scores.float()).sum(-1) * slope + grad_gate.float()
            grad_x = tpg.gate_table_grad(grad_g, rows, pre_values, x, bufs[1], accumulate=True, deterministic=False)
            return (grad_eff * act.unsqueeze(-1)).to(scores.dtype), grad_x

        def fused_cfg(deterministic=False):
            return lambda a: tgl.gate_lookup_backward_cuda(*a[:7], a[7], True, *bufs, deterministic=deterministic)

        for name, fn, shape in (
            [("ours composed (lookup acc, glue, gate acc)", composed, contextlib.nullcontext())]
            + [(f"ours fused[{_cfg_name(cfg)}]", fused_cfg(), fused_shape(cfg, True)) for cfg in FUSED_BWD_CONFIGS]
            + [
                (f"ours fused deterministic (sorted)[{_cfg_name(cfg)}]", fused_cfg(True), fused_shape(cfg, True))
                for cfg in FUSED_BWD_CONFIGS[:3]
            ]
        ):
            inp2 = fresh()
            gate = tpg.pre_value_gate_cuda(inp2.rows, inp2.pre_values, inp2.x)
            a = (inp2.grad_out, inp2.grad_gate, inp2.rows, inp2.values, inp2.pre_values, inp2.x, inp2.scores, gate)
            refs = gate_lookup_bwd_ref(*a)
            for b in bufs:
                b.normal_()
            starts = [b.clone() for b in bufs]
            ctx.poison_allocator(t * d * 2)
            with shape:
                grad_scores, grad_x = fn(a)
                rel = max(
                    ctx.check(f"fused bwd {name} grad_values", bufs[0].double() - starts[0].double(), refs[0]),
                    ctx.check(f"fused bwd {name} grad_pre_values", bufs[1].double() - starts[1].double(), refs[1]),
                    ctx.check(f"fused bwd {name} grad_x", grad_x, refs[2]),
                    ctx.check(f"fused bwd {name} grad_scores", grad_scores, refs[3]),
                )
                del refs, starts
                us = ctx.do_bench(lambda: fn(a))
            add("gate_lookup_bwd", name, us, fused_bwd_bytes, rel)

    inp = fresh()
    guarded("gate_lookup_bwd", "all", fused_bwd)
    return rows_out
