"""Which tensors Inductor thinks a Triton kernel reads and writes, and the kernel's PTX, on a CPU.

When torch.compile traces a Triton launch (`wrap_triton` inside a `torch.library.triton_op`),
Inductor analyses the kernel's TTIR to find the tensors it writes; every tensor it counts as
written is cloned before the launch and copied back after it. This script runs that analysis for
the kernels of the retrieval and of the lookup families (weighted_lookup, pre_value_gate,
gate_lookup, the accumulating and the staged table gradients) as the 227M layer launches them,
with a CUDA target declared (no GPU needed), and prints reads and writes per pointer argument.
An input listed under "writes" costs a copy per call.

With --ptx it also compiles each kernel for sm_90 and prints the number of PTX instructions and
a hash of them (DWARF debug data, which holds file paths, left out): two revisions with the same
hash run the same machine code, whatever their sources say.

    python -m perf.diagnostics.kernel_access [--ptx] [--only FAMILY]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
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


class _EveryLaunch(dict):
    """A `_Capture` sink that keeps every launch: under "<call>: <kernel>", a kernel's second
    launch within one call as "<call>: <kernel> (2)"."""

    call = ""

    def __setitem__(self, kernel_name, launch):
        key, n = f"{self.call}: {kernel_name}", 1
        while key in self:
            n += 1
            key = f"{self.call}: {kernel_name} ({n})"
        super().__setitem__(key, launch)


def _capture_lookup_launches(calls: dict) -> dict:
    """Runs each of `calls` (name: a function calling a lookup-family launcher on CPU tensors)
    with every kernel of the lookup families replaced by a `_Capture`; returns the launches by
    "<call>: <kernel>"."""
    from ultramem.ops._triton import gate_lookup, staged_grad, weighted_lookup

    captured = _EveryLaunch()
    saved = [
        (module, name, kernel)
        for module in (weighted_lookup, gate_lookup, staged_grad)
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


def _lookup_tensors() -> SimpleNamespace:
    """The lookup ops' arguments at the 227M layer's shapes: 12,288 tokens of 32 rows (int64 ids)
    from 2.59M-row tables of 192 columns (values and pre-values, bf16), 2 cores, bf16
    activations; fp32 gradient buffers (never read here: left uninitialized)."""
    t, e, d, n, m = 12288, 32, 192, 2_592_000, 2
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        rows=torch.randint(0, n, (t, e), generator=g),
        values=torch.empty(n, d, dtype=torch.bfloat16),
        pre=torch.empty(n, d, dtype=torch.bfloat16),
        x=torch.randn(t, d, generator=g).bfloat16(),
        scores=torch.randn(t, e, m, generator=g).bfloat16(),
        gate=torch.randn(t, e, generator=g).bfloat16(),
        grad_out=torch.randn(t, d, generator=g).bfloat16(),
        grad_gate=torch.randn(t, e, generator=g).bfloat16(),
        grad_values=torch.empty(n, d),
        grad_pre=torch.empty(n, d),
    )


def _deterministic():
    """Deterministic mode (sorted table gradients, one writer per row) for the duration."""
    from unittest import mock

    from ultramem.ops import determinism

    return mock.patch.object(determinism, "_deterministic", True)


def weighted_lookup_launches() -> dict:
    """`weighted_lookup`'s kernels: the forward, the backward (atomics; deterministic: dots, then
    the segment scatter's two passes). The dense backward's zero-filled gradient is
    `grad_values` here (the same launch, without a 2 GB fill)."""
    from ultramem.ops._triton import weighted_lookup as wl

    a = _lookup_tensors()

    def backward():
        wl.lookup_table_grad(a.grad_out, a.rows, a.values, a.scores, a.grad_values, accumulate=False)

    def backward_deterministic():
        with _deterministic():
            backward()

    return _capture_lookup_launches(
        {
            "forward": lambda: wl.weighted_lookup_cuda(a.rows, a.values, a.scores),
            "backward": backward,
            "backward, deterministic": backward_deterministic,
        }
    )


def pre_value_gate_launches() -> dict:
    """`pre_value_gate`'s kernels: the forward (row dots), the backward (a lookup forward for
    grad_x, then the table gradient: atomics, or deterministic the segment scatter)."""
    from ultramem.ops._triton import pre_value_gate as pv

    a = _lookup_tensors()

    def backward():
        pv.gate_table_grad(a.grad_gate, a.rows, a.pre, a.x, a.grad_pre, accumulate=False)

    def backward_deterministic():
        with _deterministic():
            backward()

    return _capture_lookup_launches(
        {
            "forward": lambda: pv.pre_value_gate_cuda(a.rows, a.pre, a.x),
            "backward": backward,
            "backward, deterministic": backward_deterministic,
        }
    )


def gate_lookup_launches() -> dict:
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

    return _capture_lookup_launches(
        {
            "forward": lambda: gl.gate_lookup_cuda(a.rows, a.values, a.pre, a.x, a.scores, True),
            "forward, entry blocks": forward_entry_blocks,
            "backward": backward,
            "backward, deterministic": lambda: backward(deterministic=True),
        }
    )


def table_grad_launches() -> dict:
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

    return _capture_lookup_launches(
        {
            "weighted_lookup": lookup,
            "weighted_lookup, deterministic": deterministic(lookup),
            "pre_value_gate": gate,
            "pre_value_gate, deterministic": deterministic(gate),
        }
    )


def staged_grad_launches() -> dict:
    """The staged backwards (the trainer's path at 227M: gate_lookup's, and the one-table ones
    of weighted_lookup and pre_value_gate), each with its overflow and fill kernels, and the
    flush's block add. The staging areas hold 4 micro-batches of one layer (the trainer's holds
    every memory layer's: a size that changes no launch but the sort's)."""
    from ultramem.ops import GradStaging
    from ultramem.ops._triton import staged_grad as sg

    a = _lookup_tensors()
    t, e, m = a.scores.shape
    d = a.values.shape[1]

    def staging(vdim, pre_vdim):
        return GradStaging(4 * t, e, m, vdim, pre_vdim, torch.bfloat16, "cpu")

    both, lookup, gate = staging(d, d), staging(d, 0), staging(0, d)
    return _capture_lookup_launches(
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
            # (the fill level stays 0, the kernels being captured: without `wait` all is sorted)
            "flush": lambda: both.flush(a.grad_values, a.grad_pre, kernels=True, wait=False),
        }
    )


# The op families whose kernels this covers, by name (--only).
FAMILIES = {
    "retrieval": retrieval_launches,
    "weighted_lookup": weighted_lookup_launches,
    "pre_value_gate": pre_value_gate_launches,
    "gate_lookup": gate_lookup_launches,
    "table_grad": table_grad_launches,
    "staged_grad": staged_grad_launches,
}


def ptx_summary(kernel, args, kwargs) -> tuple[int, str]:
    """(instructions, hash of them) of the kernel compiled for the declared target."""
    ptx = kernel.warmup(*args, grid=(1,), **kwargs).asm["ptx"]
    code = ptx.split("Length of Unit")[0]  # the DWARF data from there on names the source files
    lines = [ln.strip() for ln in code.splitlines()]
    ins = [ln for ln in lines if ln[:1].isalpha() or ln[:1] == "@"]  # instructions, predicated ones too
    return len(ins), hashlib.sha256("\n".join(ins).encode()).hexdigest()[:16]


class Accesses(NamedTuple):
    reads: list[str]
    writes: list[str]
    failed: bool  # the analysis raised: Inductor then counts every tensor as read and written


def declared_cuda_target():
    """The declared sm_90 target as Triton's active driver, for a `with` block."""
    from unittest import mock

    return mock.patch.object(triton.runtime.driver, "_active", _DeclaredCudaTarget())


def tensor_accesses(kernel, launch_args, kwargs) -> Accesses:
    """The pointer arguments Inductor's analysis counts as read and as written in one launch
    (under `declared_cuda_target()`)."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    named = dict(zip(kernel.arg_names, launch_args)) | kwargs
    for option in ("num_warps", "num_stages", "maxnreg"):
        named.pop(option, None)

    class Failure(logging.Handler):  # the analysis logs its exception and carries on
        failed = False

        def emit(self, record):
            self.failed = True

    handler = Failure(logging.WARNING)
    wrap.log.addHandler(handler)
    try:
        rw = wrap.identify_accessed_tensors(kernel, named, {}).read_writes
    finally:
        wrap.log.removeHandler(handler)
    return Accesses(sorted(d.name for d in rw.reads), sorted(d.name for d in rw.writes), handler.failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ptx", action="store_true", help="also compile for sm_90 and summarize the PTX")
    parser.add_argument("--only", choices=list(FAMILIES), help="one op family's kernels")
    args = parser.parse_args(argv)
    with declared_cuda_target():
        for family in [args.only] if args.only else FAMILIES:
            print(f"== {family}")
            for name, (kernel, launch_args, kwargs) in FAMILIES[family]().items():
                if args.ptx:
                    n_ins, digest = ptx_summary(kernel, launch_args, kwargs)
                    print(f"{name}: {n_ins} PTX instructions, sha256 {digest}")
                reads, writes, failed = tensor_accesses(kernel, launch_args, kwargs)
                inputs_written = [p for p in writes if p in reads]
                print(f"{name}\n  reads:  {', '.join(reads)}\n  writes: {', '.join(writes)}")
                if failed:
                    print("  the analysis FAILED: every tensor counts as read and written")
                print(f"  inputs counted as written (cloned per traced call): {', '.join(inputs_written) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
