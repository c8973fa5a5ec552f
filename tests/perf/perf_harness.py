"""What the perf checks measure, and how: compile events, host reads, op calls and backward
allocations of memory layers and of the trainer's step, all on CPU.

Figures come from torch's own counters and hooks, never from log text:
- graph breaks and captured graphs: `torch._dynamo.utils.counters` ("graph_break", "stats");
- compiles, recompiles and the kernels each one generated: `torch._dynamo.callback` start/end
  callbacks, `torch._dynamo.utils.get_compilation_metrics()` (which code each compile id is) and
  `torch._inductor.metrics.generated_kernel_count` (also restored from the FX graph cache on a hit);
- op calls and host reads at run time: a `TorchDispatchMode` that sees what compiled code
  dispatches (custom ops, extern GEMMs) without stopping compilation (`ignore_compile_internals`);
- allocations in the backward: the profiler's memory events (inductor's own buffers included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
import tomllib
import traceback
from collections import Counter

import numpy as np
import torch
from torch._dynamo.callback import callback_handler
from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics
from torch.utils._python_dispatch import TorchDispatchMode

import ultramem

HERE = pathlib.Path(__file__).resolve().parent
BUDGETS_PATH = HERE / "budgets.toml"
_PKG = pathlib.Path(ultramem.__file__).resolve().parent
_REPO = _PKG.parent


def load_budgets() -> dict:
    with open(BUDGETS_PATH, "rb") as f:
        return tomllib.load(f)


# ---------------------------------------------------------------------------------------------
# Sites: where in the repository a call came from (stable across line edits)


# Calls made on behalf of these functions are reports, allowed to read the device: their
# sites get the prefix "metrics: " (the trainer reports memory metrics every log_interval steps).
REPORTING = {"memory_metrics"}


def call_site() -> str:
    """'ultramem/x.py:func' of the innermost package frame on the stack, else the innermost
    frame outside torch (a test), else '?'; prefixed "metrics: " under a reporting function."""
    frames = traceback.extract_stack()[:-1]
    site = None
    fallback = "?"
    for fr in reversed(frames):
        path = pathlib.Path(fr.filename).resolve()
        if site is None and path.is_relative_to(_PKG):
            site = f"{path.relative_to(_REPO).as_posix()}:{fr.name}"
        elif fallback == "?" and "torch" not in path.parts and path != pathlib.Path(__file__).resolve():
            fallback = f"{path.name}:{fr.name}"
    reporting = any(fr.name in REPORTING for fr in frames)
    return ("metrics: " if reporting else "") + (site or fallback)


# ---------------------------------------------------------------------------------------------
# Op calls and host reads


# Ops whose result the host must see before it can go on: a device-to-host sync on CUDA.
# `_local_scalar_dense` is what .item(), float(t), int(t) and bool(t) dispatch to; the others
# have an output size that depends on the data.
_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_DATA_DEPENDENT = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.repeat_interleave.Tensor,
}


def _bool_index(func, args) -> bool:
    return func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched at run time and the host reads among them, by call site.

    Custom ops are opaque here, as they are to a CUDA stream: what their CPU kernels do inside
    (the CPU-only index range checks) is not seen, because the mode is off while it handles an
    op. Compiled code runs compiled under this mode (ignore_compile_internals), and the ops it
    dispatches are its extern kernels and custom ops; its generated kernels are counted at
    compile time instead. `host_tensors`: storages that live on the host by design on every
    device (the optimizer's step counters), whose reads are no device sync."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.backward_ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self._host = {t.untyped_storage().data_ptr() for t in host_tensors}
        self._patched: list = []

    # a mutating custom op runs in an aot_eager graph as auto_functionalized(op, ...)
    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            inner = _functionalized_op(func, args)
            self._count(f"{inner.namespace}::{inner._opname}" if inner is not None else f"higher_order::{func.name()}")
            return func(*args, **kwargs)
        if not func.is_view and func.namespace != "profiler":
            self._count(f"{func.namespace}::{func._opname}")
        if func is _SCALAR_READ:
            if args[0].untyped_storage().data_ptr() not in self._host:
                self.syncs[call_site()] += 1
        elif func in _DATA_DEPENDENT or _bool_index(func, args):
            self.syncs[call_site() + f" ({func._opname})"] += 1
        return func(*args, **kwargs)

    def _count(self, name: str) -> None:
        self.ops[name] += 1
        if torch._C._current_graph_task_id() != -1:
            self.backward_ops[name] += 1

    def __enter__(self):
        # .tolist() and .numpy() read CPU tensors without dispatching anything: count them here
        for name in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, name)
            self._patched.append((name, orig))

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                self.syncs[call_site() + f" ({_name})"] += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._patched:
            setattr(torch.Tensor, name, orig)
        self._patched = []
        return super().__exit__(*exc)

    def custom_ops(self, backward_only: bool = False) -> dict[str, int]:
        src = self.backward_ops if backward_only else self.ops
        out = Counter()
        for k, v in src.items():
            if k.startswith("ultramem::"):  # an `<op>_opaque` call is its op's (see graph_custom_ops)
                out[k.split("::", 1)[1].removesuffix("_opaque")] += v
        return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Allocations in the backward


def backward_allocations(fn, min_bytes: int) -> tuple[list[int], int]:
    """Run fn() under the profiler; the sizes (bytes) of the allocations of at least min_bytes
    made while the autograd engine ran a backward node (compiled backwards included), and the
    largest allocation made there."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    spans = [
        (e.start_ns(), e.start_ns() + e.duration_ns())
        for e in events
        if e.name().startswith("autograd::engine::evaluate_function")
    ]
    sizes = [
        e.nbytes()
        for e in events
        if e.name() == "[memory]" and e.nbytes() > 0 and any(a <= e.start_ns() <= b for a, b in spans)
    ]
    assert spans and sizes, "the profiler saw no backward, or no allocation in it"
    return [s for s in sizes if s >= min_bytes], max(sizes)


# ---------------------------------------------------------------------------------------------
# Compile events


@dataclasses.dataclass
class CompileEvent:
    compile_id: str
    trigger: str
    kernels: int


class CompileRecorder:
    """Compile events (Dynamo frames and lazily compiled backwards) and the kernels Inductor
    generated during each, plus deltas of Dynamo's counters, between start() and stop()."""

    def __init__(self):
        self.events: list[CompileEvent] = []
        self._open: dict[str, int] = {}

    def _on_start(self, args) -> None:
        import torch._inductor.metrics as metrics

        self._open[str(args.compile_id)] = metrics.generated_kernel_count

    def _on_end(self, args) -> None:
        import torch._inductor.metrics as metrics

        cid = str(args.compile_id)
        start = self._open.pop(cid, metrics.generated_kernel_count)
        self.events.append(CompileEvent(cid, args.callback_trigger.name, metrics.generated_kernel_count - start))

    def __enter__(self):
        self._breaks = sum(counters["graph_break"].values())
        self._graphs = counters["stats"]["unique_graphs"]
        # Dynamo keeps the last 64 compiles only: after a long test session the list no longer
        # grows, so start it empty rather than remembering its length
        clear_compilation_metrics()
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        return self

    def __exit__(self, *exc):
        callback_handler.remove_start_callback(self._on_start)
        callback_handler.remove_end_callback(self._on_end)
        self.graph_breaks = sum(counters["graph_break"].values()) - self._breaks
        self.break_reasons = [r for r in counters["graph_break"]]
        self.unique_graphs = counters["stats"]["unique_graphs"] - self._graphs
        self.metrics = get_compilation_metrics()
        return False

    def frames(self, names: dict) -> dict[str, list[str]]:
        """Compiled code → the compile ids of its graphs, in order; `names` maps (file, first
        line) of a code object to a readable name such as 'Block.forward' or 'model.py:run_stage'."""
        out: dict[str, list[str]] = {}
        for m in self.metrics:
            if m.compile_id is None or m.co_filename is None:
                continue
            key = (str(pathlib.Path(m.co_filename).resolve()), m.co_firstlineno)
            out.setdefault(names.get(key, f"{pathlib.Path(m.co_filename).name}:{m.co_name}"), []).append(
                str(m.compile_id)
            )
        return out

    def kernels_by_frame(self, names: dict) -> dict[str, int]:
        """'model.py:run_stage[i]' (its i-th graph) → kernels generated for its forward and backward."""
        per_id = Counter()
        for e in self.events:
            per_id[e.compile_id] += e.kernels
        return {
            f"{name}[{i}]": per_id[cid] for name, ids in sorted(self.frames(names).items()) for i, cid in enumerate(ids)
        }

    def recompiles(self) -> list[str]:
        """Compile ids of a second or later graph of one code object ('frame/attempt', attempt > 0)."""
        return sorted({e.compile_id for e in self.events if e.trigger == "DYNAMO" and not e.compile_id.endswith("/0")})


def code_names(*classes) -> dict:
    """(file, first line) of each class's forward → 'Class.forward'."""
    out = {}
    for cls in classes:
        code = cls.forward.__code__
        out[(str(pathlib.Path(code.co_filename).resolve()), code.co_firstlineno)] = f"{cls.__name__}.forward"
    return out


# ---------------------------------------------------------------------------------------------
# The trainer's compiled step on a tiny model

# The model is tiny, but its value tables are large next to everything else the backward
# allocates (the 300 × 32 embedding gradient, 2 × 16 × 300 logits): an allocation of a
# table's size in the backward can only be a dense table gradient.
TRAIN_OVERRIDES = [
    "--model.vocab_size=300",
    "--model.dim=32",
    "--model.n_layers=2",
    "--model.n_heads=2",
    "--model.ffn_hidden=48",
    "--model.max_seq_len=16",
    "--model.memory.knum=32",
    "--model.memory.kdim=8",
    "--model.memory.vdim=32",
    "--model.memory.pre_vdim=16",
    "--model.memory.knn=2",
    "--model.memory.calibration_rounds=1",
    "--model.memory.log_interval=3",
    "--data.vocab_size=300",
    "--train.seq_len=16",
    "--train.batch_size=2",
    "--train.grad_accum=2",
    "--train.max_steps=10",
    "--train.log_interval=1",
    "--train.compile=true",
    "--optim.warmup_steps=2",
    "--metrics.tensorboard=false",
]


def build_compiled_trainer():
    """The trainer as `build_trainer` wires it (training model with gradient buffers and staging,
    a block and its memory layer compiled as one region by `parallelize`), on random tokens,
    prepared for its first step."""
    from ultramem.data import TokenWindows
    from ultramem.train.config import load_config
    from ultramem.train.optim import build_optimizer
    from ultramem.train.trainer import DistInfo, Trainer, build_training_model, parallelize

    cfg = load_config("debug", TRAIN_OVERRIDES)
    dev = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_training_model(cfg, dev)
    par = parallelize(model, cfg, DistInfo(), dev)
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=5000).astype(np.uint16)
    batches = TokenWindows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    trainer = Trainer(cfg, model, opt, sched, batches, dev, DistInfo(), parallel=par)
    trainer.prepare()
    return trainer


def optimizer_step_counters(optimizer) -> list[torch.Tensor]:
    return [s["step"] for s in optimizer.state.values() if torch.is_tensor(s.get("step"))]


def table_bytes(tables) -> int:
    """Bytes of the smallest value table (what a dense gradient of it would take)."""
    return min(p.numel() * 4 for p in tables.value_parameters())


# ---------------------------------------------------------------------------------------------
# Timing: ratios of two callables measured in the same run, interleaved


@dataclasses.dataclass
class Ratio:
    name: str
    times_a: list[float]
    times_b: list[float]

    @property
    def value(self) -> float:
        """Median of the paired ratios: each pair ran back to back, so both halves saw about
        the same load from the machine's other work."""
        return float(np.median(np.asarray(self.times_a) / np.asarray(self.times_b)))

    @property
    def of_minima(self) -> float:
        return min(self.times_a) / min(self.times_b)

    def summary(self) -> dict:
        return {
            "ratio": round(self.value, 4),
            "ratio_of_minima": round(self.of_minima, 4),
            "a_median_us": round(float(np.median(self.times_a)) * 1e6, 1),
            "b_median_us": round(float(np.median(self.times_b)) * 1e6, 1),
            "pairs": len(self.times_a),
        }


class PairTimer:
    """Each call times a() and b() back to back (which one goes first alternates), in CPU time
    of this thread: time spent waiting for a core that other work holds is not counted (on one
    thread, all of an op's work runs on this thread)."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.times_a: list[float] = []
        self.times_b: list[float] = []

    def __call__(self) -> None:
        flip = len(self.times_a) % 2 == 1
        first, second = (self.b, self.a) if flip else (self.a, self.b)
        t0 = time.thread_time()
        first()
        t1 = time.thread_time()
        second()
        t2 = time.thread_time()
        da, db = (t2 - t1, t1 - t0) if flip else (t1 - t0, t2 - t1)
        self.times_a.append(da)
        self.times_b.append(db)


@contextlib.contextmanager
def one_thread():
    """Time on one thread: CI's two cores are shared, and a second thread only adds noise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_pairs(a, b, pairs: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Time a() and b() alternately, `pairs` times each, after `warmup` untimed pairs."""
    with one_thread():
        for _ in range(warmup):
            a()
            b()
        timer = PairTimer(a, b)
        for _ in range(pairs):
            timer()
    return timer.times_a, timer.times_b


@contextlib.contextmanager
def no_new_compiles():
    """Fail if Dynamo compiles anything inside (a timing must not include a compile)."""
    before = counters["stats"]["unique_graphs"]
    yield
    after = counters["stats"]["unique_graphs"]
    assert after == before, f"{after - before} graph(s) compiled during a timing"


# ---------------------------------------------------------------------------------------------
# Memory layers on their own, compiled as the trainer compiles them (one graph per layer call,
# fullgraph off), through AOT autograd without Inductor: the graphs are what is checked here,
# the kernels are counted on the trainer's step.


class GraphRecorder:
    """A torch.compile backend that keeps the Dynamo graph and AOT autograd's forward and
    backward graphs, and runs them as they are (aot_eager)."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo: list[torch.fx.GraphModule] = []
        self.forward: list[torch.fx.GraphModule] = []
        self.backward: list[torch.fx.GraphModule] = []

        def keep(into):
            def compiler(gm, example_inputs):
                into.append(gm)
                return make_boxed_func(gm.forward)

            return compiler

        self._aot = aot_autograd(fw_compiler=keep(self.forward), bw_compiler=keep(self.backward))

    def __call__(self, gm, example_inputs):
        self.dynamo.append(gm)
        return self._aot(gm, example_inputs)


def _functionalized_op(target, args) -> torch._ops.OpOverload | None:
    """The mutating op an auto_functionalized call runs (None for another target)."""
    hops = (torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2)
    return args[0] if target in hops else None


def graph_custom_ops(graphs) -> dict[str, int]:
    """ultramem:: ops called by the graphs, by name. On CPU an op's traced body is one call of its
    `<op>_opaque` twin, which counts as the op (a mutating one through auto_functionalized)."""
    out = Counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            target = node.target
            if node.op == "call_function":
                target = _functionalized_op(target, node.args) or target
            if (
                node.op == "call_function"
                and isinstance(target, torch._ops.OpOverload)
                and target.namespace == "ultramem"
            ):
                out[target._opname.removesuffix("_opaque")] += 1
    return dict(sorted(out.items()))


LAYER_DIM = 32
LAYER_TOKENS = (2, 8)
# Tables far larger than anything else the layer's backward allocates (see TRAIN_OVERRIDES).
LAYER_VARIANTS = {
    "ultramem_v2": dict(type="ultramem_v2", pre_vdim=16),
    "ultramem_v2_no_pre_values": dict(type="ultramem_v2", pre_vdim=0),
    "ultramem_v1": dict(type="ultramem_v1", key_expand=2),
    "memory_plus": dict(type="memory_plus"),
}


def build_layer_pair(variant: str):
    """(tables or None, two layers of one model) for a variant, initialized, in training mode,
    with the tables' gradient buffers on as the trainer sets them."""
    from ultramem.config import MemoryConfig, ModelConfig
    from ultramem.layers import build_memory

    memory = dict(knum=32, kdim=8, vdim=32, knn=4, heads=2, calibration_rounds=1, key_balance_coef=0.1)
    if variant != "memory_plus":
        memory["tucker_rank_penalty"] = 0.1
    memory.update(LAYER_VARIANTS[variant])
    cfg = ModelConfig(dim=LAYER_DIM, ffn_hidden=48, n_layers=2, n_heads=2, memory=MemoryConfig(**memory))
    tables, layers = build_memory(cfg, 2)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.reset_parameters(g, tables)
        layer.train()
    if tables is not None:
        tables.use_grad_buffers()
    return tables, layers


def layer_value_bytes(tables, layers) -> int:
    """Bytes of the smallest value table the layers read (v1: each layer's own)."""
    params = tables.value_parameters() if tables is not None else layers[0].value_parameters()
    return min(p.numel() * p.element_size() for p in params)


def layer_step(layer, tables, x, gy):
    y, aux = layer(x, tables)
    ((y * gy).sum() + aux).backward()
