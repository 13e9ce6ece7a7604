"""SiLU-and-mul: out = silu(gate) * up, gate in the first N columns, up in the second N.

This is how vLLM and SGLang lay out w1 (gate rows first, then up rows), so GEMM 1's output
row [2N] splits in two halves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [rows, 2N]
    out_ptr,  # [rows, N]
    N,
    stride_xm, stride_om,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + N + offs, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g * sigmoid(g), computed in fp32 and rounded once
    result = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_om + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, 2N] -> silu(x[:, :N]) * x[:, N:] as [rows, N] in x's dtype."""
    rows, two_n = x.shape
    n = two_n // 2
    if out is None:
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_n = min(1024, triton.next_power_of_2(n))
    launch(_silu_and_mul_kernel, (rows, triton.cdiv(n, block_n)))(
        x, out, n, x.stride(0), out.stride(0), BLOCK_N=block_n, num_warps=4 if block_n >= 512 else 1)
    return out
