"""Gradient accumulation with one foreach add per micro-batch (`ultramem.train.accumulate`)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ultramem.train.accumulate import FoldedGrads


class _Net(nn.Module):
    """Three linears and a parameter that only some micro-batches use."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4, bias=False)
        self.c = nn.Linear(4, 3)
        self.rare = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor, use_rare: bool) -> torch.Tensor:
        y = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return (y * self.rare if use_rare else y).square().mean()


def _micro_batches(n: int) -> list[tuple[torch.Tensor, bool]]:
    g = torch.Generator().manual_seed(1)
    # `rare` is absent from the first micro-batch and from the third
    return [(torch.randn(7, 6, generator=g), i not in (0, 2)) for i in range(n)]


def _accumulate(net: _Net, folded: FoldedGrads | None, batches) -> list[list]:
    """Backward of each micro-batch; after each, every parameter's .grad object."""
    seen = []
    for x, use_rare in batches:
        loss = net(x, use_rare)
        if folded is None:
            loss.backward()
        else:
            with folded.backward():
                loss.backward()
        seen.append([p.grad for p in net.parameters()])
    return seen


def test_folded_gradients_are_autograds_to_the_bit():
    torch.manual_seed(0)
    want_net = _Net()
    got_net = _Net()
    got_net.load_state_dict(want_net.state_dict())
    batches = _micro_batches(5)
    _accumulate(want_net, None, batches)
    seen = _accumulate(got_net, FoldedGrads(got_net.parameters()), batches)
    for (name, want), got in zip(want_net.named_parameters(), got_net.parameters()):
        assert got.grad is not None and torch.equal(got.grad, want.grad), name
    # once a parameter has a gradient, later micro-batches add into that same tensor
    rare = [i for i, (n, _) in enumerate(got_net.named_parameters()) if n == "rare"][0]
    assert seen[0][rare] is None and seen[1][rare] is not None
    for later in seen[2:]:
        assert all(g is seen[1][i] for i, g in enumerate(later))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fold", [False, True])
def test_one_foreach_add_instead_of_an_add_per_parameter(fold):
    torch.manual_seed(0)
    net = _Net()
    folded = FoldedGrads(net.parameters()) if fold else None
    x, _ = _micro_batches(1)[0]
    _accumulate(net, folded, [(x, True)])
    ops = _Ops()
    with ops:
        _accumulate(net, folded, [(x, True)])
    n_params = len(list(net.parameters()))
    adds, foreach = ops.names.count("aten.add_"), ops.names.count("aten._foreach_add_")
    assert (adds, foreach) == ((0, 1) if fold else (n_params, 0)), ops.names


def test_a_failed_backward_leaves_the_gradients_as_they_were():
    torch.manual_seed(0)
    net = _Net()
    folded = FoldedGrads(net.parameters())
    batches = _micro_batches(3)
    _accumulate(net, folded, batches[:1])  # `rare` has no gradient yet
    kept = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    objects = [p.grad for p in net.parameters()]
    with pytest.raises(RuntimeError, match="interrupted"):
        with folded.backward():
            net(*batches[1]).backward()  # (uses `rare`)
            raise RuntimeError("interrupted")
    for p, g, k in zip(net.parameters(), objects, kept):
        assert p.grad is g and (k is None or torch.equal(p.grad, k))


def _mixed_params():
    """Parameters of two dtypes, one an embedding's with sparse gradients, one absent from a
    micro-batch; and the backward of micro-batch i."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 2, sparse=True)
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, dtype=torch.float64)), emb.weight]
    params.append(nn.Parameter(torch.randn(4)))

    def backward(i: int) -> None:
        ids = torch.tensor([i % 5, (i + 2) % 5])
        loss = (params[0] * i).sum() + params[1].sum() * i + emb(ids).square().sum()
        (loss + params[3].sum() if i != 1 else loss).backward()

    return params, backward


def test_gradients_of_another_dtype_and_sparse_ones_are_added_too():
    """One foreach add per dtype (and device); a sparse gradient as autograd adds it."""
    params, backward = _mixed_params()
    folded = FoldedGrads(params)
    assert sorted(map(len, folded._groups)) == [1, 3]
    for i in range(3):
        with folded.backward():
            backward(i)
    want, want_backward = _mixed_params()
    for i in range(3):
        want_backward(i)
    for p, w in zip(params, want):
        assert p.grad.is_sparse == w.grad.is_sparse and torch.equal(p.grad.to_dense(), w.grad.to_dense())


def test_trainer_steps_are_bit_identical_with_and_without_folding(monkeypatch):
    """Three micro-batches per step: the trainer's folding changes no loss and no weight. (The
    config asks for a compile, which makes the trainer fold; built here without `parallelize`,
    the model runs eagerly.)"""
    from test_trainer import tiny_trainer

    extra = ["--train.max_steps=2", "--train.grad_accum=3", "--train.compile=true"]
    want = tiny_trainer(extra)
    assert want._folded is not None
    monkeypatch.setattr(want, "_folded", None)
    want_losses = [r.loss for r in want.train()]
    got = tiny_trainer(extra)
    calls = []
    orig = FoldedGrads.backward

    def backward(self):
        calls.append(self)
        return orig(self)

    monkeypatch.setattr(FoldedGrads, "backward", backward)
    got_losses = [r.loss for r in got.train()]
    assert calls == [got._folded] * 6
    assert got_losses == want_losses
    for (name, p), q in zip(want.model.named_parameters(), got.model.parameters()):
        assert torch.equal(p, q), name
    assert np.isfinite(got_losses).all()


def test_the_trainer_folds_only_a_compiled_model_in_one_process():
    """Elsewhere the new gradients would outlive autograd's adds (eager, DDP's split graphs) or
    a wrapper reduces them in the backward (DDP, FSDP)."""
    from test_trainer import tiny_trainer

    from ultramem.train.parallelize import Parallelized
    from ultramem.train.trainer import Trainer

    assert tiny_trainer([])._folded is None
    compiled = tiny_trainer(["--train.compile=true"])
    folded = compiled._folded
    assert folded is not None
    # every parameter autograd gives a gradient to (not the tables), once each
    tables = {id(p) for p in compiled.model.memory_tables.parameters()}
    assert tables and len(folded.params) == len({id(p) for p in folded.params})
    assert {id(p) for p in folded.params} == {id(p) for p in compiled._params} - tables
    for mode in ("ddp", "fsdp"):
        t = compiled
        again = Trainer(
            t.cfg,
            t.model,
            t.optimizer,
            t.scheduler,
            t.train_batches,
            t.device,
            t.info,
            parallel=Parallelized(t.model, t.model, mode),
        )
        assert again._folded is None, mode
