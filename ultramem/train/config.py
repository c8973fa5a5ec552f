"""The training configuration: one dataclass tree loaded from TOML, validated once.

Sections: `[model]` (+ `[model.memory]`) are `ultramem.config.ModelConfig` / `MemoryConfig`;
`[data]`, `[optim]`, `[train]`, `[parallel]`, `[checkpoint]`, `[metrics]`, `[run]` are defined here.
The comment after each field is its help text (`python -m ultramem.train --help` lists them).
Command-line overrides `--section.key=value` (also nested: `--model.memory.knn=16`) are parsed
with the type of the field they set. Every error is a `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultramem.config import MEMORY_INITS, MEMORY_TYPES, ConfigError, ModelConfig, validate_heads, validate_moe

PARALLEL_MODES = ("none", "ddp", "fsdp")
RESHARD_POLICIES = ("default", "always", "never")
AC_MODES = ("none", "full", "selective")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
VAL_SPLITS = ("tail", "spread")  # as ultramem.data.VAL_SPLITS (a test keeps them equal)
WINDOW_DRAWS = ("step", "micro_batch")


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (embedded corpus) or a path: shard directory or text file
    vocab_size: int = 4096  # BPE vocabulary to train; must fit in model.vocab_size
    max_corpus_bytes: int = 4_000_000  # cap on text read from the corpus (stdlib or text file)
    val_fraction: float = 0.05  # share of the token stream held out for validation (as data.val_split takes it)
    # a stream in sorted path order ends with its last packages: the tail is text the model never
    # trains on (out of distribution), spread chunks are text of every part (in distribution)
    val_split: str = "tail"  # "tail": the end of the stream; "spread": evenly spaced chunks across it
    val_chunk_tokens: int = 65_536  # with val_split="spread": about this many tokens per chunk (1 to 2×)
    cache_dir: str = ""  # "" → $ULTRAMEM_CACHE or ~/.cache/ultramem
    val_source: str = ""  # validation data apart from source (shard directory or text file); "" → split of source
    # "step": a step's windows are drawn at once for all its micro-batches and ranks, so any split
    # of the same global batch draws the same; "micro_batch": each on its own (runs made before)
    window_draw: str = "step"


@dataclass
class OptimConfig:
    lr: float = 4e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW weight decay of matrices (norm scales and biases get none)
    warmup_steps: int = 100  # linear warmup steps, then cosine decay to max_steps
    min_lr_frac: float = 0.1  # warmup starts and cosine ends at this fraction of the peak
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    value_lr_mult: float = 1.0  # the tables' lr multiplier at step 0, decaying linearly to 1
    value_lr_decay_frac: float = 1.0  # fraction of max_steps over which the multiplier decays
    value_weight_decay: float | None = None  # None: same as weight_decay
    memory_plus_value_lr: float = 1e-3  # Memory+ tables take this constant lr, no schedule
    fused: bool | None = None  # None: fused AdamW on CUDA, foreach elsewhere

    @property
    def table_weight_decay(self) -> float:
        return self.weight_decay if self.value_weight_decay is None else self.value_weight_decay


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps of the whole run
    batch_size: int = 8  # micro-batch per rank
    seq_len: int = 256  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step (gradients reduced once, on the last)
    seed: int = 0  # model init and data order
    dtype: str = "float32"  # "bfloat16" → autocast; parameters stay fp32
    compile: bool = False  # torch.compile (the regions: parallelize.compile_regions)
    # "reduce-overhead" replays the compiled model as CUDA graphs (a memory layer launches many
    # small kernels: without graphs the host sets the pace)
    compile_mode: str = "default"  # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), ...
    # "aot_eager" and "eager" trace as Inductor would (graphs, graph breaks, DDP's split) but run
    # the traced ops as they are: to tell a compiler problem from a model one, and compile fast
    compile_backend: str = "inductor"  # torch.compile backend: "inductor", "aot_eager" or "eager"
    # half the bytes per gather; the fp32 tables stay the master copy
    bf16_table_copy: bool = True  # bfloat16 runs: memory layers gather from a bf16 copy of the tables
    # fewer read-modify-writes of the fp32 gradient rows (docs/table-gradients.md); about 1.3 kB per
    # token, layer and micro-batch staged.
    table_grad_flush: int = 4  # UltraMemV2: stage table gradients, add them every this many micro-batches; 0: at once
    # none: stage where measured faster (CPU; CUDA when compiled, without FSDP); true: wherever
    # the layers can (UltraMemV2, table_grad_flush > 0); false: never
    table_grad_staging: bool | None = None
    # hand the table gradients' buffers to the layers' lookups as tensors, so that a compiled
    # backward launches its kernels itself (docs/table-gradients.md); off: by registered id;
    # none: on CUDA in one process without FSDP, off elsewhere
    table_grads_as_inputs: bool | None = None
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    log_interval: int = 1  # steps between log lines
    eval_interval: int = 100  # validation every this many steps and at the end; 0: never
    eval_batches: int = 4  # validation batches per evaluation (per rank)
    ac: str = "none"  # activation checkpointing: "none", "full" (every block) or "selective"
    ac_every: int = 2  # with ac="selective": recompute every this-many-th block (0, n, 2n, ...)


@dataclass
class ParallelConfig:
    # "ddp", "fsdp" (FSDP2) or "none" (one process only); with one process "ddp" is "none"
    mode: str = "ddp"
    # FSDP: whether a unit frees its gathered weights after its forward and gathers them again for
    # the backward. "default": blocks do, except the last, and so do UltraMem v1's layers (each
    # owns its table); memory layers that share the tables keep theirs (a few MB each, and each
    # gather costs host time in host-bound layers). "always" or "never": every unit.
    reshard_after_forward: str = "default"
    # DDP: the size of a gradient bucket in MB (DDP's bucket_cap_mb). A bucket is all-reduced as soon
    # as the backward has produced it; a model compiled under DDP is split into graphs at the buckets'
    # boundaries so that this still overlaps (smaller buckets: more, smaller graphs).
    bucket_cap_mb: float = 25.0


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" → <run.dir>/checkpoints
    interval: int = 500  # save every this many steps (and always at the end); 0: only at the end
    keep: int = 3  # complete checkpoints kept (the newest); 0: keep all
    enabled: bool = True  # false: save nothing


@dataclass
class MetricsConfig:
    tensorboard: bool = True  # write tensorboard events
    tensorboard_dir: str = ""  # "" → <run.dir>/tb
    progress: bool = True  # a progress bar with ETA when stderr is a terminal


@dataclass
class RunConfig:
    dir: str = ""  # run directory: config copy, logs, tensorboard, checkpoints; "" → outputs/<config name>
    resume: str = "auto"  # "auto": from the run directory's latest checkpoint; a checkpoint path; "": fresh


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Finding a config file


def packaged_config_names() -> list[str]:
    root = importlib.resources.files("ultramem.configs")
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".toml"))


def read_config_text(name_or_path: str) -> tuple[str, str]:
    """Return (text, where) for a packaged config name (`227m` or `227m.toml`) or a file path."""
    path = Path(name_or_path)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:  # e.g. UTF-16, as some Windows editors and shells save
            raise ConfigError(
                f"config {name_or_path!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
            ) from None
    bare = name_or_path if name_or_path.endswith(".toml") else name_or_path + ".toml"
    if "/" not in name_or_path and bare in packaged_config_names():
        resource = importlib.resources.files("ultramem.configs").joinpath(bare)
        return resource.read_text(), f"ultramem/configs/{bare}"
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a packaged config; "
        f"packaged configs: {', '.join(packaged_config_names()) or '(none)'}"
    )


# ---------------------------------------------------------------------------------------------
# Typed conversion of TOML values and command-line strings


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check a TOML value against a field type (with the int→float widening TOML needs)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(value, opt, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _parse_cli_value(text: str, tp: Any, key: str) -> Any:
    """A command-line string → a value for a field of type `tp` (TOML literal syntax accepted)."""
    if tp is str:
        return text
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp):
        return text
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    if tp is bool or (type(None) in typing.get_args(tp) and bool in typing.get_args(tp)):
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected bool (true/false), got {text!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if typing.get_origin(tp) is tuple:  # allow `--optim.betas=0.9,0.95`
            try:
                value = tomllib.loads(f"v = [{text}]")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}") from None
        else:
            raise ConfigError(f"{key}: cannot parse {text!r} as {_type_name(tp)}") from None
    return _convert(value, tp, key)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise _unknown_key(key, name, list(known))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}], got {type(value).__name__} {value!r}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _convert(value, tp, key)
    return cls(**kwargs)


def _set_override(cfg: TrainConfig, dotted: str, text: str) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, name in enumerate(parts):
        key = ".".join(parts[: i + 1])
        known = _fields(type(obj))
        if name not in known:
            raise _unknown_key(key, name, list(known))
        tp = typing.get_type_hints(type(obj))[name]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a section; override one of its keys ({key}.<key>=...)")
            setattr(obj, name, _parse_cli_value(text, tp, key))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a value of type {_type_name(tp)}, not a section")
            obj = getattr(obj, name)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--a.b=1`, `--a.b 1` → [("a.b", "1")]; anything else is a ConfigError naming it."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value; use {arg}=VALUE")
            key, value = body, args[i + 1]
            i += 2
        out.append((key, value))
    return out


def load_config(
    name_or_path: str | None = None, overrides: list[tuple[str, str]] | list[str] = (), validate: bool = True
) -> TrainConfig:
    """Load a TOML config (packaged name or path; None = all defaults), apply overrides, validate."""
    table: dict[str, Any] = {}
    if name_or_path is not None:
        text, where = read_config_text(name_or_path)
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {where}: invalid TOML: {e}") from None
    cfg = _build(TrainConfig, table, "")
    if validate and name_or_path is not None and "model" not in table:
        # every default together is the 1.2B-parameter model: never what an empty file meant
        raise ConfigError(
            f"config {where} has no [model] section; start from a packaged config "
            f"({', '.join(packaged_config_names())})"
        )
    pairs = parse_overrides(list(overrides)) if overrides and isinstance(overrides[0], str) else overrides
    for key, value in pairs:
        _set_override(cfg, key, value)
    if validate:
        validate_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation (sizes that must fit together)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(value: str, options: tuple[str, ...], key: str) -> None:
    _require(value in options, f"{key}={value!r}: must be one of {', '.join(options)}")


def validate_config(cfg: TrainConfig) -> None:
    m, mem, t, o, d = cfg.model, cfg.model.memory, cfg.train, cfg.optim, cfg.data
    for key, value in (
        ("model.dim", m.dim),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("model.ffn_hidden", m.ffn_hidden),
        ("model.vocab_size", m.vocab_size),
        ("model.max_seq_len", m.max_seq_len),
        ("train.max_steps", t.max_steps),
        ("train.batch_size", t.batch_size),
        ("train.seq_len", t.seq_len),
        ("train.grad_accum", t.grad_accum),
        ("train.log_interval", t.log_interval),
        ("data.vocab_size", d.vocab_size),
        ("data.max_corpus_bytes", d.max_corpus_bytes),
        ("model.memory.log_interval", mem.log_interval),
    ):
        _require(value >= 1, f"{key}={value}: must be >= 1")
    validate_heads(m)
    _require(0 < m.norm_eps < math.inf, f"model.norm_eps={m.norm_eps}: must be a finite number > 0")
    _require(
        m.init_std is None or 0 < m.init_std < math.inf, f"model.init_std={m.init_std}: must be a finite number > 0"
    )
    _require(0 < m.rope_theta < math.inf, f"model.rope_theta={m.rope_theta}: must be a finite number > 0")
    _require(0 <= t.seed < 2**63, f"train.seed={t.seed}: must be in [0, 2**63)")  # torch's and numpy's seeds
    _require(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    _require(  # a directory of shards brings its own tokenizer: checked against the model on load
        d.vocab_size <= m.vocab_size or Path(d.source).expanduser().is_dir(),
        f"data.vocab_size={d.vocab_size} (tokenizer) must be <= model.vocab_size={m.vocab_size}",
    )
    _require(
        d.source == "stdlib" or Path(d.source).expanduser().exists(),
        f"data.source={d.source!r}: no such file or directory "
        f"(use 'stdlib', a text file or a directory of token shards)",
    )
    if d.source == "stdlib" or not Path(d.source).expanduser().is_dir():  # a BPE will be trained
        _require(
            d.vocab_size >= 256 + 1,
            f"data.vocab_size={d.vocab_size}: a byte-level BPE needs >= 257 (256 bytes + end of text)",
        )
    _require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    _one_of(d.val_split, VAL_SPLITS, "data.val_split")
    _one_of(d.window_draw, WINDOW_DRAWS, "data.window_draw")
    _require(
        d.val_split != "spread" or d.val_chunk_tokens >= t.seq_len + 2,
        f"data.val_chunk_tokens={d.val_chunk_tokens}: with data.val_split='spread' it must be >= "
        f"train.seq_len + 2 = {t.seq_len + 2} (one validation window)",
    )
    _require(t.table_grad_flush >= 0, f"train.table_grad_flush={t.table_grad_flush}: must be >= 0 (0: no staging)")
    _require(
        t.table_grad_staging is not True or t.table_grad_flush > 0,
        "train.table_grad_staging=true needs train.table_grad_flush > 0 (the micro-batches per flush), "
        f"not {t.table_grad_flush}",
    )
    _one_of(t.dtype, DTYPES, "train.dtype")
    _one_of(t.device, DEVICES, "train.device")
    _one_of(t.compile_mode, COMPILE_MODES, "train.compile_mode")
    _require(
        t.compile or t.compile_mode == "default",
        f"train.compile_mode={t.compile_mode!r} needs train.compile=true (it is the mode of that compile)",
    )
    _one_of(t.compile_backend, COMPILE_BACKENDS, "train.compile_backend")
    _require(
        t.compile_backend == "inductor" or t.compile_mode == "default",
        f"train.compile_mode={t.compile_mode!r} with train.compile_backend={t.compile_backend!r}: the modes are "
        f"Inductor's; use train.compile_backend='inductor'",
    )
    _one_of(cfg.parallel.mode, PARALLEL_MODES, "parallel.mode")
    _one_of(cfg.parallel.reshard_after_forward, RESHARD_POLICIES, "parallel.reshard_after_forward")
    _require(
        0 < cfg.parallel.bucket_cap_mb < math.inf,
        f"parallel.bucket_cap_mb={cfg.parallel.bucket_cap_mb}: must be a finite number > 0",
    )
    _require(
        not (cfg.parallel.mode == "ddp" and t.compile and cfg.parallel.bucket_cap_mb < 1),
        f"parallel.bucket_cap_mb={cfg.parallel.bucket_cap_mb} with parallel.mode='ddp' and train.compile=true: "
        f"must be >= 1 (Dynamo's DDP optimizer starts with a 1 MB bucket and needs the others at least as large)",
    )
    _require(
        not (cfg.parallel.mode == "fsdp" and t.compile and t.compile_mode in ("reduce-overhead", "max-autotune")),
        f"parallel.mode='fsdp' with train.compile_mode={t.compile_mode!r}: FSDP's gathers and hooks do not "
        f"run inside CUDA graphs; use train.compile_mode='default' (or parallel.mode='ddp')",
    )
    _one_of(t.ac, AC_MODES, "train.ac")
    _require(t.ac_every >= 1, f"train.ac_every={t.ac_every}: must be >= 1")
    _require(
        cfg.checkpoint.interval >= 0,
        f"checkpoint.interval={cfg.checkpoint.interval}: must be >= 0 (0: only at the end)",
    )
    _require(cfg.checkpoint.keep >= 0, f"checkpoint.keep={cfg.checkpoint.keep}: must be >= 0 (0: keep all)")
    _require(
        not d.val_source or Path(d.val_source).expanduser().exists(),
        f"data.val_source={d.val_source!r}: no such file or directory",
    )
    _require(0 < o.lr < math.inf, f"optim.lr={o.lr}: must be > 0 and finite")
    _require(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas={o.betas}: each must be in [0, 1)")
    _require(0 < o.eps < math.inf, f"optim.eps={o.eps}: must be > 0 and finite")
    _require(0 <= o.weight_decay < math.inf, f"optim.weight_decay={o.weight_decay}: must be >= 0 and finite")
    _require(
        0 <= o.table_weight_decay < math.inf,
        f"optim.value_weight_decay={o.value_weight_decay}: must be >= 0 and finite",
    )
    _require(
        0 <= o.warmup_steps <= t.max_steps,
        f"optim.warmup_steps={o.warmup_steps}: must be in [0, train.max_steps={t.max_steps}]",
    )
    _require(0.0 <= o.min_lr_frac <= 1.0, f"optim.min_lr_frac={o.min_lr_frac}: must be in [0, 1]")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables)")
    _require(0 < o.value_lr_mult < math.inf, f"optim.value_lr_mult={o.value_lr_mult}: must be > 0 and finite")
    _require(
        0 <= o.memory_plus_value_lr < math.inf,
        f"optim.memory_plus_value_lr={o.memory_plus_value_lr}: must be >= 0 and finite",
    )
    _require(
        0.0 <= o.value_lr_decay_frac <= 1.0, f"optim.value_lr_decay_frac={o.value_lr_decay_frac}: must be in [0, 1]"
    )
    _require(t.eval_interval >= 0, f"train.eval_interval={t.eval_interval}: must be >= 0")
    _require(t.eval_batches >= 1, f"train.eval_batches={t.eval_batches}: must be >= 1")
    _one_of(mem.type, MEMORY_TYPES, "model.memory.type")
    _one_of(mem.init, MEMORY_INITS, "model.memory.init")
    # Placement is parsed here so a bad insert string fails before anything is built; the
    # remaining memory rules (knum, knn, share_ratio, ...) belong to the layers' own validation.
    from ultramem.config import memory_placement

    memory_placement(m)
    if mem.type != "none":
        from ultramem.model import validate_memory

        validate_memory(m)
    validate_moe(m.moe)  # (TOML values are checked on load; command-line overrides land here)


def default_run_dir(name_or_path: str | None) -> str:
    """Where a command-line run writes unless run.dir says otherwise: outputs/<config name>."""
    return str(Path("outputs") / (Path(name_or_path).stem if name_or_path else "default"))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Help: every key with its default and the comment written beside its field


def _field_comments(cls: type) -> dict[str, str]:
    import inspect

    out: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    above: list[str] = []  # comment lines right above a field describe it when it has none beside it
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^=]+=(.*)$", line)
        if m:
            beside = re.search(r"#\s*(.+)$", m.group(2))
            text = beside.group(1).strip() if beside else " ".join(above)
            if text:
                out[m.group(1)] = text
        above = []
    return out


def config_help(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every config key, in field order."""
    rows: list[tuple[str, str, str]] = []
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_help(tp, f"{prefix}{f.name}."))
        else:
            value = getattr(default, f.name)
            shown = list(value) if isinstance(value, tuple) else value
            rows.append((f"{prefix}{f.name}", repr(shown), comments.get(f.name, "")))
    return rows
