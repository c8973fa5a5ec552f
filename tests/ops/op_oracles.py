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


def gate_lookup_backward_oracle(grad_out, grad_gate, rows, values, pre_values, x, scores, gate, gelu):
    """(grad_values, grad_pre_values, grad_x, grad_scores) of gate_lookup, the activation taken
    at the saved `gate` (as the op's backward does)."""
    t, e = rows.shape
    m = scores.shape[2]
    dm = values.shape[1] // m
    g_values = torch.zeros(values.shape, dtype=torch.float64)
    g_pre = torch.zeros(pre_values.shape, dtype=torch.float64)
    g_x = torch.zeros(x.shape, dtype=torch.float64)
    g_scores = torch.zeros(t, e, m, dtype=torch.float64)
    for ti in range(t):
        for ei in range(e):
            r, g = int(rows[ti, ei]), float(gate[ti, ei])
            if gelu:
                cdf = 0.5 * (1.0 + math.erf(g / math.sqrt(2.0)))
                act, slope = g * cdf, cdf + g * math.exp(-0.5 * g * g) / math.sqrt(2.0 * math.pi)
            else:
                act, slope = g, 1.0
            q = [0.0] * m
            for c in range(values.shape[1]):
                s = float(scores[ti, ei, c // dm])
                g_values[r, c] += s * act * float(grad_out[ti, c])
                q[c // dm] += float(values[r, c]) * float(grad_out[ti, c])
            grad_g = slope * sum(q[k] * float(scores[ti, ei, k]) for k in range(m))
            if grad_gate is not None:
                grad_g += float(grad_gate[ti, ei])
            for k in range(m):
                g_scores[ti, ei, k] = q[k] * act
            g_x[ti] += grad_g * pre_values[r].double()
            g_pre[r] += grad_g * x[ti].double()
    return g_values, g_pre, g_x, g_scores


def retrieval_selection_oracle(a, b, cores, u, v, knn):
    """Per (token, head): the coarse scores, the k-th coarse score of each side, and the k best
    pairs (total, virtual id i·n_col + j, per-core scores), sorted by descending total."""
    t, h, n_row, _ = a.shape
    n_col = b.shape[2]
    out = {}
    for ti, hi in itertools.product(range(t), range(h)):
        a64, b64 = a[ti, hi].double(), b[ti, hi].double()
        ca = [float(a64[i] @ u[hi].double()) for i in range(n_row)]
        cb = [float(b64[j] @ v[hi].double()) for j in range(n_col)]
        rows = sorted(range(n_row), key=lambda i: -ca[i])[:knn]
        cols = sorted(range(n_col), key=lambda j: -cb[j])[:knn]
        pairs = []
        for i in rows:
            for j in cols:
                per_core = [float(a64[i] @ cores[hi, m].double() @ b64[j]) for m in range(cores.shape[1])]
                pairs.append((sum(per_core), i * n_col + j, per_core))
        pairs.sort(key=lambda p: -p[0])
        out[ti, hi] = dict(ca=ca, cb=cb, kth_a=ca[rows[-1]], kth_b=cb[cols[-1]], pairs=pairs[:knn])
    return out


def retrieval_oracle(a, b, cores, u, v, knn):
    """The op's outputs from the brute-force selection: ids [T, H, k], scores [T, H, k, M] (float64)."""
    t, h = a.shape[:2]
    ids = torch.zeros(t, h, knn, dtype=torch.int64)
    scores = torch.zeros(t, h, knn, cores.shape[1], dtype=torch.float64)
    for (ti, hi), sel in retrieval_selection_oracle(a, b, cores, u, v, knn).items():
        for e, (_, vid, per_core) in enumerate(sel["pairs"]):
            ids[ti, hi, e] = vid
            scores[ti, hi, e] = torch.tensor(per_core, dtype=torch.float64)
    return ids, scores
