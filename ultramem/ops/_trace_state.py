"""The process-wide switches that a traced op body reads, in the compile caches' keys.

A compiled graph keeps what the ops' bodies chose when they were traced: inline launches or opaque
calls, deterministic or atomic table gradients, range checks (debug mode). The compile caches key
on the Dynamo graph, which is the same whatever these switches say, so a graph compiled under one
setting would be reused under another in a later process. The modules that own the switches
therefore `record` each value they take (at import, from the environment, and in their setters),
and the switches that differ from their defaults go into `torch.compiler.config.cache_key_tag`,
which every compile cache keys on (the user's own tag is kept beside ours). PyTorch's own
deterministic mode is keyed already.
"""

from __future__ import annotations

import torch

_PREFIX = "ultramem:"
# name in the tag -> whether it is on (on = differs from the default), in the tag's order
_on: dict[str, bool] = {"opaque": False, "deterministic": False, "debug": False}


def record(name: str, on: bool) -> None:
    """A switch's new state; updates the compile caches' tag."""
    if name not in _on:
        raise KeyError(f"unknown switch {name!r}; known: {', '.join(_on)}")
    _on[name] = bool(on)
    _sync_cache_tag()


def tag() -> str:
    """The switches that differ from their defaults, e.g. "ultramem:opaque,deterministic"; "" if none."""
    state = [name for name, on in _on.items() if on]
    return _PREFIX + ",".join(state) if state else ""


def _sync_cache_tag() -> None:
    """Put `tag()` into torch.compiler.config.cache_key_tag, replacing the previous one of ours."""
    config = torch.compiler.config
    if not hasattr(config, "cache_key_tag"):  # older PyTorch: nothing to key on
        return
    parts = [p for p in config.cache_key_tag.split("|") if p and not p.startswith(_PREFIX)]
    ours = tag()
    config.cache_key_tag = "|".join(parts + ([ours] if ours else []))
