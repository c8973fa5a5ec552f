"""The trainer as users run it: torchrun with 2 CPU ranks (gloo), FSDP2 and DDP, checkpoints and
exact resume. Each run is a real subprocess; runs shared by several tests are made once."""

from __future__ import annotations

import re

import pytest
from launch import env, losses, run, timeout_for, token_shards, train_cmd
from tiny import TINY_MODEL

pytestmark = pytest.mark.slow

STEPS = 5
# debug.toml's decoder, smaller, on random token shards (no tokenizer to train)
TINY = [
    *TINY_MODEL,
    "--model.memory.log_interval=2",
    "--optim.warmup_steps=1",
    f"--train.max_steps={STEPS}",
    "--train.eval_interval=5",
    "--train.eval_batches=1",
    "--checkpoint.interval=2",
    "--checkpoint.keep=0",
    "--metrics.tensorboard=false",
]
GLOBAL_BATCH = 4


class Runs:
    """Training runs by name, each launched once per module."""

    def __init__(self, tmp_path_factory):
        self.root = tmp_path_factory.mktemp("runs")
        self.data = token_shards(self.root / "data")
        self.done: dict[str, object] = {}

    def get(self, name: str, nproc: int, extra: list[str] = (), expect_rc: int = 0, environ: dict | None = None):
        if name not in self.done:
            run_dir = self.root / name
            batch = GLOBAL_BATCH // max(nproc, 1)
            args = [
                "--config",
                "debug.toml",
                *TINY,
                f"--data.source={self.data}",
                f"--train.batch_size={batch}",
                f"--run.dir={run_dir}",
                *extra,
            ]
            out = run(
                train_cmd(args, nproc), timeout_for(STEPS, max(nproc, 1)), self.root, env(self.root, **(environ or {}))
            )
            assert out.returncode == expect_rc, (
                f"{name}: rc {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
            )
            self.done[name] = (run_dir, out)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


def assert_losses_match(want_dir, got_dir, first_step: int = 1):
    """The run in got_dir logged a loss at each step from first_step to STEPS, each within 1e-5
    of want_dir's at that step: the same global batch, summed in another order."""
    steps = range(first_step, STEPS + 1)
    want, got = losses(want_dir), losses(got_dir)
    assert sorted(got) == list(steps), got
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-5, rel=0), (step, want, got)


# (the dense model under DDP is plain DDP: the memory model's DDP run covers our part of it)
@pytest.mark.parametrize("mode, memory", [("fsdp", "ultramem_v2"), ("ddp", "ultramem_v2"), ("fsdp", "none")])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, mode, memory):
    one_dir, _ = runs.get(f"one-{memory}", 0, [f"--model.memory.type={memory}"])
    two_dir, out = runs.get(f"{mode}-{memory}", 2, [f"--model.memory.type={memory}", f"--parallel.mode={mode}"])
    assert_losses_match(one_dir, two_dir)
    assert f"parallel: {mode} on 2 ranks" in out.stdout
    if memory != "none":
        assert "all-reduced once per step" in out.stdout


# wide enough for several of DDP's gradient buckets at 1 MB: about 0.8 MB of weights a block
# (3 micro-batches: DDP reduces only the last's, the sum in .grad)
WIDE = ["--model.dim=128", "--model.n_heads=4", "--model.ffn_hidden=352", "--model.n_layers=3", "--train.grad_accum=3"]


@pytest.mark.parametrize(
    "name, extra, min_pieces",
    [("ddp-compiled", [], 3), ("ddp-compiled-ac", ["--train.ac=full", "--train.compile_backend=aot_eager"], 2)],
    ids=["plain", "recomputed-blocks"],
)
def test_compiled_ddp_splits_at_the_buckets_and_matches_one_process(runs, name, extra, min_pieces):
    """The whole model compiled under DDP on 2 ranks with 1 MB buckets: Dynamo splits its graph
    at the buckets' boundaries (so each bucket's all-reduce overlaps the backward), and the run
    trains as one eager process. About 2.6 MB of DDP's weights: buckets of 1, 1 and the rest
    (DDP's default 25 MB gives 2: its first bucket is 1 MB whatever the cap). With every block
    recomputed, each block is a checkpoint region inside the graph, which the DDP optimizer
    keeps whole when it splits (2 pieces here), and recomputation changes no loss. (The split is
    Dynamo's: the recomputed run compiles with aot_eager, which traces alike and skips codegen.)"""
    one_dir, _ = runs.get("one-wide", 0, WIDE)
    ddp = ["--parallel.mode=ddp", "--train.compile=true", "--parallel.bucket_cap_mb=1", *extra]
    two_dir, out = runs.get(name, 2, WIDE + ddp, environ={"TORCH_LOGS": "ddp_graphs"})
    assert_losses_match(one_dir, two_dir)
    assert ("compile=aot_eager" if "aot_eager" in " ".join(extra) else "compile=True") in out.stdout
    pieces = set(re.findall(r"---(submod_\d+) graph---", out.stdout + out.stderr))
    assert len(pieces) >= min_pieces, out.stderr[-4000:]


def test_fsdp_memory_unit_with_accumulation_skips_and_recompute(runs):
    """All memory layers one FSDP unit, gathered again for the backward, with 2 micro-batches,
    layers read at one block and added after another, and recomputed blocks."""
    extra = ["--model.memory.insert=0:1/1:1", "--train.ac=full"]
    one_dir, _ = runs.get("one-skip", 0, extra + ["--train.grad_accum=2"])
    fsdp = ["--parallel.mode=fsdp", "--parallel.reshard_after_forward=always", "--train.grad_accum=2"]
    two_dir, _ = runs.get("fsdp-skip", 2, extra + fsdp)
    assert_losses_match(one_dir, two_dir)


@pytest.mark.parametrize("name, nproc, mode", [("one-ultramem_v2", 0, "none"), ("fsdp-ultramem_v2", 2, "fsdp")])
def test_resume_continues_bit_identically(runs, name, nproc, mode):
    full_dir, _ = runs.get(name, nproc, [f"--parallel.mode={mode}"])
    ckpt = full_dir / "checkpoints" / "step_00000002"
    resumed_dir, out = runs.get(f"{name}-resumed", nproc, [f"--parallel.mode={mode}", f"--run.resume={ckpt}"])
    assert f"resumed from {ckpt} at step 2" in out.stdout
    want, got = losses(full_dir), losses(resumed_dir)
    assert sorted(got) == [3, 4, 5]
    assert [got[s] for s in got] == [want[s] for s in got]  # exactly
    # the usage counters came back too: the step-4 memory metrics match the uninterrupted run's
    from launch import records

    mem_want = [r for r in records(full_dir, "memory") if r["step"] == 4]
    mem_got = [r for r in records(resumed_dir, "memory") if r["step"] == 4]
    assert mem_want and mem_got
    keys = [k for k in mem_want[0] if k.endswith("coverage") or k.endswith("kl_uniform")]
    assert keys and all(mem_got[0][k] == mem_want[0][k] for k in keys)


@pytest.mark.parametrize(
    "src, nproc, extra",
    [
        ("fsdp-ultramem_v2", 0, ["--parallel.mode=none"]),
        # every FSDP unit keeps its gathered weights for the backward: the reshard policy changes no loss
        ("one-ultramem_v2", 2, ["--parallel.mode=fsdp", "--parallel.reshard_after_forward=never"]),
    ],
    ids=["fsdp-to-one", "one-to-fsdp-never-resharded"],
)
def test_resume_with_another_world_size(runs, src, nproc, extra):
    src_nproc = 2 if src.startswith("fsdp") else 0
    full_dir, _ = runs.get(src, src_nproc, [f"--parallel.mode={'fsdp' if src_nproc else 'none'}"])
    ckpt = full_dir / "checkpoints" / "step_00000002"
    resumed_dir, _ = runs.get(f"{src}-to-{nproc}", nproc, [*extra, f"--run.resume={ckpt}"])
    assert_losses_match(full_dir, resumed_dir, first_step=3)


def test_automatic_resume_from_the_run_directory(runs):
    full_dir, _ = runs.get("one-ultramem_v2", 0, [])
    # the same run directory and a longer run: picks up at the last checkpoint (step 5)
    _, out = runs.get("one-ultramem_v2-longer", 0, [f"--run.dir={full_dir}", "--train.max_steps=7"])
    assert f"resumed from {full_dir / 'checkpoints' / 'step_00000005'} at step 5" in out.stdout
    got = losses(full_dir)
    assert sorted(got) == list(range(1, 8))
