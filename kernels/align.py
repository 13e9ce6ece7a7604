"""Block alignment: (token, k) slots sorted by expert and padded to multiples of BLOCK_SIZE_M.

The grouped GEMM gives each program BLOCK_SIZE_M rows of one expert, so the flattened
top-k expert ids become
  sorted_ids   [max_padded_rows]  slot index (token * topk + k), or `numel` for padding,
  expert_ids   [max_blocks]       the expert of each block of BLOCK_SIZE_M rows,
  padded_rows  [1]                rows actually used (a device tensor: no host sync).
Three small kernels and no host synchronisation, so the layer can be captured in a CUDA
graph. Ids outside [0, E) (experts on other ranks under expert parallelism) are skipped.
Order inside one expert follows atomic arrival; results do not depend on it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import launch


@triton.jit
def _count_kernel(
    topk_ids_ptr, counts_ptr, sorted_ids_ptr,
    numel, padded_capacity, num_experts,
    BLOCK: tl.constexpr,
):
    # Each program counts one chunk of slots and pre-fills one chunk of the output with
    # the padding sentinel; the grid covers the larger of the two ranges.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sorted_ids_ptr + offs, numel, mask=offs < padded_capacity)
    in_range = offs < numel
    expert = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1)
    valid = in_range & (expert >= 0) & (expert < num_experts)
    tl.atomic_add(counts_ptr + expert, 1, mask=valid, sem="relaxed")


@triton.jit
def _offsets_kernel(
    counts_ptr, cursor_ptr, expert_ids_ptr, padded_rows_ptr,
    num_experts, max_blocks,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # One program: padded counts -> exclusive prefix sum (each expert's first row), then the
    # expert of every block by counting the experts whose range ends at or before it.
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    blocks = (counts + BLOCK_SIZE_M - 1) // BLOCK_SIZE_M
    block_end = tl.cumsum(blocks, axis=0)
    tl.store(cursor_ptr + experts, (block_end - blocks) * BLOCK_SIZE_M, mask=experts < num_experts)
    total_blocks = tl.sum(blocks, axis=0)
    tl.store(padded_rows_ptr, total_blocks * BLOCK_SIZE_M)
    for chunk in range(0, tl.cdiv(max_blocks, BLOCK_B)):
        block = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
        ended = (block_end[None, :] <= block[:, None]) & (experts[None, :] < num_experts)
        owner = tl.sum(ended.to(tl.int32), axis=1)
        # Blocks past the used range get -1; the GEMM never reads them.
        owner = tl.where(block < total_blocks, owner, -1)
        tl.store(expert_ids_ptr + block, owner, mask=block < max_blocks)


@triton.jit
def _scatter_kernel(
    topk_ids_ptr, cursor_ptr, sorted_ids_ptr,
    numel, num_experts,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    expert = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1)
    valid = in_range & (expert >= 0) & (expert < num_experts)
    row = tl.atomic_add(cursor_ptr + expert, 1, mask=valid, sem="relaxed")
    tl.store(sorted_ids_ptr + row, offs, mask=valid)


class AlignedTokens(NamedTuple):
    sorted_ids: torch.Tensor  # int32 [max_padded_rows(...)]
    expert_ids: torch.Tensor  # int32 [blocks]
    padded_rows: torch.Tensor  # int32 [1]
    block_size_m: int


def max_padded_rows(numel: int, num_experts: int, block_size_m: int) -> int:
    """Upper bound of the padded row count, known on the host without reading ids."""
    # Each non-empty expert wastes at most BLOCK_SIZE_M - 1 rows, and at most
    # min(numel, E) experts are non-empty.
    return numel + min(numel, num_experts) * (block_size_m - 1)


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_size_m: int) -> AlignedTokens:
    """Sort the (token, k) slots of `topk_ids` [M, topk] by expert, padded per expert."""
    numel = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    capacity = max_padded_rows(numel, num_experts, block_size_m)
    max_blocks = triton.cdiv(capacity, block_size_m)
    device = ids.device
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    padded_rows = torch.empty(1, dtype=torch.int32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)

    block = 1024
    launch(_count_kernel, (triton.cdiv(max(numel, capacity), block),))(
        ids, counts, sorted_ids, numel, capacity, num_experts, BLOCK=block)
    block_e = max(16, triton.next_power_of_2(num_experts))
    launch(_offsets_kernel, (1,))(
        counts, cursor, expert_ids, padded_rows, num_experts, max_blocks,
        BLOCK_SIZE_M=block_size_m, BLOCK_E=block_e, BLOCK_B=max(16, 8192 // block_e))
    launch(_scatter_kernel, (triton.cdiv(numel, block),))(ids, cursor, sorted_ids, numel, num_experts, BLOCK=block)
    return AlignedTokens(sorted_ids, expert_ids, padded_rows, block_size_m)
