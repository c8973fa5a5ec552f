"""Learning-rate schedule values, optimizer groups, and the value-table lr multiplier."""

import math

import pytest
import torch

from ultramem.config import MemoryConfig, ModelConfig
from ultramem.model import build_model
from ultramem.train.config import OptimConfig
from ultramem.train.optim import GlobalSchedule, ValueLrMultiplier, build_optimizer, param_groups


def test_global_schedule_key_steps():
    s = GlobalSchedule(warmup_steps=10, max_steps=110, min_frac=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # stays at the floor past the end
    values = [s(i) for i in range(111)]
    assert all(b >= a for a, b in zip(values[:10], values[1:11]))
    assert all(b <= a for a, b in zip(values[10:], values[11:]))


def test_schedule_without_warmup_starts_at_peak():
    s = GlobalSchedule(0, 100, 0.1)
    assert s(0) == pytest.approx(1.0) and s(100) == pytest.approx(0.1)


def test_value_multiplier_decays_linearly_to_one():
    m = ValueLrMultiplier(4.0, 0.5, 100)
    assert [m(i) for i in (0, 25, 50, 75, 100)] == pytest.approx([4.0, 2.5, 1.0, 1.0, 1.0])
    assert ValueLrMultiplier(4.0, 0.0, 100)(0) == 1.0
    assert ValueLrMultiplier(1.0, 1.0, 100)(37) == 1.0


def memory_model():
    mem = MemoryConfig(knum=4, kdim=8, vdim=16, pre_vdim=8, knn=2, calibration_rounds=1)
    return build_model(
        ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=16, memory=mem), seed=0
    )


def test_groups_put_each_parameter_in_its_place():
    model = memory_model()
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1, value_weight_decay=0.05))}
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = {k: {by_id[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert names["values"] == {"memory_tables.values", "memory_tables.pre_values"}
    assert {
        "tok_embeddings.weight",
        "blocks.0.attn.wqkv.weight",
        "blocks.1.ffn.w2.weight",
        "memory_layers.0.w_q.weight",
        "memory_layers.1.keys",
        "memory_layers.0.cores",
        "memory_layers.0.w_o.weight",
    } <= names["decay"]
    assert {
        "norm.weight",
        "blocks.0.norm_attn.weight",
        "blocks.1.norm_ffn.weight",
        "memory_layers.0.norm_q.weight",
        "memory_layers.1.norm_k.weight",
    } <= names["no_decay"]
    assert all(n.endswith("weight") for n in names["no_decay"])
    all_names = [n for g in names.values() for n in g]
    assert sorted(all_names) == sorted(by_id.values())  # each exactly once
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["values"]["weight_decay"] == 0.05
    default = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    assert default["values"]["weight_decay"] == 0.1


def test_scheduler_lrs_per_group_over_steps():
    model = memory_model()
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, min_lr_frac=0.1, value_lr_mult=4.0, value_lr_decay_frac=0.5)
    opt, sched = build_optimizer(model, cfg, max_steps=20)
    names = [g["name"] for g in opt.param_groups]
    schedule = GlobalSchedule(4, 20, 0.1)
    for step in range(21):
        lrs = dict(zip(names, sched.get_last_lr()))
        base = 1e-2 * schedule(step)
        mult = 4.0 + (1.0 - 4.0) * min(1.0, step / 10)
        assert lrs["decay"] == pytest.approx(base) and lrs["no_decay"] == pytest.approx(base)
        assert lrs["values"] == pytest.approx(base * mult), step
        opt.step()
        sched.step()


def test_memory_plus_table_takes_a_constant_lr():
    mem = MemoryConfig(type="memory_plus", knum=4, kdim=8, vdim=16, knn=2, heads=2)
    model = build_model(
        ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=16, memory=mem), seed=0
    )
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, value_lr_mult=4.0, memory_plus_value_lr=2e-3)
    opt, sched = build_optimizer(model, cfg, max_steps=12)
    names = [g["name"] for g in opt.param_groups]
    schedule = GlobalSchedule(4, 12, 0.1)
    for step in range(13):
        lrs = dict(zip(names, sched.get_last_lr()))
        assert lrs["values"] == pytest.approx(2e-3), step
        assert lrs["decay"] == pytest.approx(1e-2 * schedule(step))
        opt.step()
        sched.step()


def test_dense_model_has_no_value_group():
    model = build_model(
        ModelConfig(
            vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=8, memory=MemoryConfig(type="none")
        ),
        seed=0,
    )
    opt, _ = build_optimizer(model, OptimConfig(), 10)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert isinstance(opt, torch.optim.AdamW)
