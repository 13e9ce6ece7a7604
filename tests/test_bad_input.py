"""Bad input to the layer: a ValueError/TypeError that names the problem."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetune import fused_experts, fused_moe
from tests.moe_inputs import make_inputs

ROOT = Path(__file__).resolve().parent.parent
CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}


@pytest.fixture
def inputs():
    return make_inputs(5, 4, 8, 16, 2, torch.float32, torch.Generator().manual_seed(1))


def call(inputs, **changes):
    x, w1, w2, weights, ids = inputs
    args = {"hidden_states": x, "w1": w1, "w2": w2, "topk_weights": weights, "topk_ids": ids}
    kwargs = {"variant": "unfused", "config": CFG}
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    return fused_experts(args.pop("hidden_states"), args.pop("w1"), args.pop("w2"), args.pop("topk_weights"),
                         args.pop("topk_ids"), **kwargs)


@pytest.mark.parametrize("change,error,words", [
    (lambda x, w1, w2, w, i: {"hidden_states": x[:, :-1]}, ValueError, "w1"),
    (lambda x, w1, w2, w, i: {"w1": w1[:, :-1]}, ValueError, "even"),
    (lambda x, w1, w2, w, i: {"w2": w2[:, :, :-1]}, ValueError, "w2"),
    (lambda x, w1, w2, w, i: {"w2": w2[:-1]}, ValueError, "w2"),
    (lambda x, w1, w2, w, i: {"hidden_states": x[0]}, ValueError, "hidden_states must have 2 dimensions"),
    (lambda x, w1, w2, w, i: {"w1": w1.half()}, TypeError, "w1 dtype"),
    (lambda x, w1, w2, w, i: {"hidden_states": x.double(), "w1": w1.double(), "w2": w2.double()}, TypeError, "float64"),
    (lambda x, w1, w2, w, i: {"topk_ids": i.float()}, TypeError, "topk_ids must be int32 or int64"),
    (lambda x, w1, w2, w, i: {"topk_ids": i[:-1], "topk_weights": w[:-1]}, ValueError, "M = 5"),
    (lambda x, w1, w2, w, i: {"topk_weights": w[:, :1]}, ValueError, "topk_weights"),
    (lambda x, w1, w2, w, i: {"topk_weights": w.int()}, TypeError, "topk_weights must be a floating"),
    (lambda x, w1, w2, w, i: {"topk_ids": i.repeat(1, 3), "topk_weights": w.repeat(1, 3)}, ValueError, "top-k = 6"),
    (lambda x, w1, w2, w, i: {"topk_ids": i[:, :0], "topk_weights": w[:, :0]}, ValueError, "top-k = 0"),
    (lambda x, w1, w2, w, i: {"topk_ids": "ids"}, TypeError, "topk_ids must be a torch.Tensor"),
    (lambda x, w1, w2, w, i: {"out": torch.empty(5, 3)}, ValueError, "out must be"),
    (lambda x, w1, w2, w, i: {"variant": "atomic"}, ValueError, "'atomic'"),
    (lambda x, w1, w2, w, i: {"accumulation": "fp64"}, ValueError, "'fp64'"),
    (lambda x, w1, w2, w, i: {"routed_scaling_factor": "2"}, TypeError, "routed_scaling_factor"),
    (lambda x, w1, w2, w, i: {"config": {k: v for k, v in CFG.items() if k != "num_stages"}}, ValueError, "num_stages"),
    (lambda x, w1, w2, w, i: {"config": dict(CFG, BLOCK_SIZE_N=48)}, ValueError, "BLOCK_SIZE_N"),
    (lambda x, w1, w2, w, i: {"config": dict(CFG, BLOCK_SIZE_K=8)}, ValueError, "BLOCK_SIZE_K"),
    (lambda x, w1, w2, w, i: {"config": dict(CFG, GROUP_SIZE_M=0)}, ValueError, "GROUP_SIZE_M"),
    (lambda x, w1, w2, w, i: {"config": dict(CFG, num_warps=4.0)}, TypeError, "num_warps"),
    (lambda x, w1, w2, w, i: {"config": [16, 16]}, TypeError, "config must be a dict"),
    (lambda x, w1, w2, w, i: {"down_config": dict(CFG, BLOCK_SIZE_M=24)}, ValueError, "down_config"),
])
def test_bad_input_is_named(inputs, change, error, words):
    with pytest.raises(error, match=None) as info:
        call(inputs, **change(*inputs))
    assert words in str(info.value)


# Run without TRITON_INTERPRET on this GPU-less machine: the kernels are compiled ones.
WITHOUT_INTERPRETER = """
import os, sys
import torch
before = dict(os.environ)
import moetune
from moetune import fused_moe
x, w1, w2 = torch.randn(3, 16), torch.randn(4, 32, 16), torch.randn(4, 16, 16)
try:
    fused_moe(x, w1, w2, torch.randn(3, 4), 2)
except ValueError as error:
    print(error)
print("environment unchanged" if dict(os.environ) == before else "environment changed")
"""


def test_without_the_interpreter_cpu_tensors_are_refused_and_import_sets_nothing():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even where one exists
    done = subprocess.run([sys.executable, "-c", WITHOUT_INTERPRETER], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    error, environment = done.stdout.splitlines()
    assert error.startswith("tensors are on cpu: ") and "set TRITON_INTERPRET=1" in error
    assert environment == "environment unchanged"


def test_fused_moe_checks_router_logits_and_topk(inputs):
    x, w1, w2, _, _ = inputs
    with pytest.raises(ValueError, match="router_logits"):
        fused_moe(x, w1, w2, torch.randn(5, 3), 2, config=CFG)
    with pytest.raises(ValueError, match="top-k = 5"):
        fused_moe(x, w1, w2, torch.randn(5, 4), 5, config=CFG)
    with pytest.raises(TypeError, match="topk must be an int"):
        fused_moe(x, w1, w2, torch.randn(5, 4), 2.0, config=CFG)
