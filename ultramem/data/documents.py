"""Reading documents from text files, directories and JSON Lines.

Rules:
* a file named on the command line is always read; inside a directory (walked recursively in
  sorted path order, hidden entries and `__pycache__` / `node_modules` skipped) only files whose
  suffix is in TEXT_SUFFIXES are read, `.gz` compressed versions of them included;
* `*.jsonl` / `*.ndjson` files hold one JSON object per line with a string `text` field, one
  document per line (blank lines are skipped); every other file is one document;
* bytes that are not UTF-8 are replaced with U+FFFD and the file is named in a warning with the
  fraction of bytes replaced;
* documents with no non-whitespace character are skipped.

Long documents are handed out in pieces of about PIECE_CHARS characters, cut just after a line
break that sits between two non-space characters: a byte-level BPE never merges across such a
point, so encoding the pieces gives the same ids as encoding the whole.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    {
        ".txt",
        ".text",
        ".md",
        ".markdown",
        ".rst",
        ".tex",
        ".org",
        ".adoc",
        ".jsonl",
        ".ndjson",
        ".json",
        ".csv",
        ".tsv",
        ".xml",
        ".html",
        ".htm",
        ".yaml",
        ".yml",
        ".toml",
        ".py",
        ".pyi",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".cu",
        ".rs",
        ".go",
        ".java",
        ".kt",
        ".scala",
        ".js",
        ".ts",
        ".jsx",
        ".tsx",
        ".rb",
        ".php",
        ".pl",
        ".lua",
        ".sh",
        ".bash",
        ".sql",
        ".r",
        ".jl",
        ".hs",
        ".ml",
        ".swift",
        ".cs",
        ".m",
    }
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
PIECE_CHARS = 1 << 20
_READ_BLOCK = 1 << 22

# --------------------------------------------------------------------------- decoding with a count

_counts = threading.local()


def _replace_and_count(err: UnicodeDecodeError):
    _counts.bad = getattr(_counts, "bad", 0) + (err.end - err.start)
    return "\ufffd", err.end


codecs.register_error("ultramem-replace-count", _replace_and_count)


class Utf8Decoder:
    """Incremental UTF-8 decoding like errors="replace", counting the bytes replaced."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="ultramem-replace-count")
        self.n_bytes = 0
        self.n_bad = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        _counts.bad = 0
        text = self._dec.decode(data, final)
        self.n_bad += _counts.bad
        self.n_bytes += len(data)
        return text

    def warn(self, name: str) -> None:
        if self.n_bad:
            log.warning(
                "%s is not valid UTF-8: %d of %d bytes (%.2f%%) replaced with U+FFFD",
                name,
                self.n_bad,
                self.n_bytes,
                100.0 * self.n_bad / max(self.n_bytes, 1),
            )


def decode_text(data: bytes, name: str, warn: bool = True, final: bool = True) -> str:
    """data decoded as UTF-8 with errors="replace", warning with the share of bytes replaced.
    With final=False an incomplete character at the end (a cut read) is dropped, not replaced."""
    dec = Utf8Decoder()
    text = dec.decode(data, final)
    if warn:
        dec.warn(name)
    return text


# ----------------------------------------------------------------------------------- input files


def is_gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _inner_suffix(path: Path) -> str:
    return Path(path.stem).suffix.lower() if is_gzipped(path) else path.suffix.lower()


def is_jsonl(path: Path) -> bool:
    return _inner_suffix(path) in JSONL_SUFFIXES


def collect_inputs(inputs: Iterable[str | Path], exclude: Sequence[Path] = ()) -> list[Path]:
    """The files to read, in order: each input file as given, each directory's text files."""
    excluded = [Path(e).resolve() for e in exclude]

    def skipped(p: Path) -> bool:
        r = p.resolve()
        return any(r == e or e in r.parents for e in excluded)

    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(
                    d
                    for d in dirnames
                    if not d.startswith(".") and d not in SKIP_DIRS and not skipped(Path(dirpath) / d)
                )
                for f in filenames:
                    fp = Path(dirpath) / f
                    if not f.startswith(".") and _inner_suffix(fp) in TEXT_SUFFIXES and not skipped(fp):
                        found.append(fp)
            if not found:
                raise FileNotFoundError(
                    f"input directory {str(p)!r} holds no text files "
                    f"(suffixes read: {', '.join(sorted(TEXT_SUFFIXES))})"
                )
            files.extend(sorted(found, key=lambda q: q.relative_to(p).as_posix()))
        else:
            raise FileNotFoundError(f"input {str(p)!r}: no such file or directory")
    return files


def open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if is_gzipped(path) else open(path, "rb")


def cut_point(text: str, target: int) -> int | None:
    """An index near `target` just after a line break between two non-space characters, or None."""
    i = text.rfind("\n", 1, target)
    floor = target // 2
    while i >= max(1, floor):
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 1, i)
    i = text.find("\n", max(target, 1))
    while i != -1 and i + 1 < len(text):
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.find("\n", i + 1)
    return None


def split_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    pieces = []
    while len(text) > max_chars:
        cut = cut_point(text, max_chars)
        if cut is None:
            break
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def _jsonl_pieces(path: Path, warn: bool, max_chars: int) -> Iterator[tuple[str, bool]]:
    dec = Utf8Decoder()
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = dec.decode(raw, final=True)  # a line break never falls inside a UTF-8 character
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); a JSON Lines "
                    f"file holds one JSON object per line"
                ) from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(
                    f'{path}:{lineno}: no "text" field; each line of a JSON Lines file must be '
                    f'a JSON object with a "text" string'
                )
            text = obj["text"]
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: the "text" field is not a string (got {type(text).__name__})')
            if text.strip():
                pieces = split_pieces(text, max_chars)
                for k, piece in enumerate(pieces):
                    yield piece, k == len(pieces) - 1
    if warn:
        dec.warn(str(path))


def _text_pieces(path: Path, warn: bool, max_chars: int) -> Iterator[tuple[str, bool]]:
    dec = Utf8Decoder()
    buf = ""
    with open_binary(path) as f:
        while True:
            block = f.read(_READ_BLOCK)
            buf += dec.decode(block, final=not block)
            # a whitespace-only buffer has no cut point, so empty files never yield
            while len(buf) > max_chars:
                cut = cut_point(buf, max_chars)
                if cut is None:
                    break
                yield buf[:cut], False
                buf = buf[cut:]
            if not block:
                break
    if warn:
        dec.warn(str(path))
    if buf.strip():
        yield buf, True


def iter_pieces(files: Iterable[Path], warn: bool = True, max_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) for every piece of every document of the files, in order."""
    for path in files:
        reader = _jsonl_pieces if is_jsonl(path) else _text_pieces
        yield from reader(Path(path), warn, max_chars)


def iter_texts(files: Sequence[Path], max_chars: int = 0, warn: bool = False) -> Iterator[str]:
    """Document pieces as plain strings (tokenizer training), stopping after max_chars (0: all)."""
    total = 0
    for text, _ in iter_pieces(files, warn=warn):
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
            return
