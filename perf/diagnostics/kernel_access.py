"""Which tensors Inductor thinks a Triton kernel reads and writes, and the kernel's PTX, on a CPU.

When torch.compile traces a Triton launch (`wrap_triton` inside a `torch.library.triton_op`),
Inductor analyses the kernel's TTIR to find the tensors it writes; every tensor it counts as
written is cloned before the launch and copied back after it. This script runs that analysis for
the retrieval kernels as the 227M layer launches them, with a CUDA target declared (no GPU
needed), and prints reads and writes per pointer argument. It exits non-zero when an input of the
op (not a tensor the launcher allocates) counts as written, or when the analysis fails (Inductor
then takes every tensor as written). --scalars-as-constexprs runs it as torch < 2.12 does, which
hands the kernel's scalar arguments to Triton as constexprs.

With --ptx it also compiles each kernel of the retrieval and lookup ops for sm_90 as the 227M layer
launches it and prints the number of PTX instructions and a hash of them (DWARF debug data, which
holds file paths, left out): two revisions with the same hash run the same machine code, whatever
their sources say. For the retrieval kernels it adds ptxas's registers per thread as the launcher
compiles them and as Inductor compiles a traced launch (no register cap: its user-kernel configs
keep only warps and stages).

    python -m perf.diagnostics.kernel_access [--ptx] [--scalars-as-constexprs]
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


class _Capture:
    """Stands in for a kernel: records the launch's arguments instead of running it."""

    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.sink.append((self.kernel, args, kwargs))

        return call


def _capture_retrieval(run) -> list:
    """(kernel, args, kwargs) of each retrieval kernel launch that run() makes."""
    from ultramem.ops._triton import retrieval as tri

    captured: list = []
    saved = {name: getattr(tri, name) for name in ("_retrieval_fwd_kernel", "_retrieval_bwd_kernel")}
    try:
        for name, kernel in saved.items():
            setattr(tri, name, _Capture(kernel, captured))
        run()
    finally:
        for name, kernel in saved.items():
            setattr(tri, name, kernel)
    return captured


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


def retrieval_case(t=12288, h=1, n=1138, pad=14, r=2, m=2, k=32, dtype=torch.bfloat16, strided_out=False) -> list:
    """The retrieval kernels' launches for T tokens and H heads, n keys a side read from score
    blocks padded by `pad` rows (the layer's GEMM outputs), rank r, m cores, k kept pairs, the
    backward's gradients padded alike (or, with strided_out, written into rank-strided views):
    [(label, kernel, args, kwargs, names of the op's input arguments)]. The default is the 227M
    layer: 12,288 tokens, one head, 1138 keys padded to 1152 rows, rank 2, 2 cores, k = 32."""
    from ultramem.ops._triton import retrieval as tri

    a, b = (torch.empty(t, h, n + pad, r, dtype=dtype) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    cores = torch.randn(h, m, r, r, generator=g)
    u, v = torch.randn(h, r, generator=g), torch.randn(h, r, generator=g)
    ids = torch.zeros(t, h, k, dtype=torch.int64)
    grad = torch.empty(t, h, k, m, dtype=dtype)
    inputs = {_storage(x) for x in (a, b, cores, u, v, ids, grad)}

    def run():
        tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k, n)
        if strided_out:
            out = tuple(torch.empty(t, h, n + pad, 2 * r, dtype=dtype)[..., ::2] for _ in range(2))
            tri.launch_backward(grad, a, b, cores, ids, n, out=out)
        else:
            tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids, n)

    launches = []
    for kernel, args, kwargs in _capture_retrieval(run):
        named = dict(zip(kernel.arg_names, args))
        given = {p for p, x in named.items() if isinstance(x, torch.Tensor) and _storage(x) in inputs}
        layout = " strided out" if strided_out else ""
        label = f"{kernel.fn.__name__} (T={t} H={h} n={n}+{pad} r={r} M={m} k={k}{layout})"
        launches.append((label, kernel, args, kwargs, given))
    return launches


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


class AnalysisFailed(RuntimeError):
    pass


class _Failures(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "Encountered an exception" in record.getMessage():
            self.messages.append(record.getMessage())


def analysis_available() -> bool:
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    return hasattr(tkw, "identify_accessed_tensors") or hasattr(tkw, "identify_mutated_tensors")


def accesses(kernel, args, kwargs, scalars_as_constexprs: bool = False) -> tuple[set, set]:
    """(read, written) pointer arguments of a launch by Inductor's analysis (read is empty on torch
    versions whose analysis finds writes only). Raises AnalysisFailed where Inductor would give up
    and take every tensor as written. Call under declared_cuda_target()."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    named = dict(zip(kernel.arg_names, args)) | kwargs
    for option in ("num_warps", "num_stages", "maxnreg"):
        named.pop(option, None)
    failures = _Failures()
    logger = logging.getLogger(tkw.__name__)
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


def lookup_launches() -> list:
    """The lookup ops' kernel launches at the 227M shapes (12,288 tokens, 32 rows each, 2.59M-row
    tables of 192, 2 cores): each op's CUDA kernel called on CPU tensors, launches recorded."""
    import importlib

    import triton.runtime.jit as jit

    import ultramem.ops as ops

    gl, wl, pv = (
        importlib.import_module(f"ultramem.ops.{m}") for m in ("gate_lookup", "weighted_lookup", "pre_value_gate")
    )
    t, e, d, n, m = 12288, 32, 192, 2_592_000, 2
    rows = torch.randint(0, n, (t, e))
    values, pre = torch.empty(n, d, dtype=torch.bfloat16), torch.empty(n, d, dtype=torch.bfloat16)
    x, grad_out = torch.randn(t, d).bfloat16(), torch.randn(t, d).bfloat16()
    scores, gate, grad_gate = (
        torch.randn(t, e, m).bfloat16(),
        torch.randn(t, e).bfloat16(),
        torch.randn(t, e).bfloat16(),
    )
    buffers = [torch.zeros(n, d), torch.zeros(n, d)]
    ids = [ops.register_grad_buffer(b) for b in buffers]

    def cuda(op):
        return op._backend_fns["cuda"]

    calls = {
        "gate_lookup": lambda: cuda(gl.gate_lookup)(rows, values, pre, x, scores, True),
        "gate_lookup_backward_into": lambda: cuda(gl.gate_lookup_backward_into)(
            grad_out, None, rows, values, pre, x, scores, gate, True, *ids
        ),
        "weighted_lookup": lambda: cuda(wl.weighted_lookup)(rows, values, scores),
        "weighted_lookup_backward": lambda: cuda(wl.weighted_lookup_backward)(grad_out, rows, values, scores),
        "pre_value_gate": lambda: cuda(pv.pre_value_gate)(rows, pre, x),
        "pre_value_gate_backward": lambda: cuda(pv.pre_value_gate_backward)(grad_gate, rows, pre, x),
    }
    launches, run, current = [], jit.JITFunction.run, [""]

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((f"{current[0]}: {kernel.fn.__name__}", kernel, args, kwargs))

    jit.JITFunction.run = record
    try:
        for op_name, call in calls.items():
            current[0] = op_name
            call()
    finally:
        jit.JITFunction.run = run
        for i in ids:
            ops.release_grad_buffer(i)
    return launches


def ptx_summary(kernel, args, kwargs) -> tuple[int, str]:
    """(instructions, hash of them) of the kernel compiled for the declared target."""
    ptx = kernel.warmup(*args, grid=(1,), **kwargs).asm["ptx"]
    code = ptx.split("Length of Unit")[0]  # the DWARF data from there on names the source files
    lines = [ln.strip() for ln in code.splitlines()]
    ins = [ln for ln in lines if ln[:1].isalpha() or ln[:1] == "@"]  # instructions, predicated ones too
    return len(ins), hashlib.sha256("\n".join(ins).encode()).hexdigest()[:16]


def registers(kernel, args, kwargs) -> str:
    """ptxas's registers per thread (and stack bytes) for the kernel compiled with these options."""
    cubin = kernel.warmup(*args, grid=(1,), **kwargs).asm["cubin"]
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
    parser.add_argument("--ptx", action="store_true", help="also compile for sm_90 and summarize the PTX")
    parser.add_argument("--scalars-as-constexprs", action="store_true", help="run the analysis as torch < 2.12 does")
    args = parser.parse_args(argv)
    bad = 0
    with declared_cuda_target():
        if args.ptx:
            for name, kernel, launch_args, kwargs in lookup_launches():
                n_ins, digest = ptx_summary(kernel, launch_args, kwargs)
                print(f"{name}: {n_ins} PTX instructions, sha256 {digest}")
        for label, kernel, launch_args, kwargs, given in retrieval_case():
            print(label)
            if args.ptx:
                n_ins, digest = ptx_summary(kernel, launch_args, kwargs)
                traced = {o: x for o, x in kwargs.items() if o != "maxnreg"}
                print(f"  {n_ins} PTX instructions, sha256 {digest}")
                print(
                    f"  launcher (maxnreg {kwargs.get('maxnreg')}): {registers(kernel, launch_args, kwargs)}; "
                    f"traced by Inductor (no cap): {registers(kernel, launch_args, traced)}"
                )
            try:
                reads, writes = accesses(kernel, launch_args, kwargs, args.scalars_as_constexprs)
            except AnalysisFailed as e:
                print(f"  analysis FAILED (every tensor counts as written): {e}")
                bad += 1
                continue
            written_inputs = sorted(writes & given)
            print(f"  reads:  {', '.join(sorted(reads))}\n  writes: {', '.join(sorted(writes))}")
            print(f"  inputs counted as written (cloned per traced call): {', '.join(written_inputs) or 'none'}")
            bad += bool(written_inputs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
