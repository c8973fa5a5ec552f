"""The ops whose Triton launches torch.compile traces (torch.library.triton_op), on a CUDA device
(skipped without one): compiled, Inductor's own code launches the kernels, with no ultramem:: call
left, and the results equal the eager op's (grad_cores up to the order of its sum over tokens,
which Inductor reduces its own way; table gradients up to the order of their atomic adds, and
gate_lookup's gradients up to the rounding of the elementwise ops Inductor fuses around them);
the padded key gradients are zero in the padding; opcheck passes on CUDA; debug mode keeps the
opaque call, whose range checks read the data."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import ultramem.ops as ops
from ultramem.ops import _checks, determinism
from ultramem.ops._triton import _launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def inline_launches(monkeypatch):
    # No compile cache: AOTAutograd's keys on the Dynamo graph, the same whatever the bodies
    # decide when traced (inline or not, deterministic mode), and would hand back another test's.
    monkeypatch.setattr(_launch, "INLINE_TRITON", True)
    with torch.compiler.config.patch(force_disable_caches=True):
        yield


def _retrieval_inputs(t=64, h=1, n=96, r=2, m=2, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(t, h, n, r, device="cuda", generator=g, dtype=dtype)
    b = torch.randn(t, h, n, r, device="cuda", generator=g, dtype=dtype)
    cores = torch.randn(h, m, r, r, device="cuda", generator=g)
    u, v = torch.randn(h, r, device="cuda", generator=g), torch.randn(h, r, device="cuda", generator=g)
    return a, b, cores, u, v


def _retrieval(a, b, cores, u, v, knn, n_keys=-1):
    return ops.tdqkr_retrieval(a, b, cores, u, v, knn, n_keys)


def _retrieval_step(a, b, cores, u, v, knn, n_keys=-1, retrieval=_retrieval):
    # `retrieval` compiled or not; the backward runs outside it (Dynamo does not trace
    # Tensor.backward()), through the backward graph compiled with the forward
    ids, scores = retrieval(a, b, cores, u, v, knn, n_keys)
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
    compiled = torch.compile(_retrieval, fullgraph=True)
    (ids_c, scores_c), codes = run_and_get_code(_retrieval_step, *leaves_c, *inputs[3:], knn, n_keys, compiled)
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


def _stacked_step(sub, cores, u, v, retrieval):
    ids, scores = retrieval(sub, cores, u, v)
    weights = torch.linspace(-1, 1, scores.numel(), device=scores.device).view_as(scores)
    (scores.float() * weights).sum().backward()
    return ids, scores


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stacked_retrieval_equals_the_op_on_both_sides(compiled):
    # The layer's call at its 227M launch (k = 32, 1,138 keys padded to 1,152), on fewer tokens:
    # sides laid out [H, 2, T, n, r] as its batched GEMM writes them, padding the kernels must
    # never read. Results and gradients equal the op on the two sides apart, bit for bit (the
    # same kernels); the gradient comes back in the input's layout, zero in the padding.
    torch._dynamo.reset()
    a, b, cores, u, v = _retrieval_inputs(t=2048, n=1152)
    a[:, :, 1138:], b[:, :, 1138:] = float("nan"), 1e4
    sub = torch.stack([a, b]).permute(2, 0, 1, 3, 4).contiguous().permute(2, 0, 1, 3, 4)
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), cores.clone().requires_grad_()]
    ids, scores = _retrieval_step(*leaves, u, v, 32, 1138)
    sub_l, cores_l = sub.clone().requires_grad_(), cores.clone().requires_grad_()

    def stacked(s, c, uu, vv):
        return ops.tdqkr_retrieval_stacked(s, c, uu, vv, 32, 1138)

    if compiled:
        fn = torch.compile(stacked, fullgraph=True)
        (ids_s, scores_s), codes = run_and_get_code(_stacked_step, sub_l, cores_l, u, v, fn)
        code = "\n".join(codes)
        assert "torch.ops.ultramem" not in code and code.count("_retrieval_bwd_kernel") >= 1, code
    else:
        ids_s, scores_s = _stacked_step(sub_l, cores_l, u, v, stacked)
    assert torch.equal(ids_s, ids) and torch.equal(scores_s, scores)
    assert sub_l.grad.stride() == sub.stride()
    assert torch.equal(sub_l.grad[:, :, 0], leaves[0].grad) and torch.equal(sub_l.grad[:, :, 1], leaves[1].grad)
    assert not sub_l.grad[:, :, :, 1138:].any()
    torch.testing.assert_close(cores_l.grad, leaves[2].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aoti", [False, True], ids=["compiled", "aoti"])
def test_rows_retrieval_compiled_equals_the_stacked_ids_mapped(aoti, tmp_path):
    # The inference op at the 227M launch: compiled (Inductor launches it) and packaged by
    # AOTInductor with the row window and perm baked in as constants, its rows are the stacked
    # op's ids mapped, its scores the stacked op's, bit for bit. The package runs in a fresh
    # process (decode_aoti's runner), where a crash on load ends only that process.
    from perf.diagnostics import decode_aoti

    torch._dynamo.reset()
    a, b, cores, u, v = _retrieval_inputs(t=64, n=1152)
    sub = torch.stack([a, b]).permute(2, 0, 1, 3, 4).contiguous().permute(2, 0, 1, 3, 4)
    perm = torch.randperm(4 * 1138 * 1138, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    n2 = 1138 * 1138

    class Rows(torch.nn.Module):  # rows and scores in one float64 tensor (exact: rows < 2^53)
        def __init__(self):
            super().__init__()
            self.register_buffer("perm", perm)
            self.register_buffer("window", torch.tensor([3 * n2 + 11, 5 * n2], device="cuda"))

        def forward(self, s):
            rows, scores = ops.tdqkr_retrieval_rows(s, cores, u, v, 32, 1138, self.perm, n2, self.window)
            return torch.cat([rows.double(), scores.double().flatten(2)], dim=2)

    module = Rows()
    with torch.inference_mode():
        ids, scores = ops.tdqkr_retrieval_stacked(sub, cores, u, v, 32, 1138)
        rows = (perm[ids] % n2 + 3 * n2 + 11) % (5 * n2)
        want = torch.cat([rows.double(), scores.double().flatten(2)], dim=2)
        if aoti:
            package = decode_aoti.aoti_package(module, sub, tmp_path / "rows.pt2", None)
            torch.save([sub.cpu()], tmp_path / "inputs.pt")
            child = decode_aoti._run_package_in_child(package, tmp_path / "inputs.pt", tmp_path / "out.pt", "cuda", 1)
            assert child is not None, "the package failed to load or run (see the output above)"
            got = child["outputs"][0].cuda()
        else:
            got, codes = run_and_get_code(torch.compile(module, fullgraph=True), sub)
            assert "torch.ops.ultramem" not in "\n".join(codes)
    assert torch.equal(got, want)


def test_stacked_retrieval_opcheck_on_cuda():
    a, b, cores, u, v = _retrieval_inputs(t=16, n=40, dtype=torch.float32)
    sub = torch.stack([a, b], 2)
    torch.library.opcheck(torch.ops.ultramem.tdqkr_retrieval_stacked.default, (sub, cores, u, v, 8, 33))
    ids, _ = ops.tdqkr_retrieval_stacked(sub, cores, u, v, 8, 33)
    grad = torch.randn(16, 1, 8, 2, device="cuda")
    torch.library.opcheck(torch.ops.ultramem.tdqkr_retrieval_stacked_backward.default, (grad, sub, cores, ids, 33))


def test_debug_mode_keeps_the_checked_call(monkeypatch):
    monkeypatch.setattr(_checks, "_debug", True)
    torch._dynamo.reset()
    a, b, cores, u, v = _retrieval_inputs(t=8, n=40)
    compiled = torch.compile(lambda *x: ops.tdqkr_retrieval(*x, 8), fullgraph=True)
    _, codes = run_and_get_code(compiled, a, b, cores, u, v)
    assert "ultramem.tdqkr_retrieval_opaque" in "\n".join(codes)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- the lookup ops

LOOKUP_KERNELS = {
    "weighted_lookup": ("_weighted_gather_kernel", "_gather_dot_scatter_kernel"),
    "pre_value_gate": ("_gather_dot_scatter_kernel", "_weighted_gather_kernel"),
    "gate_lookup": ("_gate_lookup_fwd_chunks_kernel", "_weighted_gather_kernel", "_gather_dot_scatter_kernel"),
}


def _lookup_inputs(t=64, e=8, n=512, dv=64, dp=32, m=2, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = torch.randint(0, n, (t, e), device="cuda", generator=g)
    rows[1] = rows[0]  # rows picked twice: their gradients add
    values = torch.randn(n, dv, device="cuda", generator=g, dtype=dtype)
    pre = torch.randn(n, dp, device="cuda", generator=g, dtype=dtype)
    x = torch.randn(t, dp, device="cuda", generator=g, dtype=dtype)
    scores = torch.randn(t, e, m, device="cuda", generator=g, dtype=dtype)
    return rows, values, pre, x, scores


def _lookup_outputs(op, rows, values, pre, x, scores, *buffers):
    if op == "weighted_lookup":
        return (ops.weighted_lookup(rows, values, scores),)
    if op == "pre_value_gate":
        return (ops.pre_value_gate(rows, pre, x),)
    return ops.gate_lookup(rows, values, pre, x, scores, True, *buffers)


def _lookup_step(op, weights, *inputs, outputs=_lookup_outputs):
    # `outputs` compiled or not; the backward runs outside it, as in _retrieval_step
    outs = outputs(op, *inputs)
    sum((y.float() * w).sum() for y, w in zip(outs, weights)).backward()
    return outs


def _leaves(inputs):
    return [x.clone().requires_grad_(x.dtype.is_floating_point) for x in inputs]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("op", list(LOOKUP_KERNELS))
def test_lookup_compiled_launches_inline_and_matches_eager(op, deterministic, monkeypatch):
    monkeypatch.setattr(determinism, "_deterministic", deterministic)
    torch._dynamo.reset()
    inputs = _lookup_inputs()
    g = torch.Generator(device="cuda").manual_seed(1)
    weights = [torch.randn(y.shape, device="cuda", generator=g) for y in _lookup_outputs(op, *inputs)]
    leaves = _leaves(inputs)
    outs = _lookup_step(op, weights, *leaves)
    leaves_c = _leaves(inputs)
    compiled = torch.compile(_lookup_outputs, fullgraph=True)
    outs_c, codes = run_and_get_code(_lookup_step, op, weights, *leaves_c, outputs=compiled)
    for y, y_c in zip(outs, outs_c):
        assert torch.equal(y_c, y)
    for name, x, x_c in zip(("rows", "values", "pre", "x", "scores"), leaves, leaves_c):
        if x.grad is None:
            assert x_c.grad is None, name
        elif op == "gate_lookup":  # Inductor fuses the elementwise ops of its backward its own way
            torch.testing.assert_close(x_c.grad, x.grad, rtol=1e-4, atol=1e-4, msg=name)
        elif name in ("values", "pre") and not deterministic:  # atomic adds, in any order
            torch.testing.assert_close(x_c.grad, x.grad, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(x_c.grad, x.grad), name
    code = "\n".join(codes)
    assert "torch.ops.ultramem" not in code, "an ultramem:: op is still called from the compiled code"
    for kernel in LOOKUP_KERNELS[op]:
        assert kernel in code, kernel
    if deterministic:
        assert "_segment_scatter_kernel" in code


def _ultramem_calls(code: str) -> set[str]:
    return {part.split(".")[0] for part in code.split("torch.ops.ultramem.")[1:]}


def test_gate_lookup_with_grad_buffers_keeps_only_the_backward_into():
    # The trainer's case: the forward launches inline, the backward adds into the registered
    # buffers through gate_lookup_backward_into, the one ultramem:: op left.
    torch._dynamo.reset()
    inputs = _lookup_inputs()
    _, values, pre, _, _ = inputs
    g = torch.Generator(device="cuda").manual_seed(2)
    weights = [torch.randn(y.shape, device="cuda", generator=g) for y in _lookup_outputs("gate_lookup", *inputs)]
    compiled = torch.compile(_lookup_outputs, fullgraph=True)
    grads, codes = [], []
    for outputs in (_lookup_outputs, compiled):
        bufs = [torch.zeros(values.shape, device="cuda"), torch.zeros(pre.shape, device="cuda")]
        ids = [ops.register_grad_buffer(b) for b in bufs]
        leaves = _leaves(inputs)
        try:
            _, codes = run_and_get_code(_lookup_step, "gate_lookup", weights, *leaves, *ids, outputs=outputs)
        finally:
            for i in ids:
                ops.release_grad_buffer(i)
        grads.append((*bufs, leaves[3].grad, leaves[4].grad))
    for eager, compiled_grad in zip(*grads):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert "_gate_lookup_fwd_chunks_kernel" in code
    assert _ultramem_calls(code) == {"gate_lookup_backward_into"}, code


def test_eager_cuda_calls_launch_from_the_body_and_equal_the_twins(monkeypatch):
    # eagerly the body launches itself (one dispatch), whatever INLINE_TRITON says; the twins run
    # the same launchers
    rows, values, pre, x, scores = _lookup_inputs(dtype=torch.float32)
    calls = {
        "weighted_lookup": (ops.weighted_lookup, (rows, values, scores)),
        "pre_value_gate": (ops.pre_value_gate, (rows, pre, x)),
        "gate_lookup": (ops.gate_lookup, (rows, values, pre, x, scores, True)),
    }
    for name, (op, args) in calls.items():
        twin = getattr(torch.ops.ultramem, f"{name}_opaque")(*args)

        def no_twin(*a, _name=name, **k):
            raise AssertionError(f"eager {_name} called its opaque twin")

        with monkeypatch.context() as m:
            m.setattr(importlib.import_module(f"ultramem.ops.{name}"), "_forward_opaque", no_twin)
            for inline in (False, True):
                m.setattr(_launch, "INLINE_TRITON", inline)
                out = op(*args)
                for y, z in zip(
                    out if isinstance(out, tuple) else (out,), twin if isinstance(twin, tuple) else (twin,)
                ):
                    torch.testing.assert_close(y, z, rtol=0, atol=0)


def test_lookup_opcheck_on_cuda():
    rows, values, pre, x, scores = _lookup_inputs(t=16, n=40, dtype=torch.float32)
    values, pre = values.requires_grad_(), pre.requires_grad_()
    x, scores = x.requires_grad_(), scores.requires_grad_()
    torch.library.opcheck(torch.ops.ultramem.weighted_lookup.default, (rows, values, scores))
    torch.library.opcheck(torch.ops.ultramem.pre_value_gate.default, (rows, pre, x))
    torch.library.opcheck(torch.ops.ultramem.gate_lookup.default, (rows, values, pre, x, scores, True))
    grad_out, grad_gate = torch.randn(16, 64, device="cuda"), torch.randn(16, 8, device="cuda")
    v, p, s, xd = values.detach(), pre.detach(), scores.detach(), x.detach()
    torch.library.opcheck(torch.ops.ultramem.weighted_lookup_backward.default, (grad_out, rows, v, s))
    torch.library.opcheck(torch.ops.ultramem.pre_value_gate_backward.default, (grad_gate, rows, p, xd))


def test_lookup_debug_mode_keeps_the_checked_calls(monkeypatch):
    monkeypatch.setattr(_checks, "_debug", True)
    torch._dynamo.reset()
    rows, values, pre, x, scores = _lookup_inputs(t=8)
    compiled = torch.compile(lambda *a: [y for op in LOOKUP_KERNELS for y in _lookup_outputs(op, *a)], fullgraph=True)
    _, codes = run_and_get_code(compiled, rows, values, pre, x, scores)
    code = "\n".join(codes)
    for op in LOOKUP_KERNELS:
        assert f"ultramem.{op}_opaque" in code, op
    torch._dynamo.reset()


# ------------------------------------------------------------------ the layer statistics


def _stats_case(seed):
    from perf.benches.layer_stats import stats_case

    c = stats_case(False, "cuda", seed)
    hits, sums = (
        torch.zeros(c.n, dtype=torch.float64, device="cuda"),
        torch.zeros(6, dtype=torch.float64, device="cuda"),
    )
    return (hits, sums, c.ids, c.y, c.scores), (c.want_hits, c.want_sums)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_layer_stats_at_227m_matches_float64(compiled, deterministic, monkeypatch):
    # compiled, one launch of the kernel and no ultramem:: call (deterministic: the reference's
    # ATen ops, bit-identical from run to run); ids out of range count nowhere in both
    monkeypatch.setattr(determinism, "_deterministic", deterministic)
    torch._dynamo.reset()
    args, (want_hits, want_sums) = _stats_case(7)
    ids = args[2].view(-1)
    dropped = ids[:2].clone()
    ids[:2] = torch.tensor([-1, args[0].numel()], device="cuda")
    want_hits = want_hits.index_add(0, dropped, torch.full((2,), -1.0, dtype=torch.float64, device="cuda"))
    call = ops.layer_stats_accumulate
    if compiled:
        call = torch.compile(ops.layer_stats_accumulate, fullgraph=True)
        _, codes = run_and_get_code(call, *args)
        code = "\n".join(codes)
        assert "torch.ops.ultramem" not in code, code
        assert ("_layer_stats_kernel" in code) != deterministic, code
    else:
        call(*args)
    call(*args)
    hits, sums = args[0].cpu(), args[1].cpu()
    assert torch.equal(hits, 2 * want_hits.cpu())
    for i in range(6):  # each on its own: the counts would dominate one norm over all six
        torch.testing.assert_close(sums[i], 2 * want_sums[i].cpu(), rtol=1e-5, atol=1e-3)
    if deterministic:  # bit-identical on a second run
        again, _ = _stats_case(7)
        again[2].view(-1)[:2] = ids[:2]
        for _ in range(2):
            call(*again)
        assert torch.equal(again[1], args[1]) and torch.equal(again[0], args[0])
    torch._dynamo.reset()


def test_layer_stats_opcheck_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(8)
    hits, sums = torch.zeros(40, dtype=torch.float64, device="cuda"), torch.zeros(6, dtype=torch.float64, device="cuda")
    ids = torch.randint(0, 40, (7, 2, 5), generator=g, device="cuda")
    y = torch.randn(7, 12, generator=g, device="cuda").bfloat16()
    scores = torch.randn(14, 5, 2, generator=g, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.ultramem.layer_stats_accumulate.default, (hits, sums, ids, y, scores))


# ------------------------------------------------------------------ the keys' normalization


@pytest.mark.parametrize("compiled", [False, True])
def test_normed_keys_at_227m_matches_float64(compiled):
    # the 227M layout (1138 keys a side padded to 1152, kdim 192, rank 2), fp32 keys to bf16, the
    # keys a Parameter as in the layers (Dynamo fakes it as one); compiled, one launch each way and
    # no ultramem:: call
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(9)
    keys = torch.nn.Parameter(torch.randn(1, 2, 1138, 192, 2, device="cuda", generator=g))
    grad_out = torch.randn(1, 2, 1152, 2, 192, device="cuda", generator=g).bfloat16()
    k64 = keys.detach().double().requires_grad_()
    want = ops.normed_keys(k64.cpu(), 1e-6, 1152, torch.float64)
    (want_grad,) = torch.autograd.grad(want, k64, grad_out.double().cpu())

    def f(k):
        return ops.normed_keys(k, 1e-6, 1152, torch.bfloat16)

    if compiled:
        f = torch.compile(f, fullgraph=True)
        out, codes = run_and_get_code(f, keys)
        code = "\n".join(codes)
        assert "torch.ops.ultramem" not in code and "_normed_keys_fwd_kernel" in code, code
    else:
        out = f(keys)
    (grad,) = torch.autograd.grad(out, keys, grad_out)
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=8e-3, atol=8e-3)  # bf16 rounding
    assert torch.equal(out[:, :, 1138:].cpu(), torch.zeros(1, 2, 14, 2, 192, dtype=torch.bfloat16))
    torch.testing.assert_close(grad.double().cpu(), want_grad.cpu(), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_normed_keys_opcheck_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(10)
    keys = torch.randn(2, 2, 9, 12, 3, device="cuda", generator=g).requires_grad_()
    torch.library.opcheck(torch.ops.ultramem.normed_keys.default, (keys, 1e-5, 11, torch.bfloat16))
    grad_out = torch.randn(2, 2, 11, 3, 12, device="cuda", generator=g)
    torch.library.opcheck(torch.ops.ultramem.normed_keys_backward.default, (grad_out, keys.detach(), 1e-5))
