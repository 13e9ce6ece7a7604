"""SiLU-and-mul: out = silu(gate) * up, gate in the first N columns, up in the second N.

This is how vLLM and SGLang lay out w1 (gate rows first, then up rows), so GEMM 1's output
row [2N] splits in two halves.

With `aligned` (the sorted intermediate, kernels/switches.py) the rows are GEMM 1's aligned
positions: rows past the used range and padding rows are skipped, neither read nor written.
With a 3-D x [splits, rows, 2N] (GEMM 1's split-K partials, fp32) the splits are summed first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import AlignedTokens
from .launch import launch


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [rows, 2N], or [SPLITS, rows, 2N] partials to sum
    out_ptr,  # [rows, N]
    sorted_ids_ptr,  # [rows] slot per aligned position, read when ALIGNED_ROWS
    padded_rows_ptr,  # [1] aligned rows in use, read when ALIGNED_ROWS
    N, num_slots,
    stride_xm, stride_om, stride_xs,
    BLOCK_N: tl.constexpr,
    ALIGNED_ROWS: tl.constexpr,
    SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if ALIGNED_ROWS:
        # The grid covers the worst-case capacity; padding rows hold no slot.
        if row >= tl.load(padded_rows_ptr):
            return
        if tl.load(sorted_ids_ptr + row) >= num_slots:
            return
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + N + offs, mask=mask, other=0.0).to(tl.float32)
    for split in tl.static_range(1, SPLITS):
        part = x_ptr + split * stride_xs + row * stride_xm
        gate += tl.load(part + offs, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(part + N + offs, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g * sigmoid(g), computed in fp32 and rounded once
    result = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_om + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, *, aligned: AlignedTokens | None = None,
                 num_slots: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [rows, 2N] -> silu(x[:, :N]) * x[:, N:] as [rows, N] in x's dtype (or `dtype`).

    A 3-D x [splits, rows, 2N] is summed over its first dimension first.

    With `aligned`, x's rows are aligned positions (rows >= aligned.sorted_ids.numel()) and
    only those holding one of the `num_slots` slots are computed; the others of `out` are
    left as they were.
    """
    splits, rows, two_n = x.shape if x.dim() == 3 else (1, *x.shape)
    n = two_n // 2
    if out is None:
        out = torch.empty(rows, n, dtype=dtype or x.dtype, device=x.device)
    if rows == 0:
        return out
    if aligned is not None:
        if rows < aligned.sorted_ids.numel():
            raise ValueError(f"aligned rows: x has {rows} rows, fewer than the alignment's capacity "
                             f"{aligned.sorted_ids.numel()}")
        rows = aligned.sorted_ids.numel()
        sorted_ids, padded_rows = aligned.sorted_ids, aligned.padded_rows
    else:
        sorted_ids = padded_rows = x  # not read
    block_n = min(1024, triton.next_power_of_2(n))
    launch(_silu_and_mul_kernel, (rows, triton.cdiv(n, block_n)))(
        x, out, sorted_ids, padded_rows, n, num_slots, x.stride(-2), out.stride(0),
        x.stride(0) if splits > 1 else 0, BLOCK_N=block_n,
        ALIGNED_ROWS=aligned is not None, SPLITS=splits, num_warps=4 if block_n >= 512 else 1)
    return out
