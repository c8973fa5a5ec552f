"""The training loop: in-process mechanics on a tiny model, and a real debug run under torchrun."""

import copy
import json
import pickle
import re

import numpy as np
import pytest
import torch
from launch import env, records, run, timeout_for, train_cmd
from tiny import TINY_MODEL
from torch._dynamo.utils import counters

from ultramem.data import TokenWindows
from ultramem.layers import tucker
from ultramem.model import build_model
from ultramem.train.config import load_config
from ultramem.train.optim import build_optimizer
from ultramem.train.parallelize import COMPILE_REGIONS, apply_compile
from ultramem.train.trainer import DistInfo, Trainer, build_training_model, parallelize

TINY = [
    *TINY_MODEL,
    "--train.batch_size=2",
    "--optim.warmup_steps=2",
]


def tiny_trainer(extra=(), tensorboard_dir=""):
    cfg = load_config("debug", TINY + list(extra) + [f"--metrics.tensorboard_dir={tensorboard_dir}"])
    model = build_model(cfg.model, seed=cfg.train.seed)
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    batches = TokenWindows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    return Trainer(cfg, model, opt, sched, batches, torch.device("cpu"), DistInfo(), val_batches=batches)


def test_loop_refreshes_rank1_reports_metrics_and_accumulates(tmp_path, monkeypatch):
    trainer = tiny_trainer(
        [
            "--train.max_steps=4",
            "--train.grad_accum=2",
            "--model.memory.log_interval=2",
            "--train.eval_interval=2",
            "--train.eval_batches=1",
        ],
        str(tmp_path / "tb"),
    )
    refreshes, seen = [], []
    orig_refresh = tucker.refresh_rank1_all
    monkeypatch.setattr(
        tucker,
        "refresh_rank1_all",
        lambda layers: (refreshes.append((trainer.scheduler.last_epoch, len(layers))), orig_refresh(layers))[1],
    )
    orig_batch = trainer.train_batches.batch
    monkeypatch.setattr(trainer.train_batches, "batch", lambda i: (seen.append(i), orig_batch(i))[1])
    history = trainer.train()
    # once before the first forward, then after each of the 4 optimizer (and scheduler) steps, both layers
    assert refreshes == [(0, 2), (1, 2), (2, 2), (3, 2), (4, 2)]
    assert [r.step for r in history] == [1, 2, 3, 4]
    # grad_accum=2: micro-batches 2s and 2s+1 at step s (evaluation reads batches 0 again)
    assert [i for i in seen][:4] == [0, 1, 2, 3]
    assert all(np.isfinite(r.loss) and r.grad_norm > 0 for r in history)
    assert "mem0/coverage" in history[1].extra and "mem1/coverage" in history[3].extra
    assert not history[0].extra and not history[2].extra
    # debug.toml: value lr ×4 → ×1 over half the run (2 of 4 steps); record s used update s-1's lr
    assert [r.value_lr_mult for r in history] == pytest.approx([4.0, 2.5, 1.0, 1.0])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_grad_clip_bounds_the_update_norm():
    trainer = tiny_trainer(["--train.max_steps=1", "--optim.warmup_steps=0", "--optim.grad_clip=1e-3"])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    grads = {}
    hook = trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.update(
            norm=torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for g in opt.param_groups for p in g["params"]])
            )
        )
    )
    record = trainer.train()[0]
    hook.remove()
    assert record.grad_norm > 1e-3  # the norm before clipping is logged
    assert grads["norm"].item() == pytest.approx(1e-3, rel=1e-3)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("copy", [True, False])
def test_bf16_run_gathers_from_a_table_copy_refreshed_each_step(copy):
    cfg = load_config(
        "debug",
        TINY
        + [
            "--train.max_steps=3",
            "--train.dtype=bfloat16",
            "--metrics.tensorboard_dir=",
            f"--train.bf16_table_copy={str(copy).lower()}",
        ],
    )
    model = build_training_model(cfg, torch.device("cpu"))
    tables = model.memory_tables
    assert (tables.values_compute is not None) == copy
    start = tables.values.detach().clone()
    opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    batches = TokenWindows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    history = Trainer(cfg, model, opt, sched, batches, torch.device("cpu"), DistInfo()).train()
    assert len(history) == 3 and all(np.isfinite(r.loss) for r in history)
    assert not torch.equal(tables.values, start)  # the tables learned ...
    if copy:  # ... and the copy the layers read followed them
        assert tables.values_compute.dtype == torch.bfloat16
        torch.testing.assert_close(tables.values_compute, tables.values.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(tables.pre_values_compute, tables.pre_values.to(torch.bfloat16), rtol=0, atol=0)


def test_cuda_graph_mode_keeps_its_own_grads_and_matches_the_plain_compile():
    # With CUDA graphs a .grad must not alias a graph output (the next replay overwrites it):
    # grads are allocated up front and zeroed in place. On CPU the graphs themselves are skipped,
    # so both runs must agree exactly.
    extra = ["--train.max_steps=2", "--train.grad_accum=2", "--train.compile=true", "--optim.warmup_steps=1"]
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        trainer = tiny_trainer(extra + [f"--train.compile_mode={mode}"])
        parallelize(trainer.model, trainer.cfg, DistInfo(), torch.device("cpu"))
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        if mode == "reduce-overhead":
            assert all(g is not None and not g.any() for g in grads.values())
        losses[mode] = [r.loss for r in trainer.train()]
        # without FSDP the whole model is one compiled region (each region entered costs host
        # time): one graph in training and one in evaluation (no grad)
        modules = [*trainer.model.blocks, *trainer.model.memory_layers]
        assert all(m._compiled_call_impl is None for m in modules)
        assert trainer.model._compiled_call_impl is not None
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
        if mode == "reduce-overhead":  # the same tensors, zeroed in place after the last step
            for n, p in trainer.model.named_parameters():
                assert p.grad is grads[n] and not p.grad.any(), n
    torch._dynamo.reset()
    assert losses["default"] == losses["reduce-overhead"]


@pytest.mark.parametrize("regions", COMPILE_REGIONS)
def test_apply_compile_adds_inductor_options_to_the_mode(monkeypatch, regions):
    # torch.compile refuses a mode together with options: the mode's own options are merged in
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (seen.append(kwargs), fn)[1])
    model = build_model(load_config("debug", TINY).model)
    apply_compile(model, "reduce-overhead", regions, options={"epilogue_fusion": False})
    apply_compile(model, "reduce-overhead", regions)
    apply_compile(model, "default", regions, backend="aot_eager")  # (another backend takes no options)
    # the whole model, or each block and memory layer
    modules = [*model.blocks, *model.memory_layers]
    compiled = [m for m in [model, *modules] if m._compiled_call_impl is not None]
    assert compiled == ([model] if regions == "model" else modules)
    merged = {**torch._inductor.list_mode_options("reduce-overhead"), "epilogue_fusion": False}
    want = [{"options": merged}, {"mode": "reduce-overhead"}, {"backend": "aot_eager"}]
    assert seen == [kwargs for kwargs in want for _ in compiled]
    with pytest.raises(ValueError, match="regions='block'"):
        apply_compile(model, "default", "block")


def test_a_copy_of_a_compiled_model_is_its_own():
    # the compiled callable is bound to the original model: a copy (EMA, eval) or a pickle
    # comes back uncompiled instead of running the original's weights
    model = build_model(load_config("debug", TINY).model)
    apply_compile(model, "default", "model")
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin._compiled_call_impl is None and model._compiled_call_impl is not None


def test_a_copy_of_a_training_model_keeps_its_gradients_to_itself():
    # the tables' gradient buffers are registered by id with the ops: a copy comes back without
    # them (autograd's own gradients), so its backward leaves the original's buffers untouched
    cfg = load_config("debug", TINY)
    model = build_training_model(cfg, torch.device("cpu"))
    tables = model.memory_tables
    assert tables.values_grad_id != -1 and tables.grad_staging is not None
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        t = twin.memory_tables
        assert (t.values_grad_id, t.pre_values_grad_id, t.values_grad, t.grad_staging) == (-1, -1, None, None)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        loss, _ = twin(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert t.values.grad is not None and t.values.grad.abs().sum() > 0
        assert not tables.values_grad.any() and not tables.pre_values_grad.any()
        assert tables.grad_staging.staged_tokens() == 0


@pytest.mark.parametrize(
    ("mode", "regions", "backend"),
    [("none", "model", "inductor"), ("ddp", "model", "aot_eager"), ("fsdp", "module", "eager")],
)
def test_parallelize_compiles_the_regions_of_its_mode(monkeypatch, mode, regions, backend):
    """The whole model unless FSDP's hooks run between the modules (DDP on 2 ranks included),
    with the configured backend."""
    from ultramem.train import parallelize as par

    seen = []
    monkeypatch.setattr(par, "apply_compile", lambda model, mode, regions, backend: seen.append((regions, backend)))
    monkeypatch.setattr(par, "apply_fsdp", lambda *args: None)
    monkeypatch.setattr(par, "apply_ddp", lambda model, *args: model)
    overrides = ["--train.compile=true", f"--parallel.mode={mode}", f"--train.compile_backend={backend}"]
    cfg = load_config("debug", TINY + overrides)
    model = build_training_model(cfg, torch.device("cpu"))
    parallelize(model, cfg, DistInfo(world_size=2), torch.device("cpu"))
    assert seen == [(regions, backend)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_compile_stages_table_gradients_equal_to_unstaged():
    # Without CUDA graphs the trainer stages too: the tables' gradients at the optimizer step
    # (after the flush) equal those added at once by the atomics, and so do the losses
    cuda = torch.device("cuda")
    grads, losses, staged = {}, {}, []
    for flush in (2, 0):
        torch._dynamo.reset()
        extra = ["--train.max_steps=2", "--train.grad_accum=4", "--train.compile=true", "--optim.warmup_steps=1"]
        cfg = load_config("debug", TINY + extra + [f"--train.table_grad_flush={flush}", "--train.device=cuda"])
        model = build_training_model(cfg, cuda)
        assert (model.memory_tables.grad_staging is not None) == (flush > 0)
        opt, sched = build_optimizer(model, cfg.optim, cfg.train.max_steps)
        tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
        batches = TokenWindows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
        trainer = Trainer(cfg, model, opt, sched, batches, cuda, DistInfo(), val_batches=batches)
        parallelize(trainer.model, trainer.cfg, DistInfo(), cuda)
        tables = model.memory_tables
        if flush:  # the backwards did stage (a staging area that refused them would add at once)
            flush_staging = tables.flush_grad_staging
            tables.flush_grad_staging = lambda wait=True, f=flush_staging: (
                staged.append(tables.grad_staging.staged_tokens()),
                f(wait=wait),
            )[1]
        seen = grads.setdefault(flush, [])
        opt.register_step_pre_hook(
            lambda *_: seen.append([tables.values.grad.clone().cpu(), tables.pre_values.grad.clone().cpu()])
        )
        losses[flush] = [r.loss for r in trainer.train()]
    torch._dynamo.reset()
    assert staged and all(n > 0 for n in staged), staged
    assert len(grads[2]) == 2 and all(g.abs().sum() > 0 for step in grads[2] for g in step)
    for staged_step, direct_step in zip(grads[2], grads[0]):
        for a, b in zip(staged_step, direct_step):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(timeout_for(100) + 300)
def test_debug_run_under_torchrun_loss_falls(tmp_path):
    """100 steps of debug.toml (UltraMemV2 on the embedded stdlib corpus) in one torchrun process,
    with the run directory the README promises."""
    cmd = train_cmd(["--config", "debug.toml", f"--metrics.tensorboard_dir={tmp_path / 'tb'}"], nproc=1)
    # + a BPE trained on the corpus
    # one thread (env's default): beside another busy worker, two OpenMP threads on two cores
    # made this run several times slower
    out = run(cmd, timeout_for(100) + 120, tmp_path, env(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "debug"
    assert "run directory outputs/debug" in out.stdout
    assert (run_dir / "config.json").is_file() and (run_dir / "train.log").is_file()
    assert [r["step"] for r in records(run_dir, "val")] == [100]
    assert (run_dir / "checkpoints" / "step_00000100" / ".metadata").is_file()
    assert re.search(
        r"done: step 100/100 in .*, loss [0-9.]+, val loss [0-9.]+, [0-9]+ tok/s over the run, "
        r"[0-9]+ tok/s a step \(median after the first\)",
        out.stdout,
    )
    losses = [float(x) for x in re.findall(r"step +\d+ \| loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 100, out.stdout[-2000:]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 1.5, (first, last)
    assert "memory metrics" in out.stdout and "value lr x4.000" in out.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_threads_split_the_cores_between_the_ranks_of_a_node(monkeypatch):
    import os

    from ultramem.train.distributed import set_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(DistInfo(local_world_size=2)) == 4
        # torchrun's own OMP_NUM_THREADS=1, set when it starts several ranks, is a default ...
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_cpu_threads(DistInfo(local_world_size=4)) == 2
        # ... with one rank torchrun sets nothing, so 1 is the user's ...
        assert set_cpu_threads(DistInfo(local_world_size=1)) == 1
        assert torch.get_num_threads() == 1
        # ... and a user's value wins, under torchrun or not
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_cpu_threads(DistInfo(local_world_size=4)) == 3
        monkeypatch.delenv("TORCHELASTIC_RUN_ID")
        assert set_cpu_threads(DistInfo(local_world_size=1)) == 3
        # a value that is no thread count leaves OpenMP's own reading of it
        for value in ("4,2", "0"):
            monkeypatch.setenv("OMP_NUM_THREADS", value)
            assert set_cpu_threads(DistInfo(local_world_size=1)) == torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_signal_after_the_steps_all_reduce_stops_at_the_next_step(tmp_path):
    # Every rank must stop after the same step, so a rank acts on the stop requests the step's
    # all-reduce agreed on: a signal landing after it (here: during the optimizer step) is counted
    # in the next step's, as it would be on the other ranks; acting on it at once left one rank
    # saving its checkpoint while the others trained on, both waiting on collectives forever.
    import signal

    trainer = tiny_trainer(["--train.max_steps=20", f"--checkpoint.dir={tmp_path / 'ckpt'}"])
    real_step = trainer.optimizer.step
    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            trainer._stop._handle(signal.SIGINT, None)
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step_then_signal
    history = trainer.train()
    assert [r.step for r in history][-1] == 4 and trainer.step == 4
    assert (tmp_path / "ckpt" / "step_00000004").is_dir()


def test_a_resumed_run_with_more_steps_follows_the_new_schedule(tmp_path):
    """max_steps may change on resume: the first step after it already takes the new schedule's
    learning rate (the optimizer's stored rates were the old schedule's)."""
    ckpt = f"--checkpoint.dir={tmp_path / 'ckpt'}"
    first = tiny_trainer(["--train.max_steps=3", ckpt])
    first.train()
    resumed = tiny_trainer(["--train.max_steps=8", ckpt])
    resumed.prepare()
    assert resumed.step == 3
    fresh = tiny_trainer(["--train.max_steps=8"])
    for _ in range(3):
        fresh.optimizer.step()  # no gradients: no update; the scheduler wants it first
        fresh.scheduler.step()
    want = [g["lr"] for g in fresh.optimizer.param_groups]
    assert want != [g["lr"] for g in first.optimizer.param_groups]
    assert [g["lr"] for g in resumed.optimizer.param_groups] == want
    assert resumed.scheduler.get_last_lr() == want


def test_a_run_starting_before_the_latest_checkpoint_removes_the_later_ones_at_its_first_save(tmp_path, caplog):
    """--no-resume in a directory with checkpoints, or a resume from an earlier checkpoint: the
    later checkpoints are another run's; left there, the next resume (or eval, or export) would
    pick them over the new run's."""
    ckpt = tmp_path / "ckpt"
    args = [f"--checkpoint.dir={ckpt}", "--checkpoint.interval=2", "--checkpoint.keep=0"]

    def steps():
        return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_"))

    tiny_trainer(["--train.max_steps=4", *args]).train()
    assert steps() == ["step_00000002", "step_00000004"]
    # resumed from step 2: step 4 goes at this run's first save, step 2 (its own past) stays
    branch = tiny_trainer(["--train.max_steps=3", *args, f"--run.resume={ckpt / 'step_00000002'}"])
    with caplog.at_level("WARNING"):
        branch.prepare()
    assert "1 checkpoint(s)" in caplog.text and "step_00000004" in caplog.text
    assert steps() == ["step_00000002", "step_00000004"]  # nothing removed before a save
    branch.train()
    assert steps() == ["step_00000002", "step_00000003"]
    # afresh (--no-resume): all of them go at the first save
    tiny_trainer(["--train.max_steps=2", *args, "--checkpoint.interval=1", "--run.resume="]).train()
    assert steps() == ["step_00000001", "step_00000002"]


def test_a_refused_resume_leaves_the_run_directory_as_it_was(tmp_path):
    from ultramem.config import ConfigError

    run = [f"--run.dir={tmp_path / 'run'}", f"--checkpoint.dir={tmp_path / 'run' / 'checkpoints'}"]
    tiny_trainer(["--train.max_steps=2", *run]).train()
    before = (tmp_path / "run" / "config.json").read_text()
    assert '"train.max_steps": 2' in before
    other = tiny_trainer(["--train.max_steps=3", "--model.memory.knn=3", *run])
    with pytest.raises(ConfigError, match="model.memory.knn"):
        other.prepare()
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_unreadable_checkpoints_and_exports_are_one_error_naming_the_file(tmp_path):
    from ultramem.train.checkpoint import CheckpointError
    from ultramem.train.export import checkpoint_config, export, load_exported

    ckpt = tmp_path / "ckpt"
    tiny_trainer(["--train.max_steps=2", f"--checkpoint.dir={ckpt}"]).train()
    step = ckpt / "step_00000002"
    model_file = export(step, tmp_path / "model.safetensors")
    load_exported(model_file)  # whole, it loads

    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    truncate(model_file)
    with pytest.raises(CheckpointError, match=r"exported model '.*model.safetensors' could not be read"):
        load_exported(model_file)
    with pytest.raises(ValueError, match="is a directory: a training checkpoint loads with load_checkpoint_model"):
        load_exported(step)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"suffix picks the format.*got '.txt'"):
        load_exported(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="is a directory; give the file to write"):
        export(step, tmp_path)
    with pytest.raises(ValueError, match=r"got '.onnx'"):
        export(step, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()

    shard = next(step.glob("*.distcp"))
    truncate(shard)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*step_00000002' could not be read"):
        tiny_trainer(["--train.max_steps=3", f"--checkpoint.dir={ckpt}"]).prepare()
    truncate(step / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json' could not be read \(JSONDecodeError"):
        checkpoint_config(step)


def test_data_that_breaks_a_data_rule_is_a_config_error(tmp_path):
    """The data loader's own refusals name their data.* key: the command prints them as one line."""
    from launch import token_shards

    from ultramem.config import ConfigError
    from ultramem.train.trainer import build_data

    (tmp_path / "val.txt").write_text("some text\n")
    cfg = load_config(
        "debug",
        [*TINY, f"--data.source={token_shards(tmp_path / 'shards')}", f"--data.val_source={tmp_path / 'val.txt'}"],
    )
    with pytest.raises(ConfigError, match="is a text file, but data.source .* has no tokenizer.json"):
        build_data(cfg, DistInfo())


def test_the_training_windows_follow_the_configs_draw(tmp_path):
    from launch import token_shards

    from ultramem.train.trainer import build_data

    data = token_shards(tmp_path / "shards")
    for draw, accum in (("step", 3), ("micro_batch", 1)):
        cfg = load_config(
            "debug", [*TINY, f"--data.source={data}", "--train.grad_accum=3", f"--data.window_draw={draw}"]
        )
        train, _, _ = build_data(cfg, DistInfo(rank=1, world_size=2))
        assert (train.grad_accum, train.rank, train.world_size) == (accum, 1, 2)


def test_table_gradients_go_as_tensors_by_default_only_where_a_gpu_ran_them():
    # (the layers then hand them over on CUDA tables; CPU tables keep ids whatever None says)
    from ultramem.train.trainer import build_training_model

    def as_inputs(*args, world_size=1):
        cfg = load_config("debug", [*TINY, *args])
        return build_training_model(cfg, torch.device("cpu"), world_size).memory_tables.grads_as_inputs

    assert as_inputs() is None
    assert as_inputs("--parallel.mode=fsdp") is None  # FSDP2 in one process
    assert as_inputs("--parallel.mode=fsdp", world_size=2) is False
    assert as_inputs("--train.table_grads_as_inputs=true", "--parallel.mode=fsdp", world_size=2) is True
    assert as_inputs(world_size=2) is False  # DDP
    assert as_inputs("--train.table_grads_as_inputs=true", world_size=2) is True


def test_each_run_in_one_process_logs_only_to_its_own_train_log(tmp_path, caplog, monkeypatch):
    """run_training called twice (a notebook, a sweep): the second run's lines stay out of the
    first run's train.log, and a run refused after its log was opened leaves no handler behind."""
    import logging

    from launch import token_shards

    from ultramem.config import ConfigError
    from ultramem.train.trainer import run_training

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    data = token_shards(tmp_path / "data")
    short = tmp_path / "short.txt"
    short.write_text("a few words\n")
    base = TINY + [
        "--train.max_steps=1",
        "--optim.warmup_steps=0",
        "--train.eval_interval=0",
        "--metrics.tensorboard=false",
    ]
    with caplog.at_level("INFO"):
        for name in ("a", "b"):
            run_training(load_config("debug", [*base, f"--data.source={data}", f"--run.dir={tmp_path / name}"]))
        with pytest.raises(ConfigError, match="too short"):
            run_training(load_config("debug", [*base, f"--data.source={short}", f"--run.dir={tmp_path / 'c'}"]))
    first, second = (tmp_path / "a" / "train.log").read_text(), (tmp_path / "b" / "train.log").read_text()
    assert f"run directory {tmp_path / 'a'}" in first and f"run directory {tmp_path / 'b'}" in second
    assert str(tmp_path / "b") not in first and str(tmp_path / "c") not in first + second
    assert f"run directory {tmp_path / 'c'}" in (tmp_path / "c" / "train.log").read_text()
    left = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    assert not [h for h in left if h.baseFilename.startswith(str(tmp_path))], left


def test_a_second_run_in_a_run_directory_in_use_is_refused(tmp_path, monkeypatch):
    """While a run holds its directory, a second run there is refused before it writes anything,
    naming the directory and the holder; once the first is closed the directory is free again.
    A process that dies holding the lock frees it too (the OS drops the lock)."""
    import os
    import subprocess
    import sys

    from launch import token_shards

    from ultramem.config import ConfigError
    from ultramem.train.trainer import RunDirLock, build_trainer

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"--data.source={token_shards(tmp_path / 'data')}", f"--run.dir={run_dir}"]
    cfg = load_config("debug", [*overrides, "--metrics.tensorboard=false"])
    first = build_trainer(cfg, DistInfo())
    try:
        log_before = (run_dir / "train.log").read_text()
        refusal = (
            rf"run.dir='{re.escape(str(run_dir))}': another run .*process {os.getpid()} on .*this one\): close\(\)"
        )
        with pytest.raises(ConfigError, match=refusal):
            build_trainer(load_config("debug", overrides), DistInfo())  # (this one would make tb/)
        assert (run_dir / "train.log").read_text() == log_before and not (run_dir / "tb").exists()
    finally:
        first.close()
    build_trainer(cfg, DistInfo()).close()

    hold = (
        "import sys\nfrom pathlib import Path\nfrom ultramem.train.trainer import RunDirLock\n"
        f"lock = RunDirLock(Path({str(run_dir)!r}))\nassert lock.acquire() is None\n"
        "print('held', flush=True)\nsys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = RunDirLock(run_dir).acquire()
        assert f"process {holder.pid} on" in refused and "wait for it to end" in refused
    finally:
        holder.kill()
        holder.wait(timeout=60)
    lock = RunDirLock(run_dir)
    assert lock.acquire() is None
    lock.release()
    missing = RunDirLock(tmp_path / "missing").acquire()
    assert "missing'" in missing and "cannot open the lock file .lock: No such file or directory" in missing


def test_a_token_cache_inside_the_run_directory_is_built_while_the_run_holds_it(tmp_path):
    """data.cache_dir set to run.dir: building the token cache takes a lock of its own there, not
    the run's (which this very process holds), so the build goes on instead of waiting forever."""
    import threading

    from ultramem.train.trainer import build_trainer

    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"paragraph {i} says hello world again" for i in range(300)))
    run_dir = tmp_path / "run"
    cfg = load_config(
        "debug",
        [*TINY, f"--data.source={text}", f"--run.dir={run_dir}", f"--data.cache_dir={run_dir}"]
        + ["--metrics.tensorboard=false"],
    )
    built = []
    thread = threading.Thread(target=lambda: built.append(build_trainer(cfg, DistInfo())), daemon=True)
    thread.start()
    thread.join(timeout=timeout_for(0))  # (a tokenizer trained on 10 kB and a tiny model: seconds)
    assert not thread.is_alive(), "building the trainer still waits (on a lock in run.dir?)"
    built[0].close()
    assert (run_dir / ".lock").exists() and any(p.name.startswith("text-") for p in run_dir.iterdir())


def test_a_checkpoint_directory_outside_the_run_directory_is_held_too(tmp_path, monkeypatch):
    """Two runs in different run directories sharing one checkpoint.dir would rotate each other's
    checkpoints away: the second is refused, naming checkpoint.dir. A file name of the run
    directory taken by a directory, or a config.json there that is not a run's, is refused before
    the run starts."""
    from launch import token_shards

    from ultramem.config import ConfigError
    from ultramem.train.checkpoint import flatten_config
    from ultramem.train.trainer import build_trainer

    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "cache"))
    shared = tmp_path / "ckpts"
    common = [*TINY, f"--data.source={token_shards(tmp_path / 'data')}", "--metrics.tensorboard=false"]
    first = build_trainer(
        load_config("debug", [*common, f"--run.dir={tmp_path / 'a'}", f"--checkpoint.dir={shared}"]), DistInfo()
    )
    try:
        second = load_config("debug", [*common, f"--run.dir={tmp_path / 'b'}", f"--checkpoint.dir={shared}"])
        with pytest.raises(
            ConfigError, match=rf"checkpoint.dir='{re.escape(str(shared))}': another run .*another checkpoint.dir"
        ):
            build_trainer(second, DistInfo())
        # the refused run let go of its own run directory
        build_trainer(load_config("debug", [*common, f"--run.dir={tmp_path / 'b'}"]), DistInfo()).close()
    finally:
        first.close()
    build_trainer(second, DistInfo()).close()
    (tmp_path / "c" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(ConfigError, match="metrics.jsonl is a directory; the run writes a file there"):
        build_trainer(load_config("debug", [*common, f"--run.dir={tmp_path / 'c'}"]), DistInfo())
    # a directory holding another program's config.json (a model's, say) is not taken over
    for i, text in enumerate(['{"hidden_size": 768, "model_type": "llama"}', "not json"]):
        foreign = tmp_path / f"foreign{i}" / "config.json"
        foreign.parent.mkdir()
        foreign.write_text(text)
        with pytest.raises(ConfigError, match=r"config.json is not a training run's config.*another run.dir"):
            build_trainer(load_config("debug", [*common, f"--run.dir={foreign.parent}"]), DistInfo())
        assert foreign.read_text() == text
    # an earlier run's config.json is the run's to replace
    earlier = load_config("debug", [*common, f"--run.dir={tmp_path / 'd'}"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(flatten_config(earlier)))
    build_trainer(earlier, DistInfo()).close()
