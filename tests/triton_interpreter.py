"""A fix-up for running the Triton kernels under TRITON_INTERPRET=1 (tests, CPU smoke runs of perf/).

Triton 3.6's interpreter keeps scalars as 1-element NumPy arrays and calls int() on them for
`range(...)` bounds, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted").
`patch_index()` makes such scalars convertible by reading their single element. It changes
nothing when Triton's interpreter module is absent or already behaves.
"""

from __future__ import annotations


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
