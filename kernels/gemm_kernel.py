"""Device code of the grouped GEMM; kernels/grouped_gemm.py launches it and its module doc
describes the epilogues, the switches and the fp8 modes.
"""

import triton
import triton.language as tl

from .activation import gate_activation

QUANT_NONE, QUANT_PER_TENSOR, QUANT_BLOCK = 0, 1, 2


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_SIZE_M: tl.constexpr):
    # Grouped ordering: GROUP_SIZE_M row blocks share the weight columns they stream, so
    # consecutive programs hit the same tiles of b in L2.
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _gemm_tile(
    pid_m, pid_n, split, a_desc, b_desc,
    a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, a_scale_ptr, b_scale_ptr,
    N, K, num_slots,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    weight_scale,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    A_ROWS_PER_SLOT: tl.constexpr, TOPK: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, EPILOGUE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, ATOMIC_SEM: tl.constexpr,
    A_SORTED: tl.constexpr, C_SORTED: tl.constexpr, FUSE_SILU: tl.constexpr, TMA_B: tl.constexpr,
    TMA_A: tl.constexpr, SPLIT_K: tl.constexpr, QUANT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    GELU: tl.constexpr,
):
    """One BLOCK_SIZE_M x BLOCK_SIZE_N output tile (of K split `split` when SPLIT_K > 1)."""
    offs_row = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    slot = tl.load(sorted_ids_ptr + offs_row).to(tl.int64)
    row_valid = slot < num_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    # This split's share of the K tiles; the last splits may get none and store zeros.
    k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
    if SPLIT_K > 1:
        k_per_split = tl.cdiv(k_tiles, SPLIT_K)
        k_first = split * k_per_split
        k_last = min(k_tiles, k_first + k_per_split)
    else:
        k_first = 0
        k_last = k_tiles

    # Wrap the column offsets instead of masking them: loads stay unmasked along N and
    # the extra columns are dropped by the store mask.
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
    offs_k = k_first * BLOCK_SIZE_K + tl.arange(0, BLOCK_SIZE_K)
    a_rows = offs_row.to(tl.int64) if A_SORTED else slot // A_ROWS_PER_SLOT
    if not TMA_A:
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    if QUANT == 2:
        # This tile's rows' activation scales, and each column's weight scale row (the up
        # columns of the fused activation sit N rows further down).
        a_scale_ptrs = a_scale_ptr + a_rows * stride_asm
        b_scale_ptrs = b_scale_ptr + expert * stride_bse + (offs_n // GROUP_N) * stride_bsn
        if FUSE_SILU:
            b_up_scale_ptrs = b_scale_ptr + expert * stride_bse + ((offs_n + N) // GROUP_N) * stride_bsn
    if TMA_B:
        # Rows past this expert's tile (the last N tile) come from the next expert, or are
        # zeros past the last: their columns are dropped by the store mask.
        rows_per_expert = 2 * N if FUSE_SILU else N
        b_row = (expert * rows_per_expert + pid_n * BLOCK_SIZE_N).to(tl.int32)
    else:
        b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    if FUSE_SILU:
        acc_up = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(k_first, k_last):
        k_left = K - k * BLOCK_SIZE_K
        if TMA_A:
            # Padding rows are read as they are (their results are never stored); columns
            # past K come back as zeros.
            a = a_desc.load([pid_m * BLOCK_SIZE_M, k * BLOCK_SIZE_K])
        else:
            a = tl.load(a_ptrs, mask=row_valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if TMA_B:
            b = b_desc.load([b_row, k * BLOCK_SIZE_K]).T
        else:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if QUANT == 2:
            group = (k * BLOCK_SIZE_K) // GROUP_K
            a_s = tl.load(a_scale_ptrs + group * stride_ask, mask=row_valid, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * tl.load(b_scale_ptrs + group * stride_bsk)[None, :]
        else:
            acc = tl.dot(a, b, acc)
        if FUSE_SILU:
            # The up rows sit N rows below the gate rows of the same expert.
            if TMA_B:
                b_up = b_desc.load([b_row + N, k * BLOCK_SIZE_K]).T
            else:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_IN_FP32:
                b_up = b_up.to(tl.float32)
            if QUANT == 2:
                acc_up += tl.dot(a, b_up) * a_s[:, None] * tl.load(b_up_scale_ptrs + group * stride_bsk)[None, :]
            else:
                acc_up = tl.dot(a, b_up, acc_up)
        if not TMA_A:
            a_ptrs += BLOCK_SIZE_K * stride_ak
        if not TMA_B:
            b_ptrs += BLOCK_SIZE_K * stride_bk

    if QUANT == 1:
        scale = tl.load(a_scale_ptr) * tl.load(b_scale_ptr + expert * stride_bse)
        acc *= scale
        if FUSE_SILU:
            acc_up *= scale

    if FUSE_SILU:
        if QUANT > 0:
            # Rounded as the unfused path stores them, so that GEMM 2's fp8 input is the same
            # whichever path computed it (a rounding here can tip an fp8 value over).
            acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
            acc_up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        # silu(g) * u (gelu with GELU) in fp32 as the activation kernel computes it, rounded
        # once at the store.
        acc = gate_activation(acc, GELU) * acc_up

    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + slot, mask=row_valid, other=0.0).to(tl.float32)
        acc = acc * (weight * weight_scale)[:, None]

    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    c_mask = row_valid[:, None] & (offs_cn[None, :] < N)
    if EPILOGUE == 1:
        c_ptrs = c_ptr + (slot[:, None] // TOPK) * stride_cm + offs_cn[None, :] * stride_cn
        tl.atomic_add(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask, sem=ATOMIC_SEM)
    else:
        if C_SORTED:
            c_ptrs = c_ptr + offs_row[:, None].to(tl.int64) * stride_cm + offs_cn[None, :] * stride_cn
        else:
            c_ptrs = c_ptr + slot[:, None] * stride_cm + offs_cn[None, :] * stride_cn
        if SPLIT_K > 1:
            c_ptrs += split.to(tl.int64) * stride_cs  # this split's fp32 partial
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _grouped_gemm_kernel(
    # Pointers
    a_ptr,  # [rows_a, K] activations; row of slot s is s // A_ROWS_PER_SLOT (A_SORTED: aligned position)
    b_ptr,  # [E, N, K] expert weights (output features, reduction); FUSE_SILU: [E, 2N, K], gate then up
    c_ptr,  # STORE: [slots, N] (C_SORTED: [capacity, N]; SPLIT_K > 1: [SPLIT_K, those, N] fp32);
            # ATOMIC_ADD: [slots // topk, N]
    topk_weights_ptr,  # [slots] router weights, read when MUL_ROUTED_WEIGHT
    sorted_ids_ptr,  # [padded capacity] slot index per aligned row, `num_slots` = padding
    expert_ids_ptr,  # [blocks] expert of each BLOCK_SIZE_M rows, -1 past the used range
    padded_rows_ptr,  # [1] rows in use after alignment
    a_scale_ptr,  # fp8 (QUANT > 0): [1] per tensor; [rows_a, ceil(K / GROUP_K)] per token and group
    b_scale_ptr,  # fp8: [E] per tensor; [E, ceil(weight rows / GROUP_N), ceil(K / GROUP_K)] per block
    # Sizes
    N, K, capacity, num_slots,
    weight_rows,  # E * rows of one expert's weights: the TMA descriptor's height
    # Strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    stride_cs,  # between the SPLIT_K partials of the STORE epilogue
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,  # of the fp8 scales
    # Scalar applied with the router weight (routed_scaling_factor)
    weight_scale,
    # Launch config
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    # Problem switches
    A_ROWS_PER_SLOT: tl.constexpr,  # topk for GEMM 1 (one hidden row per token), 1 for GEMM 2
    TOPK: tl.constexpr,  # slots per output row of the ATOMIC_ADD epilogue
    MUL_ROUTED_WEIGHT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # only under the interpreter, whose bf16 dot is wrong
    ATOMIC_SEM: tl.constexpr,  # memory ordering of the ATOMIC_ADD epilogue
    # Kernel switches (module doc)
    A_SORTED: tl.constexpr,
    C_SORTED: tl.constexpr,
    FUSE_SILU: tl.constexpr,
    TMA_B: tl.constexpr,
    TMA_A: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    # fp8 operands (module doc): QUANT_NONE / QUANT_PER_TENSOR / QUANT_BLOCK, block_shape
    QUANT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    GELU: tl.constexpr,  # FUSE_SILU's activation is gelu(gate) * up instead (kernels/activation.py)
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    if not PERSISTENT:
        # One program per tile of the worst-case grid; with SPLIT_K the split is the slowest index.
        num_pid_m = tl.cdiv(capacity, BLOCK_SIZE_M)
        split = 0
        if SPLIT_K > 1:
            split = pid // (num_pid_m * num_pid_n)
            pid = pid % (num_pid_m * num_pid_n)
        pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_SIZE_M)
        # The grid is sized for the worst case; blocks past the used range leave at once.
        if pid_m * BLOCK_SIZE_M >= tl.load(padded_rows_ptr):
            return
    else:
        # About one program per SM, each taking every num_programs-th live tile: the tile
        # count comes from the aligned rows in use, so no program starts for the padding
        # of the worst case.
        num_pid_m = tl.cdiv(tl.load(padded_rows_ptr), BLOCK_SIZE_M)
        tiles_per_split = num_pid_m * num_pid_n

    a_desc = None
    b_desc = None
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[capacity, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
    if TMA_B:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[weight_rows, K], strides=[stride_bn, 1],
                                           block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])

    if not PERSISTENT:
        _gemm_tile(pid_m, pid_n, split, a_desc, b_desc,
                   a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, a_scale_ptr, b_scale_ptr,
                   N, K, num_slots,
                   stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                   stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
                   weight_scale, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, A_ROWS_PER_SLOT, TOPK,
                   MUL_ROUTED_WEIGHT, EPILOGUE, DOT_IN_FP32, ATOMIC_SEM, A_SORTED, C_SORTED, FUSE_SILU, TMA_B,
                   TMA_A, SPLIT_K, QUANT, GROUP_N, GROUP_K, GELU)
    else:
        for tile in range(pid, tiles_per_split * SPLIT_K, tl.num_programs(0)):
            split = tile // tiles_per_split
            pid_m, pid_n = _tile_coords(tile % tiles_per_split, num_pid_m, num_pid_n, GROUP_SIZE_M)
            _gemm_tile(pid_m, pid_n, split, a_desc, b_desc,
                       a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, a_scale_ptr,
                       b_scale_ptr, N, K, num_slots,
                       stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                       stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
                       weight_scale, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, A_ROWS_PER_SLOT, TOPK,
                       MUL_ROUTED_WEIGHT, EPILOGUE, DOT_IN_FP32, ATOMIC_SEM, A_SORTED, C_SORTED, FUSE_SILU, TMA_B,
                       TMA_A, SPLIT_K, QUANT, GROUP_N, GROUP_K, GELU)
