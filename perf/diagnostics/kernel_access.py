"""Which tensors Inductor thinks a Triton kernel reads and writes, and the kernel's PTX, on a CPU.

When torch.compile traces a Triton launch (`wrap_triton` inside a `torch.library.triton_op`),
Inductor analyses the kernel's TTIR to find the tensors it writes; every tensor it counts as
written is cloned before the launch and copied back after it, and every tensor when the analysis
fails. This script runs that analysis, with a CUDA target declared (no GPU needed), for the
kernels of each op family in FAMILIES (retrieval at the 227M layer's launch and on its other
kernel paths; weighted_lookup, pre_value_gate, gate_lookup, the accumulating and the staged table
gradients at the 227M layer's shapes), and prints reads and writes per pointer argument. It exits
non-zero when an input of an op counts as written (not a tensor the launcher allocates, nor a
buffer the op writes or adds into by design: gradient buffers, a staging area), or when the
analysis fails. --scalars-as-constexprs runs it as torch < 2.12 does, which hands the kernel's
scalar arguments to Triton as constexprs.

With --ptx it also compiles each launch for sm_90 and prints the number of PTX instructions and a
hash of them (DWARF debug data, which holds file paths, left out; two revisions with the same hash
run the same machine code, whatever their sources say), and ptxas's registers per thread: with
the launcher's register cap (maxnreg) where it sets one, and without it, as Inductor compiles a
traced launch (its user-kernel configs keep only warps and stages).

    python -m perf.diagnostics.kernel_access [--ptx] [--only FAMILY] [--scalars-as-constexprs]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget


class _DeclaredCudaTarget:
    """Just enough of a Triton driver to generate TTIR for sm_90 without a device."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, *args):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def declared_cuda_target():
    """Triton's active driver replaced by _DeclaredCudaTarget for the duration."""
    driver = triton.runtime.driver
    saved = driver._active
    driver.set_active(_DeclaredCudaTarget())
    try:
        yield
    finally:
        driver._active = saved


# ------------------------------------------------------------------------------------ capture


class Launch(NamedTuple):
    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict
    inputs: frozenset[str]  # pointer arguments on an input of the op that it must not write


class _Capture:
    """Stands in for a kernel: records the launch's arguments instead of running it."""

    def __init__(self, kernel, sink: _Launches):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.sink.add(self.kernel, args, kwargs)

        return call


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


class _Launches(dict):
    """Launches by "<call>: <kernel>", a kernel's second launch within one call as
    "<call>: <kernel> (2)"; a pointer argument is an input when it shares storage with one of
    `inputs`."""

    def __init__(self, inputs):
        super().__init__()
        self.call, self.inputs = "", {_storage(x) for x in inputs} - {0}

    def add(self, kernel, args, kwargs):
        name = kernel.fn.__name__
        key, n = f"{self.call}: {name}", 1
        while key in self:
            n += 1
            key = f"{self.call}: {name} ({n})"
        given = frozenset(
            p for p, x in zip(kernel.arg_names, args) if isinstance(x, torch.Tensor) and _storage(x) in self.inputs
        )
        self[key] = Launch(kernel, args, kwargs, given)


def _capture(calls: dict, inputs) -> dict[str, Launch]:
    """Runs each of `calls` (name: a function calling an op's CUDA launcher on CPU tensors) with
    every kernel of ultramem's Triton modules replaced by a `_Capture`; `inputs`: the tensors the
    calls hand the ops that no launch may write."""
    from ultramem.ops._triton import gate_lookup, layer_stats, normed_keys, retrieval, staged_grad, weighted_lookup

    captured = _Launches(inputs)
    saved = [
        (module, name, kernel)
        for module in (weighted_lookup, gate_lookup, staged_grad, retrieval, layer_stats, normed_keys)
        for name, kernel in vars(module).items()
        if isinstance(kernel, triton.runtime.JITFunction) and name.endswith("_kernel")
    ]
    try:
        for module, name, kernel in saved:
            setattr(module, name, _Capture(kernel, captured))
        for call_name, call in calls.items():
            captured.call = call_name
            call()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return dict(captured)


# ------------------------------------------------------------------------------------ families

# Shapes of the retrieval launches (`retrieval_launches`): t tokens, h heads, n keys a side read
# from score blocks padded by `pad` rows (the layer's GEMM outputs), rank r, m cores, k kept pairs;
# strided_out: the backward writes into rank-strided views instead of fresh gradients; stacked:
# the stacked op (both sides in one tensor laid out [H, 2, T, n, r], as the layer's GEMM writes it);
# rows: the stacked forward writing table rows (tdqkr_retrieval_rows, inference: no backward),
# from the raw queries (kdim 192, the first 2·kdim columns of the [T, 3·192] projection) as the
# layer passes them.
RETRIEVAL_CASES = {
    # the 227M layer: 2 warps, register caps, padded keys, bf16, both sides stacked
    "227M": dict(t=12288, h=1, n=1138, pad=14, r=2, m=2, k=32, stacked=True),
    "227M rows": dict(t=12288, h=1, n=1138, pad=14, r=2, m=2, k=32, stacked=True, rows=True),
    # 8 warps, grid in registers; several heads, rank 3, 3 cores
    "k=64": dict(t=4, h=2, n=300, pad=4, r=3, m=3, k=64, dtype=torch.float32),
    # tiled grid: staged factors, candidates, the bisection fallback; backward in chunks
    "k=128": dict(t=2, n=200, pad=0, k=128, dtype=torch.float16),
    # backward into rank-strided views: the element-wise zero fill
    "strided out": dict(t=2, n=50, pad=6, k=8, dtype=torch.float32, strided_out=True),
}


def _retrieval_case(
    case, t, n, k, h=1, pad=0, r=2, m=2, dtype=torch.bfloat16, strided_out=False, stacked=False, rows=False
) -> dict:
    from ultramem.ops._triton import retrieval as tri

    if stacked:
        sub = torch.empty(h, 2, t, n + pad, r, dtype=dtype).permute(2, 0, 1, 3, 4)
        a, b = sub.unbind(2)
    else:
        a, b = (torch.empty(t, h, n + pad, r, dtype=dtype) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    cores = torch.randn(h, m, r, r, generator=g)
    u, v = torch.randn(h, r, generator=g), torch.randn(h, r, generator=g)
    ids = torch.zeros(t, h, k, dtype=torch.int64)
    grad = torch.empty(t, h, k, m, dtype=dtype)
    perm, row_window = torch.zeros(4 * n * n, dtype=torch.int64), torch.tensor([0, 20 * n * n])
    q = torch.empty(t, 3 * h * 192, dtype=dtype)[:, : 2 * h * 192].view(t, h, 2, 192)

    def forward():
        if rows:
            tri.tdqkr_retrieval_rows_cuda(sub, cores, u, v, k, n, perm, n * n, row_window, q, 1e-6)
        elif stacked:
            tri.tdqkr_retrieval_stacked_cuda(sub, cores, u, v, k, n)
        else:
            tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k, n)

    def backward():
        if stacked:
            tri.tdqkr_retrieval_stacked_backward_cuda(grad, sub, cores, ids, n)
        elif strided_out:
            out = tuple(torch.empty(t, h, n + pad, 2 * r, dtype=dtype)[..., ::2] for _ in range(2))
            tri.launch_backward(grad, a, b, cores, ids, n, out=out)
        else:
            tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids, n)

    calls = {f"{case} forward": forward} | ({} if rows else {f"{case} backward": backward})
    return _capture(calls, (a, b, cores, u, v, ids, grad, perm, row_window, q))


def retrieval_launches(cases: dict = RETRIEVAL_CASES) -> dict[str, Launch]:
    """tdqkr_retrieval's kernels, forward and backward, for each of `cases` (named shapes, as
    RETRIEVAL_CASES)."""
    launches = {}
    for case, shape in cases.items():
        launches |= _retrieval_case(case, **shape)
    return launches


def _lookup_tensors() -> SimpleNamespace:
    """The lookup ops' arguments at the 227M layer's shapes: 12,288 tokens of 32 rows (int64 ids)
    from 2.59M-row tables of 192 columns (values and pre-values, bf16), 2 cores, bf16
    activations; fp32 gradient buffers (never read here: left uninitialized). `inputs`: all but
    the gradient buffers, which the backwards write or add into."""
    t, e, d, n, m = 12288, 32, 192, 2_592_000, 2
    g = torch.Generator().manual_seed(0)
    a = SimpleNamespace(
        rows=torch.randint(0, n, (t, e), generator=g),
        values=torch.empty(n, d, dtype=torch.bfloat16),
        pre=torch.empty(n, d, dtype=torch.bfloat16),
        x=torch.randn(t, d, generator=g).bfloat16(),
        scores=torch.randn(t, e, m, generator=g).bfloat16(),
        gate=torch.randn(t, e, generator=g).bfloat16(),
        grad_out=torch.randn(t, d, generator=g).bfloat16(),
        grad_gate=torch.randn(t, e, generator=g).bfloat16(),
    )
    a.inputs = tuple(vars(a).values())
    a.grad_values, a.grad_pre = torch.empty(n, d), torch.empty(n, d)
    return a


def _deterministic():
    """Deterministic mode (sorted table gradients, one writer per row) for the duration."""
    from unittest import mock

    from ultramem.ops import determinism

    return mock.patch.object(determinism, "_deterministic", True)


def _forward_and_backwards(forward, backward, inputs) -> dict[str, Launch]:
    """A table op's launches: the forward, the backward with atomics and deterministic."""

    def backward_deterministic():
        with _deterministic():
            backward()

    return _capture(
        {"forward": forward, "backward": backward, "backward, deterministic": backward_deterministic}, inputs
    )


def weighted_lookup_launches() -> dict[str, Launch]:
    """`weighted_lookup`'s kernels: the forward, the backward (atomics; deterministic: dots, then
    the segment scatter's two passes). The dense backward's zero-filled gradient is
    `grad_values` here (the same launch, without a 2 GB fill)."""
    from ultramem.ops._triton import weighted_lookup as wl

    a = _lookup_tensors()
    return _forward_and_backwards(
        lambda: wl.weighted_lookup_cuda(a.rows, a.values, a.scores),
        lambda: wl.lookup_table_grad(a.grad_out, a.rows, a.values, a.scores, a.grad_values, accumulate=False),
        a.inputs,
    )


def pre_value_gate_launches() -> dict[str, Launch]:
    """`pre_value_gate`'s kernels: the forward (row dots), the backward (a lookup forward for
    grad_x, then the table gradient: atomics, or deterministic the segment scatter)."""
    from ultramem.ops._triton import pre_value_gate as pv

    a = _lookup_tensors()
    return _forward_and_backwards(
        lambda: pv.pre_value_gate_cuda(a.rows, a.pre, a.x),
        lambda: pv.gate_table_grad(a.grad_gate, a.rows, a.pre, a.x, a.grad_pre, accumulate=False),
        a.inputs,
    )


def gate_lookup_launches() -> dict[str, Launch]:
    """`gate_lookup`'s kernels (GELU gate): the forward (the column-chunk kernel; the entry-block
    kernel, which runs above 32 entries, at the same shapes), the fused backward into both
    gradient buffers (atomics; deterministic: then the segment scatter per table)."""
    from unittest import mock

    from ultramem.ops._triton import gate_lookup as gl

    a = _lookup_tensors()

    def forward_entry_blocks():
        with mock.patch.object(gl, "CHUNKS_MAX_ENTRIES", 0):
            gl.gate_lookup_cuda(a.rows, a.values, a.pre, a.x, a.scores, True)

    def backward(deterministic=False):
        args = (a.grad_out, None, a.rows, a.values, a.pre, a.x, a.scores, a.gate, True)
        gl.gate_lookup_backward_cuda(*args, a.grad_values, a.grad_pre, deterministic=deterministic)

    return _capture(
        {
            "forward": lambda: gl.gate_lookup_cuda(a.rows, a.values, a.pre, a.x, a.scores, True),
            "forward, entry blocks": forward_entry_blocks,
            "backward": backward,
            "backward, deterministic": lambda: backward(deterministic=True),
        },
        a.inputs,
    )


def table_grad_launches() -> dict[str, Launch]:
    """The accumulating backwards (`table_grad`: what `*_backward_into` runs without staging):
    the table gradient added into the caller's buffer, which these kernels legitimately write
    (atomics; deterministic: the segment scatter adding to the rows)."""
    from ultramem.ops._triton import pre_value_gate as pv
    from ultramem.ops._triton import weighted_lookup as wl

    a = _lookup_tensors()

    def lookup():
        wl.weighted_lookup_backward_accumulate_cuda(a.grad_values, a.grad_out, a.rows, a.values, a.scores)

    def gate():
        pv.pre_value_gate_backward_accumulate_cuda(a.grad_pre, a.grad_gate, a.rows, a.pre, a.x)

    def deterministic(call):
        def run():
            with _deterministic():
                call()

        return run

    return _capture(
        {
            "weighted_lookup": lookup,
            "weighted_lookup, deterministic": deterministic(lookup),
            "pre_value_gate": gate,
            "pre_value_gate, deterministic": deterministic(gate),
        },
        a.inputs,
    )


def staged_grad_launches() -> dict[str, Launch]:
    """The staged backwards (the trainer's path at 227M: gate_lookup's, and the one-table ones
    of weighted_lookup and pre_value_gate), each one launch that also moves the fill level (and
    adds into the tables when the area is full): they write the staging area, and the flush's
    block add reads it. The staging areas hold 4 micro-batches of one layer (the trainer's holds
    every memory layer's: a size that changes no launch but the sort's)."""
    from ultramem.ops import GradStaging
    from ultramem.ops._triton import staged_grad as sg

    a = _lookup_tensors()
    t, e, m = a.scores.shape
    d = a.values.shape[1]

    def staging(vdim, pre_vdim):
        return GradStaging(4 * t, e, m, vdim, pre_vdim, torch.bfloat16, "cpu")

    both, lookup, gate = staging(d, d), staging(d, 0), staging(0, d)
    backwards = _capture(
        {
            "gate_lookup backward": lambda: sg.staged_gate_lookup_backward_cuda(
                a.grad_out, None, a.rows, a.values, a.pre, a.x, a.scores, a.gate, True, a.grad_values, a.grad_pre, both
            ),
            "weighted_lookup backward": lambda: sg.staged_lookup_backward_cuda(
                a.grad_out, a.rows, a.values, a.scores, a.grad_values, lookup
            ),
            "pre_value_gate backward": lambda: sg.staged_gate_backward_cuda(
                a.grad_gate, a.rows, a.pre, a.x, a.grad_pre, gate
            ),
        },
        a.inputs,
    )
    # (the fill level stays 0, the kernels being captured: without `wait` all is sorted)
    flush = _capture(
        {"flush": lambda: both.flush(a.grad_values, a.grad_pre, kernels=True, wait=False)},
        [*both._tensors(), both.fill],
    )
    return backwards | flush


def layer_stats_launches() -> dict[str, Launch]:
    """The statistics of a 227M layer's training forward (`perf.benches.layer_stats`'s case); it
    adds into the layer's counters (hits, sums), which are the op's to write."""
    from perf.benches.layer_stats import stats_case
    from ultramem.ops._triton import layer_stats as ls

    c = stats_case(False, "cpu")
    hits, sums = torch.zeros(c.n, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)

    def forward():
        ls.layer_stats_accumulate_cuda(hits, sums, c.ids, c.y, c.scores)

    return _capture({"forward": forward}, (c.ids, c.y, c.scores))


def normed_keys_launches() -> dict[str, Launch]:
    """The keys' normalization of a 227M layer (keys [1, 2, 1138, 192, 2] fp32, padded to 1152
    keys, out in bf16) and its backward."""
    from ultramem.ops._triton import normed_keys as nk

    keys = torch.randn(1, 2, 1138, 192, 2)
    grad_out = torch.randn(1, 2, 1152, 2, 192, dtype=torch.bfloat16)
    return _capture(
        {
            "forward": lambda: nk.normed_keys_cuda(keys, 1e-6, 1152, torch.bfloat16),
            "backward": lambda: nk.normed_keys_backward_cuda(grad_out, keys, 1e-6),
        },
        (keys, grad_out),
    )


# The op families whose kernels this covers, by name (--only).
FAMILIES = {
    "retrieval": retrieval_launches,
    "weighted_lookup": weighted_lookup_launches,
    "pre_value_gate": pre_value_gate_launches,
    "gate_lookup": gate_lookup_launches,
    "table_grad": table_grad_launches,
    "staged_grad": staged_grad_launches,
    "layer_stats": layer_stats_launches,
    "normed_keys": normed_keys_launches,
}


# ------------------------------------------------------------------------------------ analysis


class AnalysisFailed(RuntimeError):
    pass


class _Failures(logging.Handler):
    """Records the warnings the analysis logs: it logs its exception and carries on."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def analysis_available() -> bool:
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    return hasattr(tkw, "identify_accessed_tensors") or hasattr(tkw, "identify_mutated_tensors")


def _scalars_as_constexprs(kernel, named: dict):
    """The analysis as torch < 2.12 runs it: every scalar argument handed to Triton as a
    constexpr (and left out of the analysed function's parameters)."""
    import triton.compiler.compiler as compiler
    import triton.experimental.gluon  # noqa: F401  (subclasses ASTSource on import: before the patch)
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    scalars = {
        p: x
        for p, x in named.items()
        if not isinstance(x, torch.Tensor) and not kernel.params[kernel.arg_names.index(p)].is_constexpr
    }
    source, generate = compiler.ASTSource, tkw.generate_ttir

    class WithScalars(source):
        def __init__(self, fn, signature, constexprs=None, attrs=None):
            super().__init__(fn, signature, {**(constexprs or {}), **scalars}, attrs)

    def generate_ttir(*args, **kwargs):
        module, names = generate(*args, **kwargs)
        return module, [p for p in names if p not in scalars]

    @contextlib.contextmanager
    def patched():
        compiler.ASTSource, tkw.generate_ttir = WithScalars, generate_ttir
        try:
            yield
        finally:
            compiler.ASTSource, tkw.generate_ttir = source, generate

    return patched()


def accesses(launch: Launch, scalars_as_constexprs: bool = False) -> tuple[set[str], set[str]]:
    """(read, written) pointer arguments of a launch by Inductor's analysis (read is empty on torch
    versions whose analysis finds writes only). Raises AnalysisFailed where Inductor gives up and
    takes every tensor as written. Call under declared_cuda_target()."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    kernel = launch.kernel
    named = dict(zip(kernel.arg_names, launch.args)) | launch.kwargs
    for option in ("num_warps", "num_stages", "maxnreg"):
        named.pop(option, None)

    failures = _Failures()
    logger = getattr(tkw, "log", logging.getLogger("torch._dynamo"))
    logger.addHandler(failures)
    try:
        with _scalars_as_constexprs(kernel, named) if scalars_as_constexprs else contextlib.nullcontext():
            if hasattr(tkw, "identify_accessed_tensors"):
                rw = tkw.identify_accessed_tensors(kernel, named, {}).read_writes
                reads, writes = {d.name for d in rw.reads}, {d.name for d in rw.writes}
            else:
                reads, writes = set(), set(tkw.identify_mutated_tensors(kernel, named, {}))
    finally:
        logger.removeHandler(failures)
    if failures.messages:
        raise AnalysisFailed(f"{kernel.fn.__name__}: {failures.messages[0]}")
    return reads, writes


# ------------------------------------------------------------------------------------ machine code


def _compiled(launch: Launch, cap: bool = True):
    kwargs = launch.kwargs if cap else {o: x for o, x in launch.kwargs.items() if o != "maxnreg"}
    return launch.kernel.warmup(*launch.args, grid=(1,), **kwargs)


def ptx_summary(launch: Launch) -> tuple[int, str]:
    """(instructions, hash of them) of the kernel compiled for the declared target."""
    code = _compiled(launch).asm["ptx"].split("Length of Unit")[0]  # the DWARF data from there on names the sources
    lines = [ln.strip() for ln in code.splitlines()]
    ins = [ln for ln in lines if ln[:1].isalpha() or ln[:1] == "@"]  # instructions, predicated ones too
    return len(ins), hashlib.sha256("\n".join(ins).encode()).hexdigest()[:16]


def registers(launch: Launch, cap: bool = True) -> str:
    """ptxas's registers per thread (and stack bytes) for the kernel compiled with the launch's
    options (cap=False: without its maxnreg)."""
    cubin = _compiled(launch, cap).asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{found.group(1)} registers, {found.group(2)} B stack" if found else "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptx", action="store_true", help="also compile for sm_90: PTX summary and registers")
    parser.add_argument("--only", choices=list(FAMILIES), help="one op family's kernels")
    parser.add_argument("--scalars-as-constexprs", action="store_true", help="run the analysis as torch < 2.12 does")
    args = parser.parse_args(argv)
    n_launches, bad = 0, []
    with declared_cuda_target():
        for family in [args.only] if args.only else FAMILIES:
            print(f"== {family}")
            for name, launch in FAMILIES[family]().items():
                n_launches += 1
                print(name)
                if args.ptx:
                    n_ins, digest = ptx_summary(launch)
                    print(f"  {n_ins} PTX instructions, sha256 {digest}")
                    cap = launch.kwargs.get("maxnreg")
                    if cap is None:
                        print(f"  {registers(launch)}")
                    else:
                        print(f"  maxnreg {cap}: {registers(launch)}; traced (no cap): {registers(launch, cap=False)}")
                try:
                    reads, writes = accesses(launch, args.scalars_as_constexprs)
                except AnalysisFailed as e:
                    print(f"  the analysis FAILED (every tensor counts as written): {e}")
                    bad.append(f"{family}: {name}")
                    continue
                inputs_written = sorted(writes & launch.inputs)
                print(f"  reads:  {', '.join(sorted(reads))}\n  writes: {', '.join(sorted(writes))}")
                print(f"  inputs counted as written (cloned per traced call): {', '.join(inputs_written) or 'none'}")
                if inputs_written:
                    bad.append(f"{family}: {name}")
    print(f"== {n_launches} launches; inputs counted as written or analysis failed: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
