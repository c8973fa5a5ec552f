"""Which tensors Inductor thinks a Triton kernel reads and writes, and the kernel's PTX, on a CPU.

When torch.compile traces a Triton launch (`wrap_triton` inside a `torch.library.triton_op`),
Inductor analyses the kernel's TTIR to find the tensors it writes; every tensor it counts as
written is cloned before the launch and copied back after it. This script runs that analysis for
the retrieval kernels at a small shape, with a CUDA target declared (no GPU needed), and prints
reads and writes per pointer argument. An input listed under "writes" costs a copy per call.

With --ptx it also compiles each kernel of the retrieval and lookup ops for sm_90 as the 227M layer
launches it and prints the
number of PTX instructions and a hash of them (DWARF debug data, which holds file paths, left
out): two revisions with the same hash run the same machine code, whatever their sources say.

    python -m perf.diagnostics.kernel_access [--ptx]
"""

from __future__ import annotations

import argparse
import hashlib
import sys

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


class _Capture:
    """Stands in for a kernel: records the launch's arguments instead of running it."""

    def __init__(self, kernel, sink: dict):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.sink[self.kernel.fn.__name__] = (self.kernel, args, kwargs)

        return call


def retrieval_launches() -> dict:
    """The retrieval kernels' arguments as the 227M layer launches them: 12,288 tokens, one head,
    1138 keys a side read from GEMM outputs padded to 1152 rows, rank 2, 2 cores, k = 32."""
    from ultramem.ops._triton import retrieval as tri

    captured: dict = {}
    saved = {name: getattr(tri, name) for name in ("_retrieval_fwd_kernel", "_retrieval_bwd_kernel")}
    try:
        for name, kernel in saved.items():
            setattr(tri, name, _Capture(kernel, captured))
        t, h, n, r, m, k = 12288, 1, 1138, 2, 2, 32
        a, b = (torch.empty(t, h, 1152, r, dtype=torch.bfloat16)[:, :, :n] for _ in range(2))
        g = torch.Generator().manual_seed(0)
        cores = torch.randn(h, m, r, r, generator=g)
        u, v = torch.randn(h, r, generator=g), torch.randn(h, r, generator=g)
        tri.launch_forward(a, b, cores, u, v, k)
        ids = torch.zeros(t, h, k, dtype=torch.int64)
        tri.launch_backward(torch.empty(t, h, k, m, dtype=torch.bfloat16), a, b, cores, ids)
    finally:
        for name, kernel in saved.items():
            setattr(tri, name, kernel)
    return captured


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptx", action="store_true", help="also compile for sm_90 and summarize the PTX")
    args = parser.parse_args(argv)
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    triton.runtime.driver.set_active(_DeclaredCudaTarget())
    if args.ptx:
        for name, kernel, launch_args, kwargs in lookup_launches():
            n_ins, digest = ptx_summary(kernel, launch_args, kwargs)
            print(f"{name}: {n_ins} PTX instructions, sha256 {digest}")
    for name, (kernel, launch_args, kwargs) in retrieval_launches().items():
        if args.ptx:
            n_ins, digest = ptx_summary(kernel, launch_args, kwargs)
            print(f"{name}: {n_ins} PTX instructions, sha256 {digest}")
        named = dict(zip(kernel.arg_names, launch_args)) | kwargs
        for option in ("num_warps", "num_stages", "maxnreg"):
            named.pop(option, None)
        rw = identify_accessed_tensors(kernel, named, {}).read_writes
        reads, writes = sorted(d.name for d in rw.reads), sorted(d.name for d in rw.writes)
        inputs_written = [p for p in writes if p in reads]
        print(f"{name}\n  reads:  {', '.join(reads)}\n  writes: {', '.join(writes)}")
        print(f"  inputs counted as written (cloned per traced call): {', '.join(inputs_written) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
