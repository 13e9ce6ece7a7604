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

fp8 (e4m3 a and weights, fp32 accumulation, moetune/quant.py's scale layouts):
  per tensor  the K loop accumulates unscaled dots; a_scale[0] * b_scale[e] multiplies the
            sum once after the loop (before the fused activation, the router weight and the
            split-K partials, all of which are linear in it but the activation).
  block     each K tile lies in one scale group (BLOCK_SIZE_K divides block_k) and adds
            dot(a, b) * a_scale[row, group] * b_scale[e, column // block_n, group]: every
            column picks its own weight scale, so BLOCK_SIZE_N need not equal block_n.
Every switch runs with fp8. Triton 3.6's interpreter runs fp8 loads, descriptor loads and
dots as written (kernels/quantize.py says what it gets wrong: the fp32 -> fp8 cast, not used here).
Triton 3.6's interpreter runs device-side tensor descriptors (bounds, zero padding and the
16-byte checks included), so it runs the TMA paths as written; it does not model the
hardware's tensor-map limits (box sides <= 256) nor the allocator's scratch: only a GPU
checks those.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from triton.runtime.interpreter import InterpretedFunction

from .activation import check_activation
from .align import AlignedTokens
from .gemm_operands import FP8_DTYPE, Fp8Scales, GemmSwitches, check_block_k, check_fp8_operands, check_gemm_switches, \
    check_operands
from .gemm_kernel import QUANT_BLOCK, QUANT_NONE, QUANT_PER_TENSOR, _grouped_gemm_kernel
from .launch import compile_only, launch

EPILOGUE_STORE = 0
EPILOGUE_ATOMIC_ADD = 1


# Triton chose between compiling and interpreting when the kernel was defined (by
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
    scale_strides: tuple[int, ...] = (0, 0, 0, 0, 0)  # fp8: a_scale's 2, b_scale's 3 (0 where absent)


def gemm_geometry(a: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, capacity: int, topk: int,
                  atomic_add: bool, *, c_sorted: bool = False, a_rows_per_slot: int = 1,
                  fuse_activation: bool = False, fp8: Fp8Scales | None = None) -> GemmGeometry:
    """The geometry of a launch. With c_sorted, out has `capacity` rows (one per aligned
    position), so the slot count comes from a: a_rows_per_slot slots per row of a. With
    fuse_activation the output is half as wide as the weights' rows (gate and up). A 3-D
    `out` is split-K's [split_k, rows, N_out] partials. `fp8`: the scales (of any device,
    meta included), whose strides the kernel takes."""
    partials = out.dim() == 3
    out_rows = out.shape[-2]
    num_slots = a.shape[0] * a_rows_per_slot if c_sorted else out_rows * (topk if atomic_add else 1)
    n_out = weights.shape[1] // 2 if fuse_activation else weights.shape[1]
    return GemmGeometry(
        n_out, weights.shape[2], capacity, num_slots,
        a.stride(0), a.stride(1), weights.stride(0), weights.stride(1), weights.stride(2),
        out.stride(-2), out.stride(-1), weights.shape[0] * weights.shape[1], out.stride(0) if partials else 0,
        _scale_strides(fp8))


def _scale_strides(fp8: Fp8Scales | None) -> tuple[int, ...]:
    if fp8 is None:
        return (0, 0, 0, 0, 0)
    if fp8.block_shape is None:
        return (0, 0, fp8.b_scale.stride(0), 0, 0)
    return (*fp8.a_scale.stride(), *fp8.b_scale.stride())


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
            dot_in_fp32: bool, num_programs: int, fp8: bool = False, block_shape: tuple[int, int] | None = None,
            gelu: bool = False):
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
        *g.scale_strides,
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
        QUANT=QUANT_NONE if not fp8 else QUANT_PER_TENSOR if block_shape is None else QUANT_BLOCK,
        GROUP_N=block_shape[0] if block_shape else 1, GROUP_K=block_shape[1] if block_shape else 1, GELU=gelu,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


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
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    activation: str = "silu",
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
    silu(gate) * up into `out` [slots or capacity, N] (gelu(gate) * up with
    activation="gelu"). tma_weights / tma_activations load
    weight / A tiles through tensor descriptors (tma_activations only with a_sorted); both
    need the tensor's last stride 1, its other strides and its address 16-byte aligned.
    split_k > 1: with STORE, `out` is [split_k, rows, N_out] float32 and holds each split's
    partial (the caller sums them: silu_and_mul / topk_sum take them so); with ATOMIC_ADD
    every split adds into `out`. persistent: `num_programs` programs (default
    default_num_programs) loop over the live tiles.

    fp8 (module doc): `a` and `weights` float8_e4m3fn with a_scale and b_scale in
    moetune/quant.py's layouts, block_shape None (per tensor) or (block_n, block_k), whose
    block_k the config's BLOCK_SIZE_K must divide; `out` in the activation dtype, or the
    fp32 partials of split_k.
    """
    if config["BLOCK_SIZE_M"] != aligned.block_size_m:
        raise ValueError(
            f"config BLOCK_SIZE_M={config['BLOCK_SIZE_M']} differs from the alignment's {aligned.block_size_m}")
    switches = GemmSwitches(a_sorted, c_sorted, fuse_activation, tma_weights, tma_activations, split_k, persistent)
    check_gemm_switches(switches, atomic_add=atomic_add, mul_routed_weight=topk_weights is not None)
    check_operands(switches, a, weights, out, aligned, atomic_add)
    fp8 = None if a_scale is None and b_scale is None else \
        Fp8Scales(a_scale, b_scale, tuple(block_shape) if block_shape is not None else None)
    check_fp8_operands(a, weights, out, fp8, config)
    geometry = gemm_geometry(a, weights, out, aligned.sorted_ids.numel(), topk, atomic_add,
                             c_sorted=c_sorted, a_rows_per_slot=a_rows_per_slot, fuse_activation=fuse_activation,
                             fp8=fp8)
    pointers = (a, weights, out, topk_weights if topk_weights is not None else a,
                aligned.sorted_ids, aligned.expert_ids, aligned.padded_rows,
                *(fp8[:2] if fp8 else (a, a)))
    _launch(pointers, geometry, config, switches,
            weight_scale=weight_scale, a_rows_per_slot=a_rows_per_slot, topk=topk,
            mul_routed_weight=topk_weights is not None, atomic_add=atomic_add, atomic_sem=atomic_sem,
            num_programs=num_programs if num_programs is not None else default_num_programs(a.device),
            fp8=fp8 is not None, block_shape=fp8.block_shape if fp8 else None,
            gelu=check_activation(activation) and fuse_activation,
            # Triton 3.6's interpreter multiplies bf16 as raw 16-bit integers; upcasting
            # there is exact, and compiled kernels never take this path.
            dot_in_fp32=INTERPRETED and a.dtype == torch.bfloat16)
    return out


def compile_grouped_gemm(dtype: torch.dtype, geometry: GemmGeometry, config: dict, *, topk: int,
                         a_rows_per_slot: int, mul_routed_weight: bool, atomic_add: bool,
                         out_dtype: torch.dtype | None = None, atomic_sem: str = "relaxed",
                         switches: GemmSwitches = GemmSwitches(), block_shape: tuple[int, int] | None = None):
    """Compile (without launching) the binary that grouped_gemm would run for this geometry;
    returns Triton's compiled kernel.

    Lets a tuner compile candidates in other processes: the binary lands in Triton's
    on-disk cache and the timing process only loads it. `switches` are grouped_gemm's
    switch arguments (the geometry comes from gemm_geometry with the same ones); with
    split_k > 1 and STORE, out_dtype is float32 whatever is given.
    fp8: dtype float8_e4m3fn (out_dtype then defaults to bfloat16), block_shape as for
    grouped_gemm, the scale strides in the geometry (gemm_geometry's fp8).
    """
    check_gemm_switches(switches, atomic_add=atomic_add, mul_routed_weight=mul_routed_weight)
    fp8 = dtype == FP8_DTYPE
    if fp8:
        check_block_k(block_shape, config)
    out_dtype = torch.float32 if switches.split_k > 1 and not atomic_add else \
        out_dtype or (torch.bfloat16 if fp8 else dtype)
    weights_dtype = torch.float32 if mul_routed_weight else dtype  # router weights are fp32
    scale_dtype = torch.float32 if fp8 else dtype
    pointers = (dtype, dtype, out_dtype, weights_dtype, torch.int32, torch.int32, torch.int32, scale_dtype, scale_dtype)
    with compile_only() as compiled:
        _launch(pointers, geometry, config, switches, weight_scale=1.0, a_rows_per_slot=a_rows_per_slot, topk=topk,
                mul_routed_weight=mul_routed_weight, atomic_add=atomic_add, atomic_sem=atomic_sem,
                dot_in_fp32=False, num_programs=1, fp8=fp8, block_shape=tuple(block_shape) if fp8 and block_shape
                else None)
    return compiled[0] if compiled else None  # None: `launch` was replaced by one that compiles nothing
