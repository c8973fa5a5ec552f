"""Config loading: name resolution, unknown keys, types, overrides, size rules."""

from importlib.resources import files

import pytest

from ultramem.config import ConfigError
from ultramem.train.config import load_config, packaged_config_names, parse_overrides


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_packaged_names_resolve_with_and_without_suffix():
    assert {"227m.toml", "debug.toml", "dense-debug.toml"} <= set(packaged_config_names())
    a, b = load_config("227m"), load_config("227m.toml")
    assert a == b
    assert a.model.dim == 768 and a.model.memory.knn == 32 and a.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("name", packaged_config_names())
def test_packaged_configs_write_under_the_run_directory(name):
    """A fixed checkpoint or tensorboard path in a packaged config would ignore --run.dir: two
    runs of it would share checkpoints, and the second would resume the first."""
    c = load_config(name)
    assert c.checkpoint.dir == "" and c.metrics.tensorboard_dir == ""


def test_227m_matches_spec_section_8():
    c = load_config("227m")
    m, mem, o = c.model, c.model.memory, c.optim
    assert (m.dim, m.n_layers, m.n_heads, m.ffn_hidden, m.vocab_size, m.max_seq_len) == (768, 20, 12, 2496, 50304, 4096)
    assert m.tie_embeddings and abs(m.std - 0.0228) < 1e-4
    assert (mem.type, mem.insert, mem.knum, mem.kdim, mem.vdim, mem.pre_vdim, mem.knn, mem.heads) == (
        "ultramem_v2",
        "full",
        360,
        192,
        192,
        192,
        32,
        1,
    )
    assert (mem.share_ratio, mem.tucker_rank, mem.tucker_cores, mem.key_expand) == (0.5, 2, 2, 1)
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.value_lr_mult) == (4e-4, (0.9, 0.95), 0.1, 1.0, 4.0)
    assert c.train.dtype == "bfloat16" and c.train.seq_len == 4096
    assert c.train.batch_size * c.train.grad_accum == 768


def test_path_resolution(tmp_path):
    path = write(tmp_path, "[model]\nn_layers = 20\n[train]\nmax_steps = 700\n")
    assert load_config(path).train.max_steps == 700


def test_missing_file_names_it_and_lists_packaged():
    with pytest.raises(ConfigError) as e:
        load_config("no-such-config")
    msg = str(e.value)
    assert "no-such-config" in msg and "227m.toml" in msg and "debug.toml" in msg


def test_unknown_key_names_dotted_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[model.memory]\nknnn = 4\n"))
    assert "model.memory.knnn" in str(e.value) and "knn" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[optimm]\nlr = 1e-3\n"))
    assert "'optimm'" in str(e.value) and "optim" in str(e.value)


def test_wrong_type_names_key_expected_and_got(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[model]\ndim = "wide"\n'))
    msg = str(e.value)
    assert "model.dim" in msg and "int" in msg and "wide" in msg
    with pytest.raises(ConfigError, match=r"train\.compile.*bool.*int"):
        load_config(write(tmp_path, "[train]\ncompile = 1\n"))
    with pytest.raises(ConfigError, match=r"optim\.betas"):
        load_config(write(tmp_path, "[optim]\nbetas = [0.9]\n"))
    with pytest.raises(ConfigError, match=r"train\.compile_mode.*'graphs'.*reduce-overhead"):
        load_config("debug", ["--train.compile_mode=graphs"])
    assert load_config("debug", ["--train.compile=true", "--train.compile_mode=reduce-overhead"]).train.compile
    with pytest.raises(ConfigError, match=r"train\.compile_mode='reduce-overhead' needs train\.compile=true"):
        load_config("debug", ["--train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match=r"model\.memory.*table"):
        load_config(write(tmp_path, "[model]\nmemory = 3\n"))
    # ints widen to float fields; floats do not narrow to int fields
    assert load_config(write(tmp_path, "[optim]\nlr = 1\n"), validate=False).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"model\.dim"):
        load_config(write(tmp_path, "[model]\ndim = 64.0\n"))


def test_overrides_parse_with_field_types():
    cfg = load_config(
        "debug",
        [
            "--model.memory.knn=4",
            "--optim.lr",
            "1e-3",
            "--train.compile=true",
            "--optim.betas=[0.8, 0.9]",
            "--optim.value_weight_decay=0.0",
            "--data.source=somewhere/file.txt",
            "--model.init_std=none",
        ],
        validate=False,
    )
    assert cfg.model.memory.knn == 4 and isinstance(cfg.model.memory.knn, int)
    assert cfg.optim.lr == 1e-3 and cfg.train.compile is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.value_weight_decay == 0.0 and cfg.optim.table_weight_decay == 0.0
    assert cfg.data.source == "somewhere/file.txt" and cfg.model.init_std is None
    assert load_config("debug", ["--optim.betas=0.5,0.6"]).optim.betas == (0.5, 0.6)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model.memory.kn=4"], "model.memory.kn"),
        (["--model.dim=abc"], "model.dim"),
        (["--train.compile=maybe"], "train.compile"),
        (["--model=3"], "section"),
        (["--model.dim.x=3"], "not a section"),
        (["positional"], "positional"),
        (["--train.max_steps"], "no value"),
    ],
)
def test_bad_overrides(args, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("debug", args)
    assert fragment in str(e.value)


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c", "2"]) == [("a.b", "1"), ("c", "2")]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model.dim=130"], "divisible by model.n_heads"),
        (["--model.dim=120", "--model.n_heads=8"], "must be even"),
        (["--train.seq_len=256"], "train.seq_len=256 must be <= model.max_seq_len=128"),
        (["--data.vocab_size=5000"], "data.vocab_size=5000"),
        (["--model.vocab_size=1000"], "model.vocab_size=1000"),
        (["--train.batch_size=0"], "train.batch_size=0"),
        (["--optim.warmup_steps=1000"], "optim.warmup_steps=1000"),
        (["--train.dtype=float16"], "train.dtype='float16'"),
        (["--train.device=tpu"], "train.device='tpu'"),
        (
            ["--parallel.mode=fsdp", "--train.compile=true", "--train.compile_mode=reduce-overhead"],
            "FSDP's gathers and hooks do not run inside CUDA graphs",
        ),
        (["--train.ac=some"], "train.ac='some'"),
        (["--train.compile_backend=cudagraphs"], "train.compile_backend='cudagraphs'"),
        (
            ["--train.compile=true", "--train.compile_mode=reduce-overhead", "--train.compile_backend=aot_eager"],
            "train.compile_mode='reduce-overhead' with train.compile_backend='aot_eager': the modes are Inductor's",
        ),
        (["--parallel.bucket_cap_mb=0"], "parallel.bucket_cap_mb=0.0: must be a finite number > 0"),
        (["--parallel.bucket_cap_mb=inf"], "parallel.bucket_cap_mb=inf: must be a finite number > 0"),
        (
            ["--parallel.mode=ddp", "--train.compile=true", "--parallel.bucket_cap_mb=0.5"],
            "parallel.bucket_cap_mb=0.5 with parallel.mode='ddp' and train.compile=true: must be >= 1",
        ),
        (["--data.val_split=middle"], "data.val_split='middle': must be one of tail, spread"),
        (["--data.val_split=spread", "--data.val_chunk_tokens=100"], "data.val_chunk_tokens=100: with data.val_split"),
        (["--model.moe.num_experts=4", "--model.moe.top_k=9"], "model.moe.top_k=9"),
        (["--train.ac_every=0"], "train.ac_every=0"),
        (["--checkpoint.keep=-1"], "checkpoint.keep=-1"),
        (["--parallel.mode=tp"], "parallel.mode='tp'"),
        (["--checkpoint.interval=-1"], "checkpoint.interval=-1"),
        (["--optim.value_lr_decay_frac=2"], "optim.value_lr_decay_frac"),
        (["--optim.lr=inf"], "optim.lr=inf: must be > 0 and finite"),
        (["--optim.memory_plus_value_lr=-1"], "optim.memory_plus_value_lr=-1.0: must be >= 0 and finite"),
        (["--optim.weight_decay=inf"], "optim.weight_decay=inf"),
        (["--model.memory.type=ultramem_v3"], "model.memory.type"),
        (["--model.memory.insert=2:1"], "model.memory.insert"),
        (["--model.memory.insert=0:4"], "out of range"),
        # memory rules come from the layers' own validation, named by key
        (["--model.memory.knn=100"], "model.memory.knn"),
        (["--train.seed=-1"], "train.seed=-1: must be in [0, 2**63)"),
        ([f"--train.seed={2**63}"], f"train.seed={2**63}: must be in [0, 2**63)"),
        (["--model.rope_theta=0"], "model.rope_theta=0.0: must be a finite number > 0"),
        (["--model.norm_eps=inf"], "model.norm_eps=inf: must be a finite number > 0"),
        (["--model.init_std=nan"], "model.init_std=nan: must be a finite number > 0"),
    ],
)
def test_size_rules(args, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("debug", args)
    assert fragment in str(e.value)


def test_valid_packaged_configs_load():
    for name in packaged_config_names():
        load_config(name)


def test_missing_data_source_is_a_config_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(ConfigError, match=f"data.source='{missing}': no such file or directory"):
        load_config("debug.toml", [f"--data.source={missing}"])
    text = tmp_path / "book.txt"
    text.write_text("hello world " * 100)
    assert load_config("debug.toml", [f"--data.source={text}"]).data.source == str(text)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from ultramem.train.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", "debug.toml", f"--data.source={tmp_path / 'gone'}", "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "config error: data.source=" in err and "Traceback" not in err


def test_resume_flags_that_say_nothing_or_contradict_are_refused(tmp_path, capsys):
    """An empty --resume (an unset shell variable) is no fresh start; --resume with --no-resume is
    a contradiction; a UTF-16 config file is named as such. Refused before anything is made."""
    from ultramem.train.__main__ import main

    utf16 = tmp_path / "utf16.toml"
    utf16.write_text((files("ultramem.configs") / "debug.toml").read_text(), encoding="utf-16")
    for args, fragment in (
        (["--resume", ""], "--resume needs a checkpoint path, got an empty one"),
        (["--resume", str(tmp_path), "--no-resume"], f"--resume '{tmp_path}' and --no-resume: choose one"),
        (["--config", str(utf16)], f"config '{utf16}' is not UTF-8 text (invalid start byte at byte 0)"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--config", "debug.toml", f"--run.dir={tmp_path / 'run'}", *args, "--dry-run"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_output_directories_expand_a_home_tilde(monkeypatch, tmp_path):
    """`--run.dir=~/x` reaches the trainer unexpanded (the shell expands no `~` after `=`)."""
    from ultramem.train.trainer import output_dirs

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("debug", ["--run.dir=~/run", "--metrics.tensorboard=true", "--metrics.tensorboard_dir=~/tb"])
    assert output_dirs(cfg) == (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "tb")
    cfg = load_config("debug", ["--run.dir=~/run", "--checkpoint.dir=~/ckpt"])
    assert output_dirs(cfg)[1] == tmp_path / "ckpt"


def test_a_config_without_a_model_section_is_refused(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="has no \\[model\\] section"):
        load_config(str(empty))


def test_run_dir_defaults_to_the_config_name():
    from ultramem.train.config import default_run_dir

    assert default_run_dir("debug.toml") == "outputs/debug"
    assert default_run_dir("/some/where/exp1.toml") == "outputs/exp1"
    assert load_config("debug.toml", ["--run.dir=/tmp/x"]).run.dir == "/tmp/x"


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    from ultramem.train.__main__ import main
    from ultramem.train.config import config_help

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    rows = config_help()
    assert len(rows) > 60
    for key, _default, _ in rows:
        assert f"  {key} " in out, key
    undocumented = [key for key, _, meaning in rows if not meaning]
    assert not undocumented, undocumented


def test_val_split_defaults_to_the_tail_and_older_checkpoints_resume():
    from ultramem.train.checkpoint import config_mismatch, flatten_config

    cfg = load_config("debug.toml")
    assert (cfg.data.val_split, cfg.data.val_chunk_tokens) == ("tail", 65536)
    assert load_config("debug.toml", ["--data.val_split=spread"]).data.val_split == "spread"
    # a checkpoint made before the keys existed ran with the tail split
    older = {k: v for k, v in flatten_config(cfg).items() if k not in ("data.val_split", "data.val_chunk_tokens")}
    assert "data.val_split" not in older and config_mismatch(older, cfg) is None
    spread = load_config("debug.toml", ["--data.val_split=spread"])
    assert "data.val_split: the checkpoint was made with 'tail'" in config_mismatch(older, spread)


def test_where_table_gradients_stage_may_change_on_resume():
    from ultramem.train.checkpoint import config_mismatch, flatten_config

    cfg = load_config("debug.toml")
    # a checkpoint made before train.table_grad_staging existed, and one made with it on
    older = {k: v for k, v in flatten_config(cfg).items() if k != "train.table_grad_staging"}
    assert config_mismatch(older, cfg) is None
    on = flatten_config(load_config("debug.toml", ["--train.table_grad_staging=true"]))
    assert config_mismatch(on, load_config("debug.toml", ["--train.table_grad_staging=false"])) is None


def test_checkpoints_of_the_per_micro_batch_draw_resume_with_it():
    from ultramem.train.checkpoint import config_mismatch, flatten_config

    # made before data.window_draw: each micro-batch drew its own windows
    def older(accum):
        saved = flatten_config(load_config("debug.toml", [f"--train.grad_accum={accum}"]))
        return {k: v for k, v in saved.items() if k != "data.window_draw"}

    now = load_config("debug.toml", ["--train.grad_accum=2"])
    assert now.data.window_draw == "step"
    # with several micro-batches a step the draws differ: the per-step one would repeat windows
    assert "data.window_draw: the checkpoint was made with 'micro_batch', this run has 'step'" in (
        config_mismatch(older(2), now)
    )
    assert config_mismatch(older(2), load_config("debug.toml", ["--data.window_draw=micro_batch"])) is None
    # with one micro-batch a step both drew the same windows, and neither draws them again
    assert config_mismatch(older(1), now) is None


def test_the_memory_metrics_interval_may_change_on_resume():
    from ultramem.train.checkpoint import config_mismatch, flatten_config

    saved = flatten_config(load_config("debug.toml", ["--model.memory.log_interval=2"]))
    assert config_mismatch(saved, load_config("debug.toml", ["--model.memory.log_interval=50"])) is None
    assert "model.memory.knn" in config_mismatch(saved, load_config("debug.toml", ["--model.memory.knn=4"]))


def test_a_shard_directory_brings_its_own_vocabulary(tmp_path):
    """data.vocab_size sizes a tokenizer trained here; shards were tokenized already (their
    tokenizer is checked against model.vocab_size when they load)."""
    (tmp_path / "shards").mkdir()
    small_model = ["--model.vocab_size=1024"]
    assert load_config("debug.toml", [*small_model, f"--data.source={tmp_path / 'shards'}"]).model.vocab_size == 1024
    with pytest.raises(ConfigError, match=r"data.vocab_size=4096 \(tokenizer\) must be <= model.vocab_size=1024"):
        load_config("debug.toml", small_model)  # the embedded corpus: a tokenizer trained here
