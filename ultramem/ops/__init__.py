"""The memory layers' hot paths as `ultramem::` custom ops.

Each op has a plain-PyTorch kernel (CPU, and the test oracle), a Triton kernel on CUDA, a fake
kernel, and an autograd formula whose backward is itself a custom op, so
`torch.compile(fullgraph=True)` traces through them. Nothing here imports layers or training code.

Every op takes T = 0 tokens (and E = 0 entries): empty outputs of the right shapes, zero table
gradients, no kernel launched on an empty grid. Row / id arguments are range-checked, forward and
backward, on CPU always and on CUDA in debug mode (`set_debug`; the check syncs with the host),
before anything is written: a refused backward leaves a registered gradient buffer as it was.
Unchecked on CUDA, the Triton kernels skip ids out of range (nothing read or written for them).
"""

from ._checks import debug_enabled, set_debug
from ._triton._launch import set_inline_triton
from .determinism import deterministic_enabled, set_deterministic
from .gate_lookup import gate_lookup, gate_lookup_backward_into
from .gate_lookup_into import gate_lookup_into, gate_lookup_into_backward
from .layer_stats import layer_stats_accumulate
from .normed_keys import normed_keys, normed_keys_backward
from .pre_value_gate import pre_value_gate, pre_value_gate_backward
from .retrieval import (
    tdqkr_retrieval,
    tdqkr_retrieval_backward,
    tdqkr_retrieval_rows,
    tdqkr_retrieval_stacked,
    tdqkr_retrieval_stacked_backward,
)
from .staged_grad import GradStaging, register_staging, staging_for
from .table_grad import (
    pre_value_gate_backward_accumulate,
    pre_value_gate_backward_into,
    register_grad_buffer,
    release_grad_buffer,
    update_grad_buffer,
    weighted_lookup_backward_accumulate,
    weighted_lookup_backward_into,
)
from .weighted_lookup import weighted_lookup, weighted_lookup_backward
from .weighted_lookup_into import weighted_lookup_into, weighted_lookup_into_backward

__all__ = [
    "GradStaging",
    "debug_enabled",
    "deterministic_enabled",
    "gate_lookup",
    "gate_lookup_backward_into",
    "gate_lookup_into",
    "gate_lookup_into_backward",
    "layer_stats_accumulate",
    "normed_keys",
    "normed_keys_backward",
    "pre_value_gate",
    "pre_value_gate_backward",
    "pre_value_gate_backward_accumulate",
    "pre_value_gate_backward_into",
    "register_grad_buffer",
    "register_staging",
    "release_grad_buffer",
    "set_debug",
    "set_deterministic",
    "set_inline_triton",
    "staging_for",
    "tdqkr_retrieval",
    "tdqkr_retrieval_backward",
    "tdqkr_retrieval_rows",
    "tdqkr_retrieval_stacked",
    "tdqkr_retrieval_stacked_backward",
    "update_grad_buffer",
    "weighted_lookup",
    "weighted_lookup_backward",
    "weighted_lookup_backward_accumulate",
    "weighted_lookup_backward_into",
    "weighted_lookup_into",
    "weighted_lookup_into_backward",
]
