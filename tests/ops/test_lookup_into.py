"""ultramem::gate_lookup_into and weighted_lookup_into and their backwards: the gradient
buffers handed over as tensors. Against the float64 oracle (buffers that already hold a sum
gain exactly the tables' gradients), staged with and without room, opcheck, bad input refused
before anything is written; on CUDA also compiled, with every kernel launched from Inductor's
code and no ultramem:: call left."""

from __future__ import annotations

import pytest
import torch
from op_oracles import gate_lookup_backward_oracle, gate_lookup_oracle, lookup_backward_oracle, lookup_oracle

import ultramem.ops as ops
from ultramem.ops import GradStaging

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


def _inputs(device, dtype=torch.float64, t=7, e=5, n=11, dv=8, dp=6, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n, (t, e), generator=g)
    rows[1] = rows[0]  # a repeated token: the same rows twice
    values, pre = torch.randn(n, dv, generator=g, dtype=dtype), torch.randn(n, dp, generator=g, dtype=dtype)
    x, scores = torch.randn(t, dp, generator=g, dtype=dtype), torch.randn(t, e, m, generator=g, dtype=dtype)
    return [a.to(device) for a in (rows, values, pre, x, scores)]


def _buffers(values, pre, seed=1):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    return [torch.randn(t.shape, generator=g, dtype=acc).to(values.device) for t in (values, pre)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate_grad", [False, True])
def test_matches_the_oracle_and_adds_into_the_buffers(device, gate_grad):
    rows, values, pre, x, scores = _inputs(device)
    bufs = _buffers(values, pre)
    before = [b.clone() for b in bufs]
    x_, s_ = x.clone().requires_grad_(), scores.clone().requires_grad_()
    out, gate = ops.gate_lookup_into(rows, values, pre, x_, s_, True, *bufs)
    want_out, want_gate = gate_lookup_oracle(*(a.cpu() for a in (rows, values, pre, x, scores)), True)
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gate.cpu(), want_gate, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_gate = torch.randn(gate.shape, generator=g, dtype=gate.dtype) if gate_grad else None
    loss = (out * w_out.to(device)).sum() + ((gate * w_gate.to(device)).sum() if gate_grad else 0)
    loss.backward()
    cpu = [a.cpu() for a in (rows, values, pre, x, scores)]
    g_values, g_pre, g_x, g_scores = gate_lookup_backward_oracle(w_out, w_gate, *cpu, want_gate, True)
    torch.testing.assert_close(bufs[0].cpu() - before[0].cpu(), g_values, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bufs[1].cpu() - before[1].cpu(), g_pre, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_.grad.cpu(), g_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_.grad.cpu(), g_scores, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [16, 10])  # 10: the second call finds no room and adds at once
def test_staged_backward_stages_then_flushes_to_the_same_sums(device, capacity):
    calls = [_inputs(device, torch.float32, seed=s) for s in (3, 4)]
    rows, values, pre, _, scores = calls[0]
    t, e, m = scores.shape
    staging = GradStaging(capacity, e, m, values.shape[1], pre.shape[1], torch.float32, device)
    bufs = [torch.zeros(values.shape, device=device), torch.zeros(pre.shape, device=device)]
    want = [torch.zeros(values.shape, dtype=torch.float64), torch.zeros(pre.shape, dtype=torch.float64)]
    for rows, values, pre, x, scores in calls:
        out, gate = ops.gate_lookup_into(rows, values, pre, x.requires_grad_(), scores, True, *bufs, *staging.tensors())
        out.sum().backward()
        cpu = [a.detach().cpu() for a in (rows, values, pre, x, scores)]
        grads = gate_lookup_backward_oracle(torch.ones(out.shape), None, *cpu, gate.detach().cpu(), True)
        want = [w + gr for w, gr in zip(want, grads)]
    assert staging.staged_tokens() == (2 * t if capacity >= 2 * t else t)
    assert bool(bufs[0].any()) == (capacity < 2 * t)  # only a call without room adds at once
    staging.flush(*bufs)
    for b, w in zip(bufs, want):
        torch.testing.assert_close(b.cpu().double(), w, rtol=1e-5, atol=1e-5)


def test_opcheck():
    rows, values, pre, x, scores = _inputs("cpu", torch.float32)
    bufs = _buffers(values, pre)
    staging = GradStaging(32, rows.shape[1], scores.shape[2], values.shape[1], pre.shape[1], torch.float32, "cpu")
    x, scores = x.requires_grad_(), scores.requires_grad_()
    for stage in ((), staging.tensors()):
        torch.library.opcheck(
            torch.ops.ultramem.gate_lookup_into.default, (rows, values, pre, x, scores, True, *bufs, *stage)
        )
        out, gate = ops.gate_lookup_into(rows, values, pre, x, scores, True, *bufs, *stage)
        grads = (torch.randn(out.shape), torch.randn(gate.shape))
        args = (
            *bufs,
            *(stage or (None,) * 6),
            *grads,
            rows,
            values,
            pre,
            x.detach(),
            scores.detach(),
            gate.detach(),
            True,
        )
        torch.library.opcheck(torch.ops.ultramem.gate_lookup_into_backward.default, args)


def test_bad_input_is_refused_before_anything_is_written():
    rows, values, pre, x, scores = _inputs("cpu")
    bufs = _buffers(values, pre)
    with pytest.raises(ValueError, match=r"grad_table shape \(11, 6\) must equal table shape \(11, 8\)"):
        ops.gate_lookup_into(rows, values, pre, x, scores, True, bufs[1], bufs[1])
    with pytest.raises(ValueError, match="grad_table must be float32 or float64, got torch.bfloat16"):
        ops.gate_lookup_into(rows, values, pre, x, scores, True, bufs[0].bfloat16(), bufs[1])
    staging = GradStaging(32, rows.shape[1], scores.shape[2], values.shape[1], pre.shape[1], torch.float64, "cpu")
    with pytest.raises(ValueError, match="come all together or not at all"):
        ops.gate_lookup_into(rows, values, pre, x, scores, True, *bufs, *staging.tensors()[:3])
    # rows out of range in the backward: refused, both buffers as they were
    before = [b.clone() for b in bufs]
    grad_out, gate = (
        torch.randn(rows.shape[0], values.shape[1], dtype=torch.float64),
        torch.randn(rows.shape, dtype=torch.float64),
    )
    bad = rows.clone()
    bad[3, 2] = values.shape[0]
    with pytest.raises(ValueError, match=r"rows has values in \[\d+, 11\], outside the valid range \[0, 11\)"):
        ops.gate_lookup_into_backward(*bufs, *(None,) * 6, grad_out, None, bad, values, pre, x, scores, gate, True)
    for b, w in zip(bufs, before):
        assert torch.equal(b, w)


# ------------------------------------------------------------------ weighted_lookup_into


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("staging_tokens", [0, 16, 10])  # 10: the second call finds no room
def test_lookup_into_matches_the_oracle_staged_or_not(device, staging_tokens):
    dtype = torch.float32 if staging_tokens else torch.float64  # staging holds fp32
    tol = dict(rtol=1e-5, atol=1e-5) if staging_tokens else dict(rtol=1e-10, atol=1e-10)
    rows, values, _, _, scores = _inputs(device, dtype)
    t, e, m = scores.shape
    staging = GradStaging(staging_tokens, e, m, values.shape[1], 0, dtype, device) if staging_tokens else None
    stage = (staging.rows, staging.eff, staging.grad_out, staging.fill) if staging else ()
    buf = _buffers(values, values)[0]
    want = buf.cpu().double().clone()
    for seed in (5, 6):
        rows, values, _, _, scores = _inputs(device, dtype, seed=seed)
        s_ = scores.clone().requires_grad_()
        out = ops.weighted_lookup_into(rows, values, s_, buf, *stage)
        cpu = [a.cpu() for a in (rows, values, scores)]
        torch.testing.assert_close(out.detach().cpu().double(), lookup_oracle(*cpu), **tol)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        (out * w.to(device)).sum().backward()
        g_table, g_scores = lookup_backward_oracle(w, *cpu)
        torch.testing.assert_close(s_.grad.cpu().double(), g_scores, **tol)
        want += g_table
    if staging:
        assert staging.staged_tokens() == (2 * t if staging_tokens >= 2 * t else t)
        staging.flush(buf)
    torch.testing.assert_close(buf.cpu().double(), want, **tol)


def test_lookup_into_opcheck_and_bad_input():
    rows, values, _, _, scores = _inputs("cpu", torch.float32)
    buf = _buffers(values, values)[0]
    staging = GradStaging(32, rows.shape[1], scores.shape[2], values.shape[1], 0, torch.float32, "cpu")
    stage = (staging.rows, staging.eff, staging.grad_out, staging.fill)
    scores = scores.requires_grad_()
    for st in ((), stage):
        torch.library.opcheck(torch.ops.ultramem.weighted_lookup_into.default, (rows, values, scores, buf, *st))
        grad_out = torch.randn(rows.shape[0], values.shape[1])
        args = (buf, *(st or (None,) * 4), grad_out, rows, values, scores.detach())
        torch.library.opcheck(torch.ops.ultramem.weighted_lookup_into_backward.default, args)
    with pytest.raises(ValueError, match=r"grad_table shape \(11, 6\) must equal table shape \(11, 8\)"):
        ops.weighted_lookup_into(rows, values, scores, buf[:, :6])
    with pytest.raises(ValueError, match="come all together or not at all"):
        ops.weighted_lookup_into(rows, values, scores, buf, *stage[:2])
    before = buf.clone()
    bad = rows.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match=r"rows has values in \[-1, \d+\], outside the valid range \[0, 11\)"):
        ops.weighted_lookup_into_backward(buf, *stage, grad_out, bad, values, scores.detach())
    assert torch.equal(buf, before) and staging.staged_tokens() == 0


# ------------------------------------------------------------------ compiled, on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", ["gate_lookup_into", "weighted_lookup_into"])
@pytest.mark.parametrize("staged", [False, True])
def test_compiled_on_cuda_launches_every_kernel_inline(op, staged):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    rows, values, pre, x, scores = _inputs("cuda", torch.float32, t=64, e=16, n=300, dv=64, dp=32)
    gate = op == "gate_lookup_into"
    results = []
    for compiled in (False, True):
        bufs = [torch.zeros(values.shape, device="cuda")] + ([torch.zeros(pre.shape, device="cuda")] if gate else [])
        staging = GradStaging(128, 16, 2, 64, 32 if gate else 0, torch.float32, "cuda") if staged else None
        if not staged:
            stage = ()
        elif gate:
            stage = staging.tensors()
        else:
            stage = (staging.rows, staging.eff, staging.grad_out, staging.fill)
        x_, s_ = x.clone().requires_grad_(), scores.clone().requires_grad_()

        def loss(x_, s_):
            if gate:
                out, _ = ops.gate_lookup_into(rows, values, pre, x_, s_, True, *bufs, *stage)
            else:
                out = ops.weighted_lookup_into(rows, values, s_, *bufs, *stage)
            return (out**2).sum()

        fn = torch.compile(loss, fullgraph=True) if compiled else loss

        def step(x_, s_):  # (the backward's graph is compiled when it first runs)
            fn(x_, s_).backward()

        _, codes = run_and_get_code(step, x_, s_) if compiled else (step(x_, s_), [])
        if staged:
            assert staging.staged_tokens() == 64
            staging.flush(*bufs)
        results.append((*bufs, s_.grad) + ((x_.grad,) if gate else ()))
        code = "\n".join(codes)
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-4)
    assert "torch.ops.ultramem" not in code, code
    forward = "_gate_lookup_fwd" if gate else "_weighted_gather_kernel"
    backward = ("_gate_lookup_bwd_kernel",) if gate or staged else ("_gather_dot_scatter_kernel",)
    for kernel in (forward, *backward):
        assert kernel in code, kernel
