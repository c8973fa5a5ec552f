"""data.val_split: the tail of the stream, or chunks spread evenly across it, and windows that
stay inside the chunks of their own split."""

import numpy as np
import pytest

from ultramem.data import (
    VAL_SPLITS,
    ShardedTokens,
    TokenWindows,
    load_token_splits,
    split_ranges,
    split_stream,
    token_segments,
)


def _positions(n: int, shard: int = 997) -> ShardedTokens:
    """A stream whose token i is i, in shards of `shard` tokens: a window's tokens are its positions."""
    flat = np.arange(n, dtype=np.int64)
    return ShardedTokens([flat[a : a + shard] for a in range(0, n, shard)])


def _covered(ranges) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.empty(0, dtype=np.int64)


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 10_007, 123_457])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.05, 0.3, 0.9])
@pytest.mark.parametrize("chunk", [1, 64, 500])
def test_spread_ranges_partition_the_stream_with_chunks_of_one_to_two_chunk_sizes(n, fraction, chunk):
    train, val = split_ranges(n, fraction, "spread", chunk)
    n_val = int(n * fraction)
    # train and validation together cover every position once, in order
    assert np.array_equal(np.sort(np.concatenate([_covered(train), _covered(val)])), np.arange(n))
    assert all(a < b for a, b in train + val) and train == sorted(train) and val == sorted(val)
    assert sum(b - a for a, b in val) == n_val  # the same size as the tail
    sizes = [b - a for a, b in val]
    if n_val >= chunk:
        assert all(chunk <= s < 2 * chunk for s in sizes), sizes
        assert len(val) == n_val // chunk
    else:
        assert len(val) == (1 if n_val else 0)
    assert val == [] or val[-1][1] == n  # the last chunk ends the stream
    if len(val) > 1:  # evenly spaced: the chunks' ends are k equal periods apart (to rounding)
        ends = np.array([b for _, b in val])
        assert np.ptp(np.diff(ends)) <= 2


def test_spread_chunks_are_evenly_spaced_across_the_corpus():
    train, val = split_ranges(1_000_000, 0.05, "spread", 1000)
    assert len(val) == 50 and all(b - a == 1000 for a, b in val)
    assert [b for _, b in val] == [20_000 * (i + 1) for i in range(50)]
    assert len(train) == 50 and all(b - a == 19_000 for a, b in train)


@pytest.mark.parametrize("n,fraction", [(0, 0.0), (10, 0.0), (1000, 0.05), (12_345, 0.1), (999, 0.5)])
def test_tail_is_todays_split_and_one_spread_chunk_is_the_tail(n, fraction):
    cut = n - int(n * fraction)
    train, val = split_ranges(n, fraction)
    assert _covered(train).tolist() == list(range(cut)) and _covered(val).tolist() == list(range(cut, n))
    huge_chunks = split_ranges(n, fraction, "spread", 10**9)
    assert (huge_chunks[0], huge_chunks[1]) == (train, val)
    # the tail's streams are the plain views load_token_splits always made: no breaks
    tokens = _positions(n)
    t, v = split_stream(tokens, fraction)
    assert np.array_equal(np.asarray(t), np.arange(cut)) and np.array_equal(np.asarray(v), np.arange(cut, n))
    assert t.breaks == [] and v.breaks == []


def test_a_spread_split_of_one_chunk_warns_that_it_is_the_tail(caplog):
    tokens = _positions(10_000)
    with caplog.at_level("WARNING", logger="ultramem.data.dataset"):
        split_stream(tokens, 0.1, "spread", 600)  # 1000 tokens: one chunk
    assert "1000 validation tokens are fewer than 2 x data.val_chunk_tokens=600" in caplog.text
    assert "same split as 'tail'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ultramem.data.dataset"):
        split_stream(tokens, 0.1, "spread", 500)  # two chunks
    assert caplog.text == ""


def test_join_records_breaks_and_views_keep_them():
    tokens = _positions(100, shard=7)
    joined = ShardedTokens.join([tokens.view(10, 20), tokens.view(50, 53), tokens.view(90, 100)])
    assert np.array_equal(np.asarray(joined), np.r_[10:20, 50:53, 90:100])
    assert joined.breaks == [10, 13] and joined.segments == [(0, 10), (10, 13), (13, 23)]
    sub = joined.view(5, 12)
    assert np.array_equal(np.asarray(sub), np.r_[15:20, 50:52]) and sub.segments == [(0, 5), (5, 7)]
    assert tokens.segments == [(0, 100)] and token_segments(np.arange(5)) == [(0, 5)]


def test_windows_never_cross_a_chunk_and_never_read_validation_tokens():
    n, seq = 50_000, 32
    tokens = _positions(n)
    train_ranges, val_ranges = split_ranges(n, 0.1, "spread", 300)
    assert len(val_ranges) == 16
    train, val = split_stream(tokens, 0.1, "spread", 300)
    assert len(train) + len(val) == n and len(val) == int(n * 0.1)
    val_pos = _covered(val_ranges)
    for split, ranges, seed in ((train, train_ranges, 0), (val, val_ranges, 1)):
        windows = TokenWindows(split, batch_size=16, seq_len=seq, seed=seed)
        starts = set()
        for i in range(200):
            rows = windows.batch(i).numpy()
            # a window's tokens are consecutive positions of the stream, all inside one range
            assert (np.diff(rows, axis=1) == 1).all()
            assert all(any(a <= r[0] and r[-1] < b for a, b in ranges) for r in rows)
            starts.update(rows[:, 0].tolist())
        hit = {next(k for k, (a, b) in enumerate(ranges) if a <= s < b) for s in starts}
        assert hit == set(range(len(ranges)))  # every chunk is drawn from
        if split is train:
            assert not np.isin(np.fromiter(starts, np.int64), val_pos).any()


def test_spread_windows_are_deterministic_and_sharded_by_rank_as_before():
    tokens = _positions(20_000)
    _, val = split_stream(tokens, 0.2, "spread", 500)
    _, val_again = split_stream(_positions(20_000, shard=3001), 0.2, "spread", 500)
    a = TokenWindows(val, 4, 16, seed=7)
    b = TokenWindows(val_again, 4, 16, seed=7)  # other shard boundaries, same split
    for i in range(5):
        assert np.array_equal(a.batch(i).numpy(), b.batch(i).numpy())
    # rank r takes the r-th slice of the step's draws: the two ranks together are one rank's double batch
    whole = TokenWindows(val, 8, 16, seed=7)
    ranks = [TokenWindows(val, 4, 16, seed=7, rank=r, world_size=2) for r in range(2)]
    for i in range(5):
        assert np.array_equal(np.concatenate([w.offsets(i) for w in ranks]), whole.offsets(i))


def test_a_step_trains_on_the_same_windows_however_its_global_batch_is_split():
    # a run resumed with another batch_size x world_size x grad_accum of the same product must
    # not train again on windows it has already seen (batch index = step * grad_accum + micro)
    tokens = np.arange(50_000, dtype=np.int64)

    def step_windows(batch_size, world, accum, step):
        ws = [TokenWindows(tokens, batch_size, 16, 5, r, world, accum) for r in range(world)]
        return sorted(int(s) for w in ws for m in range(accum) for s in w.offsets(step * accum + m))

    for step in range(4):
        want = step_windows(16, 1, 1, step)
        assert len(set(want)) == 16
        for split in [(8, 1, 2), (4, 2, 2), (2, 2, 4), (8, 2, 1), (1, 4, 4)]:
            assert step_windows(*split, step) == want, split
    assert step_windows(16, 1, 1, 0) != step_windows(16, 1, 1, 1)
    # per_step=False: each micro-batch drawn on its own, as runs made before the per-step draw did
    old = TokenWindows(tokens, 4, 16, 5, 1, 2, grad_accum=3, per_step=False)
    for index in range(7):
        want = np.random.default_rng([5, index]).integers(0, 50_000 - 16 - 1, size=8)[4:]
        assert np.array_equal(old.offsets(index), want)
    with pytest.raises(ValueError, match="grad_accum=0"):
        TokenWindows(tokens, 4, 16, 5, grad_accum=0)


def test_windows_of_one_piece_are_todays_windows():
    flat = np.arange(5000, dtype=np.int64)
    joined_once = ShardedTokens.join([ShardedTokens([flat])])
    for w in (TokenWindows(flat, 4, 16, seed=3), TokenWindows(joined_once, 4, 16, seed=3)):
        rng = np.random.default_rng([3, 2])
        assert np.array_equal(w.offsets(2), rng.integers(0, 5000 - 16 - 1, size=4))


def test_chunks_too_short_for_a_window_are_skipped_or_refused():
    tokens = _positions(1000)
    pieces = ShardedTokens.join([tokens.view(0, 10), tokens.view(100, 200), tokens.view(300, 305)])
    w = TokenWindows(pieces, 8, 16, seed=0)
    assert all(10 <= s and s + 17 <= 110 for i in range(20) for s in w.offsets(i))  # only the long piece
    short = ShardedTokens.join([tokens.view(0, 10), tokens.view(100, 110)])
    with pytest.raises(ValueError, match=r"20 tokens in 2 separate chunks .*\(the longest holds 10\)"):
        TokenWindows(short, 2, 16, seed=0)


def test_load_token_splits_spread_on_a_token_directory(tmp_path):
    n = 30_000
    np.save(tmp_path / "a.npy", np.arange(n // 3, dtype=np.uint16))
    np.save(tmp_path / "b.npy", np.arange(n // 3, n, dtype=np.uint16))
    tail = load_token_splits(str(tmp_path), 1 << 16, 0, 0.05)
    spread = load_token_splits(str(tmp_path), 1 << 16, 0, 0.05, val_split="spread", val_chunk_tokens=200)
    assert len(spread.train) == len(tail.train) and len(spread.val) == len(tail.val) == 1500
    train_ranges, val_ranges = split_ranges(n, 0.05, "spread", 200)
    assert np.array_equal(np.asarray(spread.val), _covered(val_ranges))
    assert np.array_equal(np.asarray(spread.train), _covered(train_ranges))
    sizes = [b - a for a, b in val_ranges]
    assert [b - a for a, b in spread.val.segments] == sizes and len(sizes) == 7
    assert "data.val_split='spread': 7 chunks" in spread.val_what
    assert spread.check_val(seq_len=190)
    with pytest.raises(ValueError, match=rf"1500 validation tokens \(at most {max(sizes)} in one chunk\)"):
        spread.check_val(seq_len=300)
    # the default is the tail, unchanged
    assert np.array_equal(np.asarray(tail.val), np.arange(n - 1500, n)) and tail.val.breaks == []


@pytest.mark.parametrize("bad", ["middle", "Tail", ""])
def test_an_unknown_split_is_refused_naming_it(tmp_path, bad):
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.uint16))
    with pytest.raises(ValueError, match=f"data.val_split={bad!r}: must be one of 'tail', 'spread'"):
        load_token_splits(str(tmp_path), 1 << 16, 0, 0.05, val_split=bad)
    with pytest.raises(ValueError, match="data.val_chunk_tokens=0: must be >= 1"):
        split_ranges(1000, 0.05, "spread", 0)


def test_the_config_knows_the_same_splits():
    from ultramem.train.config import VAL_SPLITS as CONFIG_SPLITS

    assert CONFIG_SPLITS == VAL_SPLITS
