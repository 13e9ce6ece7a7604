"""What the tuner's compile workers build is exactly what the timed launch runs."""

import importlib

import pytest
import torch

from moetune.bench import make_weights
from moetune.bench_layer import ROLES, BatchBench
from moetune.tune import _compile_job

# The module, not the function kernels/__init__ re-exports under the same name.
gg = importlib.import_module("moetune.kernels.grouped_gemm")
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}


def specialisation(pointers, geometry, config, **flags):
    dtypes = tuple(p if isinstance(p, torch.dtype) else p.dtype for p in pointers)
    return dtypes, geometry, dict(config), flags


@pytest.mark.parametrize("role", ROLES)
def test_compile_request_matches_the_launch(role, monkeypatch):
    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    bench = BatchBench(w1, w2, 5, 2, seed=1)
    seen = []
    monkeypatch.setattr(gg, "_launch", lambda call, pointers, geometry, config, **flags:
                        seen.append(specialisation(pointers, geometry, config, **flags)))
    bench.role_call(role, CONFIG)()  # the launch the tuner times
    _compile_job(bench.compile_request(role, CONFIG["BLOCK_SIZE_M"]), CONFIG)  # what a worker compiles
    assert len(seen) == 2
    assert seen[0] == seen[1]
