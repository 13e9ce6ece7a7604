"""The interpreter rounds fp32 to bf16 as the GPU does (see conftest), so the kernels' bf16
results on the CPU carry the GPU's rounding error, not a bias of the simulator."""

import torch
import triton
import triton.language as tl


@triton.jit
def _to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(tl.bfloat16), mask=mask)


def test_fp32_to_bf16_rounds_to_nearest_even(rng):
    x = torch.randn(1000, generator=rng) * 10.0 ** torch.randint(-3, 4, (1000,), generator=rng)
    x[:4] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 255.9])  # ties, carries
    y = torch.full((1000,), float("nan"), dtype=torch.bfloat16)
    _to_bf16[(1,)](x, y, 1000, BLOCK=1024)
    assert torch.equal(y, x.to(torch.bfloat16))
