"""perf.diagnostics.compile_regions: its variants parse."""

from __future__ import annotations

import pytest

from perf.diagnostics.compile_regions import parse_variant


def test_variants_parse_inductor_options_and_layer_stats():
    assert parse_variant("model") == ("model", "model", {})
    assert parse_variant("c=module,combo_kernels=1,layer_stats=off") == (
        "c",
        "module",
        {"combo_kernels": True, "layer_stats": "off"},
    )
    for bad in ("x=nowhere", "x=model,no_such_option=1", "x=model,layer_stats=sometimes"):
        with pytest.raises(SystemExit):
            parse_variant(bad)
