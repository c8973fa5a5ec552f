"""Text corpora, tokenizer training and the token cache.

The default corpus is the Python standard library's own `.py` sources: real text present on
every machine, no download. Files are read in sorted relative-path order up to a byte cap. A
byte-level BPE is trained on the text with HF `tokenizers`, and the tokenizer JSON plus the token
stream (`uint16`/`uint32` `.npy`) are cached under a directory keyed by a hash of everything
they depend on (file list + sizes, vocab, byte cap, Python and tokenizers versions). Writes go to
a temporary name and are renamed into place, so an interrupted build never leaves a corrupt cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "ULTRAMEM_CACHE"
_FORMAT_VERSION = 1  # bump when the cache layout or the tokenizer recipe changes
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ultramem"


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, sorted .py files under the standard library, third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _select(files: list[Path], root: Path, max_bytes: int) -> list[tuple[Path, int]]:
    """Leading files of the sorted list whose sizes fit within max_bytes (at least one)."""
    chosen, total = [], 0
    for f in files:
        size = f.stat().st_size
        if chosen and total + size > max_bytes:
            break
        chosen.append((f, size))
        total += size
    return chosen


@dataclass
class TokenizedCorpus:
    tokens: np.ndarray  # 1-D uint16/uint32, documents joined with the end-of-text token
    tokenizer_path: Path
    vocab_size: int  # the tokenizer's real size (<= requested)
    eot_id: int
    cache_dir: Path
    built: bool  # True when this call built the cache (False: reused)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))


EOT = "<|endoftext|>"


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file beside `path`, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_key(kind: str, files: list[tuple[str, int]], vocab_size: int, max_bytes: int) -> str:
    import tokenizers

    payload = json.dumps({
        "format": _FORMAT_VERSION, "kind": kind, "files": files, "vocab": vocab_size, "max_bytes": max_bytes,
        "python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tokenize_and_cache(kind: str, documents: list[tuple[str, int]], read_texts, vocab_size: int,
                        max_bytes: int, cache_root: Path) -> TokenizedCorpus:
    """documents: (name, size) pairs that key the cache; read_texts() → list of document texts
    (called only when the entry must be built)."""
    key = _cache_key(kind, documents, vocab_size, max_bytes)
    entry = cache_root / f"{kind}-v{vocab_size}-{key}"
    tok_path, tokens_path, meta_path = entry / "tokenizer.json", entry / "tokens.npy", entry / "meta.json"
    if meta_path.is_file() and tok_path.is_file() and tokens_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            tokens = np.load(tokens_path, mmap_mode="r")
            if tokens.shape == (meta["n_tokens"],):
                log.info("reusing tokenized corpus %s (%d tokens)", entry, tokens.shape[0])
                return TokenizedCorpus(tokens, tok_path, meta["vocab_size"], meta["eot_id"], entry, False)
        except (ValueError, KeyError, OSError) as e:
            log.warning("rebuilding unreadable cache %s: %s", entry, e)
    entry.mkdir(parents=True, exist_ok=True)
    texts = read_texts()
    log.info("training a %d-token byte-level BPE on %d documents (%.1f MB)", vocab_size, len(texts),
             sum(len(t) for t in texts) / 1e6)
    tok = _train_tokenizer(texts, vocab_size)
    eot_id = tok.token_to_id(EOT)
    real_vocab = tok.get_vocab_size()
    dtype = np.uint16 if real_vocab <= 1 << 16 else np.uint32
    pieces = []
    for enc in tok.encode_batch(texts):
        pieces.append(np.asarray(enc.ids, dtype=dtype))
        pieces.append(np.asarray([eot_id], dtype=dtype))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    # tokenizer and tokens first, meta last: meta's presence marks a complete entry
    _atomic_write(tok_path, lambda f: f.write(tok.to_str().encode()))
    _atomic_write(tokens_path, lambda f: np.save(f, tokens))
    meta = {"n_tokens": int(tokens.shape[0]), "vocab_size": real_vocab, "eot_id": eot_id,
            "documents": len(documents), "kind": kind}
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    log.info("cached %d tokens (vocab %d) in %s", tokens.shape[0], real_vocab, entry)
    return TokenizedCorpus(tokens, tok_path, real_vocab, eot_id, entry, True)


def stdlib_corpus(vocab_size: int, max_bytes: int, cache_dir: str | Path | None = None) -> TokenizedCorpus:
    """Tokenized standard-library sources (built once, then reused from the cache)."""
    root, files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    chosen = _select(files, root, max_bytes)
    docs = [(p.relative_to(root).as_posix(), size) for p, size in chosen]

    def read_texts() -> list[str]:
        return [p.read_text(encoding="utf-8", errors="replace") for p, _ in chosen]

    return _tokenize_and_cache("stdlib", docs, read_texts, vocab_size, max_bytes,
                               Path(cache_dir or default_cache_dir()))


def text_file_corpus(path: str | Path, vocab_size: int, max_bytes: int,
                     cache_dir: str | Path | None = None) -> TokenizedCorpus:
    """A single text file, tokenized with a BPE trained on it (cached like the stdlib corpus)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.source: text file {str(p)!r} does not exist")
    stat = p.stat()
    name = f"{p.resolve().as_posix()}@{stat.st_mtime_ns}"

    def read_texts() -> list[str]:
        with p.open("rb") as f:
            text = f.read(max_bytes).decode("utf-8", errors="replace")
        # paragraphs as documents: the BPE trainer and the encoder work per document
        return [t for t in re.split(r"\n\s*\n", text) if t.strip()]

    return _tokenize_and_cache("text", [(name, stat.st_size)], read_texts, vocab_size, max_bytes,
                               Path(cache_dir or default_cache_dir()))
