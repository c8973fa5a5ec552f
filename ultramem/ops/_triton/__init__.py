"""Triton kernels and their launchers, one module per op.

The package imports without Triton (CPU-only installs): then every submodule name resolves to
None, so an op module can guard its CUDA registration with

    from ._triton import weighted_lookup as _triton_weighted_lookup
    if _triton_weighted_lookup is not None:
        ...

With Triton present, the name resolves to the submodule (imported on first use).

Imports go one way: op modules import these modules; these import each other, `.._checks` and
`..determinism`, and no op module at import time (the retrieval launcher's fallback calls the
op's reference kernel, imported when it runs).
"""

from __future__ import annotations

import importlib
import logging

_log = logging.getLogger(__name__)

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only install: the reference kernels serve every device
    HAVE_TRITON = False
else:
    HAVE_TRITON = True


def __getattr__(name: str):
    # PEP 562: called only for names not already bound, i.e. submodules not yet imported.
    if name.startswith("__"):
        raise AttributeError(name)
    if not HAVE_TRITON:
        return None
    return importlib.import_module(f"{__name__}.{name}")
