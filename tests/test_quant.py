"""fp8 quantization: scale layouts, values against torch's own fp8 cast, round trips, bad input."""

import pytest
import torch

from moetune.quant import (FP8_DTYPE, FP8_MAX, dequantize_activations, dequantize_weights, quantize_activations,
                           quantize_weights)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def test_per_tensor_weights_have_one_scale_per_expert_and_cast_as_torch_does(rng):
    w = torch.randn(3, 20, 24, generator=rng, dtype=torch.bfloat16)
    w[1] *= 100  # experts of very different ranges each get their own scale
    quantized, scale = quantize_weights(w)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == w.shape
    assert scale.shape == (3,) and scale.dtype == torch.float32
    for e in range(3):
        expected_scale = w[e].float().abs().max() / FP8_MAX
        torch.testing.assert_close(scale[e], expected_scale)
        by_torch = (w[e].float() / scale[e]).to(FP8_DTYPE)
        assert torch.equal(quantized[e].view(torch.uint8), by_torch.view(torch.uint8))
    assert relative_error(dequantize_weights(quantized, scale), w) < 0.04


@pytest.mark.parametrize("rows, cols", [(64, 48), (40, 33)])  # whole blocks, and partial last blocks
def test_block_weights_have_one_scale_per_block(rng, rows, cols):
    block = [16, 16]
    w = torch.randn(2, rows, cols, generator=rng)
    w[0, :16, :16] *= 1000  # one block far larger: its neighbours must keep their own precision
    quantized, scale = quantize_weights(w, block_shape=block)
    assert scale.shape == (2, -(-rows // 16), -(-cols // 16))
    assert quantized.shape == w.shape and quantized.is_contiguous()
    for e in range(2):
        for i in range(scale.shape[1]):
            for j in range(scale.shape[2]):
                tile = w[e, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                torch.testing.assert_close(scale[e, i, j], tile.abs().max() / FP8_MAX)
                by_torch = (tile / scale[e, i, j]).to(FP8_DTYPE)
                got = quantized[e, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                assert torch.equal(got.view(torch.uint8), by_torch.view(torch.uint8))
    restored = dequantize_weights(quantized, scale, block)
    assert relative_error(restored[:, 16:, 16:], w[:, 16:, 16:]) < 0.04


def test_a_zero_block_quantizes_to_zero_without_dividing_by_zero():
    w = torch.zeros(1, 32, 32)
    w[0, 16:, 16:] = 1.0
    quantized, scale = quantize_weights(w, block_shape=[16, 16])
    assert torch.all(scale > 0)
    restored = dequantize_weights(quantized, scale, [16, 16])
    assert torch.equal(restored[0, :16], torch.zeros(16, 32, dtype=torch.float64))
    torch.testing.assert_close(restored, w.double(), rtol=1e-6, atol=0)


def test_activations_per_token_group_and_per_tensor(rng):
    x = torch.randn(5, 40, generator=rng, dtype=torch.bfloat16)
    x[2] *= 50
    quantized, scale = quantize_activations(x, group_size=16)
    assert scale.shape == (5, 3) and quantized.shape == x.shape
    for m in range(5):
        for g in range(3):
            group = x[m, g * 16:(g + 1) * 16].float()
            torch.testing.assert_close(scale[m, g], group.abs().max() / FP8_MAX)
    assert relative_error(dequantize_activations(quantized, scale, 16), x) < 0.04
    whole, one = quantize_activations(x)
    assert one.shape == (1,)
    torch.testing.assert_close(one[0], x.float().abs().max() / FP8_MAX)
    assert relative_error(dequantize_activations(whole, one), x) < 0.2  # one scale for all rows: coarse


@pytest.mark.parametrize("block_shape, words", [
    ([128], "[block_n, block_k]"),
    ("128,128", "[block_n, block_k]"),
    ([128, 96], "powers of two"),
    ([8, 8], "powers of two"),
    ([128, True], "powers of two"),
])
def test_bad_block_shapes_are_named(block_shape, words):
    with pytest.raises(ValueError, match="block_shape") as error:
        quantize_weights(torch.ones(1, 16, 16), block_shape=block_shape)
    assert words in str(error.value)


def test_weights_must_be_three_dimensional():
    with pytest.raises(ValueError, match=r"\[E, rows, cols\]"):
        quantize_weights(torch.ones(16, 16))
