"""Held-out evaluation of a trained model: mean loss, perplexity and bits per byte.

    python -m ultramem.eval --checkpoint outputs/small-dense --data data/held-out [--json eval.json]

`--checkpoint` is a checkpoint directory (`step_NNNNNNNN`), a run directory or its
`checkpoints/` directory (the latest checkpoint), or a file written by `ultramem.train.export`.

`--data` is one of
- a token directory written by `python -m ultramem.data prepare` (all of it, or `--split val`
  for the `data.val_fraction` the trainer would hold out, as `data.val_split` takes it);
- a text file (or JSON Lines), tokenized with the model's tokenizer: the whole file is one
  document (each line of a JSON Lines file one), an end-of-text token before it so that its first
  token is predicted too, and one after each document as in the training shards;
- `run`: the run's own validation split, exactly as the trainer builds it from the checkpoint's
  `[data]` section (data.source with data.val_fraction and data.val_split, or data.val_source);
- `stdlib`: the embedded standard-library corpus's validation split, with the checkpoint's data
  settings; the same as `run` for a run trained on it.

The loss is the language-model cross-entropy alone, without the memory layers' and routers'
auxiliary losses: the number the trainer logs as `val/loss`.

Windows. By default the stream is cut into consecutive non-overlapping windows of `seq_len + 1`
tokens that share their boundary token: window k holds tokens [k·S, (k+1)·S], predicts tokens
k·S + 1 … (k+1)·S from what precedes them in the window, and every token after the first is
predicted exactly once (the last window may be shorter). A split of separate chunks
(data.val_split = "spread") is cut chunk by chunk: no window spans two, and each chunk's first
token is not predicted. Each window starts without context, so its first tokens are harder than
in a sliding evaluation; the result depends only on the data, seq_len and --max-tokens, never
on the batch size or the device. `--windows trainer` evaluates the trainer's own validation
batches instead: `TokenWindows(split, batch, seq_len, seed + 1)`, batches 0 … eval_batches - 1,
which reproduces the run's `val/loss` (in float32, to rounding).

Bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens. Bytes are counted per
token from the tokenizer (a byte-level BPE maps every token to fixed bytes; special tokens such as
end-of-text count 0 bytes, though their loss counts), or, for other tokenizers, by decoding the
predicted spans. For a text file that is the file's UTF-8 size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SPLITS = ("auto", "all", "val", "train")


class EvalError(ValueError):
    """Input the evaluation cannot use; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab_size: int
    source: Path  # the checkpoint directory or exported file
    cfg: object | None = None  # the TrainConfig of a checkpoint; None for an exported file
    step: int | None = None


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    from ultramem.train.checkpoint import resolve_checkpoint
    from ultramem.train.export import load_checkpoint_model, load_exported

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {str(path)!r}: no such file or directory")
    if p.is_file():
        model = load_exported(p, device)
        return LoadedModel(model, model.tok_embeddings.weight.shape[0], p)
    ckpt = resolve_checkpoint(p)
    model, cfg = load_checkpoint_model(ckpt, device)
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else None
    return LoadedModel(model, cfg.model.vocab_size, ckpt, cfg, step)


# ---------------------------------------------------------------------------------------------
# The tokenizer a checkpoint was trained with


def _cache_root(cfg) -> Path:
    from ultramem.data import default_cache_dir

    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


def _cached_corpus_tokenizer(
    kind: str, docs: list, vocab_size: int, max_bytes: int, cache_root: Path, what: str
) -> Path:
    """The tokenizer of a corpus cache entry, found without building it. This follows the corpus
    cache's naming (ultramem.data.corpus): rebuilding would train a new BPE, which need not give
    the ids the model was trained on."""
    from ultramem.data import corpus

    key = corpus._cache_key(kind, docs, vocab_size, max_bytes)
    entry = cache_root / f"{kind}-v{vocab_size}-{key}"
    found = corpus._load_entry(entry, warn=False, announce=False)
    if found is None:
        raise FileNotFoundError(
            f"the tokenizer of the checkpoint's {what} is not in the corpus cache {str(cache_root)!r} (no "
            f"intact entry {entry.name}; set ULTRAMEM_CACHE or data.cache_dir as in training, or pass --tokenizer)"
        )
    return found.tokenizer_path


def checkpoint_tokenizer(cfg) -> Path:
    """The tokenizer.json the checkpoint's data.source was tokenized with; FileNotFoundError
    saying where it was looked for when it cannot be found."""
    from ultramem.data.shards import TOKENIZER_NAME, read_meta

    d = cfg.data
    if d.source == "stdlib":
        from ultramem.data import corpus

        root, files = corpus.stdlib_files()
        chosen = corpus._select(files, root, d.max_corpus_bytes)
        docs = [(p.relative_to(root).as_posix(), size) for p, size in chosen]
        return _cached_corpus_tokenizer(
            "stdlib", docs, d.vocab_size, d.max_corpus_bytes, _cache_root(cfg), "data.source='stdlib'"
        )
    src = Path(d.source).expanduser()
    if src.is_dir():
        meta = read_meta(src)
        tok = src / (meta.get("tokenizer", TOKENIZER_NAME) if meta else TOKENIZER_NAME)
        if not tok.is_file():
            raise FileNotFoundError(
                f"the checkpoint's data.source {d.source!r} has no {TOKENIZER_NAME}; pass --tokenizer"
            )
        return tok
    if src.is_file():
        from ultramem.data import corpus

        docs = corpus._text_file_key(src, "data.source")
        return _cached_corpus_tokenizer(
            "text", docs, d.vocab_size, d.max_corpus_bytes, _cache_root(cfg), f"data.source {d.source!r}"
        )
    raise FileNotFoundError(
        f"the checkpoint's data.source {d.source!r} no longer exists, so its tokenizer "
        f"cannot be found; pass --tokenizer"
    )


# ---------------------------------------------------------------------------------------------
# The data


@dataclass
class EvalData:
    tokens: object  # 1-D integer stream: numpy array or ShardedTokens
    what: str
    tokenizer_path: Path | None
    split_is_val: bool = False  # a split the trainer holds out (the trainer windows apply)


def _resolve_split(split: str, default: str) -> str:
    return default if split == "auto" else split


def _pick_split(splits, split: str, what: str) -> tuple[object, str]:
    if split == "val":
        if not len(splits.val):
            raise EvalError(f"{what}: the validation split is empty ({splits.val_what})")
        return splits.val, f"{what}, validation split ({splits.val_what})"
    return splits.train, f"{what}, training split"


def _text_stream(path: Path, tokenizer_path: Path, max_tokens: int | None) -> np.ndarray:
    """End-of-text, then the file's documents each followed by end-of-text (as prepare writes
    them); tokenizing stops once max_tokens + 1 tokens are there."""
    from ultramem.data.documents import iter_pieces
    from ultramem.data.tokenizer import encode_texts, find_eos_id, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    eos = find_eos_id(tok, what=f"tokenizer {str(tokenizer_path)!r}")
    parts, n = [np.asarray([eos], dtype=np.int64)], 1
    batch: list[tuple[str, bool]] = []

    def flush():
        nonlocal n
        if batch:
            ids = encode_texts(tok, [t for t, _ in batch], eos, np.dtype(np.int64), [e for _, e in batch])
            parts.append(ids)
            n += ids.size
            batch.clear()

    chars = 0
    for text, end in iter_pieces([path], warn=True):
        batch.append((text, end))
        chars += len(text)
        if chars >= 1 << 22:
            flush()
            chars = 0
            if max_tokens is not None and n > max_tokens:
                break
    flush()
    stream = np.concatenate(parts)
    if stream.size < 2:
        raise EvalError(f"--data {str(path)!r}: no text to evaluate")
    return stream


def _sha(path: Path) -> str:
    from ultramem.data.shards import file_sha256

    return file_sha256(path)


def load_eval_data(
    spec: str, loaded: LoadedModel, split: str = "auto", tokenizer: str | None = None, max_tokens: int | None = None
) -> EvalData:
    """The token stream `--data spec` names, and the tokenizer that reads it back to bytes."""
    from ultramem.data import load_token_splits, open_token_directory
    from ultramem.data.shards import TOKENIZER_NAME
    from ultramem.data.tokenizer import resolve_tokenizer_path

    cfg = loaded.cfg
    given_tok = resolve_tokenizer_path(tokenizer) if tokenizer else None
    if spec in ("run", "stdlib"):
        if cfg is None:
            raise EvalError(
                f"--data {spec} needs a training checkpoint: an exported file holds no data config; "
                f"give a token directory or a text file"
            )
        d = cfg.data
        if spec == "stdlib" and d.source != "stdlib":
            raise EvalError(
                f"--data stdlib: the checkpoint was trained on data.source={d.source!r}, not the "
                f"embedded corpus, so its tokenizer does not read it; use --data run for its own "
                f"validation split"
            )
        split = _resolve_split(split, "val")
        if split == "all":
            raise EvalError(f"--data {spec} --split all: choose val or train (they may be different sources)")
        val_source = d.val_source if spec == "run" else ""
        val_fraction = d.val_fraction
        if split == "val" and not val_source and not val_fraction:
            raise EvalError(f"--data {spec}: the run held nothing out (data.val_fraction=0, no data.val_source)")
        kwargs = {"val_source": val_source} if val_source else {}
        try:
            splits = load_token_splits(
                d.source,
                d.vocab_size,
                d.max_corpus_bytes,
                val_fraction,
                d.cache_dir or None,
                val_split=d.val_split,
                val_chunk_tokens=d.val_chunk_tokens,
                **kwargs,
            )
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--data {spec}: {e}") from None
        tokens, what = _pick_split(
            splits, split, f"the run's data ({d.source})" if spec == "run" else "the embedded standard-library corpus"
        )
        tok = given_tok or splits.tokenizer_path
        return EvalData(tokens, what, tok, split == "val")

    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {spec!r}: no such file or directory (give a token directory, a text file, 'run' or 'stdlib')"
        )
    if path.is_dir():
        split = _resolve_split(split, "all")
        tokens, meta = open_token_directory(path, "--data")
        if meta is not None and meta["vocab_size"] > loaded.vocab_size:
            raise EvalError(
                f"--data {spec!r} was tokenized with a vocabulary of {meta['vocab_size']} (its meta.json) "
                f"but the model has {loaded.vocab_size} tokens: not the model's tokenizer"
            )
        own = path / (meta.get("tokenizer", TOKENIZER_NAME) if meta else TOKENIZER_NAME)
        own = own if own.is_file() else None
        reference = given_tok
        if reference is None and cfg is not None:
            try:
                reference = checkpoint_tokenizer(cfg)
            except FileNotFoundError as e:
                log.info("not checking the data's tokenizer against the model's: %s", e)
        if own is not None and reference is not None and _sha(own) != _sha(reference):
            raise EvalError(
                f"--data {spec!r} was tokenized with another tokenizer than the model's "
                f"({str(own)!r} differs from {str(reference)!r})"
            )
        what = f"token directory {spec}"
        if cfg is not None and Path(cfg.data.source).expanduser().resolve() == path.resolve() and split == "all":
            log.warning("--data %s is the run's training data; --split val evaluates only the part it held out", spec)
        if split != "all":
            if cfg is None:
                raise EvalError(f"--split {split} takes the run's data.val_fraction: it needs a training checkpoint")
            from ultramem.data import split_stream

            d = cfg.data
            n = len(tokens)
            train, val = split_stream(tokens, d.val_fraction, d.val_split, d.val_chunk_tokens)
            tokens = val if split == "val" else train
            how = f", data.val_split='spread': {len(val.segments)} chunks" if d.val_split == "spread" else ""
            what += (
                f", {'validation' if split == 'val' else 'training'} split (data.val_fraction="
                f"{d.val_fraction} of {n} tokens{how})"
            )
        return EvalData(tokens, what, own or reference, split == "val")

    if split not in ("auto", "all"):
        raise EvalError(f"--split {split}: a text file is evaluated whole")
    tok = given_tok
    if tok is None:
        if cfg is None:
            raise EvalError(
                f"--data {spec!r} is a text file, and an exported model holds no tokenizer: pass "
                f"--tokenizer (the tokenizer.json of the data it was trained on)"
            )
        try:
            tok = checkpoint_tokenizer(cfg)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--data {spec!r} is a text file to tokenize, but {e}") from None
    stream = _text_stream(path, tok, max_tokens)
    return EvalData(stream, f"text file {spec}", tok)


# ---------------------------------------------------------------------------------------------
# Bytes of the predicted tokens


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet: character → byte. Bytes that are printable Latin-1 stand for
    themselves; the others, in byte order, take the characters from U+0100 upwards."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def token_byte_lengths(tok) -> np.ndarray | None:
    """UTF-8 bytes of every token id for a byte-level BPE (special tokens 0); None for other tokenizers."""
    from tokenizers import pre_tokenizers

    decoder = json.loads(tok.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    chars = _byte_level_chars()
    if set(chars) != set(pre_tokenizers.ByteLevel.alphabet()):
        return None
    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for piece, i in vocab.items():
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif all(c in chars for c in piece):
            lengths[i] = len(piece)
        else:
            return None
    return lengths


class ByteCounter:
    def __init__(self, tokenizer_path: Path | None):
        self.tok = None
        self.lengths = None
        if tokenizer_path is not None:
            from ultramem.data.tokenizer import load_tokenizer

            self.tok = load_tokenizer(tokenizer_path)
            self.lengths = token_byte_lengths(self.tok)

    @property
    def available(self) -> bool:
        return self.tok is not None

    def count(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        if self.lengths is not None:
            if ids.size and ids.max() >= self.lengths.size:
                raise EvalError(
                    f"token id {int(ids.max())} is outside the tokenizer's vocabulary of {self.lengths.size}"
                )
            return int(self.lengths[ids].sum())
        return len(self.tok.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Windows and the evaluation loop


def consecutive_windows(
    n_tokens: int, seq_len: int, max_tokens: int | None = None, segments: list[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """(start, predicted tokens) of the non-overlapping windows over a stream of n_tokens; window
    k reads tokens [start, start + length] and predicts the last `length` of them. With
    `segments` (contiguous pieces [a, b) of the stream) the windows stay inside one piece each."""
    out, left = [], max_tokens
    for a, b in segments if segments is not None else [(0, n_tokens)]:
        targets = b - a - 1
        if left is not None:
            targets = min(targets, left)
            left -= max(targets, 0)
        start = 0
        while start < targets:
            length = min(seq_len, targets - start)
            out.append((a + start, length))
            start += length
    return out


def _predicted_spans(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The predicted tokens [a, b) of the windows, adjacent windows' merged."""
    spans: list[list[int]] = []
    for start, length in windows:
        if spans and spans[-1][1] == start + 1:
            spans[-1][1] += length
        else:
            spans.append([start + 1, start + 1 + length])
    return [(a, b) for a, b in spans]


@dataclass
class EvalResult:
    loss: float  # mean nats per predicted token
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int | None
    tokens_per_s: float
    seconds: float
    windows: int
    seq_len: int
    batch_size: int
    window_mode: str
    device: str
    dtype: str
    checkpoint: str = ""
    step: int | None = None
    data: str = ""
    notes: list[str] = field(default_factory=list)


def _autocast(device: torch.device, dtype: str):
    import contextlib

    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _nats(model, batch: torch.Tensor, device: torch.device, dtype: str) -> torch.Tensor:
    """Summed cross-entropy (fp32) of the batch's predicted tokens."""
    batch = batch.to(device, non_blocking=True)
    with _autocast(device, dtype):
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")


def _batches_consecutive(windows, batch_size):
    """Batches of equal-length windows (consecutive windows of a stream all have seq_len but the last)."""
    group: list[tuple[int, int]] = []
    for w in windows:
        if group and (len(group) == batch_size or w[1] != group[0][1]):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def evaluate_stream(
    model,
    tokens,
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "float32",
    max_tokens: int | None = None,
    counter: ByteCounter | None = None,
    trainer_windows=None,
    batches: int | None = None,
) -> EvalResult:
    """Evaluate `model` on `tokens` in consecutive windows, or in `trainer_windows` (a
    TokenWindows) batches 0 … batches - 1."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens, n_bytes, n_windows = 0, 0, 0
    count_bytes = counter is not None and counter.available
    t0 = time.perf_counter()
    if trainer_windows is not None:
        for i in range(batches):
            batch = trainer_windows.batch(i)
            total += _nats(model, batch, device, dtype).double()
            n_tokens += batch[:, 1:].numel()
            n_windows += batch.shape[0]
            if count_bytes:
                n_bytes += sum(counter.count(row[1:].numpy()) for row in batch)
        mode = f"trainer (TokenWindows seed {trainer_windows.seed}, {batches} batches)"
    else:
        from ultramem.data import token_segments

        windows = consecutive_windows(len(tokens), seq_len, max_tokens, token_segments(tokens))
        if not windows:
            raise EvalError("the data holds fewer than 2 tokens: nothing to predict")
        for group in _batches_consecutive(windows, batch_size):
            length = group[0][1]
            rows = [np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s, _ in group]
            total += _nats(model, torch.from_numpy(np.stack(rows)), device, dtype).double()
            n_tokens += length * len(group)
            n_windows += len(group)
        if count_bytes:
            # the predicted tokens are contiguous spans (one per chunk of the stream): per-token
            # lengths add up piece by piece; a decoder sees a span whole (a cut could split a character)
            for a, b in _predicted_spans(windows):
                step = 1 << 22 if counter.lengths is not None else b - a
                n_bytes += sum(counter.count(np.asarray(tokens[i : min(i + step, b)])) for i in range(a, b, step))
        mode = "consecutive (non-overlapping)"
    nats = float(total.item())  # (waits for the device)
    seconds = time.perf_counter() - t0
    loss = nats / n_tokens
    bpb = nats / math.log(2) / n_bytes if count_bytes and n_bytes else None
    return EvalResult(
        loss,
        math.exp(min(loss, 700.0)),
        bpb,
        n_tokens,
        n_bytes if count_bytes else None,
        n_tokens / max(seconds, 1e-9),
        seconds,
        n_windows,
        seq_len,
        batch_size,
        mode,
        str(device),
        dtype,
    )


def _check_ids(tokens, vocab_size: int, what: str) -> None:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise EvalError(
            f"{what} holds token id {int(tokens.max())}, outside the model's vocabulary of {vocab_size} "
            f"(data tokenized with another tokenizer?)"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device here")
    return torch.device(name)


def run(args: argparse.Namespace) -> EvalResult:
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device)
    cfg = loaded.cfg
    if args.windows == "trainer" and cfg is None:
        raise EvalError(
            "--windows trainer needs a training checkpoint (its seed and eval_batches); an exported file has neither"
        )
    if args.windows == "trainer" and args.max_tokens is not None:
        raise EvalError("--max-tokens applies to the consecutive windows; with --windows trainer use --batches")
    seq_len = args.seq_len or (cfg.train.seq_len if cfg is not None else loaded.model.cfg.max_seq_len)
    max_seq = cfg.model.max_seq_len if cfg is not None else loaded.model.cfg.max_seq_len
    if seq_len > max_seq:
        raise EvalError(f"--seq-len {seq_len} is longer than the model's max_seq_len={max_seq}")
    batch_size = args.batch_size or (cfg.train.batch_size if cfg is not None else 8)
    data = load_eval_data(args.data, loaded, args.split, args.tokenizer, args.max_tokens)
    _check_ids(data.tokens, loaded.vocab_size, f"--data {args.data}")
    counter = ByteCounter(data.tokenizer_path)
    notes = []
    if not counter.available:
        notes.append("no tokenizer for this data: bits per byte not computed (pass --tokenizer)")
    elif counter.lengths is None:
        notes.append("bytes counted by decoding the predicted spans (not a byte-level BPE)")
    trainer = None
    batches = None
    if args.windows == "trainer":
        from ultramem.data import TokenWindows

        if not data.split_is_val:
            notes.append("trainer windows on data that is not the run's validation split")
        try:
            trainer = TokenWindows(data.tokens, batch_size, seq_len, cfg.train.seed + 1, 0, 1)
        except ValueError as e:
            raise EvalError(f"--data {args.data}: {e}") from None
        batches = args.batches or cfg.train.eval_batches
    result = evaluate_stream(
        loaded.model,
        data.tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        counter=counter,
        trainer_windows=trainer,
        batches=batches,
    )
    result.checkpoint, result.step, result.data = str(loaded.source), loaded.step, data.what
    result.notes = notes
    return result


def format_result(r: EvalResult) -> str:
    rows = [
        ("checkpoint", r.checkpoint + (f" (step {r.step})" if r.step is not None else "")),
        ("data", r.data),
        ("windows", f"{r.windows} × up to {r.seq_len} tokens, {r.window_mode}; batch {r.batch_size}"),
        ("device", f"{r.device}, {r.dtype}"),
        ("loss", f"{r.loss:.5f} nats/token"),
        ("perplexity", f"{r.perplexity:.3f}"),
        ("bits/byte", f"{r.bits_per_byte:.5f}" if r.bits_per_byte is not None else "-"),
        ("tokens", f"{r.tokens:,d}"),
        ("bytes", f"{r.bytes:,d}" if r.bytes is not None else "-"),
        ("tokens/s", f"{r.tokens_per_s:,.0f} ({r.seconds:.2f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


@contextlib.contextmanager
def _cli_logging():
    """INFO lines on stderr for the command, removed again when it returns (main() may be called
    in a process that outlives it, and whose stderr changes)."""
    root = logging.getLogger()
    if root.handlers:  # the caller has its own logging
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _positive(value: str) -> int:
    n = int(value.replace("_", ""))
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ultramem.eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory, run directory (its latest checkpoint) or exported .safetensors/.pt",
    )
    p.add_argument(
        "--data", required=True, help="token directory, text file, 'run' (the run's validation split) or 'stdlib'"
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="auto",
        help="which part of the data: 'val' (the run's data.val_fraction, as data.val_split takes it), "
        "'train', 'all' (default: val for run/stdlib, all for a path)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.json (or its directory) for a text file or for counting bytes; default: the "
        "one the checkpoint's data was tokenized with",
    )
    p.add_argument(
        "--batch-size", type=_positive, help="windows per forward (default: the run's train.batch_size, or 8)"
    )
    p.add_argument(
        "--seq-len",
        type=_positive,
        help="predicted tokens per window (default: the run's train.seq_len, or the model's max_seq_len)",
    )
    p.add_argument("--max-tokens", type=_positive, help="evaluate at most this many predicted tokens (the first)")
    p.add_argument(
        "--windows",
        choices=("consecutive", "trainer"),
        default="consecutive",
        help="'consecutive' non-overlapping windows (default), or the trainer's validation batches",
    )
    p.add_argument("--batches", type=_positive, help="with --windows trainer: batches (default train.eval_batches)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16 runs the forward under autocast, as a bf16 run's trainer does",
    )
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT ('-': stdout only JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ultramem.config import ConfigError

    if args.json and args.json != "-":  # refused before the evaluation, not after it
        from ultramem.data.shards import file_in_the_way

        out = Path(args.json).expanduser()
        blocker = file_in_the_way(out.parent)
        if out.is_dir() or blocker is not None:
            what = "is a directory" if out.is_dir() else f"cannot be made: {str(blocker)!r} is a file"
            parser.exit(2, f"error: --json {args.json!r} {what}\n")
    try:
        with _cli_logging():
            result = run(args)
    except (FileNotFoundError, EvalError, ConfigError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    if args.json == "-":
        print(json.dumps(asdict(result), indent=1))
        return 0
    print(format_result(result))
    if args.json:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(asdict(result), indent=1) + "\n")
        except OSError as e:
            parser.exit(1, f"error: --json {args.json!r}: {e.strerror or e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
