"""The memory-mapped multi-shard reader, the shard writer, and malformed shard directories."""

import json

import numpy as np
import pytest
import torch

from ultramem.data import (
    ShardedTokens,
    ShardWriter,
    TokenWindows,
    check_val_split,
    load_token_splits,
    open_shard,
    open_token_directory,
)


def _random_shards(rng, n_shards, max_len=300):
    return [rng.integers(0, 1000, size=int(rng.integers(1, max_len))).astype(np.uint16) for _ in range(n_shards)]


def test_reader_matches_concatenate_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    shards = _random_shards(rng, 7) + [np.array([7], dtype=np.uint16)]  # a one-token shard too
    for i, s in enumerate(shards):
        np.save(tmp_path / f"{i:03d}.npy", s)
    tokens, meta = open_token_directory(tmp_path)
    flat = np.concatenate(shards)
    assert meta is None and isinstance(tokens, ShardedTokens)
    assert len(tokens) == len(flat) and tokens.shape == flat.shape and tokens.dtype == np.uint16
    assert all(isinstance(s, np.memmap) for s in tokens.shards)
    bounds = np.cumsum([len(s) for s in shards])
    cases = [(0, len(flat)), (0, 0), (5, 5), (len(flat) - 1, len(flat) + 10), (-20, -3), (-5, None), (None, 4)]
    cases += [(int(b) - 3, int(b) + 3) for b in bounds]  # straddling every boundary
    cases += [(int(a), int(a) + int(w)) for a, w in zip(rng.integers(0, len(flat), 200), rng.integers(0, 700, 200))]
    for a, b in cases:
        got = tokens[a:b]
        assert isinstance(got, np.ndarray) and got.dtype == np.uint16
        np.testing.assert_array_equal(got, flat[a:b])
    for step_slice in [slice(None, None, 3), slice(None, None, -1), slice(250, 10, -7), slice(3, 900, 11)]:
        np.testing.assert_array_equal(tokens[step_slice], flat[step_slice])
    for i in [0, 1, int(bounds[0]), int(bounds[0]) - 1, len(flat) - 1, -1, -len(flat)]:
        assert tokens[i] == flat[i]
    with pytest.raises(IndexError):
        tokens[len(flat)]
    np.testing.assert_array_equal(np.asarray(tokens), flat)
    assert tokens.max() == flat.max() and tokens.min() == flat.min()
    # views are sub-streams over the same maps, and nest
    for a, b in [(0, len(flat)), (10, 11), (int(bounds[1]) - 4, int(bounds[4]) + 2), (50, 50)]:
        v = tokens.view(a, b)
        assert len(v) == b - a and all(isinstance(s, np.memmap) for s in v.shards)
        np.testing.assert_array_equal(np.asarray(v), flat[a:b])
        np.testing.assert_array_equal(v.view(1, -1)[:], flat[a:b][1:-1])


def test_windows_over_shards_equal_windows_over_the_concatenation():
    rng = np.random.default_rng(1)
    shards = _random_shards(rng, 12, max_len=40)  # many boundaries per window
    tokens, flat = ShardedTokens(shards), np.concatenate(shards)
    for world in (1, 2):
        for rank in range(world):
            a = TokenWindows(tokens, 4, 16, seed=5, rank=rank, world_size=world)
            b = TokenWindows(flat, 4, 16, seed=5, rank=rank, world_size=world)
            for i in range(20):
                assert torch.equal(a.batch(i), b.batch(i))


def test_shard_writer_splits_the_stream(tmp_path):
    rng = np.random.default_rng(2)
    stream = rng.integers(0, 70_000, size=2345).astype(np.uint32)
    w = ShardWriter(tmp_path, np.dtype("<u4"), shard_tokens=500)
    pos = 0
    for n in rng.integers(0, 400, size=100):
        w.write(stream[pos : pos + n])
        pos += int(n)
        if pos >= len(stream):
            break
    w.write(stream[pos:])
    records = w.close()
    assert [r["n_tokens"] for r in records] == [500, 500, 500, 500, 345]
    assert [r["file"] for r in records] == [f"tokens-{i:05d}.npy" for i in range(5)]
    loaded = [np.load(tmp_path / r["file"]) for r in records]
    assert all(a.dtype == np.dtype("<u4") for a in loaded)
    np.testing.assert_array_equal(np.concatenate(loaded), stream)


def test_bin_shards_must_hold_whole_uint16_tokens(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"odd\.bin.*odd size of 3 bytes.*uint16"):
        open_shard(tmp_path / "odd.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.bin.*is empty"):
        open_shard(tmp_path / "empty.bin")
    d = tmp_path / "dir"
    d.mkdir()
    np.arange(10, dtype="<u2").tofile(d / "000.bin")
    (d / "001.bin").write_bytes(b"\x05")
    with pytest.raises(ValueError, match=r"001\.bin"):
        load_token_splits(str(d), 100, 0, 0.1)
    np.save(tmp_path / "empty.npy", np.zeros(0, np.uint16))
    with pytest.raises(ValueError, match=r"empty\.npy.*no tokens"):
        open_shard(tmp_path / "empty.npy")
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(ValueError, match=r"junk\.npy.*not a readable \.npy"):
        open_shard(tmp_path / "junk.npy")
    np.save(tmp_path / "float.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"float\.npy.*1-D integer"):
        open_shard(tmp_path / "float.npy")


def test_negative_and_too_large_ids_are_refused_naming_the_shard(tmp_path):
    np.save(tmp_path / "000.npy", np.arange(100, dtype=np.int32))
    bad = np.arange(100, dtype=np.int32)
    bad[42] = -3
    np.save(tmp_path / "001.npy", bad)
    with pytest.raises(ValueError, match=r"001\.npy.*negative token id -3 at position 42"):
        load_token_splits(str(tmp_path), 1000, 0, 0.1)
    np.save(tmp_path / "001.npy", np.arange(100, dtype=np.int32) + 50)
    with pytest.raises(ValueError, match=r"001\.npy.*token id 140 at position 90.*data\.vocab_size=140"):
        load_token_splits(str(tmp_path), 140, 0, 0.1)
    # with a meta.json its vocab_size is the rule
    meta = {
        "vocab_size": 120,
        "eos_id": 0,
        "n_tokens": 200,
        "shards": [{"file": "000.npy", "n_tokens": 100}, {"file": "001.npy", "n_tokens": 100}],
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"001\.npy.*token id 120.*vocab_size=120 recorded in .*meta\.json"):
        load_token_splits(str(tmp_path), 4096, 0, 0.1)
    meta["vocab_size"] = 200
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    splits = load_token_splits(str(tmp_path), 4096, 0, 0.1)
    assert splits.vocab_size == 200  # meta.json's, not the requested one
    meta["shards"][1]["n_tokens"] = 99
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"001\.npy.*holds 100 tokens but meta\.json records 99"):
        load_token_splits(str(tmp_path), 4096, 0, 0.1)
    meta["shards"].append({"file": "002.npy", "n_tokens": 5})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match=r"002\.npy.*listed in"):
        load_token_splits(str(tmp_path), 4096, 0, 0.1)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json.*not a valid"):
        load_token_splits(str(tmp_path), 4096, 0, 0.1)


def test_validation_split_is_a_view_and_short_splits_are_reported(tmp_path):
    np.save(tmp_path / "000.npy", np.arange(600, dtype=np.uint16))
    np.save(tmp_path / "001.npy", np.arange(600, 1000, dtype=np.uint16))
    splits = load_token_splits(str(tmp_path), 1000, 0, 0.5)
    assert isinstance(splits.val, ShardedTokens) and isinstance(splits.train, ShardedTokens)
    assert all(isinstance(s, np.memmap) for s in splits.val.shards + splits.train.shards)  # no copies
    np.testing.assert_array_equal(np.asarray(splits.val), np.arange(500, 1000))
    assert len(splits.val.shards) == 2  # the split point lies in the first shard
    assert splits.check_val(seq_len=200)
    with pytest.raises(
        ValueError,
        match=r"data\.val_fraction=0\.5 .*\(1000 tokens\) gives 500 validation tokens.*"
        r"train\.seq_len \+ 2 = 502",
    ):
        splits.check_val(seq_len=500)
    tiny = load_token_splits(str(tmp_path), 1000, 0, 0.001)
    with pytest.raises(ValueError, match="gives 1 validation tokens"):
        tiny.check_val(seq_len=16)
    assert not load_token_splits(str(tmp_path), 1000, 0, 0.0).check_val(seq_len=16)  # validation turned off
    with pytest.raises(ValueError, match=r"data\.val_source='x' gives 3 validation tokens"):
        check_val_split(np.arange(3), 16, "data.val_source='x'")
    with pytest.raises(ValueError, match=r"data\.val_fraction=1\.0 must be in \[0, 1\)"):
        load_token_splits(str(tmp_path), 1000, 0, 1.0)
