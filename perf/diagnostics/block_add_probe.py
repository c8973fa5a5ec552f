"""One staged flush's block add at the 227M shapes (F = 4 micro-batches × L = 20 layers of one
table: 31M entries), run once, for a profiler to look at:

    ncu --clock-control none -k regex:_sorted_block_add_kernel -c 1 \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        python -m perf.diagnostics.block_add_probe

(from the repository root; CUDA only). The timed flush is in perf/benches/staged_flush.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from perf.benches.lookup import _shapes
from perf.benches.staged_flush import _layer_rows
from ultramem.ops._triton import staged_grad as tsg


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("block_add_probe needs a CUDA device (it is a profiler target)", file=sys.stderr)
        return 2
    sh = _shapes(False)
    dev = torch.device("cuda")
    _, e, d, m, n = sh["T"], sh["E"], sh["D"], sh["M"], sh["N"]
    micro_batches, layers = 4, 20
    gen = torch.Generator(device=dev).manual_seed(3)
    rows = torch.cat([_layer_rows(sh, i % layers, gen, dev) for i in range(micro_batches * layers)])
    weights = torch.randn(rows.shape[0], e, m, generator=gen, device=dev)
    src = torch.randn(rows.shape[0], d, generator=gen, device=dev).to(torch.bfloat16)
    buf = torch.zeros(n, d, device=dev)
    order = tsg.sort_rows(rows, n)
    tsg.sorted_block_add(rows, src, weights, buf, torch.float32, order=order)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
