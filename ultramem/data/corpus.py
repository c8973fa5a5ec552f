"""Text corpora, tokenizer training and the token cache.

The default corpus is the Python standard library's own `.py` sources: real text present on
every machine, no download. Files are read in sorted relative-path order up to a byte cap. A
byte-level BPE is trained on the text with HF `tokenizers`, and the tokenizer JSON plus the token
stream are cached as a token directory (`.npy` shards + `meta.json`, see `shards.py`) under a
name keyed by a hash of everything they depend on (file list + sizes, vocab, byte cap, Python
and tokenizers versions). The entry is built in a temporary directory and renamed into place;
`meta.json` records a checksum of the tokenizer, and an entry that fails any check on reuse
(edited tokenizer, truncated shard, unreadable meta) is rebuilt with a warning. Builds hold a
lock on the cache directory and first remove what killed builds left behind.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .documents import Utf8Decoder, decode_text, is_gzipped, is_jsonl, iter_pieces, open_binary
from .shards import (
    DEFAULT_SHARD_TOKENS,
    META_NAME,
    TOKENIZER_NAME,
    ShardedTokens,
    ShardWriter,
    clean_stale_temps,
    dir_lock,
    file_in_the_way,
    file_sha256,
    make_temp_dir,
    open_token_directory,
    read_meta,
    remove_path,
    token_dtype,
    write_meta,
)
from .tokenizer import EOT, encode_texts, find_eos_id, load_tokenizer, tokenizer_vocab_size, train_in_subprocess

log = logging.getLogger(__name__)

CACHE_ENV = "ULTRAMEM_CACHE"
_FORMAT_VERSION = 2  # bump when the cache layout or the tokenizer recipe changes
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_ENTRY_RE = re.compile(r"^(stdlib|text|val)-.*[0-9a-f]{16}$")
# not the run directory's ".lock": a cache inside a run directory would wait on its own run's lock
_LOCK_NAME = ".cache.lock"


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
    tokens: ShardedTokens  # 1-D uint16/uint32 stream, documents joined with the end-of-text token
    tokenizer_path: Path
    vocab_size: int  # the tokenizer's real size (<= requested)
    eot_id: int
    cache_dir: Path
    built: bool  # True when this call built the cache (False: reused)

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


def _train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(make_texts: Callable, vocab_size: int, out_path: Path):
    """Train our byte-level BPE on make_texts() in a child process (Ctrl-C stops it at once),
    save it to out_path and return it loaded."""
    train_in_subprocess(_train_tokenizer, make_texts, vocab_size, out_path)
    return load_tokenizer(out_path)


def _cache_key(
    kind: str, files: list[tuple[str, int]], vocab_size: int, max_bytes: int, tokenizer_sha: str | None = None
) -> str:
    import tokenizers

    payload = json.dumps(
        {
            "format": _FORMAT_VERSION,
            "kind": kind,
            "files": files,
            "vocab": vocab_size,
            "max_bytes": max_bytes,
            "python": sys.version.split()[0],
            "tokenizers": tokenizers.__version__,
            "tokenizer": tokenizer_sha,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_entry(entry: Path, warn: bool, announce: bool = True) -> TokenizedCorpus | None:
    """The complete, intact cache entry at `entry`, or None (with a warning when it is damaged)."""
    if not (entry / META_NAME).is_file():
        if warn and entry.exists():
            log.warning("rebuilding incomplete cache entry %s (no %s)", entry, META_NAME)
        return None
    try:
        meta = read_meta(entry)
        tok_path = entry / meta["tokenizer"]
        if file_sha256(tok_path) != meta["tokenizer_sha256"]:
            raise ValueError(f"{tok_path} does not match the checksum in {META_NAME} (edited or damaged)")
        tokens, _ = open_token_directory(entry, what=f"cache entry {entry}")
        if len(tokens) != meta["n_tokens"]:
            raise ValueError(f"{len(tokens)} tokens on disk, {META_NAME} records {meta['n_tokens']}")
        corpus = TokenizedCorpus(tokens, tok_path, meta["vocab_size"], meta["eos_id"], entry, False)
    except (ValueError, KeyError, TypeError, OSError) as e:
        if warn:
            log.warning("rebuilding cache entry %s: %s", entry, e)
        return None
    if announce:
        log.info("reusing tokenized corpus %s (%d tokens)", entry, len(corpus.tokens))
    return corpus


def _install_dir(tmp: Path, entry: Path) -> None:
    """Rename the finished temporary directory to `entry`, moving a previous (damaged) one aside."""
    if entry.exists():
        aside = make_temp_dir(entry.parent, entry.name)
        aside.rmdir()
        os.rename(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, entry)


def _tokenize_and_cache(
    kind: str,
    documents: list[tuple[str, int]],
    read_texts,
    vocab_size: int,
    max_bytes: int,
    cache_root: Path,
    what: str = "data.source",
    tokenizer_path: Path | None = None,
    eos_id: int | None = None,
) -> TokenizedCorpus:
    """documents: (name, size) pairs that key the cache; read_texts() → list of document texts
    (called only when the entry must be built). With tokenizer_path the texts are encoded with
    that tokenizer (and eos_id) instead of a BPE trained on them."""
    tok_sha = file_sha256(tokenizer_path) if tokenizer_path is not None else None
    key = _cache_key(kind, documents, vocab_size, max_bytes, tok_sha)
    entry = cache_root / (f"{kind}-v{vocab_size}-{key}" if tokenizer_path is None else f"{kind}-{key}")
    cached = _load_entry(entry, warn=True)
    if cached is not None:
        return cached
    texts = read_texts()
    if not any(t.strip() for t in texts):
        raise ValueError(f"{what}: no text to tokenize ({len(documents)} input file(s), all empty or whitespace)")
    try:  # a cache that cannot be written is the user's setting to fix, not a traceback
        cache_root.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        blocker = file_in_the_way(cache_root)
        why = f"{str(blocker)!r} is a file" if blocker is not None else e.strerror or e
        raise ValueError(
            f"token cache directory {str(cache_root)!r} (data.cache_dir, else $ULTRAMEM_CACHE or "
            f"~/.cache/ultramem) cannot be used: {why}"
        ) from None
    with dir_lock(cache_root, _LOCK_NAME):
        cached = _load_entry(entry, warn=False)  # another process may have built it while we waited
        if cached is not None:
            return cached
        clean_stale_temps(cache_root, legacy_subdirs=_ENTRY_RE.match)
        tmp = make_temp_dir(cache_root, entry.name)
        try:
            tok_file = tmp / TOKENIZER_NAME
            if tokenizer_path is None:
                log.info(
                    "training a %d-token byte-level BPE on %d documents (%.1f MB)",
                    vocab_size,
                    len(texts),
                    sum(len(t) for t in texts) / 1e6,
                )
                tok = train_tokenizer(functools.partial(iter, texts), vocab_size, tok_file)
                eot_id = tok.token_to_id(EOT)
            else:
                shutil.copyfile(tokenizer_path, tok_file)
                tok = load_tokenizer(tok_file, what=str(tokenizer_path))
                eot_id = find_eos_id(tok, what=str(tokenizer_path)) if eos_id is None else eos_id
            real_vocab = tokenizer_vocab_size(tok)
            dtype = token_dtype(real_vocab)
            writer = ShardWriter(tmp, dtype, DEFAULT_SHARD_TOKENS)
            try:
                writer.write(encode_texts(tok, texts, eot_id, dtype))
                shards = writer.close()
            except BaseException:
                writer.abort()
                raise
            if writer.n_tokens <= len(texts):  # nothing but the end-of-text separators
                raise ValueError(f"{what}: the text tokenizes to 0 tokens")
            write_meta(
                tmp,
                {
                    "format": _FORMAT_VERSION,
                    "kind": kind,
                    "n_tokens": writer.n_tokens,
                    "vocab_size": real_vocab,
                    "eos_id": eot_id,
                    "dtype": dtype.name,
                    "shards": shards,
                    "tokenizer": TOKENIZER_NAME,
                    "tokenizer_sha256": file_sha256(tok_file),
                    "documents": len(documents),
                },
            )
            _install_dir(tmp, entry)
        except BaseException:
            remove_path(tmp)
            raise
    log.info("cached %d tokens (vocab %d) in %s", writer.n_tokens, real_vocab, entry)
    corpus = _load_entry(entry, warn=True, announce=False)
    if corpus is None:
        raise RuntimeError(f"the cache entry {entry} just built does not read back")
    corpus.built = True
    return corpus


def stdlib_corpus(vocab_size: int, max_bytes: int, cache_dir: str | Path | None = None) -> TokenizedCorpus:
    """Tokenized standard-library sources (built once, then reused from the cache)."""
    root, files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    chosen = _select(files, root, max_bytes)
    docs = [(p.relative_to(root).as_posix(), size) for p, size in chosen]

    def read_texts() -> list[str]:
        return [decode_text(p.read_bytes(), str(p)) for p, _ in chosen]

    return _tokenize_and_cache(
        "stdlib",
        docs,
        read_texts,
        vocab_size,
        max_bytes,
        Path(cache_dir or default_cache_dir()).expanduser(),
        what="data.source='stdlib'",
    )


def _text_file_documents(p: Path, max_bytes: int) -> list[str]:
    """The documents of a text file, up to about max_bytes: JSON Lines (`.jsonl`, `.ndjson`, also
    gzipped) a record each, as `prepare` reads them; other text (gzipped too) a paragraph each."""
    if is_jsonl(p):
        docs, current, total = [], [], 0
        for piece, ends in iter_pieces([p]):
            current.append(piece)
            total += len(piece)
            if ends:
                docs.append("".join(current))
                current = []
            if total >= max_bytes:
                break
        return docs + (["".join(current)] if current else [])
    dec = Utf8Decoder()
    with open_binary(p) as f:
        data = f.read(max_bytes)
    # a cap that cuts a character in two drops it instead of counting it as invalid
    text = dec.decode(data, final=len(data) < max_bytes)
    dec.warn(str(p))
    # paragraphs as documents: the BPE trainer and the encoder work per document
    return [t for t in re.split(r"\n\s*\n", text) if t.strip()]


def _text_file_key(p: Path, what: str) -> list[tuple[str, int]]:
    if not p.is_file():
        raise FileNotFoundError(f"{what}: text file {str(p)!r} does not exist")
    stat = p.stat()
    # the reader in the key: caches made before JSON Lines and gzip were parsed hold the raw bytes
    reader = ":jsonl" if is_jsonl(p) else ":gz" if is_gzipped(p) else ""
    return [(f"{p.resolve().as_posix()}@{stat.st_mtime_ns}{reader}", stat.st_size)]


def text_file_corpus(
    path: str | Path, vocab_size: int, max_bytes: int, cache_dir: str | Path | None = None, what: str = "data.source"
) -> TokenizedCorpus:
    """A single text file, tokenized with a BPE trained on it (cached like the stdlib corpus).
    Blank-line-separated paragraphs are the documents, or a JSON Lines file's records (either may
    be gzipped); bytes that are not UTF-8 are replaced."""
    p = Path(path).expanduser()
    docs = _text_file_key(p, what)
    return _tokenize_and_cache(
        "text",
        docs,
        lambda: _text_file_documents(p, max_bytes),
        vocab_size,
        max_bytes,
        Path(cache_dir or default_cache_dir()).expanduser(),
        what=f"{what} {str(p)!r}",
    )


def tokenized_text_file(
    path: str | Path,
    tokenizer_path: Path,
    max_bytes: int,
    cache_dir: str | Path | None = None,
    eos_id: int | None = None,
    what: str = "data.val_source",
) -> TokenizedCorpus:
    """A text file encoded with an existing tokenizer (a validation text for a corpus whose
    tokenizer is fixed), documents as text_file_corpus reads them, cached like the corpora."""
    p = Path(path).expanduser()
    docs = _text_file_key(p, what)
    tokenizer_path = Path(tokenizer_path)
    load_tokenizer(tokenizer_path)  # a damaged tokenizer fails here, naming its file
    return _tokenize_and_cache(
        "val",
        docs,
        lambda: _text_file_documents(p, max_bytes),
        0,
        max_bytes,
        Path(cache_dir or default_cache_dir()).expanduser(),
        what=f"{what} {str(p)!r}",
        tokenizer_path=tokenizer_path,
        eos_id=eos_id,
    )
