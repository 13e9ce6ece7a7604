"""The public layer with fp8 weights: fused_experts / fused_moe with w1_scale, w2_scale and
block_shape as the frameworks pass them, against the emulated-quantization float64
reference; expert parallelism in fp8; bad scales named before anything runs."""

import pytest
import torch

from moetune import fused_experts, fused_moe, quantize_weights
from moetune.kernels.routing import select_experts
from moetune.quant import fp8_moe_reference, fp8_tolerance
from moetune.reference import moe_reference, relative_error
from tests.moe_inputs import make_weights

N, K = 24, 40  # K and N not multiples of the 16 x 16 scale blocks below
CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}
BLOCK = [16, 16]


def fp8_inputs(rng, M=7, E=4, topk=2, dtype=torch.float16, block_shape=BLOCK):
    x = torch.randn(M, K, generator=rng).to(dtype)
    w1, w2 = make_weights(E, N, K, torch.float32, rng)
    (w1_q, w1_s), (w2_q, w2_s) = quantize_weights(w1, block_shape), quantize_weights(w2, block_shape)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), topk, True)
    return x, (w1, w2), (w1_q, w2_q, w1_s, w2_s), weights, ids


@pytest.mark.parametrize("block_shape", [BLOCK, None], ids=["block", "per_tensor"])
@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_fp8_layer_matches_the_emulated_reference(rng, poison_empty, block_shape, variant):
    x, (w1, w2), (w1_q, w2_q, w1_s, w2_s), weights, ids = fp8_inputs(rng, block_shape=block_shape)
    out = fused_experts(x, w1_q, w2_q, weights, ids, variant=variant, config=CFG, w1_scale=w1_s, w2_scale=w2_s,
                        block_shape=block_shape)
    assert out.dtype == x.dtype
    emulated = fp8_moe_reference(x, w1_q, w2_q, w1_s, w2_s, weights, ids, block_shape)
    assert relative_error(out, emulated) <= fp8_tolerance(block_shape)
    # Against the unquantized layer the error is fp8's own: a few percent, not more.
    unquantized = relative_error(out, moe_reference(x, w1.to(x.dtype), w2.to(x.dtype), weights, ids))
    print(f"fp8 {block_shape} {variant}: vs unquantized layer {unquantized:.3f}")
    assert unquantized < 0.15


def test_fp8_without_a_config_runs_the_default_heuristic(rng, poison_empty, isolated_loader):
    x, _, (w1_q, w2_q, w1_s, w2_s), weights, ids = fp8_inputs(rng)
    out = fused_experts(x, w1_q, w2_q, weights, ids, variant="unfused", w1_scale=w1_s, w2_scale=w2_s,
                        block_shape=BLOCK, use_fp8_w8a8=True)
    emulated = fp8_moe_reference(x, w1_q, w2_q, w1_s, w2_s, weights, ids, BLOCK)
    assert relative_error(out, emulated) <= fp8_tolerance(BLOCK)


def test_fp8_expert_parallel_through_fused_moe(rng, poison_empty):
    M, E, topk = 6, 8, 3
    x = torch.randn(M, K, generator=rng).to(torch.float16)
    w1, w2 = make_weights(4, N, K, torch.float32, rng)  # this rank's half of 8 experts
    (w1_q, w1_s), (w2_q, w2_s) = quantize_weights(w1, BLOCK), quantize_weights(w2, BLOCK)
    logits = torch.randn(M, E, generator=rng)
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
    out = fused_moe(x, w1_q, w2_q, logits, topk, config=CFG, variant="unfused", expert_map=expert_map,
                    w1_scale=w1_s, w2_scale=w2_s, block_shape=BLOCK)
    weights, ids = select_experts(logits, topk, True)
    local = expert_map[ids.long()]
    assert relative_error(out, fp8_moe_reference(x, w1_q, w2_q, w1_s, w2_s, weights, local, BLOCK)) \
        <= fp8_tolerance(BLOCK)


def _bad(x, w1_q, w2_q, w1_s, w2_s):
    return {
        "w1_scale wrong shape": dict(w1_scale=w1_s[:, :1], w2_scale=w2_s, block_shape=BLOCK),
        "w2_scale wrong dtype": dict(w1_scale=w1_s, w2_scale=w2_s.half(), block_shape=BLOCK),
        "block shape 16x48": dict(w1_scale=w1_s, w2_scale=w2_s, block_shape=[16, 48]),
        "block shape of one number": dict(w1_scale=w1_s, w2_scale=w2_s, block_shape=[16]),
        "no scales": dict(),
        "scales without fp8 weights": "plain",
        "fp8 claimed on bf16 weights": "claimed",
    }


@pytest.mark.parametrize("case, words", [
    ("w1_scale wrong shape", "w1_scale"),
    ("w2_scale wrong dtype", "w2_scale"),
    ("block shape 16x48", "powers of two"),
    ("block shape of one number", "block_shape"),
    ("no scales", "need w1_scale and w2_scale"),
    ("scales without fp8 weights", "for fp8 weights only"),
    ("fp8 claimed on bf16 weights", "use_fp8_w8a8 needs w1 and w2"),
])
def test_bad_fp8_input_is_named(rng, case, words):
    x, (w1, w2), (w1_q, w2_q, w1_s, w2_s), weights, ids = fp8_inputs(rng)
    kwargs = _bad(x, w1_q, w2_q, w1_s, w2_s)[case]
    if kwargs == "plain":
        args, kwargs = (w1.half(), w2.half()), dict(w1_scale=w1_s, w2_scale=w2_s)
    elif kwargs == "claimed":
        args, kwargs = (w1.half(), w2.half()), dict(use_fp8_w8a8=True)
    else:
        args = (w1_q, w2_q)
    with pytest.raises((ValueError, TypeError), match=words):
        fused_experts(x, *args, weights, ids, variant="unfused", config=CFG, **kwargs)


def test_a_config_whose_block_k_does_not_divide_the_scale_block_is_refused(rng):
    x, _, (w1_q, w2_q, w1_s, w2_s), weights, ids = fp8_inputs(rng)
    with pytest.raises(ValueError, match="BLOCK_SIZE_K"):
        fused_experts(x, w1_q, w2_q, weights, ids, variant="unfused", config={**CFG, "BLOCK_SIZE_K": 32},
                      w1_scale=w1_s, w2_scale=w2_s, block_shape=BLOCK)
