"""Test setup: kernels run in Triton's interpreter on the CPU, buffers start poisoned."""

import os
import secrets

# Must be set before Triton kernels are defined (when moetune is first imported).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def _round_bf16_to_nearest_even() -> None:
    """Triton's interpreter turns fp32 into bf16 by dropping the low mantissa bits (round
    toward zero), where the GPU rounds to nearest even. Over the layer's four bf16 roundings
    that bias shrank the outputs by about 1.4% on average, and now and then past the 2e-2
    bf16 tolerance. Cast with torch instead, which rounds as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def _skip_integer_overflow_checks() -> None:
    """Triton's interpreter redoes every 32-bit integer add, subtract and multiply of a kernel
    in 64 bits to catch an overflow. The tests' shapes keep every index far below 2**31, so
    the check cannot fire here, and it took about a fifth of the interpreter's time (the
    GPU kernels run without it unless compiled in debug mode)."""
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


_round_bf16_to_nearest_even()
_skip_integer_overflow_checks()
_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    """torch.empty that fills floats with NaN and ints with a wild value, so an element
    a kernel forgot to write shows up in the result instead of hiding as a zero."""
    tensor = _real_empty(*args, **kwargs)
    if tensor.dtype.is_floating_point:
        tensor.fill_(float("nan"))
    elif tensor.dtype in (torch.int32, torch.int64):
        tensor.fill_(-77777)
    return tensor


@pytest.fixture
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


@pytest.fixture
def rng():
    """A fresh generator per test: inputs differ between runs, and a failure reproduces from
    the seed printed with it (pytest shows a failed test's output)."""
    seed = secrets.randbits(31)  # torch.seed() would reseed the global generator too
    print(f"rng seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def isolated_loader(monkeypatch, tmp_path):
    """No loader environment settings, an empty packaged folder, fresh caches; yields that folder."""
    import moetune.loader as loader
    import moetune.table_paths as table_paths

    for name in (table_paths.ENV_CONFIG_DIR, loader.ENV_STRICT, loader.ENV_DETERMINISTIC):
        monkeypatch.delenv(name, raising=False)
    packaged = tmp_path / "packaged"
    monkeypatch.setattr(table_paths, "PACKAGED_DIR", packaged)
    loader.clear_cache()
    yield packaged
    loader.clear_cache()


@pytest.fixture
def single_threaded():
    """Stop the monitor thread earlier in-process tqdm bars leave behind (`moetune run` has
    none before it forks): with another thread alive, nothing forks."""
    from tqdm import tqdm

    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None
