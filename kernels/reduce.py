"""Top-k sum of the unfused variant: out[m] = sum_k cache[m, k], accumulated in fp32.

Slots whose expert id is outside [0, E) were never written by GEMM 2 (the expert lives on
another rank), so they are skipped rather than read. A 4-D cache [splits, M, TOPK, K] (GEMM 2's
split-K partials, fp32) is summed over its splits too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch


@triton.jit
def _topk_sum_kernel(
    cache_ptr,  # [M, TOPK, K], or [SPLITS, M, TOPK, K] partials
    topk_ids_ptr,  # [M, TOPK]
    out_ptr,  # [M, K]
    K, num_experts,
    stride_cm, stride_ck,
    stride_om,
    stride_cs,
    TOPK: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLITS: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_TOPK)
    expert = tl.load(topk_ids_ptr + m * TOPK + offs_t, mask=offs_t < TOPK, other=-1)
    slot_ok = (offs_t < TOPK) & (expert >= 0) & (expert < num_experts)
    ptrs = cache_ptr + m * stride_cm + offs_t[:, None] * stride_ck + offs_k[None, :]
    vals = tl.load(ptrs, mask=slot_ok[:, None] & (offs_k[None, :] < K), other=0.0)
    total = tl.sum(vals.to(tl.float32), axis=0)
    for split in tl.static_range(1, SPLITS):
        vals = tl.load(ptrs + split * stride_cs, mask=slot_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        total += tl.sum(vals.to(tl.float32), axis=0)
    tl.store(out_ptr + m * stride_om + offs_k, total.to(out_ptr.dtype.element_ty), mask=offs_k < K)


def topk_sum(cache: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor) -> torch.Tensor:
    """cache [M, topk, K] -> out [M, K], skipping slots routed outside [0, num_experts).

    A 4-D cache [splits, M, topk, K] is summed over splits as well."""
    splits, m, topk, k = cache.shape if cache.dim() == 4 else (1, *cache.shape)
    if m == 0:
        return out
    block_k = min(1024, triton.next_power_of_2(k))
    launch(_topk_sum_kernel, (m, triton.cdiv(k, block_k)))(
        cache, topk_ids, out, k, num_experts,
        cache.stride(-3), cache.stride(-2), out.stride(0), cache.stride(0) if splits > 1 else 0,
        TOPK=topk, BLOCK_TOPK=triton.next_power_of_2(topk), BLOCK_K=block_k, SPLITS=splits,
        num_warps=4 if block_k >= 512 else 1)
    return out
