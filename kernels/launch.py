"""Launching a kernel, or compiling only what that launch would run.

Every launcher of this package calls `launch(kernel, grid)(...)`. Inside `compile_only()`
the same call compiles the binary (into Triton's on-disk cache) without running it, so a
process that has no GPU, or has not set one up, can build exactly what a later launch with
tensors of the same shapes, strides and dtypes loads: the launcher's own argument logic
decides both. Tensors on the meta device stand in for the real ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

# The kernels compiled by the innermost compile_only(), or None: launch.
_compiled: ContextVar[list | None] = ContextVar("compiled", default=None)


def launch(kernel, grid):
    """`kernel[grid]`, or under compile_only() a call that compiles and records the kernel."""
    compiled = _compiled.get()
    if compiled is None:
        return kernel[grid]

    def compile_without_launch(*args, **kwargs):
        compiled.append(kernel.warmup(*args, grid=grid, **kwargs))

    return compile_without_launch


@contextmanager
def compile_only():
    """Launches inside compile instead; yields the list of Triton's compiled kernels."""
    compiled: list = []
    token = _compiled.set(compiled)
    try:
        yield compiled
    finally:
        _compiled.reset(token)
