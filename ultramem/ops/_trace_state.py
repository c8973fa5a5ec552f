"""The process-wide switches that a traced op body reads, in the compile caches' keys.

A compiled graph keeps what the ops' bodies chose when they were traced: inline launches or opaque
calls, deterministic or atomic table gradients, range checks (debug mode). The compile caches key
on the Dynamo graph, which is the same whatever these switches say, so a graph compiled under one
setting would be reused under another in a later process. Each setter therefore records the
non-default switches in `torch.compiler.config.cache_key_tag`, which every compile cache keys on
(the user's own tag is kept beside ours). PyTorch's own deterministic mode is keyed already.
"""

from __future__ import annotations

import torch

_PREFIX = "ultramem:"


def tag() -> str:
    """The switches that differ from their defaults, e.g. "ultramem:opaque,deterministic"; "" if none."""
    from . import _checks, determinism  # the setters below live there and call us
    from ._triton import _launch

    state = [
        name
        for name, on in (
            ("opaque", not _launch.INLINE_TRITON),
            ("deterministic", determinism._deterministic),
            ("debug", _checks._debug),
        )
        if on
    ]
    return _PREFIX + ",".join(state) if state else ""


def sync_cache_tag() -> None:
    """Put `tag()` into torch.compiler.config.cache_key_tag, replacing the previous one of ours."""
    config = torch.compiler.config
    if not hasattr(config, "cache_key_tag"):  # older PyTorch: nothing to key on
        return
    parts = [p for p in config.cache_key_tag.split("|") if p and not p.startswith(_PREFIX)]
    ours = tag()
    config.cache_key_tag = "|".join(parts + ([ours] if ours else []))
