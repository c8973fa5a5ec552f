"""Compiler-level budgets of the memory layers and of the trainer's compiled step (budgets.toml):
graph breaks, graphs and recompiles, Inductor's kernels, op calls, host syncs and allocations of
a value table's size in the backward. Deterministic: counters, hooks and dispatch, no timing."""

from __future__ import annotations

import pytest
import torch
from perf_harness import (
    LAYER_DIM,
    LAYER_TOKENS,
    LAYER_VARIANTS,
    CompileRecorder,
    GraphRecorder,
    OpCounter,
    backward_allocations,
    build_layer_pair,
    graph_custom_ops,
    layer_step,
    layer_value_bytes,
    load_budgets,
)

BUDGETS = load_budgets()


def _diff(what: str, got, want) -> str:
    return f"{what}: measured {got}, budget {want} (tests/perf/budgets.toml)"


# ---------------------------------------------------------------------------------------------
# Each memory layer


class LayerFigures:
    def __init__(self, variant: str):
        tables, layers = build_layer_pair(variant)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(*LAYER_TOKENS, LAYER_DIM, generator=g).requires_grad_()
        gy = torch.randn(*LAYER_TOKENS, LAYER_DIM, generator=g)
        self.eager = OpCounter()
        with self.eager:
            layer_step(layers[0], tables, x, gy)
        self.graphs = GraphRecorder()
        # other tests may have compiled these forwards already: room for this test's graphs
        with torch._dynamo.config.patch(recompile_limit=64), CompileRecorder() as self.compiles:
            compiled = [torch.compile(layer, backend=self.graphs) for layer in layers]
            for _ in range(2):
                for c in compiled:
                    layer_step(c, tables, x, gy)
            self.run = OpCounter()
            with self.run:
                self.big_allocs, _ = backward_allocations(
                    lambda: layer_step(compiled[0], tables, x, gy), layer_value_bytes(tables, layers)
                )


@pytest.fixture(scope="module", params=list(LAYER_VARIANTS))
def layer(request):
    return request.param, LayerFigures(request.param), BUDGETS["layers"][request.param]


def test_layer_graphs(layer):
    """No graph break; both layers share one graph over two calls each (no recompile)."""
    variant, fig, budget = layer
    assert fig.compiles.graph_breaks == budget["graph_breaks"], _diff(
        f"{variant} graph breaks {fig.compiles.break_reasons}", fig.compiles.graph_breaks, budget["graph_breaks"]
    )
    got = (len(fig.graphs.dynamo), len(fig.graphs.forward), len(fig.graphs.backward))
    want = (budget["dynamo_graphs"],) * 3
    assert got == want, _diff(f"{variant} graphs (Dynamo, AOT forward, AOT backward)", got, want)


def test_layer_op_calls(layer):
    """The ultramem:: ops per call: in the compiled graphs and dispatched eagerly, alike."""
    variant, fig, budget = layer
    assert graph_custom_ops(fig.graphs.forward) == budget["forward_ops"], _diff(
        f"{variant} ops in the compiled forward", graph_custom_ops(fig.graphs.forward), budget["forward_ops"]
    )
    assert graph_custom_ops(fig.graphs.backward) == budget["backward_ops"], _diff(
        f"{variant} ops in the compiled backward", graph_custom_ops(fig.graphs.backward), budget["backward_ops"]
    )
    want = dict(sorted({**budget["forward_ops"], **budget["backward_ops"]}.items()))
    for how, counter in (("eager", fig.eager), ("compiled", fig.run)):
        assert counter.custom_ops() == want, _diff(f"{variant} ops dispatched ({how})", counter.custom_ops(), want)
    assert fig.eager.custom_ops(backward_only=True) == budget["backward_ops"]


def test_layer_host_syncs(layer):
    variant, fig, budget = layer
    for how, counter in (("eager", fig.eager), ("compiled", fig.run)):
        assert dict(counter.syncs) == budget["host_syncs"], _diff(
            f"{variant} host syncs ({how})", dict(counter.syncs), budget["host_syncs"]
        )


def test_layer_backward_allocations(layer):
    """No allocation of a value table's size in the backward (v1 excepted: its own table)."""
    variant, fig, budget = layer
    assert len(fig.big_allocs) == budget["backward_table_allocations"], _diff(
        f"{variant} backward allocations of a table's size (bytes)",
        fig.big_allocs,
        budget["backward_table_allocations"],
    )


# ---------------------------------------------------------------------------------------------
# The trainer's step (figures measured once per session: conftest.train_step_figures)

TRAIN = BUDGETS["train_step"]


def test_train_step_graphs(train_step_figures):
    f = train_step_figures
    assert f.compiles.graph_breaks == TRAIN["graph_breaks"], _diff(
        f"graph breaks {f.compiles.break_reasons}", f.compiles.graph_breaks, TRAIN["graph_breaks"]
    )
    frames = {name: len(ids) for name, ids in sorted(f.compiles.frames(f.names).items())}
    assert frames == TRAIN["graphs"], _diff("compiled graphs per code", frames, TRAIN["graphs"])
    assert f.compiles.unique_graphs == sum(TRAIN["graphs"].values())


def test_train_step_no_recompiles(train_step_figures):
    """Steps 2 to 4 (same shapes; one of them reports metrics) compile nothing."""
    f = train_step_figures
    later = [f"{e.compile_id} ({e.trigger})" for e in f.later_compiles.events]
    assert len(later) == TRAIN["compiles_after_first_step"], _diff(
        "compiles after the first step", later, TRAIN["compiles_after_first_step"]
    )
    assert f.later_compiles.unique_graphs == 0 and f.later_compiles.graph_breaks == 0


def test_train_step_generated_kernels(train_step_figures):
    f = train_step_figures
    got = f.compiles.kernels_by_frame(f.names)
    assert got == TRAIN["generated_kernels"], _diff(
        "Inductor kernels per graph (forward + backward)", got, TRAIN["generated_kernels"]
    )


def test_train_step_op_calls(train_step_figures):
    f = train_step_figures
    step = f.plain_step
    assert step.custom_ops() == TRAIN["ops"], _diff("ultramem:: ops per step", step.custom_ops(), TRAIN["ops"])
    assert step.custom_ops(backward_only=True) == TRAIN["backward_ops"], _diff(
        "ultramem:: ops in the backward per step", step.custom_ops(backward_only=True), TRAIN["backward_ops"]
    )
    total = sum(step.ops.values())
    assert total == TRAIN["dispatched_ops"], _diff(
        f"ops dispatched per step {dict(step.ops.most_common())}", total, TRAIN["dispatched_ops"]
    )


def test_train_step_host_syncs(train_step_figures):
    """A step reads the device only where the budget says; a metrics step adds reads only
    under Trainer.memory_metrics."""
    f = train_step_figures
    got = dict(sorted(f.plain_step.syncs.items()))
    assert got == TRAIN["host_syncs"], _diff("host syncs in a step without metrics", got, TRAIN["host_syncs"])
    reporting = {k: v for k, v in f.metrics_step.syncs.items() if k.startswith("metrics: ")}
    rest = dict(sorted((k, v) for k, v in f.metrics_step.syncs.items() if k not in reporting))
    assert rest == TRAIN["host_syncs"], _diff(
        "host syncs outside memory_metrics in a metrics step", rest, TRAIN["host_syncs"]
    )
    assert reporting, "the metrics step reported no memory metrics (nothing read under memory_metrics)"


def test_train_step_backward_allocations(train_step_figures):
    f = train_step_figures
    # the check means something only if no other gradient comes near a table's size
    model = f.trainer.model
    tables = {id(p) for p in model.memory_tables.value_parameters()}
    others = max(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)
    assert 2 * others <= f.table_bytes, (others, f.table_bytes)
    assert len(f.backward_big_allocs) == TRAIN["backward_table_allocations"], _diff(
        f"backward allocations of at least a table's {f.table_bytes} bytes",
        f.backward_big_allocs,
        TRAIN["backward_table_allocations"],
    )
