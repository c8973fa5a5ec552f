"""perf.diagnostics.compile_regions: its variants parse, and its candidate statistics agree with
the layers' own."""

from __future__ import annotations

import pytest
import torch

from perf.diagnostics.compile_regions import parse_variant, rowwise_sums
from ultramem.layers._common import LayerStats


def test_variants_parse_inductor_options_and_layer_stats():
    assert parse_variant("stage") == ("stage", "stage", {})
    assert parse_variant("c=module,combo_kernels=1,layer_stats=rowwise") == (
        "c",
        "module",
        {"combo_kernels": True, "layer_stats": "rowwise"},
    )
    for bad in ("x=nowhere", "x=stage,no_such_option=1", "x=stage,layer_stats=sometimes"):
        with pytest.raises(SystemExit):
            parse_variant(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_statistics_equal_the_layers_own(dtype):
    g = torch.Generator().manual_seed(0)
    ours, candidate = LayerStats(50), LayerStats(50)
    candidate._forward_sums = rowwise_sums
    for _ in range(2):
        logical = torch.randint(0, 50, (64, 2, 4), generator=g)
        y = torch.randn(64, 24, generator=g).to(dtype)
        top1, kth = (torch.rand(64, 2, generator=g).to(dtype) for _ in range(2))
        ours.accumulate(logical, y, top1, kth)
        candidate.accumulate(logical, y, top1, kth)
    torch.testing.assert_close(candidate.hits, ours.hits, rtol=0, atol=0)
    torch.testing.assert_close(candidate.sums, ours.sums, rtol=1e-6, atol=1e-6)
    candidate.enabled = False
    candidate.accumulate(logical, y, top1, kth)
    torch.testing.assert_close(candidate.hits, ours.hits, rtol=0, atol=0)
