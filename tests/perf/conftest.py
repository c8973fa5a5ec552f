"""The trainer's compiled step, built and measured once per session: compiling it costs tens of
seconds on a 2-core CPU, and the compile budgets and the compiled-layer timing both use it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from perf_harness import (
    CompileRecorder,
    OpCounter,
    backward_allocations,
    build_compiled_trainer,
    code_names,
    optimizer_step_counters,
    table_bytes,
)


@dataclasses.dataclass
class TrainStepFigures:
    trainer: object
    compiles: CompileRecorder  # the first step (all compiles happen there)
    later_compiles: CompileRecorder  # steps 2 to 4
    plain_step: OpCounter  # step 2: no memory metrics
    metrics_step: OpCounter  # step 3: memory metrics reported
    backward_big_allocs: list[int]  # step 2: allocations of at least a table's bytes
    backward_max_alloc: int  # step 2: the largest allocation in the backward, bytes
    table_bytes: int
    names: dict


@pytest.fixture(scope="session")
def train_step_figures() -> TrainStepFigures:
    from ultramem.layers import MemoryPlus, UltraMemV1, UltraMemV2
    from ultramem.model import Block, Transformer

    torch._dynamo.reset()  # start from no cached graphs: the compile counts are of this model only
    trainer = build_compiled_trainer()
    model = trainer.model
    assert trainer.cfg.model.memory.log_interval == 3
    with CompileRecorder() as first:
        trainer.train_step()
    host = optimizer_step_counters(trainer.optimizer)
    limit = table_bytes(model.memory_tables)
    with CompileRecorder() as later:
        plain = OpCounter(host)
        big, largest = backward_allocations(lambda: _under(plain, trainer.train_step), limit)
        metrics = OpCounter(host)
        _under(metrics, trainer.train_step)
        trainer.train_step()
    assert trainer.step == 4
    names = code_names(Block, Transformer, UltraMemV2, UltraMemV1, MemoryPlus)
    return TrainStepFigures(trainer, first, later, plain, metrics, big, largest, limit, names)


def _under(mode, fn):
    with mode:
        return fn()
