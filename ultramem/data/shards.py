"""Token shard directories: the memory-mapped reader, the shard writer and the on-disk rules.

A token directory holds flat 1-D token shards read in order as one stream: `*.npy` integer
arrays or raw little-endian uint16 `*.bin` files. A `meta.json` beside them (written by
`python -m ultramem.data prepare` and by the corpus cache) lists the shards and their lengths
and records the tokenizer's vocabulary size, end-of-text id and a checksum of `tokenizer.json`.
Without `meta.json` every `*.npy` / `*.bin` file is a shard, in sorted name order.

Everything that writes here builds in a temporary name (`.<name>.tmp<random>`) and renames it
into place at the end, so a reader never sees a half-written shard; such names left behind by a
killed process are removed by the next writer that holds the directory's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised across processes
    fcntl = None

log = logging.getLogger(__name__)

META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_SUFFIXES = (".npy", ".bin")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
_TEMP_RE = re.compile(r"^\..+\.tmp[A-Za-z0-9_]+$")
_CHECK_CHUNK = 1 << 24  # elements scanned at a time when checking token ids


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- reading


def open_shard(path: Path) -> np.ndarray:
    """Memory-map one shard as a 1-D integer array; malformed shards raise ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"shard {str(path)!r} is not a readable .npy file: {e}") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
            what = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise ValueError(f"shard {str(path)!r}: expected a 1-D integer array, got {what}")
        if arr.size == 0:
            raise ValueError(f"shard {str(path)!r} holds no tokens (every shard must hold at least one)")
        return arr
    if path.suffix == ".bin":
        size = path.stat().st_size
        if size == 0:
            raise ValueError(
                f"shard {str(path)!r} is empty (a .bin shard holds raw little-endian uint16 "
                f"tokens and must hold at least one)"
            )
        if size % 2:
            raise ValueError(
                f"shard {str(path)!r} has an odd size of {size} bytes (a .bin shard holds raw "
                f"little-endian uint16 tokens, 2 bytes each)"
            )
        return np.memmap(path, dtype="<u2", mode="r")
    raise ValueError(f"shard {str(path)!r}: unknown shard type (expected *.npy or *.bin)")


def check_token_ids(arr: np.ndarray, name: str, limit: int | None = None, limit_rule: str = "") -> None:
    """Refuse negative ids and, with `limit`, ids >= limit; the error names the shard, the id and its position."""
    signed = arr.dtype.kind == "i"
    for off in range(0, arr.size, _CHECK_CHUNK):
        chunk = arr[off : off + _CHECK_CHUNK]
        if signed and chunk.min() < 0:
            pos = int(np.argmax(chunk < 0))
            raise ValueError(
                f"shard {name} holds the negative token id {int(chunk[pos])} at position "
                f"{off + pos}; token ids must be >= 0"
            )
        if limit is not None and chunk.max() >= limit:
            pos = int(np.argmax(chunk >= limit))
            raise ValueError(
                f"shard {name} holds token id {int(chunk[pos])} at position {off + pos}, "
                f"which does not fit {limit_rule or f'a vocabulary of {limit}'}"
            )


class ShardedTokens:
    """Several 1-D token arrays (usually memory maps) seen as one stream, without copying.

    `len(t)`, `t[i]` and `t[a:b]` work across shard boundaries; a slice returns a numpy array
    (a view when it lies in one shard). `t.view(a, b)` is the sub-stream as another
    `ShardedTokens` (views of the same maps), which is how the splits are made.

    Shard boundaries are not breaks in the text: the shards continue one another. `breaks` are
    the positions where they do not, where `join` put separate ranges of a stream one after the
    other; `segments` lists the contiguous pieces between them, which windows must not cross.
    """

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        dtype: np.dtype | None = None,
        breaks: Sequence[int] = (),
    ):
        self._shards = [np.asarray(s) if not isinstance(s, np.ndarray) else s for s in shards]
        for s in self._shards:
            if s.ndim != 1:
                raise ValueError(f"token shards must be 1-D, got shape {s.shape}")
        self.names = list(names) if names is not None else [f"shard {i}" for i in range(len(self._shards))]
        self._starts = np.zeros(len(self._shards) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self._shards], out=self._starts[1:])
        if dtype is None:
            dtype = np.result_type(*[s.dtype for s in self._shards]) if self._shards else np.dtype("<u2")
        self.dtype = np.dtype(dtype)
        self.breaks = sorted({int(b) for b in breaks if 0 < b < len(self)})

    @classmethod
    def join(cls, parts: Sequence[ShardedTokens]) -> ShardedTokens:
        """The parts one after the other as one stream, with a break at every join (no copy)."""
        shards, names, breaks, at = [], [], [], 0
        for p in parts:
            shards.extend(p._shards)
            names.extend(p.names)
            breaks.extend(at + b for b in p.breaks)
            at += len(p)
            breaks.append(at)
        return cls(shards, names, parts[0].dtype if parts else None, breaks)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """The contiguous pieces [start, stop) of the stream, in order: one unless it has breaks."""
        edges = [0, *self.breaks, len(self)]
        return list(zip(edges[:-1], edges[1:]))

    @property
    def shards(self) -> list[np.ndarray]:
        return list(self._shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    ndim = 1

    @property
    def size(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._shards)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens in {len(self._shards)} shards, dtype={self.dtype})"

    def _shard_of(self, index: int) -> int:
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def _range(self, start: int, stop: int) -> np.ndarray:
        if start >= stop:
            return np.empty(0, dtype=self.dtype)
        first, last = self._shard_of(start), self._shard_of(stop - 1)
        s = self._starts
        if first == last:
            out = np.asarray(self._shards[first][start - s[first] : stop - s[first]])
            return out if out.dtype == self.dtype else out.astype(self.dtype)
        parts = [self._shards[first][start - s[first] :]]
        parts.extend(self._shards[first + 1 : last])
        parts.append(self._shards[last][: stop - s[last]])
        return np.concatenate(parts).astype(self.dtype, copy=False)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._range(start, stop)
            idx = np.arange(start, stop, step)
            if idx.size == 0:
                return np.empty(0, dtype=self.dtype)
            lo, hi = int(idx.min()), int(idx.max()) + 1
            return self._range(lo, hi)[idx - lo]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of range for {n} tokens")
            k = self._shard_of(i)
            return self._shards[k][i - self._starts[k]]
        raise TypeError(f"ShardedTokens indices must be integers or slices, not {type(key).__name__}")

    def view(self, start: int = 0, stop: int | None = None) -> ShardedTokens:
        """Tokens [start, stop) as a ShardedTokens over views of the same shards (no copy)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        pieces, names = [], []
        for k, shard in enumerate(self._shards):
            lo, hi = int(self._starts[k]), int(self._starts[k + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append(shard[a - lo : b - lo])
                names.append(self.names[k])
        return ShardedTokens(pieces, names, self.dtype, [b - start for b in self.breaks if start < b < stop])

    def __array__(self, dtype=None, copy=None):
        out = self._range(0, len(self))
        return out if dtype is None else out.astype(dtype, copy=False)

    def min(self):
        if not len(self):
            raise ValueError("min() of an empty token stream")
        return min(s.min() for s in self._shards if len(s))

    def max(self):
        if not len(self):
            raise ValueError("max() of an empty token stream")
        return max(s.max() for s in self._shards if len(s))


def read_meta(directory: Path) -> dict | None:
    """The directory's meta.json, or None when it has none; ValueError naming it when unusable."""
    path = Path(directory) / META_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        shards = meta["shards"]
        if not isinstance(meta, dict) or not isinstance(shards, list) or not shards:
            raise ValueError("no shard list")
        for s in shards:
            if not isinstance(s["file"], str) or not isinstance(s["n_tokens"], int):
                raise ValueError(f"bad shard record {s!r}")
        if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] <= 0:
            raise ValueError(f"bad vocab_size {meta['vocab_size']!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a valid token-directory meta.json ({type(e).__name__}: {e})") from None
    return meta


def open_token_directory(
    directory: str | Path, what: str = "data.source", vocab_size: int | None = None, vocab_rule: str = ""
) -> tuple[ShardedTokens, dict | None]:
    """Memory-map a token directory: (tokens, meta or None).

    Every shard's ids are checked once here: none negative, all below the vocabulary size in
    meta.json when there is one, and all below `vocab_size` (described by `vocab_rule`) when given.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what}: directory {str(directory)!r} does not exist")
    meta = read_meta(directory)
    if meta is not None:
        paths = [directory / s["file"] for s in meta["shards"]]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{what}: shard {str(p)!r} listed in {str(directory / META_NAME)!r} is missing")
        listed = {p.name for p in paths}
        extra = sorted(p.name for p in _shard_files(directory) if p.name not in listed)
        if extra:
            log.warning(
                "%s: ignoring %d shard files of %s not listed in its meta.json (%s)",
                what,
                len(extra),
                directory,
                ", ".join(extra[:5]),
            )
    else:
        paths = _shard_files(directory)
        if not paths:
            raise FileNotFoundError(f"{what}: directory {str(directory)!r} has no *.npy or *.bin shards")
    arrays = []
    for k, p in enumerate(paths):
        arr = open_shard(p)
        name = repr(str(p))
        if meta is not None:
            expected = meta["shards"][k]["n_tokens"]
            if arr.size != expected:
                raise ValueError(
                    f"{what}: shard {name} holds {arr.size} tokens but {META_NAME} records "
                    f"{expected}; the directory is incomplete or was modified"
                )
            check_token_ids(
                arr,
                name,
                meta["vocab_size"],
                f"vocab_size={meta['vocab_size']} recorded in {str(directory / META_NAME)!r}",
            )
        if vocab_size is not None:
            check_token_ids(arr, name, vocab_size, vocab_rule or f"vocab_size={vocab_size}")
        elif meta is None:
            check_token_ids(arr, name)
        arrays.append(arr)
    return ShardedTokens(arrays, [str(p) for p in paths]), meta


def _shard_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.suffix in SHARD_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


# ---------------------------------------------------------------------------------------- writing


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


class ShardWriter:
    """Streams tokens into `<prefix>-00000.npy`, `-00001.npy`, ... of at most `shard_tokens` each.

    The files are written under their final names inside `directory`, which the caller makes a
    temporary directory and renames or moves into place once everything is written.
    """

    def __init__(
        self, directory: Path, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS, prefix: str = "tokens"
    ):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens={shard_tokens} must be positive")
        self.directory, self.dtype = Path(directory), np.dtype(dtype)
        self.shard_tokens, self.prefix = shard_tokens, prefix
        self.shards: list[dict] = []
        self.n_tokens = 0
        self._file: BinaryIO | None = None
        self._n = 0
        # numpy pads the header so that the length field can grow: the header written for an
        # empty shard has the length of the final one and is overwritten in place
        self._header_len = len(_npy_header(self.dtype, 0))

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.npy"
        self._file = open(self.directory / name, "wb")
        self._file.write(_npy_header(self.dtype, 0))
        self._n = 0

    def _finish(self) -> None:
        f, self._file = self._file, None
        header = _npy_header(self.dtype, self._n)
        if len(header) != self._header_len:
            f.close()
            raise RuntimeError(f"numpy wrote a {len(header)}-byte .npy header where {self._header_len} were reserved")
        f.seek(0)
        f.write(header)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self.shards.append({"file": Path(f.name).name, "n_tokens": self._n})

    def write(self, tokens: np.ndarray) -> None:
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        while arr.size:
            if self._file is None:
                self._open()
            part = arr[: self.shard_tokens - self._n]
            self._file.write(part.view(np.uint8).data)
            self._n += part.size
            self.n_tokens += part.size
            arr = arr[part.size :]
            if self._n == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Finish the last shard; the shard records ({"file", "n_tokens"}) in stream order."""
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file beside `path`, then rename: readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the final file private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temp_dir(parent: Path, name: str) -> Path:
    """A fresh temporary directory `.<name>.tmp<random>` in parent (a name the cleaners know)."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=parent))
    path.chmod(0o755)  # it becomes the final directory: readable like one made by mkdir
    return path


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_RE.match(name))


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(
    directory: Path, legacy_subdirs: Callable[[str], bool] | None = None, legacy_age_s: float = 3600.0
) -> int:
    """Remove temporary files and directories left in `directory` by killed writers.

    The caller must hold the directory's lock: every writer takes it, so whatever temporary is
    present then belongs to nobody. Subdirectories accepted by `legacy_subdirs` are also swept
    of `*.tmp*` files (an older cache layout wrote those there without a lock), but only when
    older than `legacy_age_s`.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    now = time.time()
    for p in directory.iterdir():
        if is_temp_name(p.name):
            log.info("removing stale temporary %s", p)
            remove_path(p)
            removed += 1
        elif legacy_subdirs is not None and p.is_dir() and legacy_subdirs(p.name):
            for q in p.iterdir():
                with contextlib.suppress(OSError):
                    if ".tmp" in q.name and q.is_file() and now - q.stat().st_mtime > legacy_age_s:
                        log.info("removing stale temporary %s", q)
                        q.unlink()
                        removed += 1
    return removed


def file_in_the_way(path: Path) -> Path | None:
    """The file that keeps directory `path` from being made: `path` itself or its nearest existing
    parent, when that is not a directory; None when nothing is in the way."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


@contextlib.contextmanager
def dir_lock(directory: Path, name: str) -> Iterator[None]:
    """Exclusive advisory lock on `directory/name`, held for the block (blocks while another holds it)."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing in %s", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def write_meta(directory: Path, meta: dict) -> None:
    atomic_write(Path(directory) / META_NAME, lambda f: f.write(json.dumps(meta, indent=1).encode()))
