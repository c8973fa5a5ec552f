"""perf.diagnostics.decode_aoti on a CPU (--small): the layer exported with a dynamic token
count, compiled by AOTInductor and called through its runner agrees with torch.compile at every
token count, and each variant is recorded."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_small_run_records_aoti_and_compiled_per_token_count(tmp_path, monkeypatch):
    from perf.diagnostics import decode_aoti

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    log = tmp_path / "log.jsonl"
    assert decode_aoti.main(["--small", "--calls", "3", "--log", str(log)]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    got = {(r["shape"], r["variant"]) for r in recs}
    assert got == {
        (f"T={t}", f"{name}, {mode}")
        for t in (1, 4)
        for name in ("cached", "reference: one add")
        for mode in ("compiled", "AOTI", "AOTI, loader.run", "AOTI, loader.run, single-threaded")
    }
    for r in recs:
        assert r["small"] and r["unit"] == "us" and r["time"] > 0
        if ", AOTI" in r["variant"]:
            assert r["extra"]["max_abs_diff_vs_compiled"] <= 1e-5
            assert r["extra"]["launches"] is None  # counted on CUDA only


def test_static_layer_only_run_builds_a_package_per_token_count(tmp_path, monkeypatch):
    from perf.diagnostics import decode_aoti

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    log = tmp_path / "log.jsonl"
    argv = ["--small", "--static", "--layer-only", "--tokens", "1", "3", "--calls", "3", "--log", str(log)]
    assert decode_aoti.main([*argv, "--inductor-config", "comprehensive_padding=False"]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    aoti = [r for r in recs if ", AOTI" in r["variant"]]
    assert {r["shape"] for r in aoti} == {"T=1", "T=3"} and len(aoti) == 6  # the layer, 2 counts, 3 ways
    assert not [r for r in recs if "one add" in r["variant"]]
    for r in aoti:
        assert "a package per token count" in r["note"]
        assert "AOTI with comprehensive_padding=False" in r["note"]
        assert r["extra"]["max_abs_diff_vs_compiled"] <= 1e-5


def test_decode_cache_folds_the_keys_in_the_package_too(tmp_path, monkeypatch):
    # where the retrieval writes rows (CUDA; patched here) the run adds the layer inside a decode
    # cache, whose package computes the sub-key scores in the projection's GEMM
    from perf.diagnostics import decode_aoti
    from ultramem.layers import ultramem_v2

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(ultramem_v2, "retrieval_writes_rows", lambda x: True)
    log = tmp_path / "log.jsonl"
    argv = ["--small", "--layer-only", "--tokens", "1", "3", "--calls", "3", "--log", str(log)]
    assert decode_aoti.main(argv) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    aoti = [r for r in recs if r["variant"].endswith(", AOTI")]
    assert {(r["shape"], r["variant"]) for r in aoti} == {
        (f"T={t}", f"{name}, AOTI") for t in (1, 3) for name in ("cached", "decode cache")
    }
    for r in aoti:
        assert r["extra"]["max_abs_diff_vs_compiled"] <= 1e-5


def test_smoke_packages_and_loads_the_one_add_in_a_fresh_process_and_here(tmp_path, monkeypatch, capsys):
    from perf.diagnostics import decode_aoti

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert decode_aoti.main(["--smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "a fresh process: loaded and called, output right" in out
    assert "this process: loaded and called, output right" in out


def test_inductor_config_items_parse_as_python_values_else_strings():
    import argparse

    from perf.diagnostics.decode_aoti import _config_item

    assert _config_item("max_autotune=True") == ("max_autotune", True)
    assert _config_item("max_autotune_gemm_backends=TRITON") == ("max_autotune_gemm_backends", "TRITON")
    assert _config_item("triton.num_stages=3") == ("triton.num_stages", 3)
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        _config_item("max_autotune")


def test_one_token_count_exports_a_dynamic_range(tmp_path, monkeypatch):
    # --tokens 1 alone: the package's token dimension still spans [1, 2] (a range of one value is
    # no dimension to torch.export)
    from perf.diagnostics import decode_aoti

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    log = tmp_path / "log.jsonl"
    assert decode_aoti.main(["--small", "--layer-only", "--tokens", "1", "--calls", "2", "--log", str(log)]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(r["shape"], r["variant"]) for r in recs} == {
        ("T=1", f"cached, {mode}")
        for mode in ("compiled", "AOTI", "AOTI, loader.run", "AOTI, loader.run, single-threaded")
    }
