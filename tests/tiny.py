"""The tiny UltraMemV2 model that trainer and CLI tests run, as command-line overrides of
debug.toml: 2 blocks of width 32, a memory layer per block over one 32-row table, sequences of
16 tokens of a 300-token vocabulary. Tests add their own run settings after it (later wins).
`tiny_cfg` is a tiny decoder's ModelConfig for tests that build a model in process."""

TINY_MODEL = [
    "--model.vocab_size=300",
    "--model.dim=32",
    "--model.n_layers=2",
    "--model.n_heads=2",
    "--model.ffn_hidden=48",
    "--model.max_seq_len=16",
    "--model.memory.knum=4",
    "--model.memory.kdim=8",
    "--model.memory.vdim=16",
    "--model.memory.pre_vdim=8",
    "--model.memory.knn=2",
    "--model.memory.calibration_rounds=1",
    "--data.vocab_size=300",
    "--train.seq_len=16",
]


def tiny_cfg(memory_type="ultramem_v2", insert="full", n_layers=3, **model_kw):
    """A tiny decoder's ModelConfig (vocabulary 97, width 32, sequences of 16), for in-process tests."""
    from ultramem.config import MemoryConfig, ModelConfig

    mem = MemoryConfig(
        type=memory_type, insert=insert, knum=4, kdim=8, vdim=16, pre_vdim=8, knn=2, calibration_rounds=1
    )
    kw = dict(vocab_size=97, dim=32, n_layers=n_layers, n_heads=4, ffn_hidden=48, max_seq_len=16, memory=mem)
    kw.update(model_kw)
    return ModelConfig(**kw)
