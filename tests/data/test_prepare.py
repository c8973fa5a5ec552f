"""`prepare` and its CLI: inputs, tokenizers, atomic output, interrupts, and validation sources."""

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from tokenizers import Regex, normalizers

from ultramem.data import TokenWindows, load_token_splits, prepare, stdlib_corpus
from ultramem.data import corpus as corpus_mod
from ultramem.data import pipeline as prepare_mod
from ultramem.data.__main__ import main as cli_main
from ultramem.data.documents import iter_pieces, split_pieces
from ultramem.data.tokenizer import load_tokenizer, train_in_subprocess

WORDS = ["def", "return", "self", "import", "class", "value", "(", ")", ":", "alpha", "beta", "gamma", "naïve", "日本"]


def _text(rng, lines):
    return "\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(lines))


@pytest.fixture
def corpus_dir(tmp_path):
    """Two text documents and a JSON Lines file of three, plus files a directory scan skips."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = [_text(rng, 120), _text(rng, 80)]
    (root / "a.txt").write_text(docs[0])
    (root / "b.md").write_text(docs[1])
    lines = [_text(rng, 20), _text(rng, 30) + "\n\n  trailing", _text(rng, 10)]
    with open(root / "sub" / "c.jsonl", "w") as f:
        for i, t in enumerate(lines):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
            if i == 0:
                f.write("\n")  # blank lines are skipped
    (root / "sub" / "image.png").write_bytes(bytes(range(256)))  # not a text suffix: skipped
    (root / ".hidden.txt").write_text("hidden")  # hidden: skipped
    (root / "empty.txt").write_text("  \n")  # no text: no document
    return root, docs + lines


def _documents(tokens, eos_id):
    ids = np.asarray(tokens).astype(np.int64)
    ends = np.flatnonzero(ids == eos_id)
    assert ends.size and ends[-1] == len(ids) - 1
    return [ids[a + 1 if i else 0 : b].tolist() for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def test_prepare_round_trip_into_windows(corpus_dir, tmp_path):
    root, docs = corpus_dir
    out = tmp_path / "out"
    meta = prepare([root], out, vocab_size=300, workers=2, shard_tokens=700, progress=False)
    assert meta["vocab_size"] <= 300 and meta["dtype"] == "uint16" and meta["n_documents"] == len(docs)
    assert len(meta["shards"]) == -(-meta["n_tokens"] // 700) > 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".prepare.lock", "meta.json", "tokenizer.json"] + [s["file"] for s in meta["shards"]]
    )
    splits = load_token_splits(str(out), 4096, 0, 0.1)
    assert splits.vocab_size == meta["vocab_size"] and splits.tokenizer_path == out / "tokenizer.json"
    assert len(splits.train) + len(splits.val) == meta["n_tokens"]
    # the stream decodes back to the documents, in input order, each followed by the end-of-text id
    tok = load_tokenizer(out / "tokenizer.json")
    full = np.concatenate([np.asarray(splits.train), np.asarray(splits.val)])
    assert [tok.decode(ids) for ids in _documents(full, meta["eos_id"])] == docs
    windows = TokenWindows(splits.train, batch_size=4, seq_len=32, seed=0)
    b = windows.batch(3)
    assert b.shape == (4, 33) and b.dtype == torch.int64 and int(b.max()) < meta["vocab_size"]
    for row, s in zip(b, windows.offsets(3)):
        assert torch.equal(row, torch.from_numpy(full[s : s + 33].astype(np.int64)))
    # one worker, other shard sizes, the tokenizer given as a directory: the same stream
    again = prepare([root], tmp_path / "again", tokenizer=out, workers=1, shard_tokens=10**6, progress=False)
    assert len(again["shards"]) == 1 and again["tokenizer_sha256"] == meta["tokenizer_sha256"]
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "tokens-00000.npy"), full)


def test_cli_prepare_in_a_subprocess(corpus_dir, tmp_path):
    root, docs = corpus_dir
    out = tmp_path / "cli-out"
    cmd = [
        sys.executable,
        "-m",
        "ultramem.data",
        "prepare",
        str(root / "a.txt"),
        str(root / "sub"),
        "--out",
        str(out),
        "--vocab-size",
        "300",
        "--workers",
        "2",
        "--shard-tokens",
        "500",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("prepare did not finish in time")
    assert proc.returncode == 0, stderr
    meta = json.loads((out / "meta.json").read_text())
    assert f"{meta['n_tokens']} tokens in {len(meta['shards'])} shard(s)" in stdout
    assert meta["n_documents"] == 1 + 3 and meta["n_files"] == 2  # a.txt + the JSON Lines (image.png skipped)
    splits = load_token_splits(str(out), 4096, 0, 0.0)
    assert len(splits.train) == meta["n_tokens"]


def test_quiet_draws_no_progress_bar(corpus_dir, tmp_path, capsys, monkeypatch):
    """-q means warnings and errors only: no bar, even on a terminal (where one is drawn)."""
    root, _ = corpus_dir
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    common = ["--vocab-size", "300", "--workers", "1", "--shard-tokens", "500"]
    assert cli_main(["prepare", str(root), "--out", str(tmp_path / "loud"), *common]) == 0
    assert "%|" in capsys.readouterr().err
    assert cli_main(["prepare", str(root), "--out", str(tmp_path / "quiet"), *common, "-q"]) == 0
    assert "%|" not in capsys.readouterr().err


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["prepare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in [
        "--out",
        "--tokenizer",
        "--vocab-size",
        "--workers",
        "--shard-tokens",
        "--eos",
        "--train-chars",
        ".jsonl",
        "tokenizer.json",
    ]:
        assert option in text
    assert cli_main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a given tokenizer has its own vocabulary
        cli_main(["prepare", "x.txt", "--out", str(tmp_path / "o"), "--tokenizer", "t.json", "--vocab-size", "512"])
    assert e.value.code == 2 and "--tokenizer brings its own vocabulary" in capsys.readouterr().err


def test_jsonl_errors_name_file_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n" * 50)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    # the tokenizer trains in a child process: its error comes back as is
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare([good, bad], tmp_path / "o1", vocab_size=300, workers=1, progress=False)
    prepare([good], tmp_path / "tok", vocab_size=300, workers=1, progress=False)
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no \"text\" field"):
        prepare([bad], tmp_path / "o2", tokenizer=tmp_path / "tok", workers=2, progress=False)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no \"text\" field"):
        prepare([bad], tmp_path / "o2", tokenizer=tmp_path / "tok", workers=1, progress=False)
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: the \"text\" field is not a string \(got int\)"):
        prepare([bad], tmp_path / "o2", tokenizer=tmp_path / "tok", workers=1, progress=False)
    for o in ["o1", "o2"]:  # failed runs leave nothing behind, not even the directory they made
        assert not (tmp_path / o).exists()


def test_tokenizer_files_are_validated(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 20)
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0')
    with pytest.raises(ValueError, match=r"damaged\.json.*not a valid Hugging Face tokenizers JSON"):
        prepare([text], tmp_path / "o", tokenizer=damaged, workers=1, progress=False)
    (tmp_path / "tokdir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokdir.*has no tokenizer\.json"):
        prepare([text], tmp_path / "o", tokenizer=tmp_path / "tokdir", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match=r"nothere\.json"):
        prepare([text], tmp_path / "o", tokenizer=tmp_path / "nothere.json", workers=1, progress=False)
    # a tokenizer without an end-of-text token needs --eos
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["hello world"] * 10,
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=["<sep>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match=r"none of the end-of-text tokens.*--eos"):
        prepare([text], tmp_path / "o", tokenizer=tmp_path / "noeos.json", workers=1, progress=False)
    meta = prepare([text], tmp_path / "o", tokenizer=tmp_path / "noeos.json", eos="<sep>", workers=1, progress=False)
    assert meta["eos_id"] == tok.token_to_id("<sep>")
    assert not (tmp_path / "o" / "meta.json").read_text() == ""


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, caplog):
    blob = tmp_path / "blob.dat"
    blob.write_bytes(b"text " * 30 + bytes([0xFF, 0xFE, 0xC3]) + b" more" + bytes([0x80]))
    with caplog.at_level("WARNING"):
        meta = prepare([blob], tmp_path / "o", vocab_size=300, workers=1, progress=False)
    assert meta["n_documents"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "blob.dat" in warnings[0] and "4 of 159 bytes (2.52%)" in warnings[0]
    # the text-file corpus warns the same way
    caplog.clear()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème brûlée\n\n".encode("latin-1") * 20)
    with caplog.at_level("WARNING"):
        corpus_mod.text_file_corpus(latin, 300, 10**6, tmp_path / "cache")
    assert any("latin.txt" in r.getMessage() and "replaced" in r.getMessage() for r in caplog.records)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt"):
        prepare([tmp_path / "nowhere.txt"], tmp_path / "o", vocab_size=300, progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": "   "}\n')
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="hold no text"):
        prepare([tmp_path / "blank"], out, vocab_size=300, workers=2, progress=False)
    assert not out.exists()  # a failed run leaves no directory it made
    (tmp_path / "nontext").mkdir()
    (tmp_path / "nontext" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(FileNotFoundError, match=r"nontext.*holds no text files"):
        prepare([tmp_path / "nontext"], out, vocab_size=300, progress=False)


def test_text_that_tokenizes_to_nothing_leaves_no_output(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 20)
    prepare([text], tmp_path / "tok", vocab_size=300, workers=1, progress=False)
    tok = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    tok.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every character removed
    tok.save(str(tmp_path / "void.json"))
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="no text that tokenizes"):
        prepare([text], out, tokenizer=tmp_path / "void.json", workers=1, progress=False)
    assert not out.exists()
    out.mkdir()  # a directory that was there stays
    with pytest.raises(ValueError, match="no text that tokenizes"):
        prepare([text], out, tokenizer=tmp_path / "void.json", workers=1, progress=False)
    assert out.is_dir()


def test_interrupted_prepare_keeps_the_previous_output(corpus_dir, tmp_path, monkeypatch):
    root, _ = corpus_dir
    out = tmp_path / "out"
    first = prepare([root], out, vocab_size=300, workers=1, shard_tokens=500, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = prepare_mod.ShardWriter.write

    def interrupted(self, tokens):  # Ctrl-C after some shards were written
        original(self, tokens)
        assert len(self.shards) > 2
        raise KeyboardInterrupt

    (out / ".prepare.tmpdeadbeef").mkdir()  # what a killed run leaves
    (out / ".prepare.tmpdeadbeef" / "tokens-00000.npy").write_bytes(b"partial")
    with monkeypatch.context() as mp:
        mp.setattr(prepare_mod.ShardWriter, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare([root], out, tokenizer=out, workers=2, shard_tokens=100, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # stale temporary gone, output intact
    assert load_token_splits(str(out), 4096, 0, 0.0).train.shape == (first["n_tokens"],)
    # a run that completes replaces the earlier output, shards of the old layout included
    meta = prepare([root / "a.txt"], out, tokenizer=out, workers=1, shard_tokens=10**6, progress=False)
    assert sorted(p.name for p in out.glob("tokens-*.npy")) == ["tokens-00000.npy"]
    assert load_token_splits(str(out), 4096, 0, 0.0).train.shape == (meta["n_tokens"],)
    np.save(out / "mine.npy", np.arange(3))
    with pytest.raises(ValueError, match=r"prepare did not write \(mine\.npy\)"):
        prepare([root], out, tokenizer=out, progress=False)


def test_pieces_encode_like_the_whole_document(tmp_path):
    rng = np.random.default_rng(3)
    parts = []
    for _ in range(400):
        parts.append(" ".join(rng.choice(WORDS, size=int(rng.integers(0, 6)))))
        parts.append(str(rng.choice(["\n", "\n\n", " \n", "\n  ", "\t\n", "\n\n\n "])))
    text = "".join(parts)
    prepare([_write(tmp_path / "t.txt", text)], tmp_path / "tok", vocab_size=320, workers=1, progress=False)
    tok = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    pieces = split_pieces(text, max_chars=40)
    assert len(pieces) > 20 and "".join(pieces) == text
    ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
    assert ids == tok.encode(text, add_special_tokens=False).ids
    streamed = list(iter_pieces([tmp_path / "t.txt"], max_chars=40))
    assert "".join(t for t, _ in streamed) == text and [e for _, e in streamed].count(True) == 1


def _write(path, text):
    path.write_text(text)
    return path


def _endless_texts():
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 8))) for _ in range(5000)]
    while True:
        yield " ".join(rng.choices(words, k=200))


def _sleepy_trainer(texts, vocab_size):
    time.sleep(120)


def _interrupt_soon(delay):
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, even where the runner inherited it
    ignored (a shell starts background jobs that way, and Python then keeps it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_tokenizer_training_stops_at_the_first_ctrl_c(fake_text_cache, tmp_path, monkeypatch, ctrl_c_raises):
    t0 = time.monotonic()
    _interrupt_soon(0.5)
    with pytest.raises(KeyboardInterrupt):
        train_in_subprocess(corpus_mod._train_tokenizer, _endless_texts, 20_000, tmp_path / "t.json")
    assert time.monotonic() - t0 < 10
    assert not multiprocessing.active_children()
    # the cache build stops too, and leaves no entry
    monkeypatch.setattr(corpus_mod, "_train_tokenizer", _sleepy_trainer)
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    _interrupt_soon(0.5)
    with pytest.raises(KeyboardInterrupt):
        stdlib_corpus(300, 10**6, cache)
    assert time.monotonic() - t0 < 10
    assert not multiprocessing.active_children()
    assert [p.name for p in cache.iterdir()] == [".cache.lock"]


@pytest.fixture
def fake_text_cache(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.py").write_text("def f(x):\n    return x\n" * 50)
    monkeypatch.setattr(corpus_mod, "stdlib_files", lambda: (root, [root / "a.py"]))
    return root


def test_val_source_text_and_directory(corpus_dir, tmp_path):
    root, _ = corpus_dir
    train_dir = tmp_path / "train"
    meta = prepare([root], train_dir, vocab_size=300, workers=1, progress=False)
    rng = np.random.default_rng(9)
    val_text = tmp_path / "val.txt"
    paragraphs = [_text(rng, 5) for _ in range(6)]
    val_text.write_text("\n\n".join(paragraphs))
    cache = tmp_path / "cache"
    splits = load_token_splits(str(train_dir), 4096, 10**6, 0.3, str(cache), val_source=str(val_text))
    assert len(splits.train) == meta["n_tokens"]  # all of the source trains
    tok = load_tokenizer(train_dir / "tokenizer.json")
    assert [tok.decode(d) for d in _documents(splits.val, meta["eos_id"])] == paragraphs
    assert splits.check_val(seq_len=16)
    with pytest.raises(ValueError, match=r"data\.val_source=.*val\.txt.*gives \d+ validation tokens"):
        splits.check_val(seq_len=10_000)
    # a prepared directory with the same tokenizer
    val_dir = tmp_path / "valdir"
    prepare([val_text], val_dir, tokenizer=train_dir, workers=1, progress=False)
    splits2 = load_token_splits(str(train_dir), 4096, 0, 0.0, val_source=str(val_dir))
    whole = tok.encode(val_text.read_text(), add_special_tokens=False).ids + [meta["eos_id"]]  # one document
    assert np.asarray(splits2.val).tolist() == whole
    # ... but not one made with another tokenizer
    other = tmp_path / "other"
    prepare([val_text], other, vocab_size=280, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"other.*different tokenizer"):
        load_token_splits(str(train_dir), 4096, 0, 0.0, val_source=str(other))
    with pytest.raises(FileNotFoundError, match=r"data\.val_source.*nope"):
        load_token_splits(str(train_dir), 4096, 0, 0.0, val_source=str(tmp_path / "nope"))
    # a text val_source needs a tokenizer on the source side
    bare = tmp_path / "bare"
    bare.mkdir()
    np.save(bare / "000.npy", np.arange(200, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"val\.txt.*is a text file.*no tokenizer\.json"):
        load_token_splits(str(bare), 4096, 0, 0.0, str(cache), val_source=str(val_text))
    # a text-file source: its cached tokenizer encodes the validation text
    src = _write(tmp_path / "src.txt", "\n\n".join(_text(rng, 5) for _ in range(40)))
    s3 = load_token_splits(str(src), 300, 10**6, 0.2, str(cache), val_source=str(val_text))
    assert s3.val_what == f"data.val_source={str(val_text)!r}"
    assert len(s3.train) == len(load_token_splits(str(src), 300, 10**6, 0.0, str(cache)).train)
    tok3 = load_tokenizer(s3.tokenizer_path)
    assert [tok3.decode(d) for d in _documents(s3.val, tok3.token_to_id("<|endoftext|>"))] == paragraphs


def test_gzip_inputs_in_a_directory(tmp_path):
    import gzip

    root = tmp_path / "gz"
    root.mkdir()
    docs = ["first document\nwith two lines", "second one", "a plain text file, compressed"]
    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs[:2]))
    with gzip.open(root / "b.txt.gz", "wt") as f:
        f.write(docs[2])
    (root / "c.bin.gz").write_bytes(gzip.compress(b"\x00\x01"))  # not a text suffix inside
    meta = prepare([root], tmp_path / "o", vocab_size=300, workers=2, progress=False)
    assert meta["n_documents"] == 3 and meta["n_files"] == 2
    tok = load_tokenizer(tmp_path / "o" / "tokenizer.json")
    tokens = load_token_splits(str(tmp_path / "o"), 4096, 0, 0.0).train
    assert [tok.decode(d) for d in _documents(tokens, meta["eos_id"])] == docs
