"""Training data: the embedded standard-library corpus, token caches and directories, batch windows."""

from .corpus import (
    TokenizedCorpus,
    default_cache_dir,
    stdlib_corpus,
    stdlib_files,
    text_file_corpus,
    tokenized_text_file,
)
from .dataset import (
    VAL_SPLITS,
    TokenSplits,
    TokenWindows,
    check_val_split,
    load_token_splits,
    split_ranges,
    split_stream,
    token_segments,
)
from .pipeline import prepare
from .shards import ShardedTokens, ShardWriter, open_shard, open_token_directory, read_meta

__all__ = [
    "VAL_SPLITS",
    "ShardWriter",
    "ShardedTokens",
    "TokenSplits",
    "TokenWindows",
    "TokenizedCorpus",
    "check_val_split",
    "default_cache_dir",
    "load_token_splits",
    "open_shard",
    "open_token_directory",
    "prepare",
    "read_meta",
    "split_ranges",
    "split_stream",
    "stdlib_corpus",
    "stdlib_files",
    "text_file_corpus",
    "token_segments",
    "tokenized_text_file",
]
