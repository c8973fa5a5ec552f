"""A fix-up for running the Triton kernels under TRITON_INTERPRET=1 (tests, CPU smoke runs of perf/).

Triton 3.6's interpreter keeps scalars as 1-element NumPy arrays and calls int() on them for
`range(...)` bounds, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted").
`patch_index()` makes such scalars convertible by reading their single element. It changes
nothing when Triton's interpreter module is absent or already behaves.

`assert_kernel_tests_pass_interpreted` runs a test module's kernel tests in such a subprocess.
"""

from __future__ import annotations

import os
import sys


def patch_index() -> None:
    try:
        import triton.runtime.interpreter as interp

        original = interp._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(original, "_ultramem_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ultramem_patched = True
    interp._patch_lang_tensor = patched


def assert_kernel_tests_pass_interpreted(test_file: str, timeout: float) -> None:
    """The tests of `test_file` named *kernel*, run by pytest in a subprocess under
    TRITON_INTERPRET=1 (the interpreter is chosen when Triton is imported): all must run and pass.
    Skips when already interpreting (the subprocess itself) or without Triton."""
    import pytest
    import subproc

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already running under the interpreter")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "kernel", test_file]
    proc = subproc.run(cmd, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout and " skipped" not in proc.stdout
