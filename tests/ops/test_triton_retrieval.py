"""The Triton kernels of ultramem::tdqkr_retrieval, run on CPU tensors by Triton's interpreter,
against float64 formulas written here with explicit loops.

The kernel tests need TRITON_INTERPRET=1 before Triton is imported, so they are skipped in a
normal run and executed by `test_kernels_under_interpreter`, which re-runs this file in a
subprocess with the variable set.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import subproc
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")

from op_oracles import retrieval_selection_oracle  # noqa: E402

from ultramem.ops import retrieval as ref_mod  # noqa: E402
from ultramem.ops._triton import retrieval as tri  # noqa: E402

interpreted_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


def test_cuda_kernels_registered():
    # the public ops launch the Triton kernels from their (traceable) bodies on CUDA; the opaque
    # ops they call on CPU and in debug mode hold the same launchers as their CUDA kernels
    for name in (
        "ultramem::tdqkr_retrieval_opaque",
        "ultramem::tdqkr_retrieval_backward_opaque",
        "ultramem::tdqkr_retrieval_stacked_opaque",
        "ultramem::tdqkr_retrieval_stacked_backward_opaque",
        "ultramem::tdqkr_retrieval_rows_opaque",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher of the interpreted run")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    proc = subproc.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-x", "-q", "-p", "no:cacheprovider"],
        timeout=900,
        cwd=root,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------- float64 oracles (explicit loops)


def pair_scores64(a, b, cores, ti, hi, vid):
    n_col = b.shape[2]
    i, j = vid // n_col, vid % n_col
    return [float(a[ti, hi, i].double() @ cores[hi, m].double() @ b[ti, hi, j].double()) for m in range(cores.shape[1])]


def assert_selection(ids, scores, a, b, cores, u, v, knn, tol, exact_ids=False):
    """ids/scores must be a top-k selection: ids distinct, rows/cols in the coarse top-k (up to
    ties within tol), per-core scores right, sorted by total, and totals as good as the oracle's."""
    t, h = a.shape[:2]
    n_col = b.shape[2]
    assert ids.shape == (t, h, knn) and ids.dtype == torch.int64
    assert scores.shape == (t, h, knn, cores.shape[1]) and scores.dtype == a.dtype
    want = retrieval_selection_oracle(a, b, cores, u, v, knn)
    for ti in range(t):
        for hi in range(h):
            w = want[ti, hi]
            got = [int(x) for x in ids[ti, hi]]
            assert len(set(got)) == knn, f"duplicate ids at {(ti, hi)}: {got}"
            if exact_ids:
                assert got == [p[1] for p in w["pairs"]], (ti, hi)
            totals = []
            for e, vid in enumerate(got):
                i, j = divmod(vid, n_col)
                assert w["ca"][i] >= w["kth_a"] - tol and w["cb"][j] >= w["kth_b"] - tol, (ti, hi, vid)
                per_core = pair_scores64(a, b, cores, ti, hi, vid)
                assert scores[ti, hi, e].double().tolist() == pytest.approx(per_core, abs=tol, rel=tol)
                totals.append(sum(per_core))
            assert all(x >= y - tol for x, y in zip(totals, totals[1:])), f"not sorted at {(ti, hi)}"
            for got_total, want_pair in zip(totals, w["pairs"]):
                assert got_total == pytest.approx(want_pair[0], abs=tol, rel=tol), (ti, hi)


def oracle_backward(grad, a, b, cores, ids):
    """d(Σ grad·scores)/d(a, b, cores) with scores[t,h,e,m] = a[i_e] C_m b[j_e]ᵀ; ids outside
    [0, n_row·n_col) contribute nothing."""
    t, h, n_row, r = a.shape
    n_col = b.shape[2]
    ga = torch.zeros(a.shape, dtype=torch.float64)
    gb = torch.zeros(b.shape, dtype=torch.float64)
    gc = torch.zeros(cores.shape, dtype=torch.float64)
    for ti in range(t):
        for hi in range(h):
            for e in range(ids.shape[2]):
                vid = int(ids[ti, hi, e])
                if not 0 <= vid < n_row * n_col:
                    continue
                i, j = divmod(vid, n_col)
                ai, bj = a[ti, hi, i].double(), b[ti, hi, j].double()
                for m in range(cores.shape[1]):
                    g = float(grad[ti, hi, e, m])
                    cm = cores[hi, m].double()
                    ga[ti, hi, i] += g * (cm @ bj)
                    gb[ti, hi, j] += g * (ai @ cm)
                    gc[hi, m] += g * torch.outer(ai, bj)
    return ga, gb, gc


def _inputs(seed, t, h, n_row, n_col, r, m, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(t, h, n_row, r, generator=g).to(dtype)
    b = torch.randn(t, h, n_col, r, generator=g).to(dtype)
    cores = torch.randn(h, m, r, r, generator=g)
    u = torch.randn(h, r, generator=g)
    v = torch.randn(h, r, generator=g)
    return a, b, cores, u, v


# ---------------------------------------------------------------- forward


@interpreted_only
@pytest.mark.parametrize(
    "seed,t,h,n_row,n_col,r,m,knn",
    [
        (0, 3, 2, 37, 50, 2, 2, 5),
        (1, 2, 1, 100, 70, 3, 1, 16),
        (2, 2, 2, 33, 20, 1, 4, 1),
        (3, 2, 1, 19, 23, 2, 3, 19),  # every row kept
        (4, 1, 1, 40, 300, 4, 2, 33),  # k just above a power of 2
    ],
)
def test_forward_fp32_matches_oracle(seed, t, h, n_row, n_col, r, m, knn):
    a, b, cores, u, v = _inputs(seed, t, h, n_row, n_col, r, m)
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, knn)
    assert_selection(ids, scores, a, b, cores, u, v, knn, tol=1e-5, exact_ids=True)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_inputs(dtype):
    a, b, cores, u, v = _inputs(5, 2, 2, 60, 45, 2, 2, dtype)
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, 8)
    assert_selection(ids, scores, a, b, cores, u, v, 8, tol=2e-2)


@interpreted_only
def test_forward_tiled_grid_matches_oracle(monkeypatch):
    # GRID_TILE = 64 with k = 9 (block 16): the k×k grid is walked in 4 tiles of 4 rows
    monkeypatch.setattr(tri, "GRID_TILE", 64)
    a, b, cores, u, v = _inputs(6, 2, 1, 30, 26, 2, 2)
    ids, scores = tri.launch_forward(a, b, cores, u, v, 9)
    assert_selection(ids, scores, a, b, cores, u, v, 9, tol=1e-5, exact_ids=True)


@interpreted_only
@pytest.mark.parametrize("grid_tile", [4096, 128])
def test_forward_all_scores_equal(monkeypatch, grid_tile):
    # every coarse and grid score ties: the coarse tie rule keeps the lowest positions, and any
    # 20 distinct pairs of their grid are a valid answer
    monkeypatch.setattr(tri, "GRID_TILE", grid_tile)
    a, b = torch.ones(2, 1, 100, 2), torch.ones(2, 1, 90, 2)
    cores, u = torch.randn(1, 2, 2, 2), torch.ones(1, 2)
    ids, scores = tri.launch_forward(a, b, cores, u, u, 20)
    for ti in range(2):
        assert len(set(ids[ti, 0].tolist())) == 20
        assert ((ids[ti, 0] // 90 < 20) & (ids[ti, 0] % 90 < 20)).all()
    torch.testing.assert_close(scores, cores[0].sum((1, 2)).expand(2, 1, 20, 2))


@interpreted_only
def test_forward_strided_inputs():
    a, b, cores, u, v = _inputs(7, 3, 2, 41, 29, 2, 2)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)  # token stride != H·n·r
    b_s = torch.cat([b, torch.randn_like(b)], dim=-1)[..., :2]  # rank stride 1, key stride 4
    c_t = cores.transpose(2, 3).contiguous().transpose(2, 3)
    u_s = torch.stack([u, u], dim=-1).flatten(-2)[:, ::2]
    ids, scores = tri.tdqkr_retrieval_cuda(a_t, b_s, c_t, u_s, v, 6)
    assert not (a_t.is_contiguous() or b_s.is_contiguous() or c_t.is_contiguous() or u_s.is_contiguous())
    assert_selection(ids, scores, a, b, cores, u, v, 6, tol=1e-5, exact_ids=True)


def _integer_grid_inputs(seed, t, n, span):
    """Grid totals A[i,0]·B[j,0] with A, B integers in [-span, span] (many exact ties at the k-th),
    coarse scores made distinct by a small second rank component."""
    g = torch.Generator().manual_seed(seed)
    a, b = (
        torch.stack(
            [torch.randint(-span, span + 1, (t, 1, n), generator=g).float(), torch.rand(t, 1, n, generator=g)], -1
        )
        for _ in range(2)
    )
    cores = torch.zeros(1, 1, 2, 2)
    cores[0, 0, 0, 0] = 1.0
    return a, b, cores, torch.tensor([[1.0, 1e-3]])


@interpreted_only
@pytest.mark.parametrize("grid_tile", [4096, 16])
def test_forward_exact_ties_in_grid(monkeypatch, grid_tile):
    # Grid totals A[i,0]·B[j,0] are small integers (many exact ties at the threshold) while the
    # coarse scores are distinct: the kept totals must equal the oracle's top totals exactly.
    monkeypatch.setattr(tri, "GRID_TILE", grid_tile)
    t, n, knn = 3, 24, 7
    a, b, cores, u = _integer_grid_inputs(8, t, n, 3)
    ids, scores = tri.launch_forward(a, b, cores, u, u, knn)
    want = retrieval_selection_oracle(a, b, cores, u, u, knn)
    for ti in range(t):
        assert len(set(ids[ti, 0].tolist())) == knn
        assert scores[ti, 0, :, 0].tolist() == [p[0] for p in want[ti, 0]["pairs"]]
    assert_selection(ids, scores, a, b, cores, u, u, knn, tol=0.0)


@interpreted_only
def test_forward_exact_ties_in_coarse_scores():
    # Many keys share a coarse score: any tie order is fine, the kept rows must still be a top-k.
    g = torch.Generator().manual_seed(9)
    a = torch.randint(-2, 3, (2, 1, 30, 1), generator=g).float()
    b = torch.randint(-2, 3, (2, 1, 30, 1), generator=g).float()
    ones = torch.ones(1, 1)
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, ones.view(1, 1, 1, 1), ones, ones, 5)
    for ti in range(2):
        assert len(set(ids[ti, 0].tolist())) == 5
        i, j = ids[ti, 0] // 30, ids[ti, 0] % 30
        assert (a[ti, 0, i, 0] == a[ti, 0, :, 0].max()).all() and (b[ti, 0, j, 0] == b[ti, 0, :, 0].max()).all()
        assert torch.equal(scores[ti, 0, :, 0], a[ti, 0, i, 0] * b[ti, 0, j, 0])


@interpreted_only
def test_forward_nan_input_stays_in_bounds():
    a, b, cores, u, v = _inputs(10, 2, 1, 20, 20, 2, 2)
    a[0, 0, 3:9] = float("nan")
    b[1, 0, :] = float("nan")
    ids, _ = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, 4)
    assert ((ids >= 0) & (ids < 400)).all()


def test_forward_float64_falls_back_to_reference(caplog):
    a, b, cores, u, v = (x.double() for x in _inputs(11, 2, 1, 12, 10, 2, 2))
    with caplog.at_level(logging.WARNING, logger=tri.__name__):
        ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, 3)
    want_ids, want_scores = ref_mod.tdqkr_retrieval(a, b, cores, u, v, 3)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    assert "float64" in caplog.text or "float64 inputs" in tri._warned


def test_unsupported_shapes_use_the_reference():
    a, b, cores, _, _ = _inputs(13, 1, 1, 400, 300, 2, 2)
    assert tri._unsupported(257, a, b, cores) == "knn above 256"
    assert tri._unsupported(256, a, b, cores) is None
    assert tri._unsupported(3, a.double(), b, cores) == "float64 inputs"
    a9 = torch.zeros(1, 1, 4, 9)
    assert tri._unsupported(2, a9, a9, torch.zeros(1, 1, 9, 9)) == "rank above 8"


def test_forward_rejects_bad_arguments():
    a, b, cores, u, v = _inputs(12, 2, 1, 12, 10, 2, 2)
    with pytest.raises(ValueError, match="knn=11"):
        tri.tdqkr_retrieval_cuda(a, b, cores, u, v, 11)
    with pytest.raises(ValueError, match="cores"):
        tri.tdqkr_retrieval_cuda(a, b, cores[:, :, :1], u, v, 3)


# ---------------------------------------------------------------- backward


def _kept_ids_with_duplicates(a, b, cores, u, v, knn, dtype):
    ids, _ = ref_mod.tdqkr_retrieval(a, b, cores, u, v, knn)
    ids[0, 0, 1] = ids[0, 0, 0]  # the same pair twice
    n_col = b.shape[2]
    ids[-1, -1, -1] = (ids[-1, -1, 0] // n_col) * n_col + (n_col - 1)  # a row shared, a new column
    return ids.to(dtype)


@interpreted_only
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "seed,t,h,n_row,n_col,r,m,knn,dtype",
    [
        (20, 3, 2, 37, 50, 2, 2, 5, torch.float32),
        (21, 2, 1, 45, 50, 3, 3, 40, torch.float32),  # entries deduplicated over chunks (2 of 32)
        (22, 2, 2, 16, 12, 1, 1, 2, torch.float16),
    ],
)
def test_backward_matches_oracle(index_dtype, seed, t, h, n_row, n_col, r, m, knn, dtype):
    a, b, cores, u, v = _inputs(seed, t, h, n_row, n_col, r, m, dtype)
    ids = _kept_ids_with_duplicates(a.float(), b.float(), cores, u, v, knn, index_dtype)
    grad = torch.randn(t, h, knn, m, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids)
    want = oracle_backward(grad, a, b, cores, ids)
    assert (ga.dtype, gb.dtype, gc.dtype) == (a.dtype, b.dtype, cores.dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got, exp in zip((ga, gb, gc), want):
        torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol)
    assert torch.equal(ga.double()[want[0] == 0], torch.zeros_like(want[0][want[0] == 0]))
    assert torch.equal(gb.double()[want[1] == 0], torch.zeros_like(want[1][want[1] == 0]))


@interpreted_only
def test_backward_strided_grad():
    a, b, cores, u, v = _inputs(23, 2, 1, 20, 20, 2, 2)
    ids = _kept_ids_with_duplicates(a, b, cores, u, v, 6, torch.int64)
    grad = torch.randn(2, 1, 6, 4)[..., ::2]
    ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids)
    for got, exp in zip((ga, gb, gc), oracle_backward(grad, a, b, cores, ids)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


@interpreted_only
def test_backward_skips_out_of_range_ids():
    a, b, cores, u, v = _inputs(24, 2, 1, 10, 8, 2, 2)
    ids = _kept_ids_with_duplicates(a, b, cores, u, v, 4, torch.int64)
    ids[0, 0, 2] = 80  # one past the end
    ids[1, 0, 0] = -3
    grad = torch.randn(2, 1, 4, 2)
    with pytest.raises(ValueError, match="ids"):  # CPU tensors are always range-checked
        tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids)
    ga, gb, gc = tri.launch_backward(grad, a, b, cores, ids)  # the kernel itself skips them
    for got, exp in zip((ga, gb, gc), oracle_backward(grad, a, b, cores, ids)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_keys_equal_the_real_keys_alone(dtype):
    # The layer's layout: A/B rows past n_keys pad each token's block to an aligned width.
    n, pad, k = 45, 19, 8
    a, b, cores, u, v = _inputs(60, 3, 2, n + pad, n + pad, 2, 2, dtype)
    a[:, :, n:] = 1e4  # would win every top-k if read
    b[:, :, n:] = float("nan")
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, k, n)
    want_ids, want_scores = tri.tdqkr_retrieval_cuda(a[:, :, :n].contiguous(), b[:, :, :n].contiguous(), cores, u, v, k)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    grad = torch.randn(scores.shape).to(dtype)
    ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(grad, a, b, cores, ids, n)
    wa, wb, wc = tri.tdqkr_retrieval_backward_cuda(grad, a[:, :, :n].contiguous(), b[:, :, :n].contiguous(), cores, ids)
    for got, want in ((ga, wa), (gb, wb)):
        assert got.shape == a.shape and got.is_contiguous()
        assert torch.equal(got[:, :, :n], want) and not got[:, :, n:].any()
    assert torch.equal(gc, wc)


# ---------------------------------------------------------------- forward: block layouts, launch settings


@interpreted_only
@pytest.mark.parametrize(
    "seed,t,h,n_row,n_col,r,m,knn,dtype",
    [
        (30, 2, 2, 37, 130, 2, 2, 7, torch.float32),  # 37: one partial block; 130: 128 + a remainder
        (31, 1, 1, 1138, 1138, 2, 2, 32, torch.float32),  # the PERF shape: 1024 + 128 keys (16 + 2 rows of 64)
        (32, 2, 1, 130, 37, 3, 1, 1, torch.float16),
        (33, 1, 2, 1138, 130, 1, 2, 32, torch.float16),
        (34, 2, 1, 300, 37, 2, 3, 37, torch.float32),  # k = n on one side (every key kept)
    ],
)
def test_forward_block_layouts_match_oracle(seed, t, h, n_row, n_col, r, m, knn, dtype):
    a, b, cores, u, v = _inputs(seed, t, h, n_row, n_col, r, m, dtype)
    ids, scores = tri.launch_forward(a, b, cores, u, v, knn)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_selection(ids, scores, a, b, cores, u, v, knn, tol=tol, exact_ids=dtype == torch.float32)


def test_coarse_layout_and_group_start():
    # 1138 keys over 64 threads (2 warps, the k <= 32 launch): 18 register rows = 16 + a
    # remainder of 2, whose last 14 keys are padding; over 128 threads: 8 + 1
    assert tri._coarse_layout(1138, 64) == dict(p1=16, p2=2, has_rem=True, mask1=False, mask2=True)
    assert tri._coarse_layout(1138, 128) == dict(p1=8, p2=1, has_rem=True, mask1=False, mask2=True)
    assert tri._coarse_layout(1024, 64) == dict(p1=16, p2=1, has_rem=False, mask1=False, mask2=False)
    assert tri._coarse_layout(37, 64) == dict(p1=1, p2=1, has_rem=False, mask1=True, mask2=False)
    assert tri._coarse_layout(300, 64) == dict(p1=4, p2=1, has_rem=True, mask1=False, mask2=True)  # 256 + 44
    # group-maximum start: more than k groups of threads, each thread with a real key
    assert tri._group_threads(32, 64, True) == 1  # 64 groups of 1 thread
    assert tri._group_threads(16, 64, True) == 2  # 32 groups of 2
    assert tri._group_threads(1, 128, True) == 64  # 2 groups
    assert tri._group_threads(64, 64, True) == 0  # 128 groups do not fit in 64 threads
    assert tri._group_threads(7, 64, False) == 0  # fewer keys than threads


@interpreted_only
def test_forward_strided_and_tiled(monkeypatch):
    monkeypatch.setattr(tri, "GRID_TILE", 64)
    a, b, cores, u, v = _inputs(35, 2, 2, 150, 1138, 2, 2)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)
    b_s = torch.cat([b, torch.randn_like(b)], dim=-1)[..., :2]
    ids, scores = tri.launch_forward(a_t, b_s, cores, u, v, 9)
    assert_selection(ids, scores, a, b, cores, u, v, 9, tol=1e-5, exact_ids=True)


@interpreted_only
@pytest.mark.parametrize("knn,num_warps", [(16, None), (16, 4), (20, None)])
def test_forward_coarse_and_grid_ties(monkeypatch, knn, num_warps):
    # Integer coarse scores and grid totals tie at every threshold. k = 16 (the grid block) with
    # sides of >= 128 keys: every selection starts from group maxima; k = 20: grid padding.
    # The kept keys are the lowest positions among those equal to the k-th, the kept totals the
    # k largest products of the kept values.
    if num_warps:
        monkeypatch.setattr(tri, "FWD_NUM_WARPS_SMALL_K", num_warps)
    g = torch.Generator().manual_seed(41)
    t = 2
    a = torch.randint(-3, 4, (t, 1, 300, 1), generator=g).float()
    b = torch.randint(-3, 4, (t, 1, 140, 1), generator=g).float()
    ones = torch.ones(1, 1)
    ids, scores = tri.launch_forward(a, b, ones.view(1, 1, 1, 1), ones, ones, knn)
    for ti in range(t):
        assert len(set(ids[ti, 0].tolist())) == knn
        for x, got_keys in ((a, ids[ti, 0] // 140), (b, ids[ti, 0] % 140)):
            vals = x[ti, 0, :, 0]
            first_k = sorted(range(len(vals)), key=lambda p: (-float(vals[p]), p))[:knn]
            assert set(got_keys.tolist()) <= set(first_k)
        kept_a = sorted(a[ti, 0, :, 0].tolist())[::-1][:knn]
        kept_b = sorted(b[ti, 0, :, 0].tolist())[::-1][:knn]
        totals = sorted((x * y for x in kept_a for y in kept_b), reverse=True)[:knn]
        assert scores[ti, 0, :, 0].tolist() == totals
        i, j = ids[ti, 0] // 140, ids[ti, 0] % 140
        assert torch.equal(scores[ti, 0, :, 0], a[ti, 0, i, 0] * b[ti, 0, j, 0])


@interpreted_only
def test_forward_all_equal_and_nan_in_remainder_block():
    a, b = torch.ones(1, 1, 130, 2), torch.ones(1, 1, 90, 2)
    cores, u = torch.randn(1, 2, 2, 2), torch.ones(1, 2)
    ids, _ = tri.launch_forward(a, b, cores, u, u, 20)
    assert len(set(ids[0, 0].tolist())) == 20 and ((ids // 90 < 20) & (ids % 90 < 20)).all()
    a, b, cores, u, v = _inputs(37, 2, 1, 150, 20, 2, 2)
    a[0, 0, 3:9] = float("nan")
    a[1, 0, 129:140] = float("nan")  # 150 keys over 64 threads: 128 + a remainder block
    ids, _ = tri.launch_forward(a, b, cores, u, v, 4)
    assert ((ids >= 0) & (ids < 150 * 20)).all()


@interpreted_only
@pytest.mark.parametrize(
    "num_warps,knn,n_row,n_col,dtype",
    [
        (None, 1, 129, 300, torch.float32),  # 2 warps: 128 + a one-key remainder
        (1, 32, 1138, 700, torch.float32),  # 32 threads: [32, 32] + [4, 32] blocks
        (2, 20, 256, 130, torch.float16),  # no remainder, no padding on one side; k < block (grid padding)
        (4, 32, 1138, 1138, torch.float32),  # 128 threads: [8, 128] + [1, 128]
        (None, 33, 300, 520, torch.float32),  # 8 warps, [64, 64] grid in registers
        (None, 100, 250, 260, torch.float32),  # tiled grid
        (None, 128, 128, 150, torch.float32),  # k = n on one side, tiled grid
    ],
)
def test_forward_launch_settings_match_oracle(monkeypatch, num_warps, knn, n_row, n_col, dtype):
    # num_warps: FWD_NUM_WARPS_SMALL_K as a sweep would set it (every such case has k <= 32)
    if num_warps:
        monkeypatch.setattr(tri, "FWD_NUM_WARPS_SMALL_K", num_warps)
    a, b, cores, u, v = _inputs(38 + knn, 2 if knn < 100 else 1, 1, n_row, n_col, 2, 2, dtype)
    ids, scores = tri.launch_forward(a, b, cores, u, v, knn)
    assert_selection(
        ids,
        scores,
        a,
        b,
        cores,
        u,
        v,
        knn,
        tol=1e-5 if dtype == torch.float32 else 2e-2,
        exact_ids=dtype == torch.float32,
    )


def _first_keys64(x, w, knn):
    """Positions of the knn largest <x[p], w> in float64, in descending order (NaN never kept;
    among equal values the lowest positions first)."""
    c = [float(x[p].double() @ w.double()) for p in range(x.shape[0])]
    return sorted((p for p in range(len(c)) if c[p] == c[p]), key=lambda p: (-c[p], p))[:knn]


@interpreted_only
def test_forward_infinite_scores_and_strided_keys():
    # -inf coarse scores (the value of the kernel's padding) are real keys, kept by the tie rule
    # when fewer than k keys are finite; +inf ones are kept first. Their grid totals are infinite,
    # or NaN (∞ − ∞): then all of the token's scores are NaN (the op's NaN rule), its ids still
    # distinct and in range. A key stride that is not the rank takes the kernel's runtime-stride
    # path.
    a, b, cores, u, v = _inputs(39, 3, 1, 150, 140, 2, 2)
    u = torch.ones(1, 2)
    a[0, 0, :140] = float("-inf")  # 10 finite keys, k = 12
    a[1, 0, 7] = float("inf")
    b[2, 0, 3:9] = float("-inf")
    b_s = torch.cat([b, torch.randn_like(b)], dim=-1)[..., :2]
    knn = 12
    ids, scores = tri.launch_forward(a, b_s, cores, u, v, knn)
    assert ((ids >= 0) & (ids < 150 * 140)).all()
    c_sum = cores[0].double().sum(0)
    poisoned = []
    for ti in range(3):
        rows = _first_keys64(a[ti, 0], u[0], knn)
        cols = _first_keys64(b[ti, 0], v[0], knn)
        assert (ti != 0 or sorted(rows) == [0, 1, *range(140, 150)]) and (ti != 1 or rows[0] == 7)
        # the grid totals as the kernel forms them (cores summed first)
        totals = [float(a[ti, 0, i].double() @ c_sum @ b[ti, 0, j].double()) for i in rows for j in cols]
        got = [int(x) for x in ids[ti, 0]]
        assert len(set(got)) == knn
        assert all(vid // 140 in rows and vid % 140 in cols for vid in got), ti
        if any(x != x for x in totals):
            poisoned.append(ti)
            assert scores[ti].isnan().all(), ti
            continue
        best = sorted(totals, reverse=True)[:knn]
        got_totals = [sum(pair_scores64(a, b, cores, ti, 0, vid)) for vid in got]
        assert got_totals == pytest.approx(best, rel=1e-5, abs=1e-5), ti
        for e, vid in enumerate(got):
            assert scores[ti, 0, e].double().tolist() == pytest.approx(
                pair_scores64(a, b, cores, ti, 0, vid), rel=1e-5, abs=1e-5
            )
    assert len(poisoned) < 3  # the finite path is exercised too


def _nan_inf_case(kind):
    """Inputs for the NaN / Inf rule and the (token, head)s whose scores must be NaN."""
    g = torch.Generator().manual_seed(70 + len(kind))
    t, h, n, r, m = 3, 2, 40, 2, 2
    if kind.startswith("inf"):  # rank 1, all positive: +inf totals and no ∞ − ∞
        a, b = torch.rand(t, h, n, 1, generator=g) + 0.1, torch.rand(t, h, n, 1, generator=g) + 0.1
        cores, u, v = torch.rand(h, m, 1, 1, generator=g) + 0.1, torch.ones(h, 1), torch.ones(h, 1)
        a[0, 1, 17] = float("inf")  # kept first, with every kept column
        b[2, 0, 3] = float("inf")
        a[1, 0, :30] = float("-inf")  # 10 finite keys left
        return a, b, cores, u, v, torch.zeros(t, h, dtype=torch.bool)
    a, b = torch.randn(t, h, n, r, generator=g), torch.randn(t, h, n, r, generator=g)
    cores, u, v = torch.rand(h, m, r, r, generator=g), torch.randn(h, r, generator=g), torch.randn(h, r, generator=g)
    poisoned = torch.zeros(t, h, dtype=torch.bool)
    if kind == "nan u":
        u[1, 1] = float("nan")
        poisoned[:, 1] = True
    elif kind == "nan key":
        a[2, 0, 33, 0] = float("nan")
        b[0, 1, :, :] = float("nan")
        poisoned[2, 0] = poisoned[0, 1] = True
    elif kind == "nan cores":
        cores[0, 1, 0, 1] = float("nan")
        poisoned[:, 0] = True
    return a, b, cores, u, v, poisoned


@interpreted_only
@pytest.mark.parametrize("kind", ["nan u", "nan key", "nan cores", "inf"])
@pytest.mark.parametrize("grid", ["registers", "candidates", "bisection"])
def test_forward_nan_inf_rule_matches_the_reference(monkeypatch, kind, grid):
    """The op's NaN / Inf rule, kernel and reference alike: a NaN coarse score or grid total
    makes all of its (token, head)'s scores NaN (ids still distinct and in range); +inf ranks
    first, -inf last. For each grid selection: in registers, tiled with candidates, and the
    tiled bisection the candidates fall back to."""
    a, b, cores, u, v, poisoned = _nan_inf_case(kind)
    knn = 5 if grid == "registers" else 12
    if grid != "registers":
        monkeypatch.setattr(tri, "GRID_TILE", 64)
    if grid == "bisection":
        monkeypatch.setattr(tri, "_grid_select_candidates", _bisection_instead)
    got_ids, got = tri.launch_forward(a, b, cores, u, v, knn)
    want_ids, want = ref_mod.tdqkr_retrieval(a, b, cores, u, v, knn)
    for ids in (got_ids, want_ids):
        assert ((ids >= 0) & (ids < 40 * 40)).all()
        assert all(len(set(x.tolist())) == knn for x in ids.reshape(-1, knn))
    for scores in (got, want):
        assert torch.equal(scores.isnan().any(-1).any(-1), poisoned)
        assert torch.equal(scores.isnan().all(-1).all(-1), poisoned)
    keep = ~poisoned
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)  # infinities compare equal
    if kind == "inf":
        assert (got_ids[0, 1] // 40 == 17).all() and (got_ids[2, 0] % 40 == 3).all()
        assert torch.isposinf(got[0, 1]).all() and torch.isposinf(got[2, 0]).all()
        assert torch.equal(got_ids[keep].sort(-1).values, want_ids[keep].sort(-1).values)


@interpreted_only
def test_no_tokens_launch_nothing():
    a, b, cores, u, v = _inputs(71, 0, 2, 12, 10, 2, 2)
    ids, scores = tri.tdqkr_retrieval_cuda(a, b, cores, u, v, 3)
    assert ids.shape == (0, 2, 3) and scores.shape == (0, 2, 3, 2)
    ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(torch.zeros(0, 2, 3, 2), a, b, cores, ids)
    assert ga.shape == a.shape and gb.shape == b.shape and not gc.any()
    ga, gb, gc = tri.tdqkr_retrieval_backward_cuda(torch.zeros(0, 2, 3, 2), a, b, cores, ids, 8)
    assert ga.shape == a.shape and gb.shape == b.shape and not gc.any()


# ---------------------------------------------------------------- backward: outputs written in full


def _poisoned_outputs(kind, a, b):
    """(grad_row, grad_col) views full of NaN, plus the buffers they live in. kind: "fresh"
    (contiguous), "padded" (views into larger buffers: token stride above n·r and storage offsets
    that are not multiples of 8 elements; each [n, r] block still one contiguous range), "strided"
    (rank stride 2: the element-wise fallback), "transposed" (key stride 1, rank stride n)."""
    views, buffers = [], []
    for x in (a, b):
        t, h, n, r = x.shape
        if kind == "fresh":
            buf = torch.full(x.shape, float("nan"), dtype=x.dtype)
            view = buf
        elif kind == "padded":
            buf = torch.full((t, h, n * r + 5 + 3), float("nan"), dtype=x.dtype)
            view = buf[:, :, 3 : 3 + n * r].unflatten(-1, (n, r))
        elif kind == "strided":
            buf = torch.full((t, h, n, 2 * r), float("nan"), dtype=x.dtype)
            view = buf[..., ::2]
        else:
            buf = torch.full((t, h, r, n), float("nan"), dtype=x.dtype)
            view = buf.transpose(2, 3)
        views.append(view)
        buffers.append(buf)
    return tuple(views), buffers


@interpreted_only
@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("fresh", torch.bfloat16),
        ("padded", torch.bfloat16),
        ("padded", torch.float32),
        ("strided", torch.float16),
        ("transposed", torch.float32),
    ],
)
def test_backward_writes_every_element(kind, dtype):
    # n·r of 3·1, 13·3 and 7·3 elements per (token, head) over 6 blocks: the 16-byte-aligned
    # interior, the ragged head and tail and blocks inside one 16-byte group all occur
    for seed, (n_row, n_col, r, knn) in enumerate([(3, 13, 1, 3), (13, 7, 3, 6)]):
        a, b, cores, u, v = _inputs(40 + seed, 3, 2, n_row, n_col, r, 2, dtype)
        ids = _kept_ids_with_duplicates(a.float(), b.float(), cores, u, v, knn, torch.int64)
        grad = torch.randn(3, 2, knn, 2, generator=torch.Generator().manual_seed(seed)).to(dtype)
        out, buffers = _poisoned_outputs(kind, a, b)
        # rank 1 transposed is still one contiguous range per block
        assert tri._flat_slabs(out[0]) == (kind in ("fresh", "padded") or (kind == "transposed" and r == 1))
        ga, gb, gc = tri.launch_backward(grad, a, b, cores, ids, out=out)
        assert ga is out[0] and gb is out[1]
        want = oracle_backward(grad, a, b, cores, ids)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for got, exp in zip((ga, gb, gc), want):
            torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol)
        for got, exp in zip((ga, gb), want[:2]):
            assert torch.equal(got.double()[exp == 0], torch.zeros_like(exp[exp == 0]))
        if kind != "fresh":  # nothing written outside the views
            for buf, view in zip(buffers, out):
                written = torch.zeros(buf.shape, dtype=torch.bool)
                written.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
                assert buf[~written].isnan().all()


@interpreted_only
def test_backward_large_k_is_bit_reproducible():
    # k = 100: four chunks of 32 entries; many entries share a row or a column
    a, b, cores, u, v = _inputs(26, 2, 1, 110, 105, 2, 2)
    ids = _kept_ids_with_duplicates(a, b, cores, u, v, 100, torch.int64)
    grad = torch.randn(2, 1, 100, 2, generator=torch.Generator().manual_seed(26))
    first = tri.launch_backward(grad, a, b, cores, ids)
    for got, exp in zip(first, oracle_backward(grad, a, b, cores, ids)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)
    again = tri.launch_backward(grad, a, b, cores, ids)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


@interpreted_only
@pytest.mark.parametrize("layout", ["tokens", "sides"])
def test_stacked_launches_match_the_oracle_and_write_every_element(layout):
    # The stacked op's launches: the forward on the halves' views, the backward writing both
    # halves of one gradient (B's through A's pointer at the side stride), padding included.
    t, h, n, pad, r, m, k = 3, 2, 13, 3, 3, 2, 6
    a, b, cores, u, v = _inputs(70, t, h, n + pad, n + pad, r, m, torch.bfloat16)
    sub = torch.stack([a, b], 2)  # [T, H, 2, n, r]
    if layout == "sides":  # laid out [H, 2, T, n, r], as a batched GEMM over (head, side) writes it
        sub = sub.permute(1, 2, 0, 3, 4).contiguous().permute(2, 0, 1, 3, 4)
    ids, scores = tri.tdqkr_retrieval_stacked_cuda(sub, cores, u, v, k, n)
    want_ids, want_scores = tri.tdqkr_retrieval_cuda(a[:, :, :n].contiguous(), b[:, :, :n].contiguous(), cores, u, v, k)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    grad = torch.randn(t, h, k, m, generator=torch.Generator().manual_seed(71)).to(torch.bfloat16)
    dup = _kept_ids_with_duplicates(a[:, :, :n].float(), b[:, :, :n].float(), cores, u, v, k, torch.int64)
    g_sub, gc = tri.tdqkr_retrieval_stacked_backward_cuda(grad, sub, cores, dup, n)
    assert g_sub.shape == sub.shape and g_sub.stride() == sub.stride() and g_sub.dtype == sub.dtype
    assert (sub.stride(0) == 2 * h * (n + pad) * r) == (layout == "tokens")
    want = oracle_backward(grad, a[:, :, :n], b[:, :, :n], cores, dup)
    for got, exp in ((g_sub[:, :, 0, :n], want[0]), (g_sub[:, :, 1, :n], want[1]), (gc, want[2])):
        torch.testing.assert_close(got.double(), exp, rtol=2e-2, atol=2e-2)
    assert not g_sub[:, :, :, n:].any()
    # every element written: the same launch into a NaN-filled gradient
    poisoned = torch.full_like(sub, float("nan"))
    a_v, b_v = sub.unbind(2)
    ga, gb = poisoned.unbind(2)
    tri._launch_bwd(grad, a_v, b_v, cores, dup, n, ga, gb, stacked=poisoned)
    assert torch.equal(poisoned, g_sub)


@interpreted_only
@pytest.mark.parametrize("grid_tile,perm_dtype", [(4096, torch.int64), (64, torch.int32)])
def test_rows_launch_writes_the_mapped_ids(monkeypatch, grid_tile, perm_dtype):
    # the rows op's launch equals the stacked launch's ids mapped with Python integers,
    # in the in-register grid and the tiled one; negative perm entries take torch's floor modulo
    monkeypatch.setattr(tri, "GRID_TILE", grid_tile)
    t, h, n, pad, r, m, k = 3, 2, 13, 3, 2, 2, 9
    a, b, cores, u, v = _inputs(72, t, h, n + pad, n + pad, r, m, torch.bfloat16)
    sub = torch.stack([a, b], 2)
    g = torch.Generator().manual_seed(73)
    perm = (torch.randperm(4 * n * n, generator=g) - n * n).to(perm_dtype)  # a quarter negative
    num_logical, num_rows = n * n, 3 * n * n + 7
    for offset in (0, 2 * n * n + 5):
        window = torch.tensor([offset, num_rows], dtype=perm_dtype)
        rows, scores = tri.tdqkr_retrieval_rows_cuda(sub, cores, u, v, k, n, perm, num_logical, window)
        ids, want_scores = tri.tdqkr_retrieval_stacked_cuda(sub, cores, u, v, k, n)
        want = [[[(int(perm[i]) % num_logical + offset) % num_rows for i in row] for row in hs] for hs in ids.tolist()]
        assert rows.dtype == torch.int64 and rows.tolist() == want
        assert torch.equal(scores, want_scores)
        assert int(rows.min()) >= 0 and int(rows.max()) < num_rows


@interpreted_only
@pytest.mark.parametrize("grid_tile", [4096, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_launch_scales_scores_by_the_queries_norms(monkeypatch, grid_tile, dtype):
    # with raw queries q the launch keeps the pairs it keeps without them and writes the scores
    # times 1/rms(q_A)·1/rms(q_B) in fp32, then rounds: the reference kernel's result; q and the
    # scores are strided views of one row per token, as the layer's slices of its folded
    # projection's output
    monkeypatch.setattr(tri, "GRID_TILE", grid_tile)
    t, h, n, pad, r, m, k, d, eps = 3, 2, 13, 3, 2, 2, 9, 5, 1e-2
    a, b, cores, u, v = _inputs(74, t, h, n + pad, n + pad, r, m, dtype)
    g = torch.Generator().manual_seed(75)
    q = (4 * torch.randn(t, h * 2 * d, generator=g)).to(dtype)
    row = torch.cat([torch.zeros(t, 1, dtype=dtype), q, torch.stack([a, b], 2).reshape(t, -1)], dim=1)
    q, sub = row[:, 1 : 1 + q.shape[1]].view(t, h, 2, d), row[:, 1 + q.shape[1] :].view(t, h, 2, n + pad, r)
    perm, window = torch.randperm(n * n, generator=g), torch.tensor([7, 2 * n * n])
    args = (sub, cores, u, v, k, n, perm, n * n, window)
    rows, scores = tri.tdqkr_retrieval_rows_cuda(*args, q, eps)
    plain_rows, _ = tri.tdqkr_retrieval_rows_cuda(*args)
    want_rows, want_scores = ref_mod.rows_reference(*args, q, eps)
    assert torch.equal(rows, plain_rows) and torch.equal(rows, want_rows)
    torch.testing.assert_close(scores, want_scores, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=0)


def test_launch_backward_rejects_bad_out():
    a, b, cores, u, v = _inputs(27, 2, 1, 12, 10, 2, 2)
    ids = torch.zeros(2, 1, 3, dtype=torch.int64)
    grad = torch.randn(2, 1, 3, 2)
    with pytest.raises(ValueError, match=r"out\[0\] \(grad_row\).*float16"):
        tri.launch_backward(grad, a, b, cores, ids, out=(torch.empty_like(a, dtype=torch.float16), torch.empty_like(b)))
    with pytest.raises(ValueError, match=r"out\[1\] \(grad_col\)"):
        tri.launch_backward(grad, a, b, cores, ids, out=(torch.empty_like(a), torch.empty_like(a)))


# ---------------------------------------------------------------- forward: tiled grid, candidate selection


@pytest.fixture
def bisection_calls(monkeypatch):
    """Counts the programs that fall back from the candidate selection to the bisection over the
    whole grid (the interpreter runs kernels as Python, so a wrapper sees every call)."""
    calls = []
    bisect = tri._grid_select_tiled

    def counted(*args, **kwargs):
        calls.append(1)
        return bisect(*args, **kwargs)

    monkeypatch.setattr(tri, "_grid_select_tiled", counted)
    return calls


def _bisection_instead(fac_ws, pairs_ws, vals_ws, _cand_pos, _cand_val, knn, r, block_k, tile_i, *rest):
    """In place of `_grid_select_candidates` (patched in under the interpreter): the bisection
    over the whole grid that it falls back to, on the same arguments."""
    return tri._grid_select_tiled(fac_ws, pairs_ws, vals_ws, knn, r, block_k, tile_i, rest[-1])


def _tiles(monkeypatch, grid_tile, cand_factor=None):
    """A tiled grid at small k: GRID_TILE entries at once, CAND_TILE_FACTOR·BLOCK_K candidate slots
    per row tile (as a sweep would set them)."""
    monkeypatch.setattr(tri, "GRID_TILE", grid_tile)
    if cand_factor is not None:
        monkeypatch.setattr(tri, "CAND_TILE_FACTOR", (cand_factor, cand_factor))


def _same_as_bisection(monkeypatch, a, b, cores, u, v, knn, calls):
    """The candidate selection's outputs, checked bit for bit against the bisection's; returns
    them and the number of programs that fell back."""
    ids, scores = tri.launch_forward(a, b, cores, u, v, knn)
    fallbacks = len(calls)
    with monkeypatch.context() as patch:
        patch.setattr(tri, "_grid_select_candidates", _bisection_instead)
        want_ids, want_scores = tri.launch_forward(a, b, cores, u, v, knn)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    return ids, scores, fallbacks


@interpreted_only
@pytest.mark.parametrize(
    "seed,t,h,n_row,n_col,r,m,knn,grid_tile",
    [
        (50, 2, 2, 60, 45, 2, 2, 9, 64),  # H > 1; 3 row tiles of 4 (block 16)
        (51, 1, 1, 130, 120, 4, 3, 100, None),  # k not a power of 2, rank 4, 3 cores
        (52, 2, 1, 80, 70, 2, 2, 33, 1024),  # 8 row tiles of 16, 3 of them padding
        (53, 1, 1, 50, 40, 1, 1, 20, 128),  # few slots (one BLOCK_K per tile): floors raised often
    ],
)
def test_forward_candidates_match_bisection_and_oracle(
    monkeypatch, bisection_calls, seed, t, h, n_row, n_col, r, m, knn, grid_tile
):
    if grid_tile:
        _tiles(monkeypatch, grid_tile)
    a, b, cores, u, v = _inputs(seed, t, h, n_row, n_col, r, m)
    ids, scores, fallbacks = _same_as_bisection(monkeypatch, a, b, cores, u, v, knn, bisection_calls)
    assert fallbacks == 0
    assert_selection(ids, scores, a, b, cores, u, v, knn, tol=1e-5, exact_ids=True)


@interpreted_only
def test_forward_candidates_knn_256():
    # 16 row tiles of 16 rows (block 256) at a tiny n; every row key kept on one side (k = n)
    a, b, cores, u, v = _inputs(54, 1, 1, 256, 270, 2, 2)
    ids, scores = tri.launch_forward(a, b, cores, u, v, 256)
    assert_selection(ids, scores, a, b, cores, u, v, 256, tol=1e-5, exact_ids=True)


@interpreted_only
@pytest.mark.parametrize("cand_factor", [1, 2])
def test_forward_candidates_all_scores_equal(monkeypatch, bisection_calls, cand_factor):
    # All 20x20 grid totals tie. 32 slots per tile of 4 rows (80 entries): no floor separates them,
    # the slots overflow and every program falls back; 64: the 5 tiles' 400 entries fit in the
    # 512 slots, selected among the candidates. Both keep the lowest positions: row 0, columns 0..19.
    _tiles(monkeypatch, 128, cand_factor)
    a, b = torch.ones(2, 1, 100, 2), torch.ones(2, 1, 90, 2)
    cores, u = torch.randn(1, 2, 2, 2), torch.ones(1, 2)
    ids, scores, fallbacks = _same_as_bisection(monkeypatch, a, b, cores, u, u, 20, bisection_calls)
    assert fallbacks == (2 if cand_factor == 1 else 0)
    assert sorted(ids[0, 0].tolist()) == list(range(20)) and sorted(ids[1, 0].tolist()) == list(range(20))
    torch.testing.assert_close(scores, cores[0].sum((1, 2)).expand(2, 1, 20, 2))


@interpreted_only
@pytest.mark.parametrize("cand_factor", [1, 8])
def test_forward_candidates_ties_at_threshold(monkeypatch, bisection_calls, cand_factor):
    # Grid totals are products of small integers: many equal the k-th. With 32 slots per tile the
    # ties overflow (fallback), with 256 they fit; either way the bisection's pairs, bit for bit,
    # and the oracle's totals.
    _tiles(monkeypatch, 256, cand_factor)
    t, n, knn = 3, 40, 30
    a, b, cores, u = _integer_grid_inputs(55, t, n, 2)
    ids, scores, fallbacks = _same_as_bisection(monkeypatch, a, b, cores, u, u, knn, bisection_calls)
    assert (fallbacks > 0) == (cand_factor == 1)
    want = retrieval_selection_oracle(a, b, cores, u, u, knn)
    for ti in range(t):
        assert scores[ti, 0, :, 0].tolist() == [p[0] for p in want[ti, 0]["pairs"]]
    assert_selection(ids, scores, a, b, cores, u, u, knn, tol=0.0)


@interpreted_only
def test_forward_candidates_nan_stays_in_bounds(monkeypatch):
    _tiles(monkeypatch, 128)
    a, b, cores, u, v = _inputs(56, 3, 1, 60, 50, 2, 2)
    a[0, 0, 5:20] = float("nan")
    b[1, 0, :] = float("nan")
    a[2, 0, 7] = float("inf")  # inf · 0 in the grid: NaN totals next to finite ones
    b[2, 0, :, 1] = 0.0
    ids, _ = tri.launch_forward(a, b, cores, u, v, 20)
    assert ((ids >= 0) & (ids < 60 * 50)).all()


def test_candidate_slots(monkeypatch):
    assert tri._candidate_slots(128, 128, 32) == (128, 512)  # 4 tiles of BLOCK_K slots
    assert tri._candidate_slots(256, 256, 16) == (512, 8192)  # 16 tiles of 2·BLOCK_K slots
    assert tri._candidate_slots(20, 32, 4) == (32, 256)  # 5 tiles with a real row
    monkeypatch.setattr(tri, "CAND_TILE_FACTOR", (2, 2))
    assert tri._candidate_slots(100, 128, 32) == (256, 1024)
    monkeypatch.setattr(tri, "CAND_TILE_FACTOR", (3, 3))
    with pytest.raises(ValueError, match="96 candidate slots"):
        tri._candidate_slots(20, 32, 4)
