"""`python -m ultramem.compare`: the plan it derives from a token budget, and two tiny configs
trained end to end: table, JSON, plots, and a rerun that skips what finished."""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import pytest
from launch import START_S, env, records, run, timeout_for, token_shards

from ultramem import compare

DENSE = """
[model]
vocab_size = 300
dim = 32
n_layers = 2
n_heads = 2
ffn_hidden = 48
max_seq_len = 16

[model.memory]
type = "none"

[data]
vocab_size = 300
val_fraction = 0.1

[optim]
lr = 3e-3
warmup_steps = 1

[train]
batch_size = 2
seq_len = 16
device = "cpu"
eval_batches = 2

[metrics]
tensorboard = false
"""

MEMORY = DENSE.replace(
    'type = "none"',
    """type = "ultramem_v2"
knum = 4
kdim = 8
vdim = 16
pre_vdim = 8
knn = 2
calibration_rounds = 1""",
).replace("ffn_hidden = 48", "ffn_hidden = 40")

TOKENS_PER_STEP = 2 * 16


def _configs(tmp_path: Path) -> tuple[Path, Path]:
    dense, memory = tmp_path / "tiny-dense.toml", tmp_path / "tiny-mem.toml"
    dense.write_text(DENSE)
    memory.write_text(MEMORY)
    return dense, memory


def test_token_counts_parse():
    assert compare.parse_count("16M") == 16_000_000
    assert compare.parse_count("1_500") == 1500
    assert compare.parse_count("2.5k") == 2500
    assert compare.parse_count("1e6") == 1_000_000
    for bad in ("0", "x", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.parse_count(bad)


def test_steady_rate_and_elapsed_time():
    assert compare.steady_rate([]) is None
    assert compare.steady_rate([5.0]) == 5.0
    assert compare.steady_rate([1.0, 10.0, 12.0, 11.0]) == 11.0  # the first is warm-up
    segments = [[100.0, 110.0], [200.0, 205.0]]
    assert compare.elapsed_at(105.0, segments) == 5.0
    assert compare.elapsed_at(150.0, segments) == 10.0
    assert compare.elapsed_at(203.0, segments) == 13.0


def test_the_plan_follows_the_token_budget(tmp_path):
    dense, memory = _configs(tmp_path)
    data = token_shards(tmp_path / "data")
    plans = compare.plan_runs(
        [str(dense), str(memory)], 100, 64, tmp_path / "out", data=str(data), extra=["--optim.lr=1e-3"], seeds=[3, 4]
    )
    assert [p.name for p in plans] == ["tiny-dense-seed3", "tiny-dense-seed4", "tiny-mem-seed3", "tiny-mem-seed4"]
    p = plans[2]
    assert p.tokens_per_step == TOKENS_PER_STEP and p.max_steps == 4 and p.eval_interval == 2
    assert p.cfg.train.max_steps == 4 and p.cfg.train.seed == 3 and p.cfg.optim.lr == 1e-3
    assert p.cfg.data.source == str(data) and p.cfg.run.dir == str(tmp_path / "out" / "tiny-mem-seed3")
    assert p.activated_params < p.total_params  # the tables count in the total only
    assert plans[0].activated_params == plans[0].total_params
    two = compare.plan_runs([str(dense)], 100, 64, tmp_path / "out", nproc=2)
    assert two[0].tokens_per_step == 2 * TOKENS_PER_STEP and two[0].max_steps == 2
    assert "torch.distributed.run" in two[0].command(2) and "--nproc_per_node" in two[0].command(2)


def test_a_sweep_runs_each_config_once_per_value(tmp_path):
    dense, memory = _configs(tmp_path)
    sweep = [("optim.lr", ["1e-3", "3e-3"]), ("optim.weight_decay", ["0", "0.1"])]
    plans = compare.plan_runs([str(memory)], 100, 64, tmp_path / "out", sweep=sweep, seeds=[1, 2])
    assert len(plans) == 8
    p = plans[-1]
    assert p.name == "tiny-mem-lr-3e-3-weight_decay-0.1-seed2" and p.variant == "tiny-mem-lr-3e-3-weight_decay-0.1"
    assert p.cfg.optim.lr == 3e-3 and p.cfg.optim.weight_decay == 0.1 and p.cfg.train.seed == 2
    assert {(q.cfg.optim.lr, q.cfg.optim.weight_decay) for q in plans} == {
        (a, b) for a in (1e-3, 3e-3) for b in (0, 0.1)
    }
    with pytest.raises(compare.CompareError, match=r"config .*tiny-dense.toml optim.nowhere=1: "):
        compare.plan_runs([str(dense)], 100, 64, tmp_path, sweep=[("optim.nowhere", ["1"])])
    with pytest.raises(compare.CompareError, match="--sweep train.max_steps"):
        compare.plan_runs([str(dense)], 100, 64, tmp_path, sweep=[("train.max_steps", ["3"])])
    with pytest.raises(compare.CompareError, match="distinct values"):
        compare.plan_runs([str(dense)], 100, 64, tmp_path, sweep=[("optim.lr", ["1e-3", "1e-3"])])
    with pytest.raises(compare.CompareError, match="--sweep optim.lr is given twice"):
        compare.plan_runs([str(dense)], 100, 64, tmp_path, sweep=[("optim.lr", ["1"]), ("optim.lr", ["2"])])


def test_a_placement_sweep_names_one_flat_directory_per_value(tmp_path):
    _, memory = _configs(tmp_path)
    plans = compare.plan_runs(
        [str(memory)], 100, 64, tmp_path / "out", sweep=[("model.memory.insert", ["0:1", "0:0/1:1"])]
    )
    assert [p.name for p in plans] == ["tiny-mem-insert-0_1", "tiny-mem-insert-0_0_1_1"]
    assert all(p.run_dir.parent == tmp_path / "out" for p in plans)
    assert [p.cfg.model.memory.insert for p in plans] == ["0:1", "0:0/1:1"]
    with pytest.raises(compare.CompareError, match="share the directory 'tiny-mem-tensorboard_dir-tb_a'"):
        compare.plan_runs([str(memory)], 100, 64, tmp_path, sweep=[("metrics.tensorboard_dir", ["tb/a", "tb:a"])])


def test_plans_that_cannot_work_are_refused(tmp_path, capsys):
    dense, _ = _configs(tmp_path)
    with pytest.raises(compare.CompareError, match="fewer than its optim.warmup_steps=5"):
        compare.plan_runs([str(dense)], 32, 32, tmp_path, extra=["--optim.warmup_steps=5"])
    with pytest.raises(compare.CompareError, match="--extra sets train.max_steps"):
        compare.plan_runs([str(dense)], 320, 32, tmp_path, extra=["--train.max_steps=3"])
    with pytest.raises(compare.CompareError, match="twice"):
        compare.plan_runs([str(dense), str(dense)], 320, 32, tmp_path)
    with pytest.raises(compare.CompareError, match="config nowhere.toml"):
        compare.plan_runs(["nowhere.toml"], 320, 32, tmp_path)
    # on the command line: one line, exit code 2 ("--extra VALUE" with a value that looks like an option)
    with pytest.raises(SystemExit) as exc:
        compare.main(
            [
                "--configs",
                str(dense),
                "--tokens",
                "32",
                "--eval-every",
                "32",
                "--out",
                str(tmp_path),
                "--extra",
                "--optim.warmup_steps=5",
                "--dry-run",
            ]
        )
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: config ")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        compare.main(["--configs", str(dense), "--tokens", "320", "--eval-every", "32", "--out", str(blocker / "x")])
    assert exc.value.code == 2
    assert f"error: --out '{blocker / 'x'}': '{blocker}' is a file, not a directory" in capsys.readouterr().err


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


@pytest.mark.slow
def test_two_tiny_configs_compared_end_to_end_and_resumed(tmp_path):
    dense, memory = _configs(tmp_path)
    data = token_shards(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "ultramem.compare",
        "--configs",
        f"{dense},{memory}",
        "--tokens",
        "128",
        "--eval-every",
        "64",
        "--out",
        str(out),
        "--data",
        str(data),
    ]
    steps = 128 // TOKENS_PER_STEP
    res = run(cmd, START_S + 2 * timeout_for(steps), tmp_path, env(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    summary = json.loads((out / "results.json").read_text())
    assert summary["tokens"] == 128 and summary["eval_every"] == 64
    runs = {r["name"]: r for r in summary["runs"]}
    assert sorted(runs) == ["tiny-dense", "tiny-mem"]
    train_tokens = 60_000 - int(60_000 * 0.1)
    for name, r in runs.items():
        run_dir = out / name
        assert r["status"] == "done" and r["steps"] == steps and r["tokens"] == 128
        assert r["epochs"] == pytest.approx(128 / train_tokens)
        vals = {v["step"]: v["val/loss"] for v in records(run_dir, "val")}
        assert [(p["step"], p["tokens"]) for p in r["val"]] == [(2, 64), (4, 128)]
        assert r["final_val_loss"] == vals[4]
        assert r["best_val_loss"] == min(vals.values())
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert 0 < r["val"][0]["seconds"] < r["val"][1]["seconds"] <= r["wall_s"]
        assert (run_dir / "compare.log").is_file() and (run_dir / "checkpoints" / "step_00000004").is_dir()
    assert runs["tiny-mem"]["activated_params"] < runs["tiny-mem"]["total_params"]

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny-")]
    assert len(rows) == 2
    for row, name in zip(rows, ("tiny-dense", "tiny-mem")):
        assert f"{runs[name]['final_val_loss']:.4f}" in row and "| done |" in row
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):
        w, h = _png_size(out / png)
        assert w > 100 and h > 100

    # the same command again: nothing is trained
    again = run(cmd, START_S, tmp_path, env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == 2
    assert json.loads((out / "results.json").read_text())["runs"] == summary["runs"]

    # an interrupted run is launched again, and the trainer resumes it from its checkpoint
    state = json.loads((out / "tiny-mem" / "compare.json").read_text())
    state["status"] = "interrupted"
    (out / "tiny-mem" / "compare.json").write_text(json.dumps(state))
    third = run(cmd, START_S + timeout_for(0), tmp_path, env(tmp_path))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "tiny-dense: done before, skipped" in third.stdout and "tiny-mem: training" in third.stdout
    assert "nothing to do: the checkpoint is at step 4" in (out / "tiny-mem" / "compare.log").read_text()
    final = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert final["tiny-mem"]["status"] == "done"
    assert final["tiny-mem"]["final_val_loss"] == runs["tiny-mem"]["final_val_loss"]
    assert len(json.loads((out / "tiny-mem" / "compare.json").read_text())["segments"]) == 2


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_refused_config_is_not_called_retryable(tmp_path, nproc):
    """Also under torchrun (nproc 2), which exits 1 when its worker exits 2."""
    dense, _ = _configs(tmp_path)
    cmd = [sys.executable, "-m", "ultramem.compare", "--configs", str(dense), "--tokens", "64", "--nproc", str(nproc)]
    wide = token_shards(tmp_path / "data", vocab=600)  # ids past the config's vocabulary of 300: the trainer refuses
    cmd += ["--eval-every", "64", "--out", str(tmp_path / "out"), "--data", str(wide)]
    res = run(cmd, START_S + timeout_for(0, nproc), tmp_path, env(tmp_path))
    assert res.returncode == 1
    assert "the trainer refused the config of tiny-dense (exit code 2)" in res.stderr, res.stdout[-4000:] + res.stderr
    assert "rerun to retry" not in res.stderr
