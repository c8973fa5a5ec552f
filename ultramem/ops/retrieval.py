"""ultramem::tdqkr_retrieval: Tucker-decomposed query-key retrieval (docs/layers.md, UltraMemV2 steps 3–5).

Inputs are the sub-key scores with their Tucker components, already computed by the layer:
    row_scores A [T, H, n_row, r], col_scores B [T, H, n_col, r],
    cores C [H, M, r, r], u [H, r], v [H, r] (rank-1 approximation of Σ_m C_m), knn = k.
Steps, per token and head:
    a = A·u, b = B·v;  I = top-k rows by a, J = top-k columns by b;
    s_m(i, j) = A[i] C_m B[j]ᵀ on the k×k grid;  keep the k pairs with the largest Σ_m s_m.
Outputs: ids [T, H, k] int64, the virtual id i·n_col + j of each kept pair, sorted by
descending Σ_m s_m; scores [T, H, k, M] in A's dtype.
Selection is not differentiated; the backward gives A and B their gradient at the kept
rows/columns (zero elsewhere) and the cores theirs. u and v get none.

n_keys (default -1: all): only the first n_keys rows of each side are keys, the rest of A and B
along dim 2 is padding that is never read (a caller can then hand over a GEMM output padded for
alignment as is, and take back a gradient of the same padded shape, zero in the padding);
ids are then i·n_keys + j.

ultramem::tdqkr_retrieval_stacked is the same op on A and B stacked along dim 2, sub_scores
[T, H, 2, n, r] (any strides; each (token, head, side)'s [n, r] block contiguous for the CUDA
kernel), with one gradient of sub_scores' shape and strides: a layer that computes both sides in
one batched GEMM hands over its output as is and takes back the gradient its backward reads, where
separate sides would cost a GEMM per side each way and a copy that stacks the two gradients.

ultramem::tdqkr_retrieval_rows is the stacked op for inference: it returns each kept pair's
table row, (perm[id] mod num_logical + offset) mod num_rows (an UltraMemV2 layer's rows),
instead of its id, written by the same launch, so that no kernel of its own maps ids to rows. It
has no backward.

NaN and infinities. ±Inf are ordinary values: +Inf coarse scores and grid totals rank first and
-Inf last, as in torch.topk. NaN propagates: when a (token, head)'s coarse scores (over the real
keys) or its k×k grid totals hold a NaN, whether from a NaN in A, B, C, u or v or from ∞ − ∞ /
∞ · 0, all k of its scores are NaN, so the fault reaches the loss instead of a silently finite
output; its ids are still k distinct ids in range (downstream gathers stay safe), which ones
unspecified. The backward is that of the same pairs, whatever their scores. (The CUDA kernel
sums the cores before the grid, the reference after; NaN from infinite inputs alone can then
depend on that order. A NaN in the inputs poisons both alike.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    acc_dtype,
    check_index_range,
    check_retrieval_args,
    check_retrieval_backward_args,
    check_retrieval_rows_args,
    check_row_window,
    check_stacked_retrieval_args,
    check_stacked_retrieval_backward_args,
    debug_enabled,
    stacked_sides,
)
from ._triton import retrieval as _triton_retrieval  # (None without Triton)
from ._triton._launch import inline_on

_OP = "tdqkr_retrieval"
_BWD = "tdqkr_retrieval_backward"
_STACKED = "tdqkr_retrieval_stacked"
_STACKED_BWD = "tdqkr_retrieval_stacked_backward"
_ROWS = "tdqkr_retrieval_rows"


def _kept_pair_scores(row_sel: Tensor, col_sel: Tensor, cores: Tensor) -> Tensor:
    """s[t,h,e,m] = row_sel[t,h,e] · C_m[h] · col_sel[t,h,e]ᵀ for paired rows/columns."""
    return torch.einsum("ther,hmrs,thes->them", row_sel, cores, col_sel)


def _gather_keys(scores: Tensor, idx: Tensor) -> Tensor:
    """scores[t, h, idx[t, h, e], :] → [T, H, E, r]."""
    return scores.gather(2, idx.unsqueeze(-1).expand(*idx.shape, scores.shape[-1]))


def forward_reference(
    row_scores: Tensor,
    col_scores: Tensor,
    cores: Tensor,
    u: Tensor,
    v: Tensor,
    knn: int,
    n_keys: int = -1,
    *,
    op: str = _OP,
) -> tuple[Tensor, Tensor]:
    """The reference kernel: plain PyTorch, any device (the CPU kernel, the CUDA kernel's fallback
    and the test oracle). op: the op its errors name (the stacked op's on its halves)."""
    check_retrieval_args(op, row_scores, col_scores, cores, u, v, knn, n_keys)
    if n_keys != -1:
        row_scores, col_scores = row_scores[:, :, :n_keys], col_scores[:, :, :n_keys]
    acc = acc_dtype(row_scores, col_scores, cores)
    a_full, b_full, c = row_scores.to(acc), col_scores.to(acc), cores.to(acc)
    t, h, _, r = a_full.shape
    n_col = b_full.shape[2]
    coarse_a = torch.einsum("thnr,hr->thn", a_full, u.to(acc))
    coarse_b = torch.einsum("thnr,hr->thn", b_full, v.to(acc))
    top_i = coarse_a.topk(knn, dim=-1).indices  # [T, H, k]
    top_j = coarse_b.topk(knn, dim=-1).indices
    poisoned = coarse_a.isnan().any(-1) | coarse_b.isnan().any(-1)  # [T, H] (see the module doc)
    a_sel = _gather_keys(a_full, top_i)  # [T, H, k, r]
    b_sel = _gather_keys(b_full, top_j)
    grid = torch.einsum("thir,hmrs,thjs->thijm", a_sel, c, b_sel)  # [T, H, k, k, M]
    m = c.shape[1]
    grid = grid.reshape(t, h, knn * knn, m)
    totals = grid.sum(-1)
    poisoned = poisoned | totals.isnan().any(-1)
    best = totals.topk(knn, dim=-1).indices  # [T, H, k] into the flattened grid
    ids = top_i.gather(2, best // knn) * n_col + top_j.gather(2, best % knn)
    scores = grid.gather(2, best.unsqueeze(-1).expand(t, h, knn, m))
    scores = scores.masked_fill(poisoned[:, :, None, None], float("nan"))
    return ids, scores.to(row_scores.dtype)


def backward_reference(
    grad_scores: Tensor,
    row_scores: Tensor,
    col_scores: Tensor,
    cores: Tensor,
    ids: Tensor,
    n_keys: int = -1,
    *,
    op: str = _BWD,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference backward (see forward_reference)."""
    n_ids = check_retrieval_backward_args(op, grad_scores, row_scores, col_scores, cores, ids, n_keys)
    check_index_range(ids, n_ids, op, "ids")
    acc = acc_dtype(row_scores, col_scores, cores, grad_scores)
    n_col = col_scores.shape[2] if n_keys == -1 else n_keys
    i, j = ids // n_col, ids % n_col
    a_full, b_full, c, g = row_scores.to(acc), col_scores.to(acc), cores.to(acc), grad_scores.to(acc)
    a_sel, b_sel = _gather_keys(a_full, i), _gather_keys(b_full, j)
    grad_a_sel = torch.einsum("them,hmrs,thes->ther", g, c, b_sel)
    grad_b_sel = torch.einsum("them,hmrs,ther->thes", g, c, a_sel)
    grad_cores = torch.einsum("them,ther,thes->hmrs", g, a_sel, b_sel)
    r = a_full.shape[-1]
    grad_a = torch.zeros(a_full.shape, dtype=acc, device=a_full.device).scatter_add_(
        2, i.unsqueeze(-1).expand(*i.shape, r), grad_a_sel
    )
    grad_b = torch.zeros(b_full.shape, dtype=acc, device=b_full.device).scatter_add_(
        2, j.unsqueeze(-1).expand(*j.shape, r), grad_b_sel
    )
    return (
        grad_a.to(row_scores.dtype).contiguous(),
        grad_b.to(col_scores.dtype).contiguous(),
        grad_cores.to(cores.dtype).contiguous(),
    )


# The public ops are triton_ops. With inline launches on (_triton/_launch.py) their CUDA body runs
# the Triton launcher, which torch.compile traces, so that Inductor emits the launches itself.
# Otherwise, on CPU, and in debug mode (its range checks read the data), the body calls an opaque
# twin: the reference kernel on CPU, the launcher on CUDA.


def _inline_triton(x: Tensor) -> bool:
    return _triton_retrieval is not None and inline_on(x) and not debug_enabled()


@torch.library.custom_op("ultramem::tdqkr_retrieval_opaque", mutates_args=())
def _forward_opaque(
    row_scores: Tensor, col_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    return forward_reference(row_scores, col_scores, cores, u, v, knn, n_keys)


@_forward_opaque.register_fake
def _(row_scores, col_scores, cores, u, v, knn, n_keys=-1):
    check_retrieval_args(_OP, row_scores, col_scores, cores, u, v, knn, n_keys)
    t, h = row_scores.shape[:2]
    ids = row_scores.new_empty((t, h, knn), dtype=torch.int64)
    return ids, row_scores.new_empty((t, h, knn, cores.shape[1]))


@torch.library.custom_op("ultramem::tdqkr_retrieval_backward_opaque", mutates_args=())
def _backward_opaque(
    grad_scores: Tensor, row_scores: Tensor, col_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    return backward_reference(grad_scores, row_scores, col_scores, cores, ids, n_keys)


@_backward_opaque.register_fake
def _(grad_scores, row_scores, col_scores, cores, ids, n_keys=-1):
    check_retrieval_backward_args(_BWD, grad_scores, row_scores, col_scores, cores, ids, n_keys)
    return (
        torch.empty_like(row_scores, memory_format=torch.contiguous_format),
        torch.empty_like(col_scores, memory_format=torch.contiguous_format),
        torch.empty_like(cores, memory_format=torch.contiguous_format),
    )


if _triton_retrieval is not None:
    _forward_opaque.register_kernel("cuda")(_triton_retrieval.tdqkr_retrieval_cuda)
    _backward_opaque.register_kernel("cuda")(_triton_retrieval.tdqkr_retrieval_backward_cuda)


@torch.library.triton_op("ultramem::tdqkr_retrieval", mutates_args=())
def tdqkr_retrieval(
    row_scores: Tensor, col_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """Returns (ids [T, H, k] int64, scores [T, H, k, M]); see the module docstring."""
    if _inline_triton(row_scores):
        return _triton_retrieval.tdqkr_retrieval_cuda(row_scores, col_scores, cores, u, v, knn, n_keys)
    return _forward_opaque(row_scores, col_scores, cores, u, v, knn, n_keys)


@torch.library.triton_op("ultramem::tdqkr_retrieval_backward", mutates_args=())
def tdqkr_retrieval_backward(
    grad_scores: Tensor, row_scores: Tensor, col_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_row_scores, grad_col_scores, grad_cores), each in its input's dtype and
    (padding included) shape. ids must lie in [0, row keys · col keys) (real keys with n_keys)."""
    if _inline_triton(row_scores):
        return _triton_retrieval.tdqkr_retrieval_backward_cuda(grad_scores, row_scores, col_scores, cores, ids, n_keys)
    return _backward_opaque(grad_scores, row_scores, col_scores, cores, ids, n_keys)


def _setup_context(ctx, inputs, output) -> None:
    row_scores, col_scores, cores, _u, _v, _knn, n_keys = inputs
    ids, _scores = output
    ctx.mark_non_differentiable(ids)
    ctx.save_for_backward(row_scores, col_scores, cores, ids)
    ctx.n_keys = n_keys


def _backward(ctx, grad_ids, grad_scores):
    row_scores, col_scores, cores, ids = ctx.saved_tensors
    grad_a, grad_b, grad_c = tdqkr_retrieval_backward(
        grad_scores.contiguous(), row_scores, col_scores, cores, ids, ctx.n_keys
    )
    return grad_a, grad_b, grad_c, None, None, None, None


tdqkr_retrieval.register_autograd(_backward, setup_context=_setup_context)


# -- both sides stacked in one tensor -----------------------------------------------------------


def stacked_forward_reference(
    sub_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """The stacked op's reference kernel: the forward on sub_scores' two halves along dim 2."""
    return forward_reference(*stacked_sides(_STACKED, sub_scores), cores, u, v, knn, n_keys, op=_STACKED)


def stacked_backward_reference(
    grad_scores: Tensor, sub_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """The stacked op's reference backward: (grad_sub_scores in sub_scores' shape, dtype and
    strides, grad_cores)."""
    sides = stacked_sides(_STACKED_BWD, sub_scores)
    grad_a, grad_b, grad_c = backward_reference(grad_scores, *sides, cores, ids, n_keys, op=_STACKED_BWD)
    grad = torch.empty_like(sub_scores)
    grad.select(2, 0).copy_(grad_a)
    grad.select(2, 1).copy_(grad_b)
    return grad, grad_c


@torch.library.custom_op("ultramem::tdqkr_retrieval_stacked_opaque", mutates_args=())
def _stacked_forward_opaque(
    sub_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    return stacked_forward_reference(sub_scores, cores, u, v, knn, n_keys)


@_stacked_forward_opaque.register_fake
def _(sub_scores, cores, u, v, knn, n_keys=-1):
    check_stacked_retrieval_args(_STACKED, sub_scores, cores, u, v, knn, n_keys)
    t, h = sub_scores.shape[:2]
    ids = sub_scores.new_empty((t, h, knn), dtype=torch.int64)
    return ids, sub_scores.new_empty((t, h, knn, cores.shape[1]))


@torch.library.custom_op("ultramem::tdqkr_retrieval_stacked_backward_opaque", mutates_args=())
def _stacked_backward_opaque(
    grad_scores: Tensor, sub_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    return stacked_backward_reference(grad_scores, sub_scores, cores, ids, n_keys)


@_stacked_backward_opaque.register_fake
def _(grad_scores, sub_scores, cores, ids, n_keys=-1):
    check_stacked_retrieval_backward_args(_STACKED_BWD, grad_scores, sub_scores, cores, ids, n_keys)
    return torch.empty_like(sub_scores), torch.empty_like(cores, memory_format=torch.contiguous_format)


if _triton_retrieval is not None:
    _stacked_forward_opaque.register_kernel("cuda")(_triton_retrieval.tdqkr_retrieval_stacked_cuda)
    _stacked_backward_opaque.register_kernel("cuda")(_triton_retrieval.tdqkr_retrieval_stacked_backward_cuda)


@torch.library.triton_op("ultramem::tdqkr_retrieval_stacked", mutates_args=())
def tdqkr_retrieval_stacked(
    sub_scores: Tensor, cores: Tensor, u: Tensor, v: Tensor, knn: int, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """tdqkr_retrieval on sub_scores [T, H, 2, n, r] (A and B stacked along dim 2); returns (ids
    [T, H, k] int64, scores [T, H, k, M]); see the module docstring."""
    if _inline_triton(sub_scores):
        return _triton_retrieval.tdqkr_retrieval_stacked_cuda(sub_scores, cores, u, v, knn, n_keys)
    return _stacked_forward_opaque(sub_scores, cores, u, v, knn, n_keys)


@torch.library.triton_op("ultramem::tdqkr_retrieval_stacked_backward", mutates_args=())
def tdqkr_retrieval_stacked_backward(
    grad_scores: Tensor, sub_scores: Tensor, cores: Tensor, ids: Tensor, n_keys: int = -1
) -> tuple[Tensor, Tensor]:
    """Returns (grad_sub_scores, grad_cores): the first of sub_scores' shape, dtype and strides
    (padding included, zero there), the second of the cores'."""
    if _inline_triton(sub_scores):
        return _triton_retrieval.tdqkr_retrieval_stacked_backward_cuda(grad_scores, sub_scores, cores, ids, n_keys)
    return _stacked_backward_opaque(grad_scores, sub_scores, cores, ids, n_keys)


def _stacked_setup_context(ctx, inputs, output) -> None:
    sub_scores, cores, _u, _v, _knn, n_keys = inputs
    ids, _scores = output
    ctx.mark_non_differentiable(ids)
    ctx.save_for_backward(sub_scores, cores, ids)
    ctx.n_keys = n_keys


def _stacked_backward(ctx, grad_ids, grad_scores):
    sub_scores, cores, ids = ctx.saved_tensors
    grad_sub, grad_c = tdqkr_retrieval_stacked_backward(grad_scores.contiguous(), sub_scores, cores, ids, ctx.n_keys)
    return grad_sub, grad_c, None, None, None, None


tdqkr_retrieval_stacked.register_autograd(_stacked_backward, setup_context=_stacked_setup_context)


# -- inference: table rows instead of ids -------------------------------------------------------


def map_rows(ids: Tensor, perm: Tensor, num_logical: int, row_window: Tensor) -> Tensor:
    """The table rows of virtual ids: (perm[ids] mod num_logical + offset) mod num_rows, with
    (offset, num_rows) = row_window."""
    window = row_window.reshape(-1).to(torch.int64)
    return (perm[ids].to(torch.int64) % num_logical + window[0]) % window[1]


def query_norm_scale(q: Tensor, eps: float) -> Tensor:
    """[T, H] in fp32 (fp64 for fp64 q): 1/rms(q_A) · 1/rms(q_B), rms(x) = sqrt(mean(x²) + eps),
    the factor that turns scores of raw queries into those of RMS-normalized ones."""
    qf = q.to(torch.promote_types(q.dtype, torch.float32))
    return torch.rsqrt(qf.pow(2).mean(-1) + eps).prod(-1)


def rows_reference(
    sub_scores: Tensor,
    cores: Tensor,
    u: Tensor,
    v: Tensor,
    knn: int,
    n_keys: int,
    perm: Tensor,
    num_logical: int,
    row_window: Tensor,
    q: Tensor | None = None,
    q_eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The rows op's reference kernel: the stacked forward, its ids mapped by `map_rows`, its
    scores times `query_norm_scale(q, q_eps)` (when q is given) before their cast."""
    args = (sub_scores, cores, u, v, knn, n_keys, perm, num_logical, row_window)
    check_retrieval_rows_args(_ROWS, *args, q, q_eps)
    check_row_window(_ROWS, row_window)
    if q is None:
        ids, scores = stacked_forward_reference(sub_scores, cores, u, v, knn, n_keys)
    else:  # (selecting on the upcast scores picks what it picks on the originals: it computes in acc)
        acc = acc_dtype(sub_scores, cores, q)
        ids, scores = stacked_forward_reference(sub_scores.to(acc), cores, u, v, knn, n_keys)
        scores = (scores * query_norm_scale(q, q_eps).to(acc)[:, :, None, None]).to(sub_scores.dtype)
    return map_rows(ids, perm, num_logical, row_window), scores


@torch.library.custom_op("ultramem::tdqkr_retrieval_rows_opaque", mutates_args=())
def _rows_opaque(
    sub_scores: Tensor,
    cores: Tensor,
    u: Tensor,
    v: Tensor,
    knn: int,
    n_keys: int,
    perm: Tensor,
    num_logical: int,
    row_window: Tensor,
    q: Tensor | None = None,
    q_eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    return rows_reference(sub_scores, cores, u, v, knn, n_keys, perm, num_logical, row_window, q, q_eps)


@_rows_opaque.register_fake
def _(sub_scores, cores, u, v, knn, n_keys, perm, num_logical, row_window, q=None, q_eps=0.0):
    check_retrieval_rows_args(_ROWS, sub_scores, cores, u, v, knn, n_keys, perm, num_logical, row_window, q, q_eps)
    t, h = sub_scores.shape[:2]
    rows = sub_scores.new_empty((t, h, knn), dtype=torch.int64)
    return rows, sub_scores.new_empty((t, h, knn, cores.shape[1]))


if _triton_retrieval is not None:
    _rows_opaque.register_kernel("cuda")(_triton_retrieval.tdqkr_retrieval_rows_cuda)


@torch.library.triton_op("ultramem::tdqkr_retrieval_rows", mutates_args=())
def tdqkr_retrieval_rows(
    sub_scores: Tensor,
    cores: Tensor,
    u: Tensor,
    v: Tensor,
    knn: int,
    n_keys: int,
    perm: Tensor,
    num_logical: int,
    row_window: Tensor,
    q: Tensor | None = None,
    q_eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """tdqkr_retrieval_stacked for inference: returns (rows [T, H, k] int64, scores [T, H, k, M]),
    rows = (perm[id] mod num_logical + offset) mod num_rows for each kept virtual id, written by
    the retrieval's own launch (no separate kernel maps the ids). perm [≥ virtual ids] int32 or
    int64; row_window = (offset, num_rows), an integer tensor of 2 contiguous values: a tensor,
    so that layers with different offsets share one compiled graph. A layer holds it as [1, 2]:
    Inductor inlines a constant of one value as a literal, which a kernel launch cannot take, and
    a 1-D one of up to 8 values as a kernel that writes them on every call. q [T, H, 2, d]
    (optional): the raw queries of the two sides when sub_scores are <q_side, k> without the
    queries' RMS normalization; the scores come out times 1/rms(q_A)·1/rms(q_B)
    (`query_norm_scale`, eps q_eps), those of the normalized queries, and the kept pairs are the
    same (a positive factor per side keeps every ranking), so the normalization needs no launch
    of its own. No backward: the gradient needs the ids; train with
    tdqkr_retrieval_stacked."""
    args = (sub_scores, cores, u, v, knn, n_keys, perm, num_logical, row_window, q, q_eps)
    if _inline_triton(sub_scores):
        return _triton_retrieval.tdqkr_retrieval_rows_cuda(*args)
    return _rows_opaque(*args)


def _rows_setup_context(ctx, inputs, output) -> None:
    raise RuntimeError(
        "ultramem::tdqkr_retrieval_rows has no backward (its gradient needs the virtual ids): "
        "call it with autograd off, or use tdqkr_retrieval_stacked"
    )


def _rows_backward(ctx, grad_rows, grad_scores):  # never reached: setup refuses
    raise RuntimeError("ultramem::tdqkr_retrieval_rows has no backward")


tdqkr_retrieval_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)
