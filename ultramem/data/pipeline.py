"""`prepare`: text files, directories and JSON Lines → a token directory the trainer memory-maps.

The output directory gets `tokens-00000.npy`, ... (flat 1-D uint16 shards, uint32 when the
vocabulary exceeds 65536; every document followed by the tokenizer's end-of-text id),
`tokenizer.json` and `meta.json`. Everything is written into a temporary subdirectory and moved
into place at the end, `meta.json` last: an interrupted or failed run leaves the directory as it
was. Documents are tokenized in parallel by worker processes, in input order, so the output does
not depend on the number of workers.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np

from .corpus import train_tokenizer
from .documents import PIECE_CHARS, collect_inputs, is_gzipped, iter_pieces, iter_texts
from .shards import (
    DEFAULT_SHARD_TOKENS,
    META_NAME,
    SHARD_SUFFIXES,
    TOKENIZER_NAME,
    ShardWriter,
    clean_stale_temps,
    dir_lock,
    file_sha256,
    make_temp_dir,
    remove_path,
    token_dtype,
    write_meta,
)
from .tokenizer import (
    encode_texts,
    find_eos_id,
    load_tokenizer,
    mp_context,
    resolve_tokenizer_path,
    tokenizer_vocab_size,
)

log = logging.getLogger(__name__)

DEFAULT_VOCAB = 4096
TASK_CHARS = 1 << 20  # text per worker task
_OUR_SHARD_RE = re.compile(r"^tokens-\d{5,}\.npy$")
_LOCK_NAME = ".prepare.lock"


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


# ------------------------------------------------------------------------------ worker processes

_worker: dict = {}


def _init_worker(tokenizer_path: str, eos_id: int, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    _worker.update(tok=load_tokenizer(tokenizer_path), eos=eos_id, dtype=np.dtype(dtype))


def _encode_task(pieces: list[tuple[str, bool]]) -> np.ndarray:
    return encode_texts(
        _worker["tok"], [t for t, _ in pieces], _worker["eos"], _worker["dtype"], [e for _, e in pieces]
    )


def _tasks(pieces: Iterable[tuple[str, bool]], task_chars: int, counts: dict) -> Iterator[tuple[list, int]]:
    """Pieces grouped into tasks of about task_chars characters; counts["documents"] counts the ends."""
    batch, n = [], 0
    for text, end in pieces:
        batch.append((text, end))
        n += len(text)
        counts["documents"] += end
        if n >= task_chars:
            yield batch, n
            batch, n = [], 0
    if batch:
        yield batch, n


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _stop_executor(ex: cf.ProcessPoolExecutor) -> None:
    # shutdown() alone lets running tasks finish; Ctrl-C should not wait for them
    terminate = getattr(ex, "terminate_workers", None)
    if terminate is not None:
        terminate()
    else:
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                p.terminate()
    ex.shutdown(wait=True, cancel_futures=True)


def encode_stream(
    tasks: Iterable[tuple[list, int]],
    tokenizer_path: Path,
    eos_id: int,
    dtype: np.dtype,
    workers: int,
    writer: ShardWriter,
    make_bar: Callable[[], ContextManager],
) -> None:
    """Encode the tasks in order (in `workers` processes when > 1) into the writer; make_bar()
    gives the progress bar, updated with each task's character count."""
    if workers <= 1:
        tok = load_tokenizer(tokenizer_path)
        with make_bar() as bar:
            for pieces, n in tasks:
                writer.write(encode_texts(tok, [t for t, _ in pieces], eos_id, dtype, [e for _, e in pieces]))
                bar.update(n)
        return
    # the workers encode one task each; the tokenizer's own thread pool would oversubscribe the cores
    with _env("TOKENIZERS_PARALLELISM", "false"):
        ex = cf.ProcessPoolExecutor(
            workers,
            mp_context=mp_context(),
            initializer=_init_worker,
            initargs=(str(tokenizer_path), eos_id, dtype.str),
        )
        try:
            ex.submit(int).result()  # starts the workers now, before the bar's monitor thread exists
            pending: collections.deque = collections.deque()
            with make_bar() as bar:
                for pieces, n in tasks:
                    pending.append((ex.submit(_encode_task, pieces), n))
                    if len(pending) >= 2 * workers:  # bounded: the input is read as fast as it is encoded
                        fut, m = pending.popleft()
                        writer.write(fut.result())
                        bar.update(m)
                while pending:
                    fut, m = pending.popleft()
                    writer.write(fut.result())
                    bar.update(m)
        except BaseException:
            _stop_executor(ex)
            raise
        ex.shutdown(wait=True)


# ------------------------------------------------------------------------------------- prepare


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(
            p.name
            for p in out.iterdir()
            if p.suffix in SHARD_SUFFIXES and not p.name.startswith(".") and not _OUR_SHARD_RE.match(p.name)
        )
        if foreign:
            raise ValueError(
                f"--out {str(out)!r} holds shard files that prepare did not write ({', '.join(foreign[:5])}); "
                f"they would be read as part of the data: choose another directory"
            )


@contextlib.contextmanager
def _new_dir_removed_on_failure(out: Path) -> Iterator[None]:
    """A failed run leaves `out` as it was: if it made the directory, it removes it again (the
    run's own files are gone by then; only its lock file is left)."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and out.is_dir() and all(p.name == _LOCK_NAME for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path, shards: list[dict]) -> None:
    """Move the finished files from tmp into out, replacing an earlier prepare's; meta.json last."""
    (out / META_NAME).unlink(missing_ok=True)
    for old in out.iterdir():
        if _OUR_SHARD_RE.match(old.name):
            old.unlink()
    for s in shards:
        os.replace(tmp / s["file"], out / s["file"])
    os.replace(tmp / TOKENIZER_NAME, out / TOKENIZER_NAME)
    os.replace(tmp / META_NAME, out / META_NAME)
    tmp.rmdir()


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eos: str | int | None = None,
    train_chars: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (files, directories, JSON Lines; see `documents`) into the token
    directory `out` and return its meta. `tokenizer`: a tokenizers JSON file or a directory
    holding tokenizer.json; None trains our byte-level BPE of `vocab_size` on the input (on its
    first `train_chars` characters when > 0). `eos`: the end-of-document token or id (default:
    the tokenizer's end-of-text token)."""
    from tqdm import tqdm

    out = Path(out).expanduser()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens={shard_tokens} must be >= 1")
    if not inputs:
        raise ValueError("no inputs given")
    tok_source = resolve_tokenizer_path(tokenizer) if tokenizer is not None else None
    if tok_source is None and vocab_size < 257:
        raise ValueError(
            f"--vocab-size={vocab_size}: a byte-level BPE needs at least 257 tokens (256 bytes + the end-of-text token)"
        )
    files = collect_inputs(inputs, exclude=[out])
    _check_out_dir(out)
    with _new_dir_removed_on_failure(out), dir_lock(out, _LOCK_NAME):
        clean_stale_temps(out)
        tmp = make_temp_dir(out, "prepare")
        writer = None
        try:
            tok_file = tmp / TOKENIZER_NAME
            if tok_source is not None:
                tok = load_tokenizer(tok_source, what=f"--tokenizer {str(tok_source)!r}")
                shutil.copyfile(tok_source, tok_file)
                tok_name = str(tok_source)
            else:
                log.info("training a %d-token byte-level BPE on %d input files", vocab_size, len(files))
                tok = train_tokenizer(_TrainTexts(files, train_chars), vocab_size, tok_file)
                tok_name = f"trained here (vocab_size={vocab_size})"
            eos_id = find_eos_id(tok, eos, what=f"tokenizer {tok_name}")
            real_vocab = tokenizer_vocab_size(tok)
            dtype = token_dtype(real_vocab)
            writer = ShardWriter(tmp, dtype, shard_tokens)
            size = sum(f.stat().st_size for f in files)
            counts = {"documents": 0}
            tasks = _tasks(iter_pieces(files, warn=True, max_chars=PIECE_CHARS), TASK_CHARS, counts)
            log.info("tokenizing %d files (%.1f MB) with %d worker(s)", len(files), size / 1e6, workers)
            # the bar counts characters; file sizes are the total unless some are compressed
            total = None if any(is_gzipped(f) for f in files) else size
            encode_stream(
                tasks,
                tok_file,
                eos_id,
                dtype,
                workers,
                writer,
                lambda: tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc="tokenizing",
                    file=sys.stderr,
                    disable=not progress,
                    dynamic_ncols=True,
                ),
            )
            shards = writer.close()
            n_docs = counts["documents"]
            if writer.n_tokens <= n_docs:  # nothing but the end-of-text separators
                raise ValueError(
                    f"the inputs ({len(files)} files) hold no text that tokenizes to any token "
                    f"(empty or whitespace-only documents are skipped)"
                )
            meta = {
                "format": 1,
                "vocab_size": real_vocab,
                "eos_id": eos_id,
                "dtype": dtype.name,
                "n_tokens": writer.n_tokens,
                "shards": shards,
                "tokenizer": TOKENIZER_NAME,
                "tokenizer_sha256": file_sha256(tok_file),
                "tokenizer_source": tok_name,
                "inputs": [str(Path(i).expanduser().resolve()) for i in inputs],
                "n_files": len(files),
                "n_documents": n_docs,
            }
            write_meta(tmp, meta)
            _commit(tmp, out, shards)
        except BaseException:
            if writer is not None:
                writer.abort()
            remove_path(tmp)
            raise
    log.info(
        "wrote %d tokens in %d shard(s) (%s, vocab %d) to %s", writer.n_tokens, len(shards), dtype.name, real_vocab, out
    )
    return meta


class _TrainTexts:
    """The texts the BPE trains on, read again in the training process (picklable for spawn)."""

    def __init__(self, files: list[Path], max_chars: int):
        self.files, self.max_chars = files, max_chars

    def __call__(self):
        return iter_texts(self.files, self.max_chars, warn=False)
