"""ultramem::layer_stats_accumulate: a memory layer's running statistics (docs/layers.md,
metrics), added in place into its buffers on every training forward.

    hits[ids] += 1
    sums += [Σy, Σy², numel(y), Σ_r Σ_m scores[r, 0, m], Σ_r Σ_m scores[r, k-1, m], R]

Shapes: hits [N] and sums [6] float64 (exact counts to 2^53), ids int32/int64 of any shape in
[0, N), y float of any shape, scores [R, k, M] ranked along k (entry 0 the best, k-1 the last
kept). The sums of one call are taken in at least fp32, the totals kept in fp64. No autograd:
these are statistics, taken under no_grad.

On CUDA it is one Triton launch (`_triton/layer_stats.py`), whose sums' last bits depend on the
order of its atomics; deterministic mode and CPU take the reference, which sums in a fixed order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_index_range, check_stats_args, debug_enabled
from ._triton import layer_stats as _triton_layer_stats  # (None without Triton)
from ._triton._launch import inline_on
from .determinism import deterministic_enabled

_OP = "layer_stats_accumulate"


def accumulate_reference(hits: Tensor, sums: Tensor, ids: Tensor, y: Tensor, scores: Tensor) -> None:
    """The reference kernel: plain PyTorch, any device."""
    check_stats_args(hits, sums, ids, y, scores)
    check_index_range(ids, hits.shape[0], _OP, "ids")
    flat, n = ids.reshape(-1), hits.shape[0]
    if n:
        # Unchecked (CUDA without debug mode, here in deterministic mode), an id outside [0, N)
        # counts nowhere, as in the kernel. A float64 index_add_ scatters with atomics in place
        # once compiled (an int64 one became a sort and an index_put).
        valid = (flat >= 0) & (flat < n)
        hits.index_add_(0, flat.clamp(0, n - 1), valid.to(hits.dtype))
    acc = torch.promote_types(y.dtype, torch.float32)
    # Σy and Σy² each straight from y: as sums of one fp32 copy of y, Inductor wrote the copy out
    y_sum = torch.sum(y, dtype=acc)
    y_sq = torch.linalg.vector_norm(y, dtype=acc).square()
    ends = (
        torch.stack([scores.select(1, 0), scores.select(1, -1)])
        .to(torch.promote_types(scores.dtype, torch.float32))
        .sum((1, 2))
    )
    first, last = ends.unbind()
    one = sums.new_ones(())
    part = [y_sum, y_sq, one * y.numel(), first, last, one * scores.shape[0]]
    sums.add_(torch.stack([p.to(sums.dtype) for p in part]))


def _accumulate_cuda(hits: Tensor, sums: Tensor, ids: Tensor, y: Tensor, scores: Tensor) -> None:
    if deterministic_enabled():
        accumulate_reference(hits, sums, ids, y, scores)
    else:
        _triton_layer_stats.layer_stats_accumulate_cuda(hits, sums, ids, y, scores)


# A triton_op, as the other pure ops (see ultramem/ops/retrieval.py): with inline launches on, its
# CUDA body runs the launcher, which torch.compile traces; on CPU and in debug mode it calls the
# opaque twin.


def _inline_triton(x: Tensor) -> bool:
    return _triton_layer_stats is not None and inline_on(x) and not debug_enabled()


@torch.library.custom_op("ultramem::layer_stats_accumulate_opaque", mutates_args=("hits", "sums"))
def _accumulate_opaque(hits: Tensor, sums: Tensor, ids: Tensor, y: Tensor, scores: Tensor) -> None:
    accumulate_reference(hits, sums, ids, y, scores)


@_accumulate_opaque.register_fake
def _(hits: Tensor, sums: Tensor, ids: Tensor, y: Tensor, scores: Tensor) -> None:
    check_stats_args(hits, sums, ids, y, scores)


if _triton_layer_stats is not None:
    _accumulate_opaque.register_kernel("cuda")(_accumulate_cuda)


@torch.library.triton_op("ultramem::layer_stats_accumulate", mutates_args=("hits", "sums"))
def layer_stats_accumulate(hits: Tensor, sums: Tensor, ids: Tensor, y: Tensor, scores: Tensor) -> None:
    """Adds one forward's statistics into `hits` and `sums` (see the module doc)."""
    if _inline_triton(hits):
        _accumulate_cuda(hits, sums, ids, y, scores)
        return
    _accumulate_opaque(hits, sums, ids, y, scores)
