"""End-to-end GPU evidence for the memory layers, in one run (writes one JSON):

1. The debug UltraMemV2 model on CUDA with the Triton kernels registered: graph breaks under
   torch._dynamo.explain (must be 0), and torch.compile(fullgraph=True) forward + backward in bf16
   against eager.
2. One UltraMemV2 layer at the 227M shapes (SPEC §8, 3 x 4096 tokens, the pooled 2.59M-row tables
   with persistent gradient buffers), forward and forward + backward, eager and compiled, next to
   the block's SwiGLU FFN on the same tokens.
3. The debug training run on the GPU (bf16 autocast, compiled as the trainer does) against the CPU fp32
   reference run of the same config, data and seed: both loss curves; and the same GPU run with
   CUDA graphs (train.compile_mode="reduce-overhead").
4. Training throughput of the 227M configs: dense baseline, UltraMemV2, UltraMemV2 + CUDA graphs.

    PYTHONPATH=. ULTRAMEM_GIT_REV=$(git rev-parse HEAD) python perf/gpu_e2e.py --out $OUT/e2e.json

Sections 2 and 4 are also the layer suite and `--e2e throughput` of `python -m perf run`, which
append their numbers to the results log; this script keeps the compile and loss-curve checks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

from ultramem.layers import build_memory
from ultramem.model import FeedForward, build_model
from ultramem.ops import register_staging
from ultramem.train.config import load_config
from ultramem.train.trainer import run_training

log = logging.getLogger("gpu_e2e")


def cuda_time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median of event-timed calls on CUDA; on CPU (smoke runs) wall-clock calls."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(max(2, iters // 10)):
            t0 = time.perf_counter()
            fn()
            times.append(1000.0 * (time.perf_counter() - t0))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_compile(result: dict) -> None:
    cfg = load_config("debug.toml").model
    model = build_model(cfg, device="cuda", seed=0)
    model.memory_tables.use_grad_buffers()
    model.refresh_rank1()
    result["cuda_kernels_registered"] = {
        # a triton_op's CUDA kernel is its opaque twin's (the op's body calls it or the launcher)
        op: torch._C._dispatch_has_kernel_for_dispatch_key(
            f"ultramem::{op}_opaque" if hasattr(torch.ops.ultramem, f"{op}_opaque") else f"ultramem::{op}", "CUDA"
        )
        for op in (
            "tdqkr_retrieval",
            "tdqkr_retrieval_backward",
            "pre_value_gate",
            "weighted_lookup",
            "weighted_lookup_backward_accumulate",
            "pre_value_gate_backward_accumulate",
        )
    }
    tokens = torch.randint(0, cfg.vocab_size, (4, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explain = torch._dynamo.explain(model)(x, y)
    result["graph_breaks"] = explain.graph_break_count
    result["graphs"] = explain.graph_count
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    losses = {}
    for name, fn in (("eager", model), ("compiled", compiled)):
        model.memory_tables.zero_grad_buffers()
        model.zero_grad(set_to_none=True)
        model.memory_tables.attach_grad_buffers()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, aux = fn(x, y)
        loss.backward()
        losses[name] = (
            loss.item(),
            model.memory_tables.values.grad.norm().item(),
            model.blocks[0].attn.wqkv.weight.grad.norm().item(),
        )
    result["compile_vs_eager"] = {
        "eager": losses["eager"],
        "compiled": losses["compiled"],
        "fields": ["loss", "|grad values|", "|grad block0 wqkv|"],
    }


def build_layers_227m(
    n: int,
    gather_dtype: torch.dtype | None = torch.bfloat16,
    config: str = "227m.toml",
    device: str = "cuda",
    batch: int = 3,
    seq: int = 4096,
):
    """The first n UltraMemV2 layers of the 227M model (or `config`'s), each with its own rows of
    the pooled tables (gradient buffers, a `gather_dtype` compute copy as the trainer keeps for bf16
    runs), a micro-batch input u of batch x seq tokens and an output gradient."""
    mcfg = load_config(config).model
    with torch.device("meta"):
        tables, layers = build_memory(mcfg, mcfg.n_layers)
    layers = layers[:n]
    tables.to_empty(device=device)
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.to_empty(device=device)
        layer.reset_parameters(gen, None)
    with torch.no_grad():  # fill the 2.59M-row tables on the GPU (the CPU generator would take minutes)
        for p in tables.value_parameters():
            p.normal_(0.0, layers[0].value_init_std or 0.02)
    for layer in layers:
        layer.refresh_rank1()
    tables.use_grad_buffers()
    tables.use_compute_copy(gather_dtype)
    u = torch.randn(batch, seq, mcfg.dim, device=device, requires_grad=True)
    grad_y = torch.randn(batch, seq, mcfg.dim, device=device, dtype=torch.bfloat16)
    return mcfg, layers, tables, u, grad_y


def build_layer_227m(
    gather_dtype: torch.dtype | None = torch.bfloat16,
    config: str = "227m.toml",
    device: str = "cuda",
    batch: int = 3,
    seq: int = 4096,
):
    """`build_layers_227m` with one layer: (mcfg, layer, tables, u, grad_y)."""
    mcfg, layers, tables, u, grad_y = build_layers_227m(1, gather_dtype, config, device, batch, seq)
    return mcfg, layers[0], tables, u, grad_y


@contextlib.contextmanager
def grad_staging(tables, tokens: int, mcfg):
    """The layers' table gradients staged (room for `tokens` tokens, sized as the trainer sizes
    it) inside the block; leaving it flushes what is staged and stops staging."""
    tables.use_grad_staging(tokens, *mcfg.memory.lookup_shape, torch.bfloat16)
    try:
        yield
    finally:
        tables.use_grad_staging(0)


def kernel_times(fn, calls: int = 3) -> list[tuple[str, float, float]]:
    """(kernel, GPU self time in µs per call, launches per call) of fn under the profiler, after
    one warm-up call; busiest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [
        (e.key, e.self_device_time_total / calls, e.count / calls)
        for e in prof.key_averages()
        if e.self_device_time_total > 0
    ]
    return sorted(events, key=lambda item: -item[1])


def profile_kernels(rows: dict, name: str, fn, calls: int = 3) -> None:
    """Per-kernel GPU self time per call of fn (after one warm-up call): rows gets
    `{name}_gpu_time_per_fwd_bwd_ms` and the top 40 kernels as `{name}_kernels_us`."""
    events = [(k, us, int(c)) for k, us, c in kernel_times(fn, calls)]
    rows[f"{name}_gpu_time_per_fwd_bwd_ms"] = sum(us for _, us, _ in events) / 1000
    rows[f"{name}_kernels_us"] = [{"kernel": k[:160], "us": round(us, 1), "calls": c} for k, us, c in events[:40]]
    log.info("%s: GPU time per fwd+bwd %.3f ms", name, rows[f"{name}_gpu_time_per_fwd_bwd_ms"])
    for k, us, c in events[:25]:
        log.info("  %8.1f us  x%-3d %s", us, c, k[:110])


def layer_shape(config: str, tokens: int, batch: int, seq: int, rows: int) -> str:
    """The layer benches' shape label (the log's `shape`)."""
    return f"{config} layer: T={tokens} ({batch}x{seq}) N={rows}"


def time_layer(result: dict, cudagraphs: bool = False, small: bool = False) -> None:
    """The layer at the 227M shapes on CUDA: eager and compiled against the block's FFN, per-kernel GPU
    time, the staged backward. small: debug.toml's layer on 2 x 64 tokens, eager only (compiling on a
    CPU takes minutes), to check the code path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config, batch, seq = ("debug.toml", 2, 64) if small else ("227m.toml", 3, 4096)
    mcfg, layer, tables, u, grad_y = build_layer_227m(config=config, device=device, batch=batch, seq=seq)
    ffn = FeedForward(mcfg.dim, mcfg.ffn_hidden).to(device)
    t = u.shape[0] * u.shape[1]
    rows = {
        "config": config,
        "shape": layer_shape(config, t, batch, seq, tables.num_rows),
        "tokens": t,
        "N": tables.num_rows,
        "table_dtype": str(tables.values.dtype),
        "gather_dtype": str(tables.gather_tables()[0].dtype),
        "layer_input_dtype": "torch.bfloat16",
        "ffn_input_dtype": str(u.dtype),
    }

    # As in the model under autocast: the FFN gets the fp32 norm output (its cast fuses into the
    # block's graph), the memory layer the same activations in bf16 (Block hands u over so).
    u_mem = u.detach().to(torch.bfloat16).requires_grad_()

    def run(mod, is_ffn: bool, backward: bool):
        inp = u if is_ffn else u_mem

        def fn():
            with torch.autocast(device, dtype=torch.bfloat16):
                out = mod(inp) if is_ffn else mod(inp, tables)[0]
            if backward:
                # the input stands for the block's activations, not a parameter: its gradient is
                # handed on (as in a model), not summed over the timed calls
                inp.grad = None
                out.backward(grad_y)

        return fn

    if small:
        variants = [("layer_eager", layer, False), ("ffn_eager", ffn, True)]
    else:
        variants = [
            ("layer_eager", layer, False),
            ("layer_compiled", torch.compile(layer, fullgraph=True), False),
            ("ffn_eager", ffn, True),
            ("ffn_compiled", torch.compile(ffn), True),
        ]
    if cudagraphs and not small:  # the host out of the way: the compiled layer replayed as CUDA graphs
        variants.insert(
            2, ("layer_compiled_cudagraphs", torch.compile(layer, fullgraph=True, mode="reduce-overhead"), False)
        )
    for name, mod, is_ffn in variants:
        with torch.no_grad():
            rows[f"{name}_fwd_ms"] = cuda_time_ms(run(mod, is_ffn, False))
        rows[f"{name}_fwd_bwd_ms"] = cuda_time_ms(run(mod, is_ffn, True))
        log.info("%s: fwd %.3f ms, fwd+bwd %.3f ms", name, rows[f"{name}_fwd_ms"], rows[f"{name}_fwd_bwd_ms"])
    if small:
        result["layer_227m"] = rows
        return
    # Staged table gradients (the trainer's default): the backward stages instead of adding; the
    # flush, once per `table_grad_flush` micro-batches for all layers, is timed by
    # perf/benches/staged_flush.py (per layer and micro-batch it adds flush / (F·L)). The fill
    # level is reset before each call, so every timed call stages.
    staged = run(variants[1][1], False, True)

    def staged_call():
        tables.grad_staging.fill.zero_()
        staged()

    # timed before the first profiler session: one can leave the host slower after it
    with grad_staging(tables, t, mcfg):
        rows["layer_compiled_staged_fwd_bwd_ms"] = cuda_time_ms(staged_call)
    # where the GPU time goes: per-kernel self time per forward + backward, eager and compiled
    # (the FFN too: the layer's target is the FFN's time, measured the same way in the same run)
    profiled = [
        ("layer_eager", layer, False),
        ("layer_compiled", variants[1][1], False),
        ("ffn_eager", ffn, True),
        ("ffn_compiled", variants[-1][1], True),
    ]
    for name, mod, is_ffn in profiled:
        profile_kernels(rows, name, run(mod, is_ffn, True))
    with grad_staging(tables, t, mcfg):
        profile_kernels(rows, "layer_compiled_staged", staged_call)  # (without the flush)
    result["layer_227m"] = rows


class LayerStack(torch.nn.Module):
    """Memory layers (given tables) or FFNs one after another on a residual stream, h = h + f(h):
    the model's memory layers without the blocks around them."""

    def __init__(self, mods, tables=None):
        super().__init__()
        self.mods = torch.nn.ModuleList(mods)
        self.tables = tables

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for mod in self.mods:
            # the memory layers get bf16 activations, as Block hands them over; the FFN the fp32 ones
            h = h + (mod(h.to(torch.bfloat16), self.tables)[0] if self.tables is not None else mod(h))
        return h


def time_layer_stack(result: dict, small: bool = False, variants_kept: tuple[str, ...] = ()) -> None:
    """Per layer, the config's memory layers (227M: 20, each with its own rows of the pooled tables)
    compiled as one function, as the trainer compiles the model, forward + backward, against as
    many of the block's FFNs: event-timed wall time and GPU time (profiler), with atomics and
    staged, the gradient buffers handed to the ops as tensors and, as "_ids", by id (the
    default). A layer compiled alone pays the compiled call's fixed costs (Dynamo's entry,
    AOTAutograd's wrappers, the autograd engine) by itself; here all layers share them, as in the
    model. small: debug.toml on 2 x 64 tokens, eager, to check the code path on a CPU.
    variants_kept: only these variants (each setting compiles the stack anew; all by default)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config, batch, seq = ("debug.toml", 2, 64) if small else ("227m.toml", 3, 4096)
    n = load_config(config).model.n_layers
    mcfg, layers, tables, u, grad_y = build_layers_227m(n, config=config, device=device, batch=batch, seq=seq)
    ffns = [FeedForward(mcfg.dim, mcfg.ffn_hidden).to(device) for _ in range(n)]
    t = u.shape[0] * u.shape[1]
    rows = {"config": config, "shape": layer_shape(config, t, batch, seq, tables.num_rows), "layers": n, "tokens": t}
    stacks = {"stack_layer": LayerStack(layers, tables), "stack_ffn": LayerStack(ffns)}
    if not small:
        stacks = {name: torch.compile(mod, fullgraph=True) for name, mod in stacks.items()}
    # the layers' own parameters (the tables' gradients live in their buffers)
    params = [p for mods in (layers, ffns) for mod in mods for p in mod.parameters()]

    grad_h = grad_y.float()  # the stream is fp32 (u + bf16 outputs)

    def run(mod):
        def fn():
            for p in params:  # each call a first micro-batch: no gradient accumulation
                p.grad = None
            with torch.autocast(device, dtype=torch.bfloat16):
                out = mod(u)
            u.grad = None  # the stack's input stands for activations: its gradient is handed on
            out.backward(grad_h)

        return fn

    layer_call = run(stacks["stack_layer"])

    def staged_call():
        tables.grad_staging.fill.zero_()  # every call stages; the flush is not timed (see time_layer)
        layer_call()

    # (name, call, staged, the buffers handed to the ops as tensors, else by id)
    variants = [("stack_layer", layer_call, False, True), ("stack_ffn", run(stacks["stack_ffn"]), False, True)]
    if not small:
        variants[1:1] = [
            ("stack_layer_staged", staged_call, True, True),
            ("stack_layer_ids", layer_call, False, False),
            ("stack_layer_staged_ids", staged_call, True, False),
        ]
    if variants_kept:
        variants = [v for v in variants if v[0] in variants_kept]
    # one staging area for all rounds, room for every layer's tokens as the trainer sizes it per
    # micro-batch: a new one per round would be new graph inputs, recompiling the stack
    tables.use_grad_staging(n * t, *mcfg.memory.lookup_shape, torch.bfloat16)
    area = tables.grad_staging

    def select(staged: bool, as_inputs: bool = True) -> None:  # a variant's setting, until the next
        tables.grads_as_inputs = as_inputs
        tables.flush_grad_staging()
        tables.grad_staging = area if staged else None
        register_staging(tables.values_grad_id, tables.grad_staging)

    # All wall times before the first profiler session (one can leave the host slower after it),
    # the variants alternating in rounds: the host's speed drifts within a run.
    walls = {name: [] for name, *_ in variants}
    for _ in range(1 if small else 7):
        for name, fn, *state in variants:
            select(*state)
            walls[name].append(cuda_time_ms(fn, iters=5) / n)
    for name, times in walls.items():
        rows[f"{name}_fwd_bwd_ms"] = statistics.median(times)
    rows["rounds_ms"] = walls
    if not small:
        for name, fn, *state in variants:
            select(*state)
            events = kernel_times(fn, calls=2)
            rows[f"{name}_gpu_time_per_fwd_bwd_ms"] = sum(us for _, us, _ in events) / 1000 / n
            log.info(
                "%s: per layer %.3f ms wall, %.3f ms GPU (%d layers)",
                name,
                rows[f"{name}_fwd_bwd_ms"],
                rows[f"{name}_gpu_time_per_fwd_bwd_ms"],
                n,
            )
    if not small and "stack_layer" in walls:
        # the first variant again, after the profiler: what a profiler session leaves behind
        select(False)
        after = rows["stack_layer_after_profiler_fwd_bwd_ms"] = cuda_time_ms(layer_call, iters=10) / n
        log.info("stack_layer after the profiler: %.3f ms wall per layer", after)
    tables.use_grad_staging(0)
    result["layer_stack_227m"] = rows


def training_curves(result: dict, steps: int, overrides: tuple[str, ...] = ()) -> None:
    common = [f"--train.max_steps={steps}", "--train.log_interval=1", "--train.eval_interval=0", *overrides]
    t0 = time.perf_counter()
    cpu = run_training(load_config("debug.toml", common + ["--train.device=cpu", "--train.dtype=float32"]))
    t1 = time.perf_counter()
    gpu = run_training(
        load_config("debug.toml", common + ["--train.device=cuda", "--train.dtype=bfloat16", "--train.compile=true"])
    )
    t2 = time.perf_counter()

    lc, lg = [r.loss for r in cpu], [r.loss for r in gpu]
    diffs = [abs(a - b) for a, b in zip(lc, lg)]
    result["training"] = {
        "steps": steps,
        "overrides": list(overrides),
        "cpu_fp32_loss": lc,
        "gpu_bf16_compiled_loss": lg,
        "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "last10_cpu": sum(lc[-10:]) / 10,
        "last10_gpu": sum(lg[-10:]) / 10,
        "first10_gpu": sum(lg[:10]) / 10,
        "cpu_seconds": t1 - t0,
        "gpu_seconds": t2 - t1,
        "gpu_tokens_per_s_last": gpu[-1].tokens_per_s,
    }
    graphs = run_training(
        load_config(
            "debug.toml",
            common
            + [
                "--train.device=cuda",
                "--train.dtype=bfloat16",
                "--train.compile=true",
                "--train.compile_mode=reduce-overhead",
            ],
        )
    )
    lgr = [r.loss for r in graphs]
    result["training_cudagraphs"] = {
        "gpu_bf16_cudagraphs_loss": lgr,
        "mean_abs_diff_vs_gpu_compiled": sum(abs(a - b) for a, b in zip(lg, lgr)) / len(lg),
        "last10": sum(lgr[-10:]) / 10,
        "tokens_per_s_last": graphs[-1].tokens_per_s,
        "seconds": time.perf_counter() - t2,
    }


THROUGHPUT_RUNS = ("dense", "ultramem_v2_cudagraphs", "ultramem_v2", "ultramem_v2_cudagraphs_unstaged")


def throughput_227m(
    result: dict,
    steps: int = 8,
    only: tuple[str, ...] = THROUGHPUT_RUNS,
    grad_accum: int | None = None,
    config: str = "227m.toml",
    overrides: tuple[str, ...] = (),
) -> None:
    """Training throughput of the 227M configs on this GPU (same trainer, data and settings):
    the dense baseline, UltraMemV2 compiled as the trainer does, and with CUDA graphs.
    grad_accum (default: the config's 256) shortens a step; the micro-batch stays the same.
    Runs go in the order of `only`; a name given twice runs twice (e.g. dense, ultramem, dense,
    ultramem, to see the drift within a run): its tokens_per_s is then the median over its runs,
    and `tokens_per_s_runs` lists each run's. `config` and `overrides` (e.g. debug.toml on the CPU
    for a smoke run) replace the 227M config."""
    common = [
        f"--train.max_steps={steps}",
        "--train.log_interval=1",
        "--train.eval_interval=0",
        "--model.memory.log_interval=1000",
        "--optim.warmup_steps=2",
    ]
    if grad_accum:
        common.append(f"--train.grad_accum={grad_accum}")
    common += list(overrides)
    extra_args = {
        "dense": ["--model.memory.type=none"],
        "ultramem_v2_cudagraphs": ["--train.compile_mode=reduce-overhead"],
        "ultramem_v2": [],
        # the tables' gradients added at once in each backward, not staged
        "ultramem_v2_cudagraphs_unstaged": ["--train.compile_mode=reduce-overhead", "--train.table_grad_flush=0"],
    }
    out = result.setdefault("throughput_227m", {})
    for name in only:
        t0 = time.perf_counter()
        # each run in its own folder: a run would otherwise resume the previous run's final checkpoint
        with tempfile.TemporaryDirectory(prefix=f"e2e-{name}-") as tmp:
            where = [f"--checkpoint.dir={tmp}/checkpoints", f"--metrics.tensorboard_dir={tmp}/tb"]
            cfg = load_config(config, common + extra_args[name] + where)
            records = run_training(cfg)
        tail = records[steps // 2 :]  # after compilation and warm-up
        rate = statistics.median(r.tokens_per_s for r in tail)
        earlier = out.get(name, {}).get("tokens_per_s_runs", [])
        out[name] = {
            "tokens_per_s": statistics.median(earlier + [rate]),
            "tokens_per_s_runs": earlier + [rate],
            "tokens_per_s_per_step": [r.tokens_per_s for r in records],
            "grad_accum": cfg.train.grad_accum,
            "config": config,
            "losses": [r.loss for r in records],
            "wall_s": time.perf_counter() - t0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
        log.info("%s %s: %.0f tokens/s (median of the last %d steps)", config, name, rate, len(tail))
    if "dense" in out:
        for name in out:
            if name != "dense":
                out[name]["vs_dense"] = out[name]["tokens_per_s"] / out["dense"]["tokens_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "e2e.json"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--training-overrides",
        nargs="*",
        default=[],
        help="config overrides for the training curves, e.g. --model.memory.pre_vdim=0",
    )
    parser.add_argument("--only", nargs="*", default=["compile", "layer", "training", "throughput"])
    parser.add_argument("--cudagraphs", action="store_true", help="also time the layer under mode='reduce-overhead'")
    parser.add_argument(
        "--stack-variants",
        nargs="*",
        default=[],
        help="the stack's variants to time (default all: stack_layer, stack_layer_staged, stack_layer_ids, "
        "stack_layer_staged_ids, stack_ffn)",
    )
    parser.add_argument("--throughput-runs", nargs="*", default=list(THROUGHPUT_RUNS), choices=THROUGHPUT_RUNS)
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument(
        "--throughput-override",
        action="append",
        default=[],
        help="a config override for every throughput run, e.g. --throughput-override=--train.compile_mode=default",
    )
    parser.add_argument(
        "--throughput-grad-accum",
        type=int,
        default=None,
        help="micro-batches per step (default: the config's); fewer make a shorter run",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "git_revision": os.environ.get("ULTRAMEM_GIT_REV"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "errors": {},
    }
    sections = {
        "compile": check_compile,
        "layer": lambda r: time_layer(r, args.cudagraphs),
        "stack": lambda r: time_layer_stack(r, variants_kept=tuple(args.stack_variants)),
        "training": lambda r: training_curves(r, args.steps, tuple(args.training_overrides)),
        "throughput": lambda r: throughput_227m(
            r,
            args.throughput_steps,
            tuple(args.throughput_runs),
            args.throughput_grad_accum,
            overrides=tuple(args.throughput_override),
        ),
    }
    for name in args.only:
        try:
            sections[name](result)
        except Exception:  # keep going: each section is evidence on its own
            result["errors"][name] = traceback.format_exc()
            log.error("section %s failed:\n%s", name, result["errors"][name])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    summary = {k: v for k, v in result.items() if k not in ("training", "training_cudagraphs")}
    if "layer_227m" in summary:  # the per-kernel lists were logged above
        summary["layer_227m"] = {k: v for k, v in summary["layer_227m"].items() if not k.endswith("_kernels_us")}
    print(json.dumps(summary, indent=1)[:6000])
    if "training" in result:
        tr = result["training"]
        print(
            "training: cpu last10 %.4f gpu last10 %.4f gpu first10 %.4f mean|diff| %.4f max|diff| %.4f"
            % (tr["last10_cpu"], tr["last10_gpu"], tr["first10_gpu"], tr["mean_abs_diff"], tr["max_abs_diff"])
        )
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
