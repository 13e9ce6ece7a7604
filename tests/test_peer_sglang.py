"""SGLang's fused MoE tests (test/srt/test_fused_moe.py, and the block-fp8 MoE case of
test/srt/test_block_fp8.py), ported to moetune at interpreter sizes.

Ours                                   SGLang's
test_fused_moe_like_sglang[fp16-...]   TestFusedMOE._test_case, fp16, no fp8: fused_moe(renormalize=
test_fused_moe_like_sglang[bf16-...]   False) against torch_naive_moe (softmax top-k, each expert's
                                       rows in the activation dtype, weights applied after GEMM 2),
                                       rtol 1e-1, atol 1e-2; bf16 likewise (top-k 2 and 6)
test_no_combine_like_sglang            the newer _test_case's per-expert check: no_combine=True
                                       against torch_naive_moe(return_per_expert=True), the
                                       router-weighted [M, top-k, K] before the sum, rtol = atol = 1e-5
test_fp8_per_tensor_like_sglang        _test_case with use_fp8_w8a8: weights cast to fp8 with a
                                       scale per expert, against torch_naive_moe on the dequantized
                                       weights in the activation dtype, rtol 1e-1, atol 1e-2
test_fp8_block_like_sglang             TestW8A8BlockFP8FusedMoE: random fp8 weights with random
                                       block scales, mean |out - ref| / mean |ref| < 0.02 against
                                       the layer with activations quantized per token and group
                                       (theirs: torch_w8a8_block_fp8_moe; ours: fp8_moe_reference);
                                       run with activation="gelu", which SGLang's fused_moe takes

Differences: SGLang draws every input with std 0.01; at these sizes fp16 then underflows
(outputs near 1e-8), so the fp16 case takes vLLM's std 0.1. SGLang's per-tensor fp8 case
passes static activation scales (a1_scale, a2_scale), which moetune does not take: it
quantizes activations dynamically, per tensor. Each case also checks the relative error of
the norm against moetune's float64 reference (tests/peer_reference.py says why). Both
variants run; bf16's fused variant adds into an fp32 buffer (accumulation="fp32"), as
Triton's interpreter has no bf16 atomic add.
"""

import pytest
import torch

from moetune import fused_moe
from moetune.quant import FP8_DTYPE, FP8_MAX, fp8_moe_reference, fp8_tolerance
from moetune.reference import TOLERANCE, moe_reference, relative_error
from tests.peer_reference import CONFIG, assert_matches, naive_moe, softmax_topk

N, K, E = 24, 40, 8  # K and N not multiples of the tiles, nor of the fp8 blocks below


def normal(shape, std, dtype, generator):
    return (torch.randn(*shape, generator=generator) * std).to(dtype)


def sglang_inputs(M, topk, dtype, std, generator):
    a = normal((M, K), std, dtype, generator)
    w1, w2 = normal((E, 2 * N, K), std, dtype, generator), normal((E, K, N), std, dtype, generator)
    score = normal((M, E), std, dtype, generator)
    return a, w1, w2, score


@pytest.mark.parametrize("dtype, std, M, topk, variant", [
    (torch.float16, 0.1, 5, 2, "unfused"),
    (torch.bfloat16, 0.01, 1, 6, "fused"),
], ids=["fp16-unfused", "bf16-fused"])
def test_fused_moe_like_sglang(rng, poison_empty, dtype, std, M, topk, variant):
    a, w1, w2, score = sglang_inputs(M, topk, dtype, std, rng)
    out = fused_moe(a, w1, w2, score, topk, renormalize=False, variant=variant, config=CONFIG, accumulation="fp32")
    weights, ids = softmax_topk(score, topk)
    assert_matches(out, naive_moe(a, w1, w2, weights, ids), moe_reference(a, w1, w2, weights, ids),
                   rtol=1e-1, atol=1e-2, tolerance=TOLERANCE[dtype])


def test_no_combine_like_sglang(rng, poison_empty):
    M, topk, dtype = 3, 2, torch.bfloat16
    a, w1, w2, score = sglang_inputs(M, topk, dtype, 0.01, rng)
    out = fused_moe(a, w1, w2, score, topk, renormalize=False, no_combine=True, config=CONFIG)
    weights, ids = softmax_topk(score, topk)
    assert out.shape == (M, topk, K)
    assert_matches(out, naive_moe(a, w1, w2, weights, ids, combine=False),
                   moe_reference(a, w1, w2, weights, ids, combine=False),
                   rtol=1e-5, atol=1e-5, tolerance=TOLERANCE[dtype])


def test_fp8_per_tensor_like_sglang(rng, poison_empty):
    M, topk, dtype = 4, 2, torch.bfloat16
    a, w1, w2, score = sglang_inputs(M, topk, dtype, 0.01, rng)
    w1_q, w2_q = w1.to(FP8_DTYPE), w2.to(FP8_DTYPE)
    w1_scale, w2_scale = (torch.randn(E, generator=rng).abs() * 0.01 + 1e-3 for _ in range(2))
    out = fused_moe(a, w1_q, w2_q, score, topk, renormalize=False, use_fp8_w8a8=True, w1_scale=w1_scale,
                    w2_scale=w2_scale, variant="unfused", config=CONFIG)

    weights, ids = softmax_topk(score, topk)
    # SGLang's reference: the dequantized weights in the activation dtype, activations as they are.
    w1_d = (w1_q.to(dtype) * w1_scale.view(-1, 1, 1)).to(dtype)
    w2_d = (w2_q.to(dtype) * w2_scale.view(-1, 1, 1)).to(dtype)
    assert_matches(out, naive_moe(a, w1_d, w2_d, weights, ids),
                   fp8_moe_reference(a, w1_q, w2_q, w1_scale, w2_scale, weights, ids),
                   rtol=1e-1, atol=1e-2, tolerance=fp8_tolerance(None))


def test_fp8_block_like_sglang(rng, poison_empty):
    M, topk, dtype, block = 4, 2, torch.float16, [32, 32]  # the last block of each weight dimension is partial
    a = torch.randn(M, K, generator=rng).to(dtype) / 10

    def random_fp8(rows, cols):  # SGLang's: uniform over the whole fp8 range, scales below 1e-2
        values = (torch.rand(E, rows, cols, generator=rng) - 0.5) * 2 * FP8_MAX
        scales = torch.rand(E, -(-rows // block[0]), -(-cols // block[1]), generator=rng) * 1e-2
        return values.to(FP8_DTYPE), scales

    (w1_q, w1_scale), (w2_q, w2_scale) = random_fp8(2 * N, K), random_fp8(K, N)
    score = torch.randn(M, E, generator=rng).to(dtype)
    config = dict(CONFIG, BLOCK_SIZE_K=block[1])  # a K tile within one scale block
    out = fused_moe(a, w1_q, w2_q, score, topk, renormalize=False, w1_scale=w1_scale, w2_scale=w2_scale,
                    block_shape=block, activation="gelu", variant="fused", config=config)

    weights, ids = softmax_topk(score, topk)
    emulated = fp8_moe_reference(a, w1_q, w2_q, w1_scale, w2_scale, weights, ids, block, activation="gelu")
    assert out.shape == (M, K) and out.dtype == dtype
    assert (out.double() - emulated).abs().mean() / emulated.abs().mean() < 0.02
    assert relative_error(out, emulated) <= fp8_tolerance(block)
