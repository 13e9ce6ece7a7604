"""The Triton MoE layer against the float64 reference, both variants, on the interpreter."""

import pytest
import torch

from moetune import fused_experts, fused_moe
from moetune.reference import TOLERANCE, fused_moe_reference, moe_reference, relative_error
from tests.moe_inputs import make_inputs, make_weights

# K and N deliberately not multiples of any block size (and small: the interpreter runs
# each program in Python).
N, K = 12, 20
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}
WIDE = {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 4, "num_warps": 4, "num_stages": 3}
TALL = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 2, "num_warps": 8, "num_stages": 2}

# Each (E, top-k) routing once, E in {1, 4, 8} and top-k in {1, 2, 3, 4}; every dtype and
# variant (bf16 has no atomic add in the interpreter) with one or two of them, and each
# M (one token, a few, 17: more rows than a 16-row block when experts are few) with both.
CASES = [
    # E, topk, M, dtype, variant
    (1, 1, 17, torch.float16, "fused"),
    (4, 1, 5, torch.float32, "fused"),
    (4, 2, 17, torch.bfloat16, "unfused"),
    (4, 3, 1, torch.float16, "unfused"),
    (4, 4, 5, torch.float32, "unfused"),
    (8, 2, 1, torch.float32, "fused"),
    (8, 3, 17, torch.float32, "unfused"),
    (8, 4, 5, torch.float16, "fused"),
]


def run_layer(x, w1, w2, weights, ids, variant, config, down_config=None, **kwargs):
    out = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)
    result = fused_experts(x, w1, w2, weights, ids, variant=variant, config=config, down_config=down_config,
                           out=out, **kwargs)
    assert result is out
    return result


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape
    error = relative_error(out, ref)
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e} for {dtype}"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("E,topk,M,dtype,variant", CASES)
def test_matches_reference(E, topk, M, dtype, variant, rng):
    x, w1, w2, weights, ids = make_inputs(M, E, N, K, topk, dtype, rng)
    out = run_layer(x, w1, w2, weights, ids, variant, SMALL)
    assert_close(out, moe_reference(x, w1, w2, weights, ids), dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("config,down_config,variant", [(WIDE, None, "unfused"), (SMALL, WIDE, "fused"),
                                                        (TALL, SMALL, "unfused")])
def test_configs_and_separate_down_config(config, down_config, variant, rng):
    x, w1, w2, weights, ids = make_inputs(17, 8, N, K, 3, torch.float32, rng)
    out = run_layer(x, w1, w2, weights, ids, variant, config, down_config)
    assert_close(out, moe_reference(x, w1, w2, weights, ids), torch.float32)


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_routed_scaling_factor(variant, rng):
    x, w1, w2, weights, ids = make_inputs(5, 4, N, K, 2, torch.float32, rng)
    out = run_layer(x, w1, w2, weights, ids, variant, SMALL, routed_scaling_factor=2.5)
    ref = moe_reference(x, w1, w2, weights, ids, routed_scaling_factor=2.5)
    assert_close(out, ref, torch.float32)
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) > 0.5  # the factor was applied


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_experts_without_tokens_and_all_on_one_expert(variant, rng):
    E, topk, M = 8, 2, 17
    x, w1, w2, weights, _ = make_inputs(M, E, N, K, topk, torch.float16, rng)
    sparse = torch.tensor([[0, 5], [5, 0]], dtype=torch.int32).repeat(M, 1)[:M]  # experts 1-4, 6, 7 idle
    assert_close(run_layer(x, w1, w2, weights, sparse, variant, SMALL), moe_reference(x, w1, w2, weights, sparse),
                 torch.float16)
    one = torch.full((M, 1), 6, dtype=torch.int32)
    w_one = torch.rand(M, 1, generator=rng) + 0.5
    assert_close(run_layer(x, w1, w2, w_one, one, variant, TALL), moe_reference(x, w1, w2, w_one, one), torch.float16)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("variant,id_dtype", [("unfused", torch.int64), ("fused", torch.int32)])
def test_out_of_range_expert_ids_are_skipped(variant, id_dtype, rng):
    E, topk, M = 4, 3, 9
    x, w1, w2, weights, ids = make_inputs(M, E, N, K, topk, torch.float32, rng)
    ids = ids.to(id_dtype)
    ids[0, :] = -1  # a token whose experts all live on other ranks
    ids[1, 0] = E
    ids[2, 2] = E + 7
    ids[3, 1] = -5
    out = run_layer(x, w1, w2, weights, ids, variant, SMALL)
    ref = moe_reference(x, w1, w2, weights, ids)
    assert torch.all(out[0] == 0)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_empty_batch_returns_empty_output_without_launch(variant, monkeypatch, rng):
    import moetune.layer as layer

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for M = 0")

    monkeypatch.setattr(layer, "align_tokens", no_launch)
    x, w1, w2, weights, ids = make_inputs(0, 4, N, K, 2, torch.float32, rng)
    out = fused_experts(x, w1, w2, weights, ids, variant=variant, config=SMALL)
    assert out.shape == (0, K) and out.dtype == torch.float32


def test_fused_fp32_accumulation_matches_unfused(rng):
    x, w1, w2, weights, ids = make_inputs(17, 8, N, K, 4, torch.float16, rng)
    unfused = run_layer(x, w1, w2, weights, ids, "unfused", WIDE)
    fused32 = run_layer(x, w1, w2, weights, ids, "fused", WIDE, accumulation="fp32")
    assert fused32.dtype == torch.float16
    # One rounding to fp16 at the end: as close to the unfused result as fp16 allows.
    assert relative_error(fused32, unfused.double()) < 2e-3
    assert_close(fused32, moe_reference(x, w1, w2, weights, ids), torch.float16)


@pytest.mark.parametrize("renormalize,variant", [(True, "unfused"), (False, "fused")])
def test_fused_moe_routes_then_matches_reference(renormalize, variant, rng):
    E, topk, M = 8, 2, 12
    x = torch.randn(M, K, generator=rng)
    w1, w2 = make_weights(E, N, K, torch.float32, rng)
    logits = torch.randn(M, E, generator=rng)
    out = fused_moe(x, w1, w2, logits, topk, renormalize=renormalize, variant=variant, config=SMALL)
    assert_close(out, fused_moe_reference(x, w1, w2, logits, topk, renormalize=renormalize), torch.float32)
