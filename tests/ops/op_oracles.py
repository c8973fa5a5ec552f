"""Independent float64 formulas of the ops, written as explicit loops (none of the ops' own
helpers), shared by the reference-op tests and the Triton kernel tests."""
from __future__ import annotations

import itertools
import math

import torch

def lookup_oracle(rows, table, scores):
    t, e = rows.shape
    m = scores.shape[2]
    dm = table.shape[1] // m
    out = torch.zeros(t, table.shape[1], dtype=torch.float64)
    for ti in range(t):
        for ei in range(e):
            r = int(rows[ti, ei])
            for c in range(table.shape[1]):
                out[ti, c] += float(scores[ti, ei, c // dm]) * float(table[r, c])
    return out


def lookup_backward_oracle(grad_out, rows, table, scores):
    t, e = rows.shape
    m = scores.shape[2]
    dm = table.shape[1] // m
    g_table = torch.zeros(table.shape, dtype=torch.float64)
    g_scores = torch.zeros(t, e, m, dtype=torch.float64)
    for ti in range(t):
        for ei in range(e):
            r = int(rows[ti, ei])
            for c in range(table.shape[1]):
                g_table[r, c] += float(scores[ti, ei, c // dm]) * float(grad_out[ti, c])
                g_scores[ti, ei, c // dm] += float(table[r, c]) * float(grad_out[ti, c])
    return g_table, g_scores


def gate_oracle(rows, table, x):
    t, e = rows.shape
    out = torch.zeros(t, e, dtype=torch.float64)
    for ti in range(t):
        for ei in range(e):
            out[ti, ei] = sum(float(a) * float(b) for a, b in zip(table[int(rows[ti, ei])], x[ti]))
    return out


def gate_backward_oracle(grad_gate, rows, table, x):
    t, e = rows.shape
    g_table = torch.zeros(table.shape, dtype=torch.float64)
    g_x = torch.zeros(x.shape, dtype=torch.float64)
    for ti in range(t):
        for ei in range(e):
            r, gg = int(rows[ti, ei]), float(grad_gate[ti, ei])
            g_table[r] += gg * x[ti].double()
            g_x[ti] += gg * table[r].double()
    return g_table, g_x


def gelu64(v: float) -> float:
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def gate_lookup_oracle(rows, values, pre_values, x, scores, gelu):
    g = gate_oracle(rows, pre_values, x)
    act = g.clone().apply_(gelu64) if gelu else g
    return lookup_oracle(rows, values, scores.double() * act.unsqueeze(-1)), g


def retrieval_oracle(a_scores, b_scores, cores, u, v, knn):
    """Brute force: all n_row x n_col pairs restricted to the coarse top-k rows/cols."""
    t, h, n_row, _ = a_scores.shape
    n_col = b_scores.shape[2]
    ids = torch.zeros(t, h, knn, dtype=torch.int64)
    scores = torch.zeros(t, h, knn, cores.shape[1], dtype=torch.float64)
    for ti, hi in itertools.product(range(t), range(h)):
        a, b = a_scores[ti, hi].double(), b_scores[ti, hi].double()
        coarse_a = [float(a[i] @ u[hi].double()) for i in range(n_row)]
        coarse_b = [float(b[j] @ v[hi].double()) for j in range(n_col)]
        rows_kept = sorted(range(n_row), key=lambda i: -coarse_a[i])[:knn]
        cols_kept = sorted(range(n_col), key=lambda j: -coarse_b[j])[:knn]
        cands = []
        for i in rows_kept:
            for j in cols_kept:
                per_core = [float(a[i] @ cores[hi, m].double() @ b[j]) for m in range(cores.shape[1])]
                cands.append((sum(per_core), i * n_col + j, per_core))
        cands.sort(key=lambda c: -c[0])
        for e, (_, vid, per_core) in enumerate(cands[:knn]):
            ids[ti, hi, e] = vid
            scores[ti, hi, e] = torch.tensor(per_core, dtype=torch.float64)
    return ids, scores
