"""`python -m ultramem.eval` against what it must agree with: the trainer's own validation loss,
a direct computation of bits per byte, the exported model, and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import START_S, env, records, run, timeout_for, train_cmd
from tiny import TINY_MODEL

from ultramem import eval as ueval

TINY = [
    *TINY_MODEL,
    "--config",
    "debug.toml",
    "--train.batch_size=2",
    "--optim.warmup_steps=1",
    "--metrics.tensorboard=false",
]
SEQ = 16

# multi-byte characters (2, 3 and 4 bytes in UTF-8) so that bytes and tokens differ
TEXT = "".join(f"naïve café {i} — 東京 line {i % 7} 🙂 word{i % 5}\n" for i in range(40))


def _write_texts(directory: Path, word: str = "word") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        words = " ".join(f"{word}{j % (7 + i)} ç{j % 3} line {j}" for j in range(400))
        (directory / f"doc{i}.txt").write_text(words + "\n" + TEXT)
    return directory


def _prepare(inputs: Path, out: Path, vocab: int = 300) -> Path:
    from ultramem.data import prepare

    prepare([inputs], out, vocab_size=vocab, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny UltraMemV2 run of 3 steps on prepared shards, validated at its last step."""
    tmp = tmp_path_factory.mktemp("eval")
    shards = _prepare(_write_texts(tmp / "texts"), tmp / "shards")
    run_dir = tmp / "run"
    args = [
        *TINY,
        f"--data.source={shards}",
        "--train.max_steps=3",
        f"--run.dir={run_dir}",
        "--train.eval_interval=3",
        "--data.val_fraction=0.1",
    ]
    out = run(train_cmd(args), timeout_for(3), tmp, env(tmp))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (val,) = records(run_dir, "val")
    assert val["step"] == 3
    return SimpleNamespace(tmp=tmp, shards=shards, run_dir=run_dir, val_loss=val["val/loss"])


def _eval(argv: list[str]) -> dict:
    """ultramem.eval in this process; its JSON result."""
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    out = Path(name)
    try:
        assert ueval.main([*argv, "--device", "cpu", "--json", str(out)]) == 0
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        ueval.main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.slow
def test_trainer_windows_reproduce_the_runs_validation_loss(trained):
    json_out = trained.tmp / "cli.json"
    cmd = [
        sys.executable,
        "-m",
        "ultramem.eval",
        "--checkpoint",
        str(trained.run_dir),
        "--data",
        "run",
        "--windows",
        "trainer",
        "--device",
        "cpu",
        "--json",
        str(json_out),
    ]
    out = run(cmd, START_S, trained.tmp, env(trained.tmp))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bits/byte" in out.stdout and "(step 3)" in out.stdout
    result = json.loads(json_out.read_text())
    assert abs(result["loss"] - trained.val_loss) < 1e-5, (result["loss"], trained.val_loss)
    assert result["tokens"] == 4 * 2 * SEQ  # train.eval_batches × batch × seq_len
    # the same split named by its directory, and the checkpoint named three ways
    ckpt = trained.run_dir / "checkpoints" / "step_00000003"
    for where in (trained.run_dir / "checkpoints", ckpt):
        again = _eval(
            ["--checkpoint", str(where), "--data", str(trained.shards), "--split", "val", "--windows", "trainer"]
        )
        assert abs(again["loss"] - trained.val_loss) < 1e-5
        assert again["step"] == 3


@pytest.mark.slow
def test_a_spread_split_run_evaluates_on_exactly_the_trainers_chunks(trained):
    """data.val_split="spread": --data run (and the directory with --split val) read the same
    chunks as the trainer, and the consecutive windows stay inside each chunk."""
    from tokenizers import Tokenizer

    from ultramem.data import open_token_directory, split_ranges
    from ultramem.train.export import load_checkpoint_model

    run_dir = trained.tmp / "run-spread"
    split = ["--data.val_fraction=0.1", "--data.val_split=spread", "--data.val_chunk_tokens=200"]
    args = [*TINY, f"--data.source={trained.shards}", "--train.max_steps=2", f"--run.dir={run_dir}"]
    out = run(train_cmd([*args, "--train.eval_interval=2", *split]), timeout_for(2), trained.tmp, env(trained.tmp))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (val,) = records(run_dir, "val")
    assert "validation tokens in 7 chunks spread over the stream" in out.stdout + out.stderr
    for data in (["--data", "run"], ["--data", str(trained.shards), "--split", "val"]):
        got = _eval(["--checkpoint", str(run_dir), *data, "--windows", "trainer"])
        assert abs(got["loss"] - val["val/loss"]) < 1e-5, (data, got["loss"], val["val/loss"])
        assert "data.val_split='spread': 7 chunks" in got["data"]
    # consecutive windows: every chunk on its own, each token after a chunk's first predicted once
    tokens, _ = open_token_directory(trained.shards)
    _, chunks = split_ranges(len(tokens), 0.1, "spread", 200)
    assert len(chunks) == 7
    got = _eval(["--checkpoint", str(run_dir), "--data", "run"])
    model, _ = load_checkpoint_model(run_dir)
    ids = np.asarray(tokens[:], dtype=np.int64)
    nats = sum(_direct_nats(model, ids[a:b].tolist(), SEQ) for a, b in chunks)
    n_pred = sum(b - a - 1 for a, b in chunks)
    assert got["tokens"] == n_pred and got["loss"] == pytest.approx(nats / n_pred, rel=1e-6)
    lengths = ueval.token_byte_lengths(Tokenizer.from_file(str(trained.shards / "tokenizer.json")))
    assert got["bytes"] == sum(int(lengths[ids[a + 1 : b]].sum()) for a, b in chunks)
    # the tail run's checkpoint (made with the default) still reads the tail
    tail = _eval(["--checkpoint", str(trained.run_dir), "--data", "run"])
    assert tail["tokens"] == int(len(tokens) * 0.1) - 1


def _direct_nats(model, ids: list[int], seq: int) -> float:
    """Cross-entropy summed over consecutive windows, computed here without ultramem.eval."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq):
            w = torch.tensor([ids[start : start + seq + 1]])
            logits = model(w[:, :-1])
            total += F.cross_entropy(logits[0].double(), w[0, 1:], reduction="sum").item()
    return total


@pytest.mark.slow
def test_bits_per_byte_of_a_text_file_match_a_direct_computation(trained):
    from tokenizers import Tokenizer

    from ultramem.train.export import load_checkpoint_model

    text_file = trained.tmp / "held-out.txt"
    text = "Ünïcödé held-out text — 東京 🙂 word3 line 9\n" * 12 + "the end"
    text_file.write_bytes(text.encode("utf-8"))
    result = _eval(["--checkpoint", str(trained.run_dir), "--data", str(text_file), "--batch-size", "3"])
    model, _ = load_checkpoint_model(trained.run_dir)
    tok = Tokenizer.from_file(str(trained.shards / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = [eos, *tok.encode(text, add_special_tokens=False).ids, eos]
    nats = _direct_nats(model, ids, SEQ)
    n_bytes = len(text.encode("utf-8"))
    assert result["tokens"] == len(ids) - 1
    assert result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-6)
    # the windows do not depend on the batch size; --max-tokens keeps the first predicted tokens
    other = _eval(["--checkpoint", str(trained.run_dir), "--data", str(text_file), "--batch-size", "1"])
    assert other["loss"] == pytest.approx(result["loss"], abs=1e-6)
    capped = _eval(["--checkpoint", str(trained.run_dir), "--data", str(text_file), "--max-tokens", "40"])
    assert capped["tokens"] == 40
    assert capped["loss"] == pytest.approx(_direct_nats(model, ids[:41], SEQ) / 40, rel=1e-6)


@pytest.mark.slow
def test_token_directory_bytes_agree_with_the_tokenizers_decoder(trained):
    from tokenizers import Tokenizer

    from ultramem.data import open_token_directory

    result = _eval(["--checkpoint", str(trained.run_dir), "--data", str(trained.shards)])
    tokens, _ = open_token_directory(trained.shards)
    ids = np.asarray(tokens[:], dtype=np.int64)
    tok = Tokenizer.from_file(str(trained.shards / "tokenizer.json"))
    assert result["tokens"] == len(ids) - 1
    assert result["bytes"] == len(tok.decode(ids[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])


@pytest.mark.slow
def test_an_exported_model_evaluates_like_its_checkpoint(trained, capsys):
    from ultramem.train.export import export

    exported = export(trained.run_dir, trained.tmp / "model.safetensors")
    text_file = trained.tmp / "held-out-2.txt"
    text_file.write_text(TEXT)
    ref = _eval(["--checkpoint", str(trained.run_dir), "--data", str(trained.shards)])
    got = _eval(["--checkpoint", str(exported), "--data", str(trained.shards), "--seq-len", str(SEQ)])
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6) and got["bytes"] == ref["bytes"]
    # an exported file holds no tokenizer: a text file needs --tokenizer
    err = _error(["--checkpoint", str(exported), "--data", str(text_file)], capsys)
    assert "pass --tokenizer" in err
    ref = _eval(["--checkpoint", str(trained.run_dir), "--data", str(text_file)])
    got = _eval(["--checkpoint", str(exported), "--data", str(text_file), "--tokenizer", str(trained.shards)])
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6) and got["bytes"] == ref["bytes"]
    err = _error(["--checkpoint", str(exported), "--data", str(trained.shards), "--windows", "trainer"], capsys)
    assert "needs a training checkpoint" in err


@pytest.mark.slow
def test_errors_are_one_line_and_name_the_problem(trained, capsys):
    run_dir = str(trained.run_dir)
    assert "no such file or directory" in _error(
        ["--checkpoint", str(trained.tmp / "nowhere"), "--data", "run"], capsys
    )
    assert "no complete checkpoint" in _error(["--checkpoint", str(trained.tmp / "texts"), "--data", "run"], capsys)
    err = _error(["--checkpoint", run_dir, "--data", str(trained.tmp / "missing.txt")], capsys)
    assert "missing.txt" in err and "no such file or directory" in err
    # a corpus tokenized with a larger vocabulary than the model's
    big = _prepare(trained.tmp / "texts", trained.tmp / "big-vocab", vocab=600)
    assert json.loads((big / "meta.json").read_text())["vocab_size"] > 300
    err = _error(["--checkpoint", run_dir, "--data", str(big)], capsys)
    assert "vocabulary of" in err and "the model has 300" in err
    # the same vocabulary size, but another tokenizer
    other = _prepare(_write_texts(trained.tmp / "texts-2", word="quokka_"), trained.tmp / "other-tok")
    err = _error(["--checkpoint", run_dir, "--data", str(other)], capsys)
    assert "another tokenizer" in err
    # bare shards (no meta.json) holding ids the model does not have
    raw = trained.tmp / "raw"
    raw.mkdir()
    np.save(raw / "tokens.npy", np.arange(0, 400, dtype=np.uint16))
    err = _error(["--checkpoint", run_dir, "--data", str(raw)], capsys)
    assert "token id 399" in err and "vocabulary of 300" in err
    err = _error(["--checkpoint", run_dir, "--data", "stdlib"], capsys)
    assert "not the embedded corpus" in err
    err = _error(["--checkpoint", run_dir, "--data", "run", "--seq-len", "64"], capsys)
    assert "max_seq_len=16" in err
    # a --json path that cannot be written is refused before the evaluation, not after it
    err = _error(["--checkpoint", run_dir, "--data", "run", "--json", str(trained.tmp)], capsys)
    assert f"--json '{trained.tmp}' is a directory" in err
    blocker = trained.tmp / "a_file"
    blocker.write_text("")
    err = _error(["--checkpoint", run_dir, "--data", "run", "--json", str(blocker / "out.json")], capsys)
    assert f"cannot be made: '{blocker}' is a file" in err


def _data_cfg(tmp: Path, **data):
    from ultramem.train.config import load_config

    overrides = [f"--data.{k}={v}" for k, v in data.items()]
    return load_config("debug.toml", ["--model.vocab_size=300", "--data.vocab_size=300", *overrides])


@pytest.mark.slow
def test_the_tokenizer_of_a_cached_corpus_is_found_without_building_it(tmp_path):
    from ultramem.data import load_token_splits, stdlib_corpus, text_file_corpus

    cache = tmp_path / "cache"
    corpus = stdlib_corpus(300, 60_000, cache)
    cfg = _data_cfg(tmp_path, max_corpus_bytes=60_000, cache_dir=cache)
    assert ueval.checkpoint_tokenizer(cfg) == corpus.tokenizer_path
    # --data stdlib: the validation split the trainer would hold out
    loaded = ueval.LoadedModel(model=None, vocab_size=300, source=tmp_path, cfg=cfg)
    data = ueval.load_eval_data("stdlib", loaded)
    expected = load_token_splits("stdlib", 300, 60_000, cfg.data.val_fraction, str(cache)).val
    assert np.array_equal(np.asarray(data.tokens), np.asarray(expected)) and data.split_is_val
    assert data.tokenizer_path == corpus.tokenizer_path
    # a text corpus, keyed by the file
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT * 5)
    text_corpus = text_file_corpus(text, 300, 60_000, cache)
    cfg_text = _data_cfg(tmp_path, source=text, max_corpus_bytes=60_000, cache_dir=cache)
    assert ueval.checkpoint_tokenizer(cfg_text) == text_corpus.tokenizer_path
    # not in the cache (another byte cap): a clear error, and nothing is built
    missing = _data_cfg(tmp_path, max_corpus_bytes=50_000, cache_dir=cache)
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(FileNotFoundError, match="not in the corpus cache"):
        ueval.checkpoint_tokenizer(missing)
    assert sorted(p.name for p in cache.iterdir()) == before


def test_consecutive_windows_predict_every_token_once():
    assert ueval.consecutive_windows(1, 4) == []
    assert ueval.consecutive_windows(10, 4) == [(0, 4), (4, 4), (8, 1)]
    assert ueval.consecutive_windows(9, 4) == [(0, 4), (4, 4)]
    assert ueval.consecutive_windows(100, 4, max_tokens=6) == [(0, 4), (4, 2)]
    # separate chunks of a stream: windows stay inside one each; --max-tokens counts across them
    chunks = [(0, 6), (6, 7), (7, 12)]
    assert ueval.consecutive_windows(12, 4, segments=chunks) == [(0, 4), (4, 1), (7, 4)]
    assert ueval.consecutive_windows(12, 4, max_tokens=6, segments=chunks) == [(0, 4), (4, 1), (7, 1)]
    assert ueval._predicted_spans([(0, 4), (4, 1), (7, 4)]) == [(1, 6), (8, 12)]


def test_byte_lengths_of_a_byte_level_bpe(tmp_path):
    from tokenizers import Tokenizer

    from ultramem.data.corpus import _train_tokenizer

    tok = _train_tokenizer([TEXT, "plain ascii words"], 300)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    tok = Tokenizer.from_file(str(path))
    lengths = ueval.token_byte_lengths(tok)
    assert lengths is not None
    for sample in (TEXT, "ÿ\x00\x7f tab\tand \U0001f642", "<|endoftext|>"):
        ids = tok.encode(sample, add_special_tokens=False).ids
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert int(lengths[ids].sum()) == len(decoded.encode("utf-8"))
    assert lengths[tok.token_to_id("<|endoftext|>")] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu(trained):
    ref = _eval(["--checkpoint", str(trained.run_dir), "--data", "run"])
    out = trained.tmp / "cuda.json"
    assert (
        ueval.main(["--checkpoint", str(trained.run_dir), "--data", "run", "--device", "cuda", "--json", str(out)]) == 0
    )
    assert json.loads(out.read_text())["loss"] == pytest.approx(ref["loss"], abs=1e-4)
