"""The switches a traced op body reads are part of the compile caches' keys; argument checks run once per signature."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import ultramem.ops as ops
from ultramem.ops import _trace_state
from ultramem.ops._triton import _launch


@pytest.fixture
def restore_switches():
    saved = (_launch.INLINE_TRITON, ops.deterministic_enabled(), ops.debug_enabled())
    with torch.compiler.config.patch(cache_key_tag=""):
        yield
        ops.set_inline_triton(saved[0])
        ops.set_deterministic(saved[1])
        ops.set_debug(saved[2])


def test_tag_names_the_switches_off_their_defaults_and_keeps_the_users_tag(restore_switches):
    ops.set_inline_triton(True)
    ops.set_deterministic(False)
    ops.set_debug(False)
    assert torch.compiler.config.cache_key_tag == ""
    ops.set_deterministic(True)
    assert torch.compiler.config.cache_key_tag == "ultramem:deterministic"
    torch.compiler.config.cache_key_tag += "|mine"
    ops.set_inline_triton(False)
    ops.set_debug(True)
    assert torch.compiler.config.cache_key_tag == "mine|ultramem:opaque,deterministic,debug"
    ops.set_inline_triton(True)
    ops.set_deterministic(False)
    ops.set_debug(False)
    assert torch.compiler.config.cache_key_tag == "mine"
    assert _trace_state.tag() == ""


def test_a_switch_changed_between_compiles_misses_the_autograd_cache(restore_switches, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(8, requires_grad=True)

    def compile_and_run():
        torch._dynamo.reset()
        torch.compile(lambda t: (t.sin() * 2).sum(), fullgraph=True)(x).backward()

    # (config modules are patched with their own patch(): monkeypatch's undo breaks them)
    with torch._functorch.config.patch(enable_autograd_cache=True):
        counters.clear()
        compile_and_run()  # a miss: the cache is empty
        compile_and_run()  # the same switches: a hit
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        ops.set_deterministic(True)
        compile_and_run()
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1
    assert counters["aot_autograd"]["autograd_cache_miss"] == 2


def test_check_once_skips_a_signature_that_passed_and_never_one_that_failed(monkeypatch):
    from ultramem.ops import _checks

    monkeypatch.setattr(_checks, "_passed", {})
    monkeypatch.setattr(_checks, "_debug", False)
    calls = []

    def checks(t, k):
        calls.append(k)
        _checks.check(t.shape[0] == k, "op", f"t has {t.shape[0]} rows, want k={k}")

    t = torch.zeros(3, 2)
    _checks.check_once("op", checks, t, 3)
    _checks.check_once("op", checks, torch.ones(3, 2), 3)  # same shape, strides, dtype, device
    assert calls == [3]
    _checks.check_once("op", checks, t.t().contiguous().t(), 3)  # other strides: checked again
    assert len(calls) == 2
    for _ in range(2):  # a failure is never remembered
        with pytest.raises(ValueError, match="t has 3 rows, want k=4"):
            _checks.check_once("op", checks, t, 4)
    assert len(calls) == 4
    monkeypatch.setattr(_checks, "_debug", True)  # debug mode checks every call
    _checks.check_once("op", checks, t, 3)
    assert len(calls) == 5


def test_check_once_returns_what_the_checks_returned_and_runs_them_on_traced_tensors(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ultramem.ops import _checks

    monkeypatch.setattr(_checks, "_passed", {})
    calls = []

    def checks(t):
        calls.append(t)
        return t.shape[0] * 10

    assert _checks.check_once("op", checks, torch.zeros(3)) == 30
    assert _checks.check_once("op", checks, torch.zeros(3)) == 30
    assert len(calls) == 1
    with FakeTensorMode() as mode:  # a trace's tensors are checked every time, never remembered
        fake = mode.from_tensor(torch.zeros(4))
        assert _checks.check_once("op", checks, fake) == 40
        assert _checks.check_once("op", checks, fake) == 40
    assert len(calls) == 3 and len(_checks._passed) == 1
