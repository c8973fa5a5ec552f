"""Token streams and the batches the trainer draws from them.

`load_token_splits` turns `[data]` into a (train, validation) pair of 1-D token arrays:
`source = "stdlib"` (embedded corpus), a text file, or a directory of pre-tokenized shards
(`*.npy` 1-D integer arrays, or raw little-endian `*.bin` uint16 files), read in sorted order.
The validation split is the tail `val_fraction` of the stream.

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

from .corpus import stdlib_corpus, text_file_corpus

log = logging.getLogger(__name__)


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int  # tokens ids are < vocab_size
    tokenizer_path: Path | None = None


def _load_shard(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"shard {str(path)!r}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
        return arr
    return np.memmap(path, dtype=np.uint16, mode="r")


def shard_directory_tokens(directory: Path) -> np.ndarray:
    shards = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".bin"))
    if not shards:
        raise FileNotFoundError(f"data.source: directory {str(directory)!r} has no *.npy or *.bin shards")
    arrays = [_load_shard(p) for p in shards]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def load_token_splits(source: str, vocab_size: int, max_corpus_bytes: int, val_fraction: float,
                      cache_dir: str | None = None) -> TokenSplits:
    tokenizer_path = None
    if source == "stdlib":
        corpus = stdlib_corpus(vocab_size, max_corpus_bytes, cache_dir or None)
        tokens, real_vocab, tokenizer_path = corpus.tokens, corpus.vocab_size, corpus.tokenizer_path
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            tokens = shard_directory_tokens(path)
            real_vocab = int(tokens.max()) + 1 if tokens.size else 0
            if real_vocab > vocab_size:
                raise ValueError(f"data.source {source!r} holds token id {real_vocab - 1}, "
                                 f"which does not fit data.vocab_size={vocab_size}")
            real_vocab = vocab_size
        elif path.is_file():
            corpus = text_file_corpus(path, vocab_size, max_corpus_bytes, cache_dir or None)
            tokens, real_vocab, tokenizer_path = corpus.tokens, corpus.vocab_size, corpus.tokenizer_path
        else:
            raise FileNotFoundError(f"data.source {source!r}: no such file or directory "
                                    f"(use 'stdlib', a text file or a directory of token shards)")
    n_val = int(len(tokens) * val_fraction)
    split = len(tokens) - n_val
    return TokenSplits(tokens[:split], tokens[split:], real_vocab, tokenizer_path)


class TokenWindows:
    """Deterministic random `[batch, seq_len + 1]` windows of a token stream, sharded by rank."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(tokens) < seq_len + 2:
            raise ValueError(f"token stream of {len(tokens)} tokens is too short for seq_len={seq_len} "
                             f"(needs at least seq_len + 2); lower train.seq_len or add data")
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size

    def offsets(self, index: int) -> np.ndarray:
        """Start offsets of this rank's windows in batch `index`."""
        rng = np.random.default_rng([self.seed, index])
        n_windows = self.batch_size * self.world_size
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=n_windows)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, index: int) -> torch.Tensor:
        """Batch `index` as an int64 tensor [batch, seq_len + 1] (inputs = [:, :-1], targets = [:, 1:])."""
        width = self.seq_len + 1
        rows = [np.asarray(self.tokens[s:s + width], dtype=np.int64) for s in self.offsets(index)]
        return torch.from_numpy(np.stack(rows))

    def __iter__(self):
        index = 0
        while True:
            yield self.batch(index)
            index += 1
