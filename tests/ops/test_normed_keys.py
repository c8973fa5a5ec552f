"""ultramem::normed_keys on CPU: the reference and its backward against float64 formulas written
here, gradcheck, opcheck, compile, bad inputs; its Triton kernels under the interpreter (in a
subprocess, as the other kernel tests). Its CUDA bodies as torch.compile traces them are in
test_kernel_access.py, the kernels on a GPU in test_inline_triton_cuda.py."""

from __future__ import annotations

import os

import pytest
import torch
from triton_interpreter import assert_kernel_tests_pass_interpreted

import ultramem.ops as ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (see test_interpreter_suite)")

# (H, S, n, kdim, r, n_pad): the 227M layout at small sizes, rank 1, no padding, kdim not a power of 2
SHAPES = [(2, 2, 5, 6, 3, 7), (1, 2, 4, 8, 1, 4), (1, 2, 3, 5, 2, 6), (3, 1, 1, 1, 2, 2), (1, 2, 0, 4, 2, 3)]


def _keys(seed, shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h, s, n, kd, r, _ = shape
    return (torch.randn(h, s, n, kd, r, generator=g, dtype=torch.float64) * 3 + 0.5).to(dtype)


def _oracle(keys, eps, n_pad):
    """out in float64, key by key: k / sqrt(Σ k² / kdim + eps), zeros past the keys."""
    h, s, n, kd, r = keys.shape
    out = torch.zeros(h, s, n_pad, r, kd, dtype=torch.float64)
    k64 = keys.double()
    for a in range(h):
        for b in range(s):
            for i in range(n):
                for p in range(r):
                    v = k64[a, b, i, :, p]
                    out[a, b, i, p] = v / torch.sqrt((v * v).sum() / kd + eps)
    return out


def _grad_oracle(grad_out, keys, eps):
    """The keys' gradient in float64 from autograd through the formula (not the op's closed form)."""
    k = keys.double().requires_grad_()
    x = k.transpose(-1, -2)
    y = x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
    (y * grad_out[:, :, : keys.shape[2]].double()).sum().backward()
    return k.grad


TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_reference_matches_float64(shape, out_dtype):
    keys = _keys(1, shape, torch.float64 if out_dtype == torch.float64 else torch.float32)
    got = ops.normed_keys(keys, 1e-6, shape[-1], out_dtype)
    assert got.dtype == out_dtype and got.is_contiguous()
    torch.testing.assert_close(got.double(), _oracle(keys, 1e-6, shape[-1]), rtol=TOL[out_dtype], atol=TOL[out_dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_backward_reference_matches_float64(shape):
    keys = _keys(2, shape, torch.float64)
    g = torch.Generator().manual_seed(3)
    h, s, n, kd, r, n_pad = shape
    grad_out = torch.randn(h, s, n_pad, r, kd, generator=g, dtype=torch.float64)
    got = ops.normed_keys_backward(grad_out, keys, 1e-6)
    assert got.shape == keys.shape and got.dtype == keys.dtype
    torch.testing.assert_close(got, _grad_oracle(grad_out, keys, 1e-6), rtol=1e-10, atol=1e-12)


def test_gradcheck_and_opcheck():
    keys = _keys(4, SHAPES[0], torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: ops.normed_keys(k, 1e-5, 7, torch.float64), (keys,))
    grad_out = torch.randn(2, 2, 7, 3, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ultramem.normed_keys.default, (keys, 1e-5, 7, torch.float64))
    torch.library.opcheck(torch.ops.ultramem.normed_keys.default, (keys.detach().float(), 1e-5, 7, torch.bfloat16))
    torch.library.opcheck(torch.ops.ultramem.normed_keys_backward.default, (grad_out, keys.detach(), 1e-5))


def test_compiles_fullgraph():
    torch._dynamo.reset()
    keys = _keys(5, SHAPES[0]).requires_grad_()

    def f(k):
        return (ops.normed_keys(k, 1e-6, 7, torch.bfloat16).float() ** 2).sum()

    want = torch.autograd.grad(f(keys), keys)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(keys), keys)[0]
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


BAD = [
    (lambda a: {**a, "keys": a["keys"][0]}, r"keys must be 5-D \[heads, sides, keys, kdim, rank\]"),
    (lambda a: {**a, "keys": a["keys"].long()}, "keys must be a floating tensor"),
    (lambda a: {**a, "eps": float("nan")}, "eps must be finite and >= 0, got nan"),
    (lambda a: {**a, "eps": -1e-6}, "eps must be finite and >= 0, got -1e-06"),
    (lambda a: {**a, "n_pad": 4}, "n_pad must be at least the number of keys 5, got 4"),
    (lambda a: {**a, "out_dtype": torch.int32}, "out_dtype must be bf16, fp16, fp32 or fp64, got torch.int32"),
]


@pytest.mark.parametrize("bad, match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_are_refused(bad, match):
    args = bad(dict(keys=_keys(6, SHAPES[0]), eps=1e-6, n_pad=7, out_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=match):
        ops.normed_keys(**args)


def test_backward_refuses_keys_or_a_gradient_of_another_shape():
    keys = _keys(7, SHAPES[0])
    with pytest.raises(ValueError, match=r"keys must be 5-D \[heads, sides, keys, kdim, rank\], got shape \(5,\)"):
        ops.normed_keys_backward(torch.zeros(2, 2, 7, 3, 6), torch.zeros(5), 1e-6)
    with pytest.raises(
        ValueError, match=r"grad_out must have shape \(H=2, S=2, n_pad>=5, r=3, kdim=6\), got \(2, 2, 4, 3, 6\)"
    ):
        ops.normed_keys_backward(torch.zeros(2, 2, 4, 3, 6), keys, 1e-6)


# ------------------------------------------------------------------ the Triton kernels


def test_interpreter_suite():
    assert_kernel_tests_pass_interpreted(__file__, timeout=300)


@pytest.fixture
def small_blocks(monkeypatch):
    """Programs of 16 elements: several rows per program, with masked edges in rows and kdim."""
    from triton_interpreter import patch_index

    patch_index()
    from ultramem.ops._triton import normed_keys as tnk

    monkeypatch.setitem(tnk.LAUNCH, "ELEMENTS", 16)
    monkeypatch.setitem(tnk.LAUNCH, "num_warps", 1)
    return tnk


@needs_interpreter
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_kernels_match_float64(small_blocks, shape, dtype, out_dtype):
    keys = _keys(8, shape, dtype)
    h, s, n, kd, r, n_pad = shape
    got = small_blocks.normed_keys_cuda(keys, 1e-6, n_pad, out_dtype)
    assert got.shape == (h, s, n_pad, r, kd) and got.dtype == out_dtype
    torch.testing.assert_close(got.double(), _oracle(keys, 1e-6, n_pad), rtol=TOL[out_dtype], atol=TOL[out_dtype])
    grad_out = torch.randn(h, s, n_pad, r, kd, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grad = small_blocks.normed_keys_backward_cuda(grad_out.to(out_dtype), keys, 1e-6)
    assert grad.shape == keys.shape and grad.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(grad.double(), _grad_oracle(grad_out.to(out_dtype), keys, 1e-6), rtol=tol, atol=tol)


@needs_interpreter
def test_kernels_read_strided_keys_and_gradients(small_blocks):
    # keys as a view with every stride other than contiguous; a gradient that is a slice
    base = _keys(10, (2, 3, 5, 12, 3, 5))
    keys = base[:, ::2, :, ::2].transpose(0, 1)  # [S=2, H=2, n, kdim=6, r] in memory order of neither
    assert not keys.is_contiguous()
    got = small_blocks.normed_keys_cuda(keys, 1e-5, 6, torch.float32)
    torch.testing.assert_close(got.double(), _oracle(keys, 1e-5, 6), rtol=2e-6, atol=2e-6)
    wide = torch.randn(2, 2, 6, 3, 12, dtype=torch.float64)
    grad_out = wide[..., ::2]
    grad = small_blocks.normed_keys_backward_cuda(grad_out, keys.double(), 1e-5)
    torch.testing.assert_close(grad, _grad_oracle(grad_out, keys, 1e-5), rtol=1e-10, atol=1e-12)
