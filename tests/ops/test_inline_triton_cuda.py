"""The ops whose Triton launches torch.compile traces (torch.library.triton_op), on a CUDA device
(skipped without one): compiled, Inductor's own code launches the kernels, with no ultramem:: call
left, and the results equal the eager op's (grad_cores up to the order of its sum over tokens,
which Inductor reduces its own way); the padded key gradients are zero in the padding; opcheck
passes on CUDA; debug mode keeps the opaque call, whose range checks read the data."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import ultramem.ops as ops
from ultramem.ops import _checks
from ultramem.ops._triton import _launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def inline_launches(monkeypatch):
    monkeypatch.setattr(_launch, "INLINE_TRITON", True)


def _retrieval_inputs(t=64, h=1, n=96, r=2, m=2, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(t, h, n, r, device="cuda", generator=g, dtype=dtype)
    b = torch.randn(t, h, n, r, device="cuda", generator=g, dtype=dtype)
    cores = torch.randn(h, m, r, r, device="cuda", generator=g)
    u, v = torch.randn(h, r, device="cuda", generator=g), torch.randn(h, r, device="cuda", generator=g)
    return a, b, cores, u, v


def _retrieval_step(a, b, cores, u, v, knn, n_keys=-1):
    ids, scores = ops.tdqkr_retrieval(a, b, cores, u, v, knn, n_keys)
    weights = torch.linspace(-1, 1, scores.numel(), device=scores.device).view_as(scores)
    (scores.float() * weights).sum().backward()
    return ids, scores


@pytest.mark.parametrize(
    "knn,n_keys,n", [(8, -1, 96), (32, -1, 96), (32, 1138, 1152), (128, -1, 300)], ids=["k8", "k32", "padded", "tiled"]
)
def test_retrieval_compiled_launches_inline_and_matches_eager(knn, n_keys, n):
    torch._dynamo.reset()
    inputs = _retrieval_inputs(n=n)
    if n_keys != -1:  # padding rows the kernels must never read (the layer's GEMM outputs)
        inputs[0][:, :, n_keys:] = float("nan")
        inputs[1][:, :, n_keys:] = 1e4
    leaves = [x.clone().requires_grad_(x.dtype.is_floating_point) for x in inputs[:3]]
    ids, scores = _retrieval_step(*leaves, *inputs[3:], knn, n_keys)
    leaves_c = [x.clone().requires_grad_(x.dtype.is_floating_point) for x in inputs[:3]]
    compiled = torch.compile(_retrieval_step, fullgraph=True)
    (ids_c, scores_c), codes = run_and_get_code(compiled, *leaves_c, *inputs[3:], knn, n_keys)
    assert torch.equal(ids_c, ids) and torch.equal(scores_c, scores)
    for x, y in zip(leaves_c[:2], leaves[:2]):
        assert torch.equal(x.grad, y.grad)
        if n_keys != -1:
            assert not x.grad[:, :, n_keys:].any()
    torch.testing.assert_close(leaves_c[2].grad, leaves[2].grad, rtol=1e-5, atol=1e-5)
    code = "\n".join(codes)
    assert "torch.ops.ultramem" not in code, "an ultramem:: op is still called from the compiled code"
    assert "_retrieval_fwd_kernel" in code and "_retrieval_bwd_kernel" in code


def test_retrieval_opcheck_on_cuda():
    a, b, cores, u, v = _retrieval_inputs(t=16, n=40, dtype=torch.float32)
    torch.library.opcheck(torch.ops.ultramem.tdqkr_retrieval.default, (a, b, cores, u, v, 8))
    torch.library.opcheck(torch.ops.ultramem.tdqkr_retrieval.default, (a, b, cores, u, v, 8, 33))
    ids, _ = ops.tdqkr_retrieval(a, b, cores, u, v, 8)
    grad = torch.randn(16, 1, 8, 2, device="cuda")
    torch.library.opcheck(torch.ops.ultramem.tdqkr_retrieval_backward.default, (grad, a, b, cores, ids))


def test_debug_mode_keeps_the_checked_call(monkeypatch):
    monkeypatch.setattr(_checks, "_debug", True)
    torch._dynamo.reset()
    a, b, cores, u, v = _retrieval_inputs(t=8, n=40)
    compiled = torch.compile(lambda *x: ops.tdqkr_retrieval(*x, 8), fullgraph=True)
    _, codes = run_and_get_code(compiled, a, b, cores, u, v)
    assert "ultramem.tdqkr_retrieval_opaque" in "\n".join(codes)
    torch._dynamo.reset()
