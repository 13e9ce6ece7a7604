"""fp8 (e4m3) quantization of activations: per token and group of columns, or per tensor.

The definition is moetune/quant.py's (`scale = max(amax / 448, 1e-12)`, `q = fp8(clamp(x /
scale, -448, 448))`, rounded to nearest even); these kernels compute exactly that, bit for
bit: the divisions are IEEE (div_rn), as torch's are.

Per tensor needs the amax of the whole tensor before any element is quantized: one kernel
takes the max of |x| (atomic max into a zeroed fp32 [1]), a second one quantizes with the
scale derived from it. SiLU-and-mul can produce that amax itself (kernels/activation.py), so
GEMM 2's input costs one quantization pass and no extra read for the max.

Rows of an intermediate that hold no slot (alignment padding, or a slot whose expert lives
on another rank) are skipped: never read, never written, left out of the amax.

Triton 3.6's interpreter loads and stores fp8, casts fp8 to fp32 exactly and runs tl.dot on
fp8 operands (upcast to fp16, exact), but its fp32 -> fp8 cast is wrong (its round-to-nearest
carries the mantissa into the exponent bits, and it does not saturate); under the interpreter
the kernels round to the e4m3 grid in fp32 arithmetic first (EMULATE_FP8_CAST), after which
its cast is exact. Compiled kernels cast directly (cvt.rn.satfinite on sm_89+).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton.runtime.interpreter import InterpretedFunction

from .align import AlignedTokens
from .launch import launch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # the scale of an all-zero group or tensor (moetune/quant.py)


@triton.jit
def fp8_cast(q, EMULATE: tl.constexpr):
    """fp32 values already divided by their scale -> fp8 e4m3, saturating at +-448 and
    rounding to nearest even."""
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if EMULATE:
        # Round |q| to the e4m3 grid: 3 mantissa bits, spacing 2^(e - 3), subnormals
        # sharing 2^-9. Scaling by powers of two is exact, and adding then subtracting
        # 1.5 * 2^23 rounds a float32 below 2^22 to an integer, to nearest even.
        bits = q.to(tl.int32, bitcast=True)
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inverse_ulp = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
        steps = tl.abs(q) * inverse_ulp
        rounded = ((steps + 12582912.0) - 12582912.0) * ulp
        q = tl.where(bits < 0, rounded * -1.0, rounded)  # a product keeps the sign of zero, 0 - x would not
    return q.to(tl.float8e4nv)


@triton.jit
def live_row(row, sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
             ALIGNED_ROWS: tl.constexpr, SLOT_EXPERTS: tl.constexpr):
    """Whether `row` of an intermediate holds a slot computed by the experts of this rank:
    ALIGNED_ROWS, rows are aligned positions (padding holds no slot); SLOT_EXPERTS, rows are
    slots, live when their expert id is in [0, num_experts)."""
    live = True
    if ALIGNED_ROWS:
        live = row < tl.load(padded_rows_ptr)
        if live:
            live = tl.load(sorted_ids_ptr + row) < num_slots
    if SLOT_EXPERTS:
        expert = tl.load(slot_experts_ptr + row)
        live = (expert >= 0) & (expert < num_experts)
    return live


@triton.jit
def quantize_groups(values, q_ptrs, scale_ptrs, mask, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                    EMULATE: tl.constexpr):
    """Store `values` [BLOCK] (fp32, zeros where masked) as fp8 with one scale per GROUP
    consecutive columns; `scale_ptrs` [BLOCK // GROUP] and the scale mask is any column."""
    grouped = tl.reshape(values, (BLOCK // GROUP, GROUP))
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(grouped), axis=1), 448.0), 1e-12)
    q = fp8_cast(tl.math.div_rn(grouped, scale[:, None]), EMULATE)
    tl.store(q_ptrs, tl.reshape(q, (BLOCK,)), mask=mask)
    group_mask = tl.max(tl.reshape(mask.to(tl.int32), (BLOCK // GROUP, GROUP)), axis=1) > 0
    tl.store(scale_ptrs, scale, mask=group_mask)


@triton.jit
def _group_quant_kernel(
    x_ptr, q_ptr, scale_ptr,  # [rows, K] -> [rows, K] fp8, [rows, ceil(K / GROUP)] fp32
    sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
    K, stride_xm, stride_qm, stride_sm,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
    ALIGNED_ROWS: tl.constexpr, SLOT_EXPERTS: tl.constexpr, EMULATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if not live_row(row, sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
                    ALIGNED_ROWS, SLOT_EXPERTS):
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    groups = tl.program_id(1) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
    quantize_groups(x, q_ptr + row * stride_qm + offs, scale_ptr + row * stride_sm + groups, mask,
                    BLOCK, GROUP, EMULATE)


@triton.jit
def _amax_kernel(
    x_ptr, amax_ptr,  # [rows, K] -> max |x| into a zeroed fp32 [1]
    sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
    rows, K, stride_xm,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED_ROWS: tl.constexpr, SLOT_EXPERTS: tl.constexpr,
):
    # Several rows per program: one atomic per program, not per row.
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    largest = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + i
        if row < rows:
            if live_row(row, sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
                        ALIGNED_ROWS, SLOT_EXPERTS):
                x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
                largest = tl.maximum(largest, tl.abs(x))
    tl.atomic_max(amax_ptr, tl.max(largest, axis=0), sem="relaxed")


@triton.jit
def _tensor_quant_kernel(
    x_ptr, amax_ptr, q_ptr, scale_ptr,  # [rows, K], [1] -> [rows, K] fp8, [1] fp32
    sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
    K, stride_xm, stride_qm,
    BLOCK: tl.constexpr, ALIGNED_ROWS: tl.constexpr, SLOT_EXPERTS: tl.constexpr, EMULATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.maximum(tl.math.div_rn(tl.load(amax_ptr), 448.0), 1e-12)
    if (row == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, scale)
    if not live_row(row, sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
                    ALIGNED_ROWS, SLOT_EXPERTS):
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * stride_qm + offs, fp8_cast(tl.math.div_rn(x, scale), EMULATE), mask=offs < K)


class LiveRows(NamedTuple):
    """Which rows of an intermediate hold a slot this rank computes (module doc). With
    `aligned`, rows are aligned positions; with `slot_experts` (topk_ids), rows are slots
    and those routed outside [0, num_experts) are dead; with neither, every row is live."""
    aligned: AlignedTokens | None = None
    slot_experts: torch.Tensor | None = None
    num_slots: int = 0
    num_experts: int = 0

    def kernel_args(self, x: torch.Tensor) -> tuple:
        """Pointer and size arguments of live_row: sorted_ids, padded_rows, slot_experts,
        num_slots, num_experts (unused pointers are x: never read)."""
        sorted_ids, padded_rows = (self.aligned.sorted_ids, self.aligned.padded_rows) if self.aligned else (x, x)
        experts = self.slot_experts.reshape(-1) if self.slot_experts is not None else x
        return sorted_ids, padded_rows, experts, self.num_slots, self.num_experts

    def flags(self) -> dict:
        return {"ALIGNED_ROWS": self.aligned is not None, "SLOT_EXPERTS": self.slot_experts is not None}


ALL_ROWS = LiveRows()


def emulate_fp8_cast() -> bool:
    """Whether the kernels must round to the e4m3 grid themselves (the interpreter's cast is wrong)."""
    return isinstance(_group_quant_kernel, InterpretedFunction)


def group_block(cols: int, group: int) -> int:
    """Columns per program of a per-group kernel: a power of two, a multiple of the group."""
    return max(group, min(1024, triton.next_power_of_2(cols)))


def _check_rows(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point or x.dtype == FP8_DTYPE:
        shape = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"activations to quantize must be a 2-D floating tensor, got {shape}")


def quantize_per_token_group(x: torch.Tensor, group_size: int, *, live: LiveRows = ALL_ROWS
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] -> (fp8 [rows, K], fp32 scales [rows, ceil(K / group_size)]), as
    moetune.quant.quantize_activations(x, group_size). Rows `live` calls dead are left
    unwritten in both outputs."""
    _check_rows(x)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 or \
            group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(rows, triton.cdiv(cols, group_size), dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return q, scales
    block = group_block(cols, group_size)
    launch(_group_quant_kernel, (rows, triton.cdiv(cols, block)))(
        x, q, scales, *live.kernel_args(x), cols, x.stride(0), q.stride(0), scales.stride(0),
        BLOCK=block, GROUP=group_size, EMULATE=emulate_fp8_cast(), **live.flags(),
        num_warps=4 if block >= 512 else 1)
    return q, scales


def tensor_amax(x: torch.Tensor, *, live: LiveRows = ALL_ROWS, amax: torch.Tensor | None = None) -> torch.Tensor:
    """max |x| over the live rows as fp32 [1] (0 when none), maxed into `amax` if given."""
    _check_rows(x)
    if amax is None:
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return amax
    block = min(1024, triton.next_power_of_2(cols))
    rows_per_program = 16
    launch(_amax_kernel, (triton.cdiv(rows, rows_per_program), triton.cdiv(cols, block)))(
        x, amax, *live.kernel_args(x), rows, cols, x.stride(0),
        ROWS_PER_PROGRAM=rows_per_program, BLOCK=block, **live.flags(), num_warps=4 if block >= 512 else 1)
    return amax


def quantize_per_tensor(x: torch.Tensor, *, live: LiveRows = ALL_ROWS, amax: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] -> (fp8 [rows, K], fp32 scale [1]), as moetune.quant.quantize_activations(x)
    (over the live rows). `amax`: max |x| over them already computed (fp32 [1], e.g. by
    silu_and_mul), else it is computed here: two kernels, no host synchronisation."""
    if amax is None:
        amax = tensor_amax(x, live=live)
    else:
        _check_rows(x)
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    block = min(1024, triton.next_power_of_2(max(cols, 1)))
    if rows == 0 or cols == 0:  # one program, which only stores the scale
        live, cols = ALL_ROWS, 0
    launch(_tensor_quant_kernel, (max(rows, 1), max(triton.cdiv(cols, block), 1)))(
        x, amax, q, scale, *live.kernel_args(x), cols, x.stride(0), q.stride(0),
        BLOCK=block, EMULATE=emulate_fp8_cast(), **live.flags(), num_warps=4 if block >= 512 else 1)
    return q, scale
