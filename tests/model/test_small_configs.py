"""The small-* config family: every file loads and validates, all but small-dense-wide activate the
same parameters per token (within 5%), they share the decoder and the training settings, and each
header's counts are the dry run's."""

import re

import pytest

from ultramem.model import build_model
from ultramem.train.config import load_config, packaged_config_names, read_config_text
from ultramem.train.summary import summarize

EXPECTED = {
    "small-dense",
    "small-dense-wide",
    "small-moe",
    "small-memory-plus",
    "small-ultramem-v1",
    "small-ultramem-v2",
}
EQUAL_TOTAL = "small-dense-wide"  # sized to small-ultramem-v2's total parameters instead


def small_names() -> list[str]:
    return sorted(n.removesuffix(".toml") for n in packaged_config_names() if n.startswith("small-"))


@pytest.fixture(scope="module")
def family():
    out = {}
    for name in small_names():
        cfg = load_config(name)  # validates, memory layers built on the meta device
        out[name] = (cfg, summarize(build_model(cfg.model, device="meta"), cfg.model, cfg.train.seq_len))
    return out


def test_the_family_is_complete():
    assert set(small_names()) == EXPECTED


def test_equal_activated_parameters(family):
    activated = {n: s.activated for n, (_, s) in family.items() if n != EQUAL_TOTAL}
    lo, hi = min(activated.values()), max(activated.values())
    assert hi <= 1.05 * lo, activated
    assert 20e6 <= lo and hi <= 60e6
    wide, v2 = family[EQUAL_TOTAL][1], family["small-ultramem-v2"][1]
    assert abs(wide.total - v2.total) <= 0.05 * v2.total


def test_same_decoder_and_training(family):
    ref_cfg, _ = family["small-dense"]
    for name, (cfg, _) in family.items():
        m = cfg.model
        assert (m.dim, m.n_layers, m.n_heads, m.vocab_size, m.max_seq_len) == (
            ref_cfg.model.dim,
            ref_cfg.model.n_layers,
            ref_cfg.model.n_heads,
            ref_cfg.model.vocab_size,
            ref_cfg.model.max_seq_len,
        ), name
        assert cfg.train == ref_cfg.train and cfg.optim == ref_cfg.optim and cfg.data == ref_cfg.data, name
        assert cfg.data.source == "stdlib" and cfg.train.device == "auto"


def test_sparse_parts(family):
    kinds = {n: (cfg.model.memory.type, cfg.model.moe.num_experts) for n, (cfg, _) in family.items()}
    assert kinds == {
        "small-dense": ("none", 0),
        "small-dense-wide": ("none", 0),
        "small-moe": ("none", 64),
        "small-memory-plus": ("memory_plus", 0),
        "small-ultramem-v1": ("ultramem_v1", 0),
        "small-ultramem-v2": ("ultramem_v2", 0),
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_counts_are_the_dry_run(family, name):
    text, _ = read_config_text(name)
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    _, s = family[name]
    shown = {f"{s.activated / 1e6:.1f}M", f"{s.total / 1e6:.1f}M"}
    found = set(re.findall(r"(\d+\.\dM) (?:activated|total)", header))
    assert found == shown, (name, found, shown)
