"""Corpus cache (reuse, rebuild, interrupted builds), token splits and deterministic batches."""

import numpy as np
import pytest
import torch

from ultramem.data import TokenWindows, corpus, load_token_splits, stdlib_corpus, stdlib_files, text_file_corpus


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A tiny stand-in for the standard library so that tokenizer training takes milliseconds."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "value", "(", ")", ":"]
    for i, name in enumerate(["a.py", "b.py", "pkg/c.py", "pkg/d.py"]):
        text = "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(200 + 10 * i))
        (root / name).write_text(text)
    (root / "notes.txt").write_text("not python")
    monkeypatch.setattr(
        corpus, "stdlib_files", lambda: (root, sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()))
    )
    return root


def test_real_stdlib_listing_is_sorted_python_without_site_packages():
    root, files = stdlib_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any("site-packages" in r for r in rel)


def test_cache_is_built_once_then_reused(fake_stdlib, tmp_path):
    cache = tmp_path / "cache"
    first = stdlib_corpus(300, 10**6, cache)
    assert first.built and first.vocab_size <= 300
    assert first.tokens.dtype == np.uint16 and first.tokens.max() < first.vocab_size
    second = stdlib_corpus(300, 10**6, cache)
    assert not second.built and second.cache_dir == first.cache_dir
    np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    # the tokens decode back to the corpus text
    tok = second.tokenizer()
    ids = [int(i) for i in second.tokens[:50]]
    assert tok.decode(ids) == (fake_stdlib / "a.py").read_text()[: len(tok.decode(ids))]
    # documents are joined by the end-of-text token
    assert int((np.asarray(first.tokens) == first.eot_id).sum()) == 4


def test_cache_rebuilds_when_inputs_change(fake_stdlib, tmp_path):
    cache = tmp_path / "cache"
    base = stdlib_corpus(300, 10**6, cache)
    other_vocab = stdlib_corpus(280, 10**6, cache)
    assert other_vocab.built and other_vocab.cache_dir != base.cache_dir
    capped = stdlib_corpus(300, 5000, cache)  # fewer files fit
    assert capped.built and len(capped.tokens) < len(base.tokens)
    with open(fake_stdlib / "pkg" / "c.py", "a") as f:
        f.write("\nreturn value\n")
    changed = stdlib_corpus(300, 10**6, cache)
    assert changed.built and changed.cache_dir != base.cache_dir
    assert len(changed.tokens) > len(base.tokens)


def test_corrupt_or_interrupted_cache_is_rebuilt(fake_stdlib, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    good = stdlib_corpus(300, 10**6, cache)
    # truncate the tokens: the entry no longer matches its meta and is rebuilt
    shard = good.cache_dir / "tokens-00000.npy"
    np.save(shard, np.asarray(good.tokens)[:10])
    with caplog.at_level("WARNING"):
        again = stdlib_corpus(300, 10**6, cache)
    assert again.built and len(again.tokens) == len(good.tokens)
    assert "tokens-00000.npy" in caplog.text
    # a build that dies while writing leaves no entry and no stray files
    cache2 = tmp_path / "cache2"
    original = corpus.ShardWriter.write

    def interrupted(self, tokens):  # dies half-way through writing the tokens
        original(self, tokens[:5])
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(corpus.ShardWriter, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            stdlib_corpus(300, 10**6, cache2)
    assert sorted(p.name for p in cache2.iterdir()) == [".cache.lock"]
    rebuilt = stdlib_corpus(300, 10**6, cache2)
    assert rebuilt.built
    entry = rebuilt.cache_dir
    assert sorted(p.name for p in cache2.iterdir()) == [".cache.lock", entry.name]
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "tokenizer.json", "tokens-00000.npy"]


def test_text_file_source_and_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "envcache"))
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"paragraph {i} says hello world again" for i in range(300)))
    splits = load_token_splits(str(text), 300, 10**6, 0.1)
    assert len(splits.val) == int((len(splits.train) + len(splits.val)) * 0.1)
    assert (tmp_path / "envcache").is_dir()  # $ULTRAMEM_CACHE is honoured
    assert not text_file_corpus(text, 300, 10**6).built
    with pytest.raises(FileNotFoundError, match="nowhere/at/all"):
        load_token_splits(str(tmp_path / "nowhere/at/all"), 300, 10**6, 0.1)


def test_json_lines_and_gzipped_sources_are_parsed_as_prepare_reads_them(tmp_path):
    """A .jsonl source's documents are its records' text, a .gz source is read decompressed: the
    same tokens as the plain text with those documents (not the JSON or the compressed bytes)."""
    import gzip
    import json

    from ultramem.data.corpus import _text_file_documents

    docs = [f"record {i} says hello world again\nwith a second line {i * 7}" for i in range(200)]
    plain = tmp_path / "docs.txt"
    plain.write_text("\n\n".join(docs))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    packed = tmp_path / "docs.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl.read_bytes()))
    text_gz = tmp_path / "docs.txt.gz"
    text_gz.write_bytes(gzip.compress(plain.read_bytes()))
    for source in (jsonl, packed, text_gz):
        assert _text_file_documents(source, 10**6) == docs, source.name
    assert _text_file_documents(jsonl, 100) == docs[:2]  # the cap stops after the document that crosses it
    cache = tmp_path / "cache"
    want = text_file_corpus(plain, 300, 10**6, cache).tokens
    for source in (jsonl, packed, text_gz):
        got = text_file_corpus(source, 300, 10**6, cache)
        assert got.built and np.array_equal(got.tokens, want), source.name


def test_a_cache_directory_that_cannot_be_made_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"paragraph {i} says hello world again" for i in range(300)))
    with pytest.raises(ValueError, match=f"token cache directory '{blocker / 'c'}' .* '{blocker}' is a file"):
        load_token_splits(str(text), 300, 10**6, 0.1, blocker / "c")


def test_shard_directory_source(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    a, b = np.arange(0, 500, dtype=np.uint16), np.arange(500, 1000, dtype=np.uint16) % 700
    np.save(shards / "000.npy", a)
    b.tofile(shards / "001.bin")
    splits = load_token_splits(str(shards), 700, 0, 0.2)
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), np.concatenate([a, b]))
    assert len(splits.val) == 200 and splits.vocab_size == 700
    with pytest.raises(ValueError, match="data.vocab_size=600"):
        load_token_splits(str(shards), 600, 0, 0.2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.npy or \\*.bin"):
        load_token_splits(str(tmp_path / "empty"), 700, 0, 0.2)


def test_windows_are_deterministic_and_sharded_by_rank():
    tokens = np.arange(10_000, dtype=np.uint32)
    w = TokenWindows(tokens, batch_size=4, seq_len=16, seed=3)
    b0 = w.batch(0)
    assert b0.shape == (4, 17) and b0.dtype == torch.int64
    # each row is a contiguous window of the stream
    for row in b0:
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 17))
    assert torch.equal(TokenWindows(tokens, 4, 16, seed=3).batch(0), b0)
    assert not torch.equal(w.batch(1), b0)
    assert not torch.equal(TokenWindows(tokens, 4, 16, seed=4).batch(0), b0)
    # two ranks split the step's windows of one world-size-2 draw, without overlap
    ranks = [TokenWindows(tokens, 4, 16, seed=3, rank=r, world_size=2).batch(5) for r in range(2)]
    assert not torch.equal(ranks[0], ranks[1])
    offs = [TokenWindows(tokens, 4, 16, seed=3, rank=r, world_size=2).offsets(5) for r in range(2)]
    rng = np.random.default_rng([3, 5])
    np.testing.assert_array_equal(np.concatenate(offs), rng.integers(0, 10_000 - 17, size=8))
    with pytest.raises(ValueError, match="rank=2"):
        TokenWindows(tokens, 4, 16, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len=20000"):
        TokenWindows(tokens, 4, 20_000, 0)


def test_damaged_tokenizer_in_the_cache_is_rebuilt(fake_stdlib, tmp_path, caplog):
    cache = tmp_path / "cache"
    good = stdlib_corpus(300, 10**6, cache)
    tok_file = good.cache_dir / "tokenizer.json"
    original = tok_file.read_text()
    tok_file.write_text(original.replace('"<|endoftext|>"', '"<|endoftexx|>"', 1))  # still valid JSON
    with caplog.at_level("WARNING"):
        again = stdlib_corpus(300, 10**6, cache)
    assert again.built and "tokenizer.json does not match the checksum" in caplog.text
    assert tok_file.read_text() == original
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(good.tokens))
    assert not stdlib_corpus(300, 10**6, cache).built


def test_empty_text_leaves_no_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    for content in ["", "\n \n\t\n"]:
        empty = tmp_path / "empty.txt"
        empty.write_text(content)
        with pytest.raises(ValueError, match=r"empty\.txt.*no text to tokenize"):
            load_token_splits(str(empty), 300, 10**6, 0.1, str(cache))
        assert not cache.exists() or not [p for p in cache.iterdir() if p.name != ".cache.lock"]


def test_next_build_removes_stale_temporaries(fake_stdlib, tmp_path):
    import os
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".stdlib-v300-0123456789abcdef.tmpk2j3h4"  # a killed build's directory
    dead.mkdir()
    (dead / "tokens-00000.npy").write_bytes(b"partial")
    (cache / ".meta.json.tmpq1w2e3").write_bytes(b"{")
    legacy = cache / "text-v300-0123456789abcdef"  # an older layout's entry with a temporary inside
    legacy.mkdir()
    old_tmp, fresh_tmp = legacy / "tokens.npy.tmpab12.npy", legacy / "tokens.npy.tmpcd34.npy"
    old_tmp.write_bytes(b"x")
    fresh_tmp.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old_tmp, (past, past))
    (cache / "notes.tmpl").write_text("not ours")
    stdlib_corpus(300, 10**6, cache)
    assert not dead.exists() and not (cache / ".meta.json.tmpq1w2e3").exists() and not old_tmp.exists()
    assert fresh_tmp.exists() and (cache / "notes.tmpl").exists()
