"""Dry-run numbers of the 227M config against hand arithmetic, and the CLI dry run itself."""

import sys

import subproc

from ultramem.model import build_model
from ultramem.train.config import load_config
from ultramem.train.summary import format_summary, summarize

# The 227M configuration of the UltraMemV2 paper, by hand.
D, BLOCKS, VOCAB, FFN, SEQ = 768, 20, 50304, 2496, 4096
KNUM, KDIM, VDIM, PRE, KNN, H, R, M = 360, 192, 192, 192, 32, 1, 2, 2
N_ROWS = KNUM * KNUM * BLOCKS  # 2,592,000
N_SIDE = 1138  # floor(sqrt(N · 0.5))

EMBED = VOCAB * D
BLOCK = 4 * D * D + 3 * D * FFN + 2 * D  # wqkv + wo, SwiGLU, two norms
DENSE = EMBED + BLOCKS * BLOCK + D  # + final norm; tied head adds nothing
MEM_LAYER = (
    D * H * 2 * KDIM  # W_q
    + H * 2 * N_SIDE * KDIM * R  # keys
    + H * M * R * R  # cores
    + 2 * KDIM  # norm_q, norm_k
    + D * PRE
    + VDIM * D
)  # W_p, W_o
TABLES = N_ROWS * (VDIM + PRE)
READS = BLOCKS * H * KNN * (VDIM + PRE)


def test_227m_numbers_match_hand_arithmetic():
    cfg = load_config("227m")
    model = build_model(cfg.model, device="meta")
    s = summarize(model, cfg.model, cfg.train.seq_len)
    assert N_ROWS == 2_592_000 and DENSE == 200_866_560
    assert s.embedding == EMBED
    assert s.memory_dense_params == BLOCKS * MEM_LAYER
    assert s.table_params == TABLES
    assert s.total == DENSE + BLOCKS * MEM_LAYER + TABLES
    assert s.total_without_embedding == s.total - EMBED
    assert s.table_reads_per_token == READS == 245_760
    assert s.activated == DENSE + BLOCKS * MEM_LAYER + READS
    # the brief's ranges: ~1.18B total without embedding, ~1.22B with; activated ≈ 0.23B
    assert 1.18e9 < s.total_without_embedding < 1.19e9 and 1.22e9 < s.total < 1.23e9
    assert 2.25e8 < s.activated < 2.31e8
    one_d = BLOCKS * (2 * D + 2 * KDIM) + D
    assert s.matmul_activated == s.activated - one_d
    assert s.flops_per_token == 6 * (s.activated - one_d) + 6 * BLOCKS * D * SEQ
    assert s.training_state_bytes == 16 * s.total
    assert {t.name: (t.rows, t.width, t.readers) for t in s.tables} == {
        "memory_tables.values": (N_ROWS, VDIM, BLOCKS),
        "memory_tables.pre_values": (N_ROWS, PRE, BLOCKS),
    }
    text = format_summary(s, cfg.model)
    assert f"{s.activated:,d}" in text and f"{s.total:,d}" in text and "6·n_layers·dim·seq_len" in text
    assert all(p.is_meta for p in model.parameters())


def test_dense_summary_has_no_tables():
    cfg = load_config("227m", ["--model.memory.type=none"])
    s = summarize(build_model(cfg.model, device="meta"), cfg.model, 4096)
    assert s.total == s.activated == DENSE and s.tables == [] and s.n_memory_layers == 0


def test_cli_dry_run_prints_summary_and_exits_zero():
    out = subproc.run([sys.executable, "-m", "ultramem.train", "--config", "227m.toml", "--dry-run"], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "activated (with embedding)" in out.stdout and f"{DENSE + BLOCKS * MEM_LAYER + TABLES:,d}" in out.stdout
    bad = subproc.run(
        [sys.executable, "-m", "ultramem.train", "--config", "227m", "--dry-run", "--model.memory.knnn=3"], timeout=300
    )
    assert bad.returncode == 2 and "model.memory.knnn" in bad.stderr
