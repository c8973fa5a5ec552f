"""Token streams and the batches the trainer draws from them.

`load_token_splits` turns `[data]` into (train, validation) token streams: `source = "stdlib"`
(embedded corpus), a text file, or a token directory (`*.npy` 1-D integer shards or raw
little-endian uint16 `*.bin` shards, with an optional `meta.json`, as written by
`python -m ultramem.data prepare`). Every source ends up as a directory of shards read through
memory maps (`ShardedTokens`): the corpora are cached as such directories. The validation split
is all of `val_source` when given, else `val_fraction` of the stream (views, not copies), taken
as `val_split` says (`split_ranges`): "tail", the end of the stream, or "spread", evenly spaced
chunks of about `val_chunk_tokens` across it. A corpus in sorted path order has its last
packages in the tail, which the model then never trains on; spread chunks hold out text of
every part of it.

`TokenWindows` yields `[batch, seq+1]` windows at random offsets, each inside one contiguous
piece of its stream (a spread split's chunks are joined with breaks between them). Each
optimizer step draws `batch · world_size · grad_accum` offsets from a generator seeded by
(seed, step), and micro-batch `m` of rank `r` takes slice `m · world_size + r`, so runs are
reproducible, ranks never see the same window of a step, and a resumed run only needs the step
number, whatever split of the same global batch it uses.
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

VAL_SPLITS = ("tail", "spread")
DEFAULT_VAL_CHUNK_TOKENS = 65_536


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


def token_segments(tokens) -> list[tuple[int, int]]:
    """The contiguous pieces [start, stop) of a token stream: a ShardedTokens' segments, else all of it."""
    segments = getattr(tokens, "segments", None)
    return list(segments) if segments is not None else [(0, len(tokens))]


def check_val_split(tokens, seq_len: int, what: str) -> None:
    """Raise ValueError when `tokens` is too short for one validation window (seq_len + 2 tokens
    of one contiguous piece); `what` says where the split came from (e.g. "data.val_fraction=0.05 of ...")."""
    need = seq_len + 2
    longest = max(b - a for a, b in token_segments(tokens))
    if longest < need:
        pieces = f" (at most {longest} in one chunk)" if len(tokens) >= need else ""
        raise ValueError(
            f"validation split too short: {what} gives {len(tokens)} validation tokens{pieces}, but one window "
            f"needs train.seq_len + 2 = {need}; raise data.val_fraction, point data.val_source at more data, or "
            f"set data.val_fraction=0 (and no data.val_source) to train without validation"
        )


def split_ranges(
    n: int, val_fraction: float, val_split: str = "tail", val_chunk_tokens: int = DEFAULT_VAL_CHUNK_TOKENS
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train ranges, validation ranges) of a stream of n tokens, [start, stop) each, in order:
    together they cover it once. Validation is int(n · val_fraction) tokens either way. "tail":
    the last ones. "spread": k = max(1, n_val // val_chunk_tokens) chunks of n_val / k tokens
    (val_chunk_tokens to twice that, or all n_val when fewer), each at the end of one of k equal
    periods of the stream; k = 1 is the tail."""
    if val_split not in VAL_SPLITS:
        raise ValueError(f"data.val_split={val_split!r}: must be one of {', '.join(map(repr, VAL_SPLITS))}")
    if val_chunk_tokens < 1:
        raise ValueError(f"data.val_chunk_tokens={val_chunk_tokens}: must be >= 1")
    n_val = int(n * val_fraction)
    n_train = n - n_val
    k = max(1, n_val // val_chunk_tokens) if val_split == "spread" else 1
    train, val, at = [], [], 0
    for i in range(k):
        a = (i + 1) * n_train // k + i * n_val // k
        b = (i + 1) * n_train // k + (i + 1) * n_val // k
        if a > at:
            train.append((at, a))
        if b > a:
            val.append((a, b))
        at = b
    return train, val


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
    val_split: str = "tail",
    val_chunk_tokens: int = DEFAULT_VAL_CHUNK_TOKENS,
) -> TokenSplits:
    """(train, validation) streams of `source`. Without `val_source` validation is `val_fraction`
    of the stream, taken as `val_split` says (see split_ranges); with it (a token directory, or a
    text file encoded with the source's tokenizer) validation is all of val_source and training
    all of source."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    split_ranges(0, 0.0, val_split, val_chunk_tokens)  # bad values fail before the corpus is built
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stream = _load_stream(source, vocab_size, max_corpus_bytes, cache_root)
    if val_source:
        if val_fraction:
            log.info("data.val_fraction=%g is not used: validation reads data.val_source", val_fraction)
        if val_split != "tail":
            log.info("data.val_split=%r is not used: validation reads data.val_source", val_split)
        val = _load_val_source(val_source, source, stream, max_corpus_bytes, cache_root)
        return TokenSplits(
            stream.tokens, val, stream.vocab_size, stream.tokenizer_path, f"data.val_source={val_source!r}", True
        )
    n = len(stream.tokens)
    train, val = split_stream(stream.tokens, val_fraction, val_split, val_chunk_tokens)
    how = f", data.val_split='spread': {len(token_segments(val))} chunks" if val_split == "spread" else ""
    return TokenSplits(
        train,
        val,
        stream.vocab_size,
        stream.tokenizer_path,
        f"data.val_fraction={val_fraction} of data.source={source!r} ({n} tokens{how})",
        val_fraction > 0,
    )


def split_stream(
    tokens: ShardedTokens,
    val_fraction: float,
    val_split: str = "tail",
    val_chunk_tokens: int = DEFAULT_VAL_CHUNK_TOKENS,
) -> tuple[ShardedTokens, ShardedTokens]:
    """(train, validation) views of `tokens` (see split_ranges); a spread split's chunks are
    joined with breaks between them, so that no window spans two."""
    n = len(tokens)
    train, val = split_ranges(n, val_fraction, val_split, val_chunk_tokens)
    if val_split == "spread" and len(val) == 1:
        log.warning(
            "data.val_split='spread': %d validation tokens are fewer than 2 x data.val_chunk_tokens=%d, "
            "so they are one chunk at the end of the stream, the same split as 'tail'; lower "
            "data.val_chunk_tokens (>= train.seq_len + 2) to spread them",
            val[0][1] - val[0][0],
            val_chunk_tokens,
        )
    if val_split == "tail":  # two plain views, as before spread splits existed
        cut = n - int(n * val_fraction)
        return tokens.view(0, cut), tokens.view(cut, n)
    return ShardedTokens.join([tokens.view(a, b) for a, b in train]), ShardedTokens.join(
        [tokens.view(a, b) for a, b in val]
    )


class TokenWindows:
    """Deterministic random `[batch, seq_len + 1]` windows of a token stream, sharded by rank.

    Batch `index` is micro-batch `index % grad_accum` of optimizer step `index // grad_accum`.
    Each step's windows are drawn at once for all micro-batches and ranks, so a run resumed with
    another split of the same global batch (batch_size × world_size × grad_accum) trains each
    step on the same windows."""

    def __init__(
        self,
        tokens: np.ndarray | ShardedTokens,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        per_step: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} must be >= 1")
        segments = token_segments(tokens)
        # the starts a window may take in each contiguous piece, numbered piece after piece
        counts = np.array([max(0, b - a - seq_len - 1) for a, b in segments], dtype=np.int64)
        if len(segments) == 1 and len(tokens) < seq_len + 2:
            raise ValueError(
                f"token stream of {len(tokens)} tokens is too short for seq_len={seq_len} "
                f"(needs at least seq_len + 2); lower train.seq_len or add data"
            )
        if not counts.sum():
            raise ValueError(
                f"token stream of {len(tokens)} tokens in {len(segments)} separate chunks is too short for "
                f"seq_len={seq_len}: no chunk holds seq_len + 2 tokens (the longest holds "
                f"{max(b - a for a, b in segments)}); lower train.seq_len or make the chunks longer"
            )
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        # per_step=False: each micro-batch drawn on its own, as by runs made before the per-step draw
        self.grad_accum = grad_accum if per_step else 1
        self._piece_starts = np.array([a for a, _ in segments], dtype=np.int64)
        self._first_start = np.cumsum(counts) - counts  # the number of each piece's first start
        self._n_starts = int(counts.sum())

    def offsets(self, index: int) -> np.ndarray:
        """Start offsets of this rank's windows in batch `index`."""
        step, micro = divmod(index, self.grad_accum)
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self._n_starts, size=self.batch_size * self.world_size * self.grad_accum)
        first = (micro * self.world_size + self.rank) * self.batch_size
        starts = starts[first : first + self.batch_size]
        if len(self._piece_starts) > 1:
            piece = np.searchsorted(self._first_start, starts, side="right") - 1
            starts = self._piece_starts[piece] + starts - self._first_start[piece]
        return starts

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
