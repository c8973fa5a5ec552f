"""perf.diagnostics.trainer_ab on a CPU: variants parse, and two trainers alternate in one process."""

from __future__ import annotations

import json

import pytest
from tiny import TINY_MODEL

from perf.diagnostics.trainer_ab import main, parse_variant


def test_variants_parse():
    assert parse_variant("plain=") == ("plain", [])
    assert parse_variant("b=--train.grad_accum=2 --model.dim=64") == ("b", ["--train.grad_accum=2", "--model.dim=64"])
    for bad in ("nothing", "=--model.dim=64"):
        with pytest.raises(SystemExit):
            parse_variant(bad)


def test_two_trainers_alternate(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    common = [f"--common={o}" for o in TINY_MODEL + ["--train.batch_size=2"]]
    args = ["--config=debug.toml", *common, "--variant", "a=", "--variant", "b=--train.table_grad_flush=0"]
    assert main(args + ["--grad-accum=1", "--warmup=1", "--rounds=2", "--steps=1", f"--log={log}"]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["variant"] for r in recs] == ["a", "b"]
    assert all(len(r["extra"]["rounds_ms"]) == 2 and r["time"] > 0 for r in recs)
    assert recs[1]["extra"]["overrides"] == ["--train.table_grad_flush=0"]
    assert recs[0]["extra"]["speed_vs_first_per_round"] == 1.0
    assert "speed vs the first" in capsys.readouterr().out
