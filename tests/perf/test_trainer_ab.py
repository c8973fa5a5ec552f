"""perf.diagnostics.trainer_ab on a CPU: variants parse, and two trainers alternate, in one process
or each in a worker process on its own checkout."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from tiny import TINY_MODEL

from perf.diagnostics.trainer_ab import ROOT, main, parse_env, parse_tree, parse_variant, tree_revision


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


def test_envs_parse():
    assert parse_env("b=TORCHINDUCTOR_X=1") == ("b", "TORCHINDUCTOR_X", "1")
    assert parse_env("b=X=") == ("b", "X", "")
    for bad in ("b", "b=X", "=X=1", "b==1"):
        with pytest.raises(SystemExit):
            parse_env(bad)
    with pytest.raises(SystemExit, match="not variants"):
        main(["--variant", "a=", "--env", "b=X=1"])
    with pytest.raises(SystemExit, match="given twice"):
        main(["--variant", "a=", "--env", "a=X=1", "--env", "a=X=2"])


def test_trees_must_be_checkouts(tmp_path):
    assert parse_tree(f"old={ROOT}") == ("old", ROOT)
    for bad in (f"old={tmp_path}", str(ROOT)):
        with pytest.raises(SystemExit):
            parse_tree(bad)
    with pytest.raises(SystemExit, match="not variants"):
        main(["--variant", "a=", "--tree", f"b={ROOT}"])


def test_variants_in_worker_processes_on_their_trees(tmp_path, capsys):
    """Each variant in its own process: one on a copy of this checkout (its ultramem first on the
    worker's path), one on this checkout with an environment variable of its own; a worker's
    failure names its variant."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "ultramem", copy / "ultramem", ignore=shutil.ignore_patterns("__pycache__"))
    log = tmp_path / "log.jsonl"
    common = [f"--common={o}" for o in TINY_MODEL + ["--train.batch_size=2"]]
    args = ["--config=debug.toml", *common, "--variant", "old=", "--variant", "new=", "--tree", f"old={copy}"]
    args += ["--env", "new=ULTRAMEM_DEBUG=1"]
    assert main(args + ["--grad-accum=1", "--warmup=1", "--rounds=2", "--steps=1", f"--log={log}"]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["variant"] for r in recs] == ["old", "new"]
    assert recs[0]["extra"]["tree"] == "copy" and recs[1]["extra"]["tree"] is None  # no git there: its name
    assert recs[0]["extra"]["env"] == {} and recs[1]["extra"]["env"] == {"ULTRAMEM_DEBUG": "1"}
    assert all(len(r["extra"]["rounds_ms"]) == 2 and r["time"] > 0 for r in recs)
    with pytest.raises(SystemExit, match="variant bad: ConfigError"):
        main(["--config=debug.toml", *common, "--variant", "bad=--model.dim=-1", "--tree", f"bad={copy}"])
    # the variable reaches its worker: this one cannot start its process group
    with pytest.raises(SystemExit, match="variant bad: its worker exited"):
        main(["--config=debug.toml", *common, "--variant", "bad=", "--env", "bad=WORLD_SIZE=two"])


def test_a_tree_names_its_own_commit_not_an_enclosing_one(tmp_path):
    """A commit unpacked into a folder of another repository is named by its folder."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    (tmp_path / "old").mkdir()
    assert tree_revision(tmp_path / "old") == "old"
    assert tree_revision(tmp_path) == head.stdout.strip()
