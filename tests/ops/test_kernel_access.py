"""Which pointer arguments Inductor's access analysis counts as written in each Triton launch
(`perf.diagnostics.kernel_access`, on a CPU with an sm_90 target declared).

Under `torch.compile`, a kernel launched through `wrap_triton` has every tensor the analysis
counts as written cloned before the launch, and every tensor counted when the analysis fails.
So each launch here must write exactly the tensors listed in CASES: its outputs, and the
caller's buffers it adds into (gradient buffers, a staging area's fill level). A pitfall: a
store address made from a `@triton.jit` helper's result counts as a write to every pointer
passed to that helper.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

import pytest

pytest.importorskip("triton")
wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
if not hasattr(wrap, "identify_accessed_tensors"):
    pytest.skip("this torch has no identify_accessed_tensors", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter's kernels have no TTIR to analyse", allow_module_level=True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # perf/ is not installed
from perf.diagnostics import kernel_access as ka  # noqa: E402

# (family of kernel_access.FAMILIES, launch, the pointer arguments it writes); every launch of a
# family listed here must be listed.
CASES = [
    ("weighted_lookup", "forward: _weighted_gather_kernel", {"out_ptr"}),
    ("weighted_lookup", "backward: _gather_dot_scatter_kernel", {"dots_ptr", "gt_ptr"}),
    ("weighted_lookup", "backward, deterministic: _gather_dot_scatter_kernel", {"dots_ptr"}),
    ("weighted_lookup", "backward, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("weighted_lookup", "backward, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("pre_value_gate", "forward: _gather_dot_scatter_kernel", {"dots_ptr"}),
    ("pre_value_gate", "backward: _weighted_gather_kernel", {"out_ptr"}),
    ("pre_value_gate", "backward: _gather_dot_scatter_kernel", {"gt_ptr"}),
    ("pre_value_gate", "backward, deterministic: _weighted_gather_kernel", {"out_ptr"}),
    ("pre_value_gate", "backward, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("pre_value_gate", "backward, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("gate_lookup", "forward: _gate_lookup_fwd_chunks_kernel", {"gate_ptr", "out_ptr"}),
    ("gate_lookup", "forward, entry blocks: _gate_lookup_fwd_kernel", {"gate_ptr", "out_ptr"}),
    ("gate_lookup", "backward: _gate_lookup_bwd_kernel", {"gp_ptr", "gs_ptr", "gv_ptr", "gx_ptr"}),
    ("gate_lookup", "backward, deterministic: _gate_lookup_bwd_kernel", {"ef_ptr", "gg_out_ptr", "gs_ptr", "gx_ptr"}),
    # (the deterministic gate_lookup backward adds into the caller's gradient buffers)
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel (3)", {"part_ptr"}),
    ("gate_lookup", "backward, deterministic: _segment_scatter_kernel (4)", {"gt_ptr"}),
    ("table_grad", "weighted_lookup: _gather_dot_scatter_kernel", {"dots_ptr", "gt_ptr"}),
    ("table_grad", "weighted_lookup, deterministic: _gather_dot_scatter_kernel", {"dots_ptr"}),
    ("table_grad", "weighted_lookup, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("table_grad", "weighted_lookup, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    ("table_grad", "pre_value_gate: _weighted_gather_kernel", {"out_ptr"}),
    ("table_grad", "pre_value_gate: _gather_dot_scatter_kernel", {"gt_ptr"}),
    ("table_grad", "pre_value_gate, deterministic: _weighted_gather_kernel", {"out_ptr"}),
    ("table_grad", "pre_value_gate, deterministic: _segment_scatter_kernel", {"part_ptr"}),
    ("table_grad", "pre_value_gate, deterministic: _segment_scatter_kernel (2)", {"gt_ptr"}),
    (
        "staged_grad",
        "gate_lookup backward: _gate_lookup_bwd_kernel",
        {"ef_ptr", "gg_out_ptr", "gs_ptr", "gx_ptr", "sgo_ptr", "sr_ptr", "sx_ptr", "xef_ptr", "xgg_ptr"},
    ),
    ("staged_grad", "gate_lookup backward: _overflow_add_kernel", {"gp_ptr", "gv_ptr"}),
    ("staged_grad", "gate_lookup backward: _advance_fill_kernel", {"fill_ptr"}),
    (
        "staged_grad",
        "weighted_lookup backward: _gate_lookup_bwd_kernel",
        {"ef_ptr", "gs_ptr", "sgo_ptr", "sr_ptr", "xef_ptr"},
    ),
    ("staged_grad", "weighted_lookup backward: _overflow_add_kernel", {"gv_ptr"}),
    ("staged_grad", "weighted_lookup backward: _advance_fill_kernel", {"fill_ptr"}),
    (
        "staged_grad",
        "pre_value_gate backward: _gate_lookup_bwd_kernel",
        {"gg_out_ptr", "gx_ptr", "sr_ptr", "sx_ptr", "xgg_ptr"},
    ),
    ("staged_grad", "pre_value_gate backward: _overflow_add_kernel", {"gp_ptr"}),
    ("staged_grad", "pre_value_gate backward: _advance_fill_kernel", {"fill_ptr"}),
    ("staged_grad", "flush: _sorted_block_add_kernel", {"gt_ptr"}),
    ("staged_grad", "flush: _sorted_block_add_kernel (2)", {"gt_ptr"}),
]


@pytest.fixture(scope="module")
def launches():
    """family -> its launches, captured once per family for this module."""
    return functools.cache(lambda family: ka.FAMILIES[family]())


@pytest.mark.parametrize("family, launch, written", CASES, ids=[f"{f}: {launch}" for f, launch, _ in CASES])
def test_kernel_writes_only_its_outputs(launches, family, launch, written):
    kernel, args, kwargs = launches(family)[launch]
    with ka.declared_cuda_target():
        accesses = ka.tensor_accesses(kernel, args, kwargs)
    assert not accesses.failed, "the analysis failed: every tensor would be cloned"
    assert set(accesses.writes) == written


@pytest.mark.parametrize("family", sorted({f for f, _, _ in CASES}))
def test_every_launch_is_listed(launches, family):
    assert set(launches(family)) == {launch for f, launch, _ in CASES if f == family}


def test_a_failed_analysis_is_reported(launches, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no TTIR")

    monkeypatch.setattr(wrap, "generate_ttir", fail)
    kernel, args, kwargs = launches("weighted_lookup")["forward: _weighted_gather_kernel"]
    with ka.declared_cuda_target():
        accesses = ka.tensor_accesses(kernel, args, kwargs)
    assert accesses.failed and {"rows_ptr", "table_ptr", "s_ptr", "out_ptr"} <= set(accesses.writes)
