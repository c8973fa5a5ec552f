"""Token streams and the batches the trainer draws from them.

`load_token_splits` turns `[data]` into (train, validation) token streams: `source = "stdlib"`
(embedded corpus), a text file, or a token directory (`*.npy` 1-D integer shards or raw
little-endian uint16 `*.bin` shards, with an optional `meta.json`, as written by
`python -m ultramem.data prepare`). Every source ends up as a directory of shards read through
memory maps (`ShardedTokens`): the corpora are cached as such directories. The validation split
is the tail `val_fraction` of the stream (a view, not a copy), or all of `val_source` when given.

`TokenWindows` yields `[batch, seq+1]` windows at random offsets. Batch `i` depends only on
(seed, i, rank, world_size): every step draws `batch · world_size` offsets from a generator
seeded by (seed, i), and rank `r` takes the r-th slice, so runs are reproducible, ranks never
see the same window of a step, and a resumed run only needs the step number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import default_cache_dir, stdlib_corpus, text_file_corpus, tokenized_text_file
from .shards import TOKENIZER_NAME, ShardedTokens, file_sha256, open_token_directory

log = logging.getLogger(__name__)


@dataclass
class TokenSplits:
    train: ShardedTokens
    val: ShardedTokens
    vocab_size: int  # tokens ids are < vocab_size
    tokenizer_path: Path | None = None
    val_what: str = "data.val_fraction"  # where the validation tokens come from, for messages
    val_requested: bool = True  # False: validation turned off (val_fraction = 0, no val_source)

    def check_val(self, seq_len: int) -> bool:
        """True when the validation split holds at least one window, False when validation was
        turned off; ValueError when it was asked for but is too short (see check_val_split)."""
        if not self.val_requested:
            return False
        check_val_split(self.val, seq_len, self.val_what)
        return True


def check_val_split(tokens, seq_len: int, what: str) -> None:
    """Raise ValueError when `tokens` is too short for one validation window (seq_len + 2 tokens);
    `what` says where the split came from (e.g. "data.val_fraction=0.05 of ...")."""
    need = seq_len + 2
    if len(tokens) < need:
        raise ValueError(
            f"validation split too short: {what} gives {len(tokens)} validation tokens, but one window needs "
            f"train.seq_len + 2 = {need}; raise data.val_fraction, point data.val_source at more data, or set "
            f"data.val_fraction=0 (and no data.val_source) to train without validation"
        )


@dataclass
class _Stream:
    tokens: ShardedTokens
    vocab_size: int
    tokenizer_path: Path | None
    eos_id: int | None


def _load_stream(source: str, vocab_size: int, max_corpus_bytes: int, cache_root: Path) -> _Stream:
    if source == "stdlib":
        c = stdlib_corpus(vocab_size, max_corpus_bytes, cache_root)
        return _Stream(c.tokens, c.vocab_size, c.tokenizer_path, c.eot_id)
    path = Path(source).expanduser()
    if path.is_dir():
        tokens, meta = open_token_directory(
            path, "data.source", None if _has_meta(path) else vocab_size, f"data.vocab_size={vocab_size}"
        )
        if meta is None:
            tok = path / TOKENIZER_NAME
            return _Stream(tokens, vocab_size, tok if tok.is_file() else None, None)
        if meta["vocab_size"] != vocab_size:
            log.info(
                "data.source %s: using the vocab_size=%d of its meta.json (data.vocab_size=%d applies only "
                "to tokenizers trained here)",
                path,
                meta["vocab_size"],
                vocab_size,
            )
        tok = path / meta.get("tokenizer", TOKENIZER_NAME)
        return _Stream(tokens, meta["vocab_size"], tok if tok.is_file() else None, meta.get("eos_id"))
    if path.is_file():
        c = text_file_corpus(path, vocab_size, max_corpus_bytes, cache_root)
        return _Stream(c.tokens, c.vocab_size, c.tokenizer_path, c.eot_id)
    raise FileNotFoundError(
        f"data.source {source!r}: no such file or directory (use 'stdlib', a text file or a directory of token shards)"
    )


def _has_meta(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def _load_val_source(
    val_source: str, source: str, train: _Stream, max_corpus_bytes: int, cache_root: Path
) -> ShardedTokens:
    path = Path(val_source).expanduser()
    if path.is_dir():
        tokens, meta = open_token_directory(
            path, "data.val_source", train.vocab_size, f"the vocab_size={train.vocab_size} of data.source={source!r}"
        )
        val_sha = meta.get("tokenizer_sha256") if meta else None
        if val_sha and train.tokenizer_path is not None and file_sha256(train.tokenizer_path) != val_sha:
            raise ValueError(
                f"data.val_source {val_source!r} was tokenized with a different tokenizer than "
                f"data.source {source!r} (the tokenizer checksum in its meta.json does not match "
                f"{str(train.tokenizer_path)!r})"
            )
        return tokens
    if path.is_file():
        if train.tokenizer_path is None:
            raise ValueError(
                f"data.val_source {val_source!r} is a text file, but data.source {source!r} has no "
                f"{TOKENIZER_NAME} to encode it with; give a token directory as data.val_source "
                f"or add the tokenizer to the source directory"
            )
        return tokenized_text_file(path, train.tokenizer_path, max_corpus_bytes, cache_root, train.eos_id).tokens
    raise FileNotFoundError(
        f"data.val_source {val_source!r}: no such file or directory (use a text file or a directory of token shards)"
    )


def load_token_splits(
    source: str,
    vocab_size: int,
    max_corpus_bytes: int,
    val_fraction: float,
    cache_dir: str | None = None,
    val_source: str | None = None,
) -> TokenSplits:
    """(train, validation) streams of `source`. Without `val_source` validation is the tail
    `val_fraction` of the stream; with it (a token directory, or a text file encoded with the
    source's tokenizer) validation is all of val_source and training all of source."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stream = _load_stream(source, vocab_size, max_corpus_bytes, cache_root)
    if val_source:
        if val_fraction:
            log.info("data.val_fraction=%g is not used: validation reads data.val_source", val_fraction)
        val = _load_val_source(val_source, source, stream, max_corpus_bytes, cache_root)
        return TokenSplits(
            stream.tokens, val, stream.vocab_size, stream.tokenizer_path, f"data.val_source={val_source!r}", True
        )
    n = len(stream.tokens)
    split = n - int(n * val_fraction)
    return TokenSplits(
        stream.tokens.view(0, split),
        stream.tokens.view(split, n),
        stream.vocab_size,
        stream.tokenizer_path,
        f"data.val_fraction={val_fraction} of data.source={source!r} ({n} tokens)",
        val_fraction > 0,
    )


class TokenWindows:
    """Deterministic random `[batch, seq_len + 1]` windows of a token stream, sharded by rank."""

    def __init__(
        self,
        tokens: np.ndarray | ShardedTokens,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"token stream of {len(tokens)} tokens is too short for seq_len={seq_len} "
                f"(needs at least seq_len + 2); lower train.seq_len or add data"
            )
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size

    def offsets(self, index: int) -> np.ndarray:
        """Start offsets of this rank's windows in batch `index`."""
        rng = np.random.default_rng([self.seed, index])
        n_windows = self.batch_size * self.world_size
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=n_windows)
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, index: int) -> torch.Tensor:
        """Batch `index` as an int64 tensor [batch, seq_len + 1] (inputs = [:, :-1], targets = [:, 1:])."""
        width = self.seq_len + 1
        rows = [np.asarray(self.tokens[s : s + width], dtype=np.int64) for s in self.offsets(index)]
        return torch.from_numpy(np.stack(rows))

    def __iter__(self):
        index = 0
        while True:
            yield self.batch(index)
            index += 1
