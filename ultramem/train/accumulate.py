"""Gradient accumulation over micro-batches with one foreach add per micro-batch.

Left to autograd, each micro-batch's backward adds every parameter's new gradient into the
`.grad` kept from the micro-batches before with an `add_` of its own: one launch per parameter
(282 for 227m.toml's UltraMemV2, whose tables take their gradients elsewhere; 142 for its dense
model), each a few microseconds of host time. Without CUDA graphs the host sets the pace of a
memory model's step, so the GPU waits for them.

`FoldedGrads` sets the kept gradients aside for the backward, so that autograd makes the new ones
each parameter's `.grad` (the tensor computed, when nothing else holds it), then adds them in
with one `torch._foreach_add_` per dtype and device and puts the kept ones back: the same
additions in the same order, so the same gradients to the bit, as long as each parameter gets
one gradient per backward (as with non-reentrant checkpointing; reentrant checkpointing can
deliver two, which autograd adds one at a time).

The new gradients live until the backward ends, where autograd would free each after its add:
up to one more set of gradients at the end of the backward. A compiled backward of the whole
model returns them all at once anyway, which is where the trainer folds (`Trainer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


class FoldedGrads:
    """Adds each micro-batch's gradients of `params` into the ones they had, in one launch group.

    Not for parameters whose gradients a backward hook reduces as they are produced (DDP,
    FSDP): those hooks must see the whole sum in `.grad`."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params = list(dict.fromkeys(params))  # (each once: a repeated one would be added twice)
        # A gradient takes its parameter's dtype and device (autograd sees to it), and one foreach
        # add takes lists of one dtype and device: the parameters' indices by the two.
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups = list(groups.values())

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        """Run one micro-batch's backward inside. Gradients kept from before are set aside and
        the new ones added into them afterwards; the kept tensors stay each parameter's `.grad`
        (CUDA graphs keep their addresses). With none kept yet (the first micro-batch) autograd
        sets them as usual. If the backward raises, every `.grad` is put back as it was."""
        kept = [p.grad for p in self.params]
        if all(g is None for g in kept):
            yield
            return
        for p in self.params:
            p.grad = None
        finished = False
        try:
            yield
            finished = True
        finally:
            new = [p.grad for p in self.params]
            for p, g in zip(self.params, kept):
                if g is not None or not finished:
                    p.grad = g
            if finished:
                _add_into(kept, new, self._groups)


@torch.no_grad()
def _add_into(kept: list[Tensor | None], new: list[Tensor | None], groups: list[list[int]]) -> None:
    """kept[i] += new[i] where both exist (no gradient this time: the kept one stands; none kept:
    the new one is .grad already), one foreach add per group of indices. A sparse gradient sends
    its group down the op's slow path, an add per pair."""
    for idx in groups:
        pairs = [i for i in idx if kept[i] is not None and new[i] is not None]
        if pairs:
            torch._foreach_add_([kept[i] for i in pairs], [new[i] for i in pairs])
