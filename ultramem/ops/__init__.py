"""The memory layers' hot paths as `ultramem::` custom ops.

Each op has a plain-PyTorch kernel (CPU, and the test oracle), a fake kernel, and an autograd
formula whose backward is itself a custom op, so `torch.compile(fullgraph=True)` traces
through them. Nothing here imports layers or training code.
"""
from ._checks import debug_enabled, set_debug
from .pre_value_gate import pre_value_gate, pre_value_gate_backward
from .retrieval import tdqkr_retrieval, tdqkr_retrieval_backward
from .weighted_lookup import weighted_lookup, weighted_lookup_backward

__all__ = [
    "debug_enabled",
    "pre_value_gate",
    "pre_value_gate_backward",
    "set_debug",
    "tdqkr_retrieval",
    "tdqkr_retrieval_backward",
    "weighted_lookup",
    "weighted_lookup_backward",
]
