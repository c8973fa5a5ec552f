"""The training command as a user meets it: its errors, signals, a kill during a save, and the
path from raw text to an exported model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import env, kill_group, losses, records, run, timeout_for, token_shards, train_cmd, wait_for
from tiny import TINY_MODEL

pytestmark = pytest.mark.slow

TINY = [
    *TINY_MODEL,
    "--config",
    "debug.toml",
    "--train.batch_size=2",
    "--optim.warmup_steps=1",
    "--train.eval_interval=0",
    "--metrics.tensorboard=false",
]


def _train(tmp_path, extra, steps=3, nproc=0, rc=0):
    data = token_shards(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    args = [*TINY, f"--data.source={data}", f"--train.max_steps={steps}", *extra]
    out = run(train_cmd(args, nproc), timeout_for(steps, max(nproc, 1)), tmp_path, env(tmp_path))
    assert out.returncode == rc, f"rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _one_line_error(out, *fragments):
    err = out.stderr.strip()
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


def test_a_config_error_is_one_line_and_exit_code_2(tmp_path):
    out = run(train_cmd([*TINY, "--train.max_stpes=3"]), timeout_for(0), tmp_path, env(tmp_path))
    assert out.returncode == 2
    _one_line_error(out, "train.max_stpes", "did you mean max_steps")


def _cli_error(capsys, argv, *fragments):
    """The command's main() in this process (the same path as above, without a torch start-up
    per case): exit code 2, one line on stderr naming the fragments."""
    from ultramem.train.__main__ import main

    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
    finally:
        torch.set_num_threads(threads)  # (the trainer sets this process's threads as a run's)
    assert exit_.value.code == 2
    out = capsys.readouterr()
    _one_line_error(subprocess.CompletedProcess(argv, 2, out.out, out.err), *fragments)


def test_bad_config_and_missing_data_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # (the default run directory is relative: outputs/debug)
    _cli_error(capsys, [*TINY, f"--data.source={tmp_path / 'nowhere'}"], "data.source=", "nowhere")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    _cli_error(capsys, ["--config", str(empty)], "has no [model] section")
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    _cli_error(capsys, [*TINY, f"--data.source={short}"], f"data.source='{short}'", "too short for seq_len=16")
    if not torch.cuda.is_available():
        _cli_error(capsys, [*TINY, "--train.device=cuda"], "train.device='cuda'", "CUDA is not available")
    # output directories are made and checked before any training, not at the first save
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for key in ("run.dir", "checkpoint.dir", "metrics.tensorboard_dir"):
        extra = [f"--{key}={blocker / 'sub'}", "--metrics.tensorboard=true"]
        if key != "run.dir":
            extra.append(f"--run.dir={tmp_path / key}")
        _cli_error(capsys, [*TINY, *extra], f"{key}='{blocker / 'sub'}': cannot make the directory: Not a directory")
        assert not (tmp_path / key / "metrics.jsonl").exists()
    # a --resume path that is not there is refused before the run directory is made
    run_dir = tmp_path / "never_made"
    resume = ["--resume", str(tmp_path / "nowhere"), f"--run.dir={run_dir}"]
    _cli_error(capsys, [*TINY, *resume], f"--resume '{tmp_path / 'nowhere'}': no such file or directory")
    assert not run_dir.exists()
    # a run directory another run holds: refused, naming the holder, and that run's log left alone
    from ultramem.train.trainer import RunDirLock

    held = tmp_path / "held"
    held.mkdir()
    (held / "train.log").write_text("the other run's log\n")
    lock = RunDirLock(held)
    assert lock.acquire() is None
    try:
        holder = f"process {os.getpid()} on"
        _cli_error(capsys, [*TINY, f"--run.dir={held}"], f"run.dir='{held}': another run is using", holder)
    finally:
        lock.release()
    assert (held / "train.log").read_text() == "the other run's log\n"


def test_two_ranks_report_a_config_error_in_one_line_each(tmp_path):
    out = run(train_cmd([*TINY, "--optim.lr=-1"], nproc=2), timeout_for(0, 2), tmp_path, env(tmp_path))
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if "optim.lr=-1.0: must be > 0 and finite" in line]
    # torchrun ends the other worker once one exits, so on a loaded machine only the first may get to print
    assert lines and len(set(lines)) == len(lines), out.stderr[-3000:]
    assert set(lines) <= {
        "[rank 0] config error: optim.lr=-1.0: must be > 0 and finite",
        "[rank 1] config error: optim.lr=-1.0: must be > 0 and finite",
    }, out.stderr[-3000:]
    # torchrun adds its own summary of the failed workers (ChildFailedError); no worker traceback
    assert "ultramem/" not in out.stderr.replace("-m ultramem.train", "")


def test_a_checkpoint_of_another_config_is_refused_naming_the_key(tmp_path):
    _train(tmp_path, [f"--run.dir={tmp_path / 'a'}"], steps=2)
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    out = _train(tmp_path, [f"--run.dir={tmp_path / 'b'}", f"--run.resume={ckpt}", "--model.ffn_hidden=64"], rc=2)
    _one_line_error(out, "does not match this run's config", "model.ffn_hidden", "48", "64")
    assert "does not match this run's config" in (tmp_path / "b" / "train.log").read_text()  # logged too


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    out = _train(
        tmp_path,
        [f"--run.dir={run_dir}", "--optim.lr=1e30", "--optim.grad_clip=0", "--checkpoint.interval=1"],
        steps=5,
        rc=3,
    )
    kept = run_dir / "checkpoints" / "step_00000001"
    _one_line_error(out, "training diverged", "step 2", "nan", f"the last good checkpoint, {kept}, is kept")
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000001"]
    assert sorted(losses(run_dir)) == [1]


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    """The file system refusing a checkpoint (here: no space left, from inside DCP's save) stops the
    run with one line naming the checkpoint, in train.log too; the earlier checkpoint stays whole
    and nothing half-written is left."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    import ultramem.train.checkpoint as ckpt
    from ultramem.train.__main__ import main

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    saves = []
    original = ckpt.dcp.save

    def save(state, checkpoint_id):
        saves.append(checkpoint_id)
        if len(saves) == 1:
            return original(state, checkpoint_id=checkpoint_id)
        (Path(checkpoint_id) / "__0_0.distcp").parent.mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise CheckpointException("save failed", {0: (full, None)})

    monkeypatch.setattr(ckpt.dcp, "save", save)
    args = [*TINY, f"--data.source={token_shards(tmp_path / 'data')}", f"--run.dir={run_dir}"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--train.max_steps=4", "--checkpoint.interval=2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    final = run_dir / "checkpoints" / "step_00000004"
    assert exc.value.code == 1
    assert f"checkpoint '{final}' could not be written: No space left on device" in err, err
    assert "the checkpoints before step 4 are intact" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert "No space left on device" in (run_dir / "train.log").read_text()
    monkeypatch.setattr(ckpt.dcp, "save", original)
    main([*args, "--train.max_steps=4", "--checkpoint.interval=2"])  # resumes from step 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 3, 4]  # the rerun took up at step 2


def test_a_tilde_in_the_output_directories_is_the_home_directory(tmp_path, monkeypatch):
    """`--run.dir=~/x` reaches the command unexpanded (no shell expands `~` after `=`): every file
    of the run goes under $HOME/x, none under a directory named `~`."""
    from ultramem.train.__main__ import main

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = token_shards(tmp_path / "data")
    assert main([*TINY, f"--data.source={data}", "--train.max_steps=1", "--run.dir=~/run"]) == 0
    run_dir = tmp_path / "home" / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "train.log", "checkpoints"}
    assert not (tmp_path / "~").exists()


def _stopped_run(tmp_path, extra, nproc, stop):
    """A run of many steps, `stop(proc)` once it has logged two; its run dir, process and output."""
    data = token_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = [*TINY, f"--data.source={data}", "--train.max_steps=100000", f"--run.dir={run_dir}"]
    args += ["--checkpoint.interval=0", *extra]
    proc = subprocess.Popen(
        train_cmd(args, nproc=nproc),
        cwd=tmp_path,
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    procs = max(nproc, 1)
    try:
        assert wait_for(lambda: len(records(run_dir)) >= 2, timeout_for(2, procs), proc), "no training steps seen"
        stop(proc)
        out, err = proc.communicate(timeout=timeout_for(2, procs))
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return run_dir, proc, out, err


def test_sigint_saves_a_checkpoint_and_exits_cleanly_on_every_rank(tmp_path):
    # what a terminal's Ctrl-C does: SIGINT to the whole foreground group
    run_dir, _, out, err = _stopped_run(
        tmp_path, ["--parallel.mode=ddp"], 2, lambda proc: os.killpg(proc.pid, signal.SIGINT)
    )
    # (torchrun itself exits non-zero after a SIGINT, whatever its workers do)
    step = max(losses(run_dir))
    stopped = [line for line in (out + err).splitlines() if "stopped by SIG" in line]
    assert len(stopped) == 2 and {"rank 0" in stopped[0] or "rank 0" in stopped[1]}, stopped
    assert all(f"at step {step}" in line for line in stopped), (stopped, step)
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / ".metadata").is_file()
    assert "ultramem/" not in err.replace("-m ultramem.train", "")  # no worker traceback (torchrun has its own)


def test_sigterm_stops_a_plain_fsdp_run_with_its_code_and_resume_takes_a_run_directory(tmp_path):
    # FSDP without torchrun runs as a group of one; a stopped run exits 128 + SIGTERM, not 0
    run_dir, proc, out, err = _stopped_run(
        tmp_path, ["--parallel.mode=fsdp"], 0, lambda proc: proc.send_signal(signal.SIGTERM)
    )
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-3000:])
    step = max(losses(run_dir))
    assert f"stopped by SIGTERM at step {step}" in out + err
    # --resume takes the run directory itself, as eval and export do
    other = tmp_path / "other"
    out = _train(tmp_path, [f"--run.dir={other}", "--resume", str(run_dir)], steps=step + 1)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in out.stdout + out.stderr
    assert [(r["step"]) for r in records(other, "resume")] == [step]  # where the logged steps begin again


KILLER = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
from ultramem.train import __main__ as cli
saves = []
real_save = dcp.save
def save_then_die(state, checkpoint_id):
    saves.append(checkpoint_id)
    if len(saves) == 2:  # the second save: write part of it, then die as a killed process does
        real_save(state, checkpoint_id=checkpoint_id)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, checkpoint_id=checkpoint_id)
dcp.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    data = token_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = [*TINY, f"--data.source={data}", "--train.max_steps=6", f"--run.dir={run_dir}", "--checkpoint.interval=2"]
    out = run([sys.executable, "-c", KILLER, *args], timeout_for(6), tmp_path, env(tmp_path))
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [".step_00000004.tmp", "step_00000002"]
    # the run directory's automatic resume picks step 2, clears the half-written one, and finishes
    out = _train(tmp_path, [f"--run.dir={run_dir}", "--checkpoint.interval=2"], steps=6)
    assert f"resumed from {ckpt_dir / 'step_00000002'} at step 2" in out.stdout
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]


def test_prepare_train_export_reload_round_trip(tmp_path):
    from ultramem.train.export import load_checkpoint_model, load_exported

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(4):
        (texts / f"doc{i}.txt").write_text(" ".join(f"word{j % (7 + i)} line {j}" for j in range(400)) + "\n")
    shards = tmp_path / "shards"
    prep = run(
        [
            sys.executable,
            "-m",
            "ultramem.data",
            "prepare",
            str(texts),
            "--out",
            str(shards),
            "--vocab-size",
            "300",
            "--workers",
            "1",
            "--no-progress",
        ],
        timeout_for(0),
        tmp_path,
        env(tmp_path),
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    run_dir = tmp_path / "run"
    args = [a for a in TINY] + [
        f"--data.source={shards}",
        "--train.max_steps=3",
        f"--run.dir={run_dir}",
        "--train.eval_interval=3",
        "--data.val_fraction=0.1",
    ]
    out = run(train_cmd(args), timeout_for(3), tmp_path, env(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for suffix in ("safetensors", "pt"):
        dest = tmp_path / f"model.{suffix}"
        exp = run(
            [sys.executable, "-m", "ultramem.train.export", "--checkpoint", str(run_dir), "--out", str(dest)],
            timeout_for(0),
            tmp_path,
            env(tmp_path),
        )
        assert exp.returncode == 0, exp.stderr[-3000:]
        exported = load_exported(dest)
        trained, _ = load_checkpoint_model(run_dir)
        tokens = torch.randint(0, 300, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(exported(tokens), trained(tokens), rtol=0, atol=0)
        assert set(exported.state_dict()) == set(trained.state_dict())
        for (name, a), b in zip(exported.state_dict().items(), trained.state_dict().values()):
            assert torch.equal(a, b), name
