"""Tokenizer files: loading and validating them, the end-of-text id, batch encoding, and BPE
training in a child process (so that Ctrl-C stops it at once)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .shards import TOKENIZER_NAME

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
# end-of-document markers of common tokenizers, tried in order when none is named
EOS_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def mp_context():
    """fork where available: children start at once, without importing torch again."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def resolve_tokenizer_path(path: str | Path, what: str = "--tokenizer") -> Path:
    """A tokenizer JSON file, or a directory holding tokenizer.json."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / TOKENIZER_NAME).is_file():
            raise FileNotFoundError(f"{what}: directory {str(p)!r} has no {TOKENIZER_NAME}")
        return p / TOKENIZER_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{what}: tokenizer file {str(p)!r} does not exist")
    return p


def load_tokenizer(path: str | Path, what: str = "tokenizer"):
    """Load a Hugging Face `tokenizers` JSON file; ValueError naming the file when it is unusable."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: tokenizer file {str(p)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a bare Exception for every parse error
        raise ValueError(f"{what}: {str(p)!r} is not a valid Hugging Face tokenizers JSON file ({e})") from None
    if tokenizer_vocab_size(tok) <= 0:
        raise ValueError(f"{what}: {str(p)!r} has an empty vocabulary")
    return tok


def tokenizer_vocab_size(tok) -> int:
    """One more than the largest id the tokenizer can produce (added tokens included)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def find_eos_id(tok, eos: str | int | None = None, what: str = "tokenizer") -> int:
    """The id that ends each document: `eos` (a token or an id) when given, else the first of
    EOS_CANDIDATES the tokenizer knows."""
    if eos is not None:
        if isinstance(eos, int) or (isinstance(eos, str) and eos.isdigit()):
            i = int(eos)
            if not 0 <= i < tokenizer_vocab_size(tok):
                raise ValueError(f"--eos {i}: not an id of {what} (vocabulary of {tokenizer_vocab_size(tok)})")
            return i
        i = tok.token_to_id(eos)
        if i is None:
            raise ValueError(f"--eos {eos!r}: {what} has no such token")
        return i
    for name in EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(
        f"{what} has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}; "
        f"name the token that separates documents with --eos"
    )


def encode_texts(
    tok, texts: Sequence[str], eos_id: int, dtype: np.dtype, ends: Sequence[bool] | None = None
) -> np.ndarray:
    """Token ids of texts, concatenated, with eos_id after each text that ends a document
    (every text when `ends` is None). No special tokens besides that eos are added."""
    encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    pieces = []
    for k, enc in enumerate(encodings):
        pieces.append(np.asarray(enc.ids, dtype=dtype))
        if ends is None or ends[k]:
            pieces.append(np.asarray([eos_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _train_child(conn, train_fn, make_texts, vocab_size: int, out_path: str) -> None:
    # the parent owns Ctrl-C: it stops this process when the user interrupts
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        train_fn(make_texts(), vocab_size).save(out_path)
        conn.send(None)
    except BaseException as e:
        try:
            conn.send(e)
        except Exception:  # an exception that does not pickle
            conn.send(RuntimeError(f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def stop_process(proc, grace_s: float = 5.0) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
    proc.join()


def train_in_subprocess(
    train_fn: Callable[[Iterable[str], int], object],
    make_texts: Callable[[], Iterable[str]],
    vocab_size: int,
    out_path: Path,
) -> None:
    """Run `train_fn(make_texts(), vocab_size)` in a child process and save the tokenizer to out_path.

    The tokenizers library trains in native code that only looks at Python signals when it is
    done, so a Ctrl-C would wait for the whole training; here the parent stays responsive and
    stops the child on KeyboardInterrupt. Errors of the child are raised again in the parent.
    """
    ctx = mp_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_train_child,
        args=(send, train_fn, make_texts, vocab_size, str(out_path)),
        name="ultramem-bpe-train",
        daemon=True,
    )
    proc.start()
    send.close()  # so that recv sees EOF if the child dies without a word
    try:
        while not recv.poll(0.1):
            if not proc.is_alive() and not recv.poll():
                raise RuntimeError(f"the tokenizer-training process died (exit code {proc.exitcode})")
        try:
            err = recv.recv()
        except EOFError:
            raise RuntimeError(f"the tokenizer-training process died (exit code {proc.exitcode})") from None
        proc.join()
    except BaseException:
        stop_process(proc)
        raise
    finally:
        recv.close()
    if err is not None:
        raise err
