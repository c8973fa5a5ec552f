"""Training data: the embedded standard-library corpus, token caches, and batch windows."""
from .corpus import TokenizedCorpus, default_cache_dir, stdlib_corpus, stdlib_files, text_file_corpus
from .dataset import TokenSplits, TokenWindows, load_token_splits

__all__ = ["TokenSplits", "TokenWindows", "TokenizedCorpus", "default_cache_dir", "load_token_splits",
           "stdlib_corpus", "stdlib_files", "text_file_corpus"]
