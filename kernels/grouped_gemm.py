"""The MoE grouped GEMM: each block of BLOCK_SIZE_M aligned rows times its expert's weight.

One kernel serves both GEMMs of the layer:
  GEMM 1: rows of hidden_states [M, K] (slot // topk) x w1[e]^T -> [M * topk, 2N], STORE.
  GEMM 2: rows of the activation [M * topk, N] (slot)  x w2[e]^T -> K wide, times the
          router weight, then either STORE into [M * topk, K] (the unfused variant, a
          reduce kernel sums over top-k afterwards) or ATOMIC_ADD into out[M, K] (the
          fused variant, out must be zeroed first).

Compile-time switches (all off is the path above; kernels/switches.py holds the layer's set):
  c_sorted  GEMM 1 writes the row of aligned position p at row p ([capacity, 2N]) instead
            of at its slot; padding rows are not written.
  a_sorted  GEMM 2 reads A row p for aligned position p (contiguous per block, no gather
            through sorted_ids); each row still goes to its slot's output row and weight.
  fuse_activation  GEMM 1 computes a gate tile (w1 rows n..) and the matching up tile (rows
            N+n..) over the same A tiles and stores silu(gate) * up: out is [rows, N], and
            neither the [rows, 2N] buffer nor the activation kernel is needed.
  tma_weights  weight tiles load through a Triton 3.6 tensor descriptor (TMA on Hopper) of
            the weights as one [E * rows, K] matrix, made on the device: on a GPU that needs
            triton.set_allocator, which the launcher sets when the caller has not.
  tma_activations  A tiles likewise, from a descriptor of `a` as [capacity, K]; only with
            a_sorted, where a block's rows are contiguous (gathered rows would need TMA
            gather, which Hopper lacks).
  split_k   the K tiles are split over split_k programs per output tile; STORE writes fp32
            partials [split_k, rows, N] for the next kernel to sum, ATOMIC_ADD adds each.
  persistent  the grid is num_programs (about one per SM), each program looping over the
            live tiles, whose count comes from padded_rows: no program starts for padding.
Triton 3.6's interpreter runs device-side tensor descriptors (bounds, zero padding and the
16-byte checks included), so it runs the TMA paths as written; it does not model the
hardware's tensor-map limits (box sides <= 256) nor the allocator's scratch: only a GPU
checks those.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

from .align import AlignedTokens
from .launch import compile_only, launch

EPILOGUE_STORE = 0
EPILOGUE_ATOMIC_ADD = 1


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
    a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
    N, K, num_slots,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
    weight_scale,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    A_ROWS_PER_SLOT: tl.constexpr, TOPK: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, EPILOGUE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, ATOMIC_SEM: tl.constexpr,
    A_SORTED: tl.constexpr, C_SORTED: tl.constexpr, FUSE_SILU: tl.constexpr, TMA_B: tl.constexpr,
    TMA_A: tl.constexpr, SPLIT_K: tl.constexpr,
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
    if not TMA_A:
        if A_SORTED:
            a_ptrs = a_ptr + offs_row[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        else:
            a_ptrs = a_ptr + (slot[:, None] // A_ROWS_PER_SLOT) * stride_am + offs_k[None, :] * stride_ak
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
        acc = tl.dot(a, b, acc)
        if FUSE_SILU:
            # The up rows sit N rows below the gate rows of the same expert.
            if TMA_B:
                b_up = b_desc.load([b_row + N, k * BLOCK_SIZE_K]).T
            else:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_IN_FP32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up)
        if not TMA_A:
            a_ptrs += BLOCK_SIZE_K * stride_ak
        if not TMA_B:
            b_ptrs += BLOCK_SIZE_K * stride_bk

    if FUSE_SILU:
        # silu(g) * u in fp32 as the activation kernel computes it, rounded once at the store.
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up

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
    # Sizes
    N, K, capacity, num_slots,
    weight_rows,  # E * rows of one expert's weights: the TMA descriptor's height
    # Strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    stride_cs,  # between the SPLIT_K partials of the STORE epilogue
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
                   a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, N, K, num_slots,
                   stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                   weight_scale, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, A_ROWS_PER_SLOT, TOPK,
                   MUL_ROUTED_WEIGHT, EPILOGUE, DOT_IN_FP32, ATOMIC_SEM, A_SORTED, C_SORTED, FUSE_SILU, TMA_B,
                   TMA_A, SPLIT_K)
    else:
        for tile in range(pid, tiles_per_split * SPLIT_K, tl.num_programs(0)):
            split = tile // tiles_per_split
            pid_m, pid_n = _tile_coords(tile % tiles_per_split, num_pid_m, num_pid_n, GROUP_SIZE_M)
            _gemm_tile(pid_m, pid_n, split, a_desc, b_desc,
                       a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, N, K, num_slots,
                       stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                       weight_scale, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, A_ROWS_PER_SLOT, TOPK,
                       MUL_ROUTED_WEIGHT, EPILOGUE, DOT_IN_FP32, ATOMIC_SEM, A_SORTED, C_SORTED, FUSE_SILU, TMA_B,
                       TMA_A, SPLIT_K)


# Triton chose between compiling and interpreting when the kernel above was defined (by
# TRITON_INTERPRET at that moment); ask the kernel rather than the environment.
INTERPRETED = isinstance(_grouped_gemm_kernel, InterpretedFunction)


def interpreted_kernels() -> bool:
    """Whether this package's kernels run in Triton's interpreter (chosen when they were defined)."""
    return INTERPRETED


class GemmGeometry(NamedTuple):
    """Every integer the kernel is specialised on besides the config: two launches with
    equal geometry, dtypes and config run the same compiled binary."""
    n_out: int
    k_in: int
    capacity: int
    num_slots: int
    stride_am: int
    stride_ak: int
    stride_be: int
    stride_bn: int
    stride_bk: int
    stride_cm: int
    stride_cn: int
    weight_rows: int = 0  # E * weights.shape[1]: the TMA descriptor's height
    stride_cs: int = 0  # between split_k partials (STORE with split_k > 1)


class GemmSwitches(NamedTuple):
    """The kernel switches of one launch (module doc); all off is the original kernel."""
    a_sorted: bool = False
    c_sorted: bool = False
    fuse_activation: bool = False
    tma_weights: bool = False
    tma_activations: bool = False
    split_k: int = 1
    persistent: bool = False


def gemm_geometry(a: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, capacity: int, topk: int,
                  atomic_add: bool, *, c_sorted: bool = False, a_rows_per_slot: int = 1,
                  fuse_activation: bool = False) -> GemmGeometry:
    """The geometry of a launch. With c_sorted, out has `capacity` rows (one per aligned
    position), so the slot count comes from a: a_rows_per_slot slots per row of a. With
    fuse_activation the output is half as wide as the weights' rows (gate and up). A 3-D
    `out` is split-K's [split_k, rows, N_out] partials."""
    partials = out.dim() == 3
    out_rows = out.shape[-2]
    num_slots = a.shape[0] * a_rows_per_slot if c_sorted else out_rows * (topk if atomic_add else 1)
    n_out = weights.shape[1] // 2 if fuse_activation else weights.shape[1]
    return GemmGeometry(
        n_out, weights.shape[2], capacity, num_slots,
        a.stride(0), a.stride(1), weights.stride(0), weights.stride(1), weights.stride(2),
        out.stride(-2), out.stride(-1), weights.shape[0] * weights.shape[1], out.stride(0) if partials else 0)


def default_num_programs(device: torch.device) -> int:
    """Programs of the persistent schedule: one per SM on a GPU, 4 under the interpreter."""
    if INTERPRETED or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors live in global scratch (128 bytes per descriptor and
    program) that Triton asks of the allocator triton.set_allocator installs; install one
    backed by torch's caching allocator unless the caller installed their own."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # another Triton layout: install ours
        pass
    triton.set_allocator(_torch_scratch)


def _launch(pointers, geometry: GemmGeometry, config: dict, switches: GemmSwitches, *, weight_scale: float,
            a_rows_per_slot: int, topk: int, mul_routed_weight: bool, atomic_add: bool, atomic_sem: str,
            dot_in_fp32: bool, num_programs: int):
    g, s = geometry, switches
    if (s.tma_weights or s.tma_activations) and not INTERPRETED:
        _ensure_allocator()
    tiles = triton.cdiv(g.capacity, config["BLOCK_SIZE_M"]) * triton.cdiv(g.n_out, config["BLOCK_SIZE_N"]) * s.split_k
    # The persistent grid's size is no compile-time constant: any num_programs runs the same binary.
    grid = (min(num_programs, tiles) if s.persistent else tiles,)
    launch(_grouped_gemm_kernel, grid)(
        *pointers,
        g.n_out, g.k_in, g.capacity, g.num_slots, g.weight_rows,
        g.stride_am, g.stride_ak, g.stride_be, g.stride_bn, g.stride_bk, g.stride_cm, g.stride_cn, g.stride_cs,
        float(weight_scale),
        BLOCK_SIZE_M=config["BLOCK_SIZE_M"], BLOCK_SIZE_N=config["BLOCK_SIZE_N"],
        BLOCK_SIZE_K=config["BLOCK_SIZE_K"], GROUP_SIZE_M=config["GROUP_SIZE_M"],
        A_ROWS_PER_SLOT=a_rows_per_slot, TOPK=topk,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        EPILOGUE=EPILOGUE_ATOMIC_ADD if atomic_add else EPILOGUE_STORE,
        DOT_IN_FP32=dot_in_fp32,
        ATOMIC_SEM=atomic_sem,
        A_SORTED=s.a_sorted, C_SORTED=s.c_sorted, FUSE_SILU=s.fuse_activation,
        TMA_B=s.tma_weights, TMA_A=s.tma_activations, SPLIT_K=s.split_k, PERSISTENT=s.persistent,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def _check_descriptor_operand(switch: str, name: str, tensor: torch.Tensor) -> None:
    """A tensor descriptor needs the last dimension contiguous and 16-byte aligned rows."""
    size = tensor.element_size()
    if tensor.stride(-1) != 1 or any(stride * size % 16 for stride in tensor.stride()[:-1]) or \
            tensor.data_ptr() % 16:
        raise ValueError(f"{switch}: {name} {tuple(tensor.shape)} {tensor.dtype} with strides {tensor.stride()} "
                         "needs its last stride 1, the others and its address 16-byte aligned")


def check_gemm_switches(s: GemmSwitches, *, atomic_add: bool, mul_routed_weight: bool) -> None:
    """Raise ValueError, naming the switches, for a combination the kernel cannot run."""
    if not isinstance(s.split_k, int) or isinstance(s.split_k, bool) or s.split_k < 1:
        raise ValueError(f"split_k must be an int >= 1, got {s.split_k!r}")
    if s.tma_activations and not s.a_sorted:
        raise ValueError("tma_activations needs a_sorted: gathered A rows cannot load through a tensor descriptor")
    if s.fuse_activation and (atomic_add or mul_routed_weight):
        raise ValueError("fuse_activation is GEMM 1's epilogue: it stores silu(gate) * up, with neither "
                         "atomic_add nor the router weight")
    if s.fuse_activation and s.split_k > 1:
        raise ValueError("fuse_activation and split_k > 1 are incompatible: silu(gate) * up is not a sum of "
                         "the splits' partials")
    if s.c_sorted and atomic_add:
        raise ValueError("c_sorted (rows in aligned order) stores GEMM 1's rows; it cannot go with atomic_add")


def _check_operands(s: GemmSwitches, a, weights, out, aligned: AlignedTokens, atomic_add: bool) -> None:
    capacity = aligned.sorted_ids.numel()
    if s.tma_weights:
        _check_descriptor_operand("tma_weights", "weights", weights)
        if weights.stride(0) != weights.shape[1] * weights.stride(1):
            raise ValueError(f"tma_weights: weights {tuple(weights.shape)} with strides {weights.stride()} are not "
                             "one [E * rows, K] matrix")
    if s.tma_activations:
        _check_descriptor_operand("tma_activations", "a", a)
    if s.fuse_activation and (weights.shape[1] % 2 or out.shape[-1] != weights.shape[1] // 2):
        raise ValueError(f"fuse_activation: weights {tuple(weights.shape)} must be [E, 2N, K] and out "
                         f"{tuple(out.shape)} N wide")
    partials = s.split_k > 1 and not atomic_add
    if partials and (out.dim() != 3 or out.shape[0] != s.split_k or out.dtype != torch.float32):
        raise ValueError(f"split_k = {s.split_k} with the STORE epilogue writes fp32 partials: out must be "
                         f"[{s.split_k}, rows, N] float32, got {tuple(out.shape)} {out.dtype}")
    if not partials and out.dim() != 2:
        raise ValueError(f"out must be 2-D here, got {tuple(out.shape)}")
    if s.c_sorted and out.shape[-2] < capacity:
        raise ValueError(f"c_sorted: out has {out.shape[-2]} rows, fewer than the alignment's capacity {capacity}")
    if s.a_sorted and a.shape[0] < capacity:
        raise ValueError(f"a_sorted: a has {a.shape[0]} rows, fewer than the alignment's capacity {capacity}")


def grouped_gemm(
    a: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    aligned: AlignedTokens,
    config: dict,
    *,
    topk: int,
    a_rows_per_slot: int,
    topk_weights: torch.Tensor | None = None,
    weight_scale: float = 1.0,
    atomic_add: bool = False,
    atomic_sem: str = "relaxed",
    a_sorted: bool = False,
    c_sorted: bool = False,
    fuse_activation: bool = False,
    tma_weights: bool = False,
    tma_activations: bool = False,
    split_k: int = 1,
    persistent: bool = False,
    num_programs: int | None = None,
) -> torch.Tensor:
    """out[...] = a[rows] @ weights[expert]^T for every aligned block (see module doc).

    `weights` is [E, N_out, K_in]; `out` is [slots, N_out] for STORE or [slots // topk,
    N_out] for ATOMIC_ADD (zeroed by the caller). `config` holds the six launch keys;
    its BLOCK_SIZE_M must be the one `aligned` was built with. The adds need atomicity
    only, hence "relaxed" ordering by default; Triton's default "acq_rel" fences each add
    and made the fused layer slower than store + reduce.

    Switches (module doc): c_sorted makes `out` [capacity, N_out], capacity =
    aligned.sorted_ids.numel(), row p for aligned position p (STORE only); a_sorted reads
    `a` the same way, so it must come from a c_sorted GEMM over the very same `aligned`.
    fuse_activation (GEMM 1: weights [E, 2N, K], gate rows then up rows) stores
    silu(gate) * up into `out` [slots or capacity, N]. tma_weights / tma_activations load
    weight / A tiles through tensor descriptors (tma_activations only with a_sorted); both
    need the tensor's last stride 1, its other strides and its address 16-byte aligned.
    split_k > 1: with STORE, `out` is [split_k, rows, N_out] float32 and holds each split's
    partial (the caller sums them: silu_and_mul / topk_sum take them so); with ATOMIC_ADD
    every split adds into `out`. persistent: `num_programs` programs (default
    default_num_programs) loop over the live tiles.
    """
    if config["BLOCK_SIZE_M"] != aligned.block_size_m:
        raise ValueError(
            f"config BLOCK_SIZE_M={config['BLOCK_SIZE_M']} differs from the alignment's {aligned.block_size_m}")
    switches = GemmSwitches(a_sorted, c_sorted, fuse_activation, tma_weights, tma_activations, split_k, persistent)
    check_gemm_switches(switches, atomic_add=atomic_add, mul_routed_weight=topk_weights is not None)
    _check_operands(switches, a, weights, out, aligned, atomic_add)
    geometry = gemm_geometry(a, weights, out, aligned.sorted_ids.numel(), topk, atomic_add,
                             c_sorted=c_sorted, a_rows_per_slot=a_rows_per_slot, fuse_activation=fuse_activation)
    pointers = (a, weights, out, topk_weights if topk_weights is not None else a,
                aligned.sorted_ids, aligned.expert_ids, aligned.padded_rows)
    _launch(pointers, geometry, config, switches,
            weight_scale=weight_scale, a_rows_per_slot=a_rows_per_slot, topk=topk,
            mul_routed_weight=topk_weights is not None, atomic_add=atomic_add, atomic_sem=atomic_sem,
            num_programs=num_programs if num_programs is not None else default_num_programs(a.device),
            # Triton 3.6's interpreter multiplies bf16 as raw 16-bit integers; upcasting
            # there is exact, and compiled kernels never take this path.
            dot_in_fp32=INTERPRETED and a.dtype == torch.bfloat16)
    return out


def compile_grouped_gemm(dtype: torch.dtype, geometry: GemmGeometry, config: dict, *, topk: int,
                         a_rows_per_slot: int, mul_routed_weight: bool, atomic_add: bool,
                         out_dtype: torch.dtype | None = None, atomic_sem: str = "relaxed",
                         switches: GemmSwitches = GemmSwitches()):
    """Compile (without launching) the binary that grouped_gemm would run for this geometry;
    returns Triton's compiled kernel.

    Lets a tuner compile candidates in other processes: the binary lands in Triton's
    on-disk cache and the timing process only loads it. `switches` are grouped_gemm's
    switch arguments (the geometry comes from gemm_geometry with the same ones); with
    split_k > 1 and STORE, out_dtype is float32 whatever is given.
    """
    check_gemm_switches(switches, atomic_add=atomic_add, mul_routed_weight=mul_routed_weight)
    out_dtype = torch.float32 if switches.split_k > 1 and not atomic_add else out_dtype or dtype
    weights_dtype = torch.float32 if mul_routed_weight else dtype  # router weights are fp32
    pointers = (dtype, dtype, out_dtype, weights_dtype, torch.int32, torch.int32, torch.int32)
    with compile_only() as compiled:
        _launch(pointers, geometry, config, switches, weight_scale=1.0, a_rows_per_slot=a_rows_per_slot, topk=topk,
                mul_routed_weight=mul_routed_weight, atomic_add=atomic_add, atomic_sem=atomic_sem,
                dot_in_fp32=False, num_programs=1)
    return compiled[0] if compiled else None  # None: `launch` was replaced by one that compiles nothing
