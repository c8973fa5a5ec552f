"""Step-by-step formulas of docs/layers.md (UltraMemV2, v1, Memory+), written with explicit loops over tokens, heads,
keys and grid cells. They read the layer's parameters and buffers but none of its helpers and
none of the ultramem ops, so a test comparing the two can fail."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_normalize(x, weight, eps):
    return x / torch.sqrt((x * x).mean() + eps) * weight


def window_n(knum: int, num_layers: int, share_ratio_num: int, share_ratio_den: int) -> int:
    """floor(sqrt(knum²·L·p/q)) in exact integer arithmetic."""
    return math.isqrt(knum * knum * num_layers * share_ratio_num // share_ratio_den)


def tucker_oracle(layer, x, tables=None, *, kind: str, n: int, offset: int = 0, num_rows: int = 0):
    """y (shape of x) and the retrieval trace of an UltraMemV2 (kind "v2") or v1 (kind "v1") layer.

    trace: dict with A, B (lists per token/head of [n', r] tensors), coarse a, b, and the kept
    entries (i, j, logical, group) per token/head."""
    d = x.shape[-1]
    xs = x.reshape(-1, d)
    heads, _, n_side, kdim, rank = layer.keys.shape
    cores = layer.cores
    n_cores = cores.shape[1]
    knn = layer.knn
    eps = layer.norm_q.eps
    wq, wnq, wnk = layer.w_q.weight, layer.norm_q.weight, layer.norm_k.weight
    u_vec, v_vec, perm = layer.rank1_u, layer.rank1_v, layer.perm
    n2 = n * n
    per_rank = layer.q_per_rank
    if kind == "v2":
        table, pre_table = tables.values, tables.pre_values
        groups = 1
    else:
        table, pre_table = layer.values, None
        groups = layer.key_expand**2
    vdim = table.shape[1]
    chunk = vdim // n_cores
    outs, trace = [], {"A": [], "B": [], "a": [], "b": [], "kept": []}
    for t in range(xs.shape[0]):
        q_all = wq @ xs[t]
        out = torch.zeros(groups * vdim, dtype=xs.dtype)
        gate_in = layer.w_p.weight @ xs[t] if (kind == "v2" and layer.w_p is not None) else None
        for h in range(heads):
            sides = []
            for side in range(2):
                if per_rank:
                    q = q_all.view(heads, 2, rank, kdim)[h, side]
                    qs = [rms_normalize(q[rho], wnq, eps) for rho in range(rank)]
                else:
                    q = rms_normalize(q_all.view(heads, 2, kdim)[h, side], wnq, eps)
                    qs = [q] * rank
                rows = []
                for i in range(n_side):
                    rows.append(
                        torch.stack(
                            [
                                torch.dot(qs[rho], rms_normalize(layer.keys[h, side, i, :, rho], wnk, eps))
                                for rho in range(rank)
                            ]
                        )
                    )
                sides.append(torch.stack(rows))  # [n', r]
            a_mat, b_mat = sides
            coarse_a = [
                float(sum(u_vec[h, rho] * a_mat[i, rho].detach() for rho in range(rank))) for i in range(n_side)
            ]
            coarse_b = [
                float(sum(v_vec[h, rho] * b_mat[j, rho].detach() for rho in range(rank))) for j in range(n_side)
            ]
            top_i = sorted(range(n_side), key=lambda i: -coarse_a[i])[:knn]
            top_j = sorted(range(n_side), key=lambda j: -coarse_b[j])[:knn]
            cells = []
            for i in top_i:
                for j in top_j:
                    s = [a_mat[i] @ cores[h, m] @ b_mat[j] for m in range(n_cores)]
                    cells.append((float(sum(s).detach()), i, j, s))
            cells.sort(key=lambda c: -c[0])
            kept = []
            for _, i, j, s in cells[:knn]:
                virtual = int(perm[i * n_side + j])
                logical, group = virtual % n2, virtual // n2
                row = (logical + offset) % num_rows if kind == "v2" else logical
                gate = 1.0
                if gate_in is not None:
                    gate = torch.dot(pre_table[row], gate_in)
                    if layer.glu_act:
                        gate = F.gelu(gate)
                for m in range(n_cores):
                    lo = (group if kind == "v1" else 0) * vdim + m * chunk  # v2 has one group
                    out[lo : lo + chunk] = out[lo : lo + chunk] + s[m] * gate * table[row, m * chunk : (m + 1) * chunk]
                kept.append((i, j, logical, group, float(sum(s).detach())))
            trace["A"].append(a_mat)
            trace["B"].append(b_mat)
            trace["a"].append(coarse_a)
            trace["b"].append(coarse_b)
            trace["kept"].append(kept)
        outs.append(layer.w_o.weight @ out)
    y = torch.stack(outs).reshape(x.shape[:-1] + (layer.w_o.weight.shape[0],))
    return y, trace


def memory_plus_oracle(layer, x, tables):
    d = x.shape[-1]
    xs = x.reshape(-1, d)
    heads, _, knum, kdim = layer.keys.shape
    knn, eps = layer.knn, layer.norm_q.eps
    table = tables.values
    outs, trace = [], {"a": [], "b": [], "kept": []}
    for t in range(xs.shape[0]):
        q_all = (layer.w_q.weight @ xs[t]).view(heads, 2, kdim)
        acc = torch.zeros(table.shape[1], dtype=xs.dtype)
        for h in range(heads):
            scores = []
            for side in range(2):
                q = rms_normalize(q_all[h, side], layer.norm_q.weight, eps)
                scores.append(
                    [torch.dot(q, rms_normalize(layer.keys[h, side, i], layer.norm_k.weight, eps)) for i in range(knum)]
                )
            sa, sb = scores
            top_i = sorted(range(knum), key=lambda i: -float(sa[i].detach()))[:knn]
            top_j = sorted(range(knum), key=lambda j: -float(sb[j].detach()))[:knn]
            cells = sorted(((sa[i] + sb[j], i, j) for i in top_i for j in top_j), key=lambda c: -float(c[0].detach()))[
                :knn
            ]
            w = torch.softmax(torch.stack([c[0] for c in cells]), dim=0)
            for wi, (_, i, j) in zip(w, cells):
                acc = acc + wi * table[i * knum + j]
            trace["a"].append([float(s.detach()) for s in sa])
            trace["b"].append([float(s.detach()) for s in sb])
            trace["kept"].append([(i, j, i * knum + j, 0, float(c.detach())) for c, i, j in cells])
        outs.append(layer.w_o.weight @ (acc * F.silu(layer.w_s.weight @ xs[t])))
    return torch.stack(outs).reshape(x.shape), trace
