"""SiLU-and-mul: out = silu(gate) * up, gate in the first N columns, up in the second N;
or GeLU-and-mul, gelu(gate) * up, with `activation="gelu"` (the exact erf form, as vLLM's
GeluAndMul by default and SGLang's gelu_and_mul compute it).

This is how vLLM and SGLang lay out w1 (gate rows first, then up rows), so GEMM 1's output
row [2N] splits in two halves.

With `aligned` (the sorted intermediate, kernels/switches.py) the rows are GEMM 1's aligned
positions: rows past the used range and padding rows are skipped, neither read nor written.
With a 3-D x [splits, rows, 2N] (GEMM 1's split-K partials, fp32) the splits are summed first.

fp8 (silu_and_mul_fp8): split-K partials are summed and rounded to the activation dtype,
as GEMM 1 stores gate and up without split-K; the result is rounded to it too, as the
unquantized layer stores it, then quantized in the same pass: per token and group of columns (fp8 out
and its scales), or, per tensor, stored in the activation dtype while the kernel maxes |out|
into an amax that kernels/quantize.py's per-tensor quantization then uses (the scale needs
every row's max before any element is quantized).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .quantize import ALL_ROWS, FP8_DTYPE, LiveRows, emulate_fp8_cast, group_block, live_row, quantize_groups, \
    quantize_per_tensor

QUANT_NONE, QUANT_AMAX, QUANT_GROUPS = 0, 1, 2
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATIONS = ("silu", "gelu")  # of the gate, as the frameworks' fused_experts name them


def check_activation(activation) -> bool:
    """Whether the activation is GeLU (else SiLU); ValueError naming anything else."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return activation == "gelu"


@triton.jit
def gate_activation(gate, GELU: tl.constexpr):
    """silu(gate), or gelu(gate) = gate * Phi(gate) with GELU; fp32 in, fp32 out."""
    if GELU:
        activated = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        activated = gate / (1.0 + tl.exp(-gate))
    return activated


@triton.jit
def _round(x, ROUNDING: tl.constexpr):
    """fp32 x rounded to 1 bf16 / 2 fp16 (0: left in fp32), returned in fp32."""
    if ROUNDING == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUNDING == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [rows, 2N], or [SPLITS, rows, 2N] partials to sum
    out_ptr,  # [rows, N]: the activation dtype, or fp8 with QUANT_GROUPS
    scale_ptr,  # QUANT_GROUPS: [rows, ceil(N / GROUP)] fp32
    amax_ptr,  # QUANT_AMAX: [1] fp32, maxed with |out|
    sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,  # live rows (quantize.py)
    N,
    stride_xm, stride_om, stride_xs, stride_sm,
    BLOCK_N: tl.constexpr,
    ALIGNED_ROWS: tl.constexpr,
    SLOT_EXPERTS: tl.constexpr,
    SPLITS: tl.constexpr,
    QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    ROUNDING: tl.constexpr,  # fp8: the activation dtype (_round), which the quantized values are rounded to
    EMULATE: tl.constexpr,
    GELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # The grid covers every row; dead rows (padding, other ranks' slots) are skipped.
    if not live_row(row, sorted_ids_ptr, padded_rows_ptr, slot_experts_ptr, num_slots, num_experts,
                    ALIGNED_ROWS, SLOT_EXPERTS):
        return
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + N + offs, mask=mask, other=0.0).to(tl.float32)
    for split in tl.static_range(1, SPLITS):
        part = x_ptr + split * stride_xs + row * stride_xm
        gate += tl.load(part + offs, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(part + N + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT != 0 and SPLITS > 1:  # rounded as GEMM 1 stores them without split-K (module doc: fp8)
        gate = _round(gate, ROUNDING)
        up = _round(up, ROUNDING)
    # the gate's activation times up, in fp32, rounded once at the store
    result = gate_activation(gate, GELU) * up
    if QUANT == 2:
        result = _round(result, ROUNDING)
        groups = tl.program_id(1) * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
        quantize_groups(result, out_ptr + row * stride_om + offs, scale_ptr + row * stride_sm + groups, mask,
                        BLOCK_N, GROUP, EMULATE)
    else:
        stored = result.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_om + offs, stored, mask=mask)
        if QUANT == 1:
            tl.atomic_max(amax_ptr, tl.max(tl.abs(stored.to(tl.float32)), axis=0), sem="relaxed")


def _launch_silu(x: torch.Tensor, out: torch.Tensor, live: LiveRows, *, scales=None, amax=None,
                 group: int | None = None, rounding: torch.dtype = torch.float32, activation: str = "silu") -> None:
    splits, rows, two_n = x.shape if x.dim() == 3 else (1, *x.shape)
    n = two_n // 2
    if rows == 0:
        return
    if live.aligned is not None:
        capacity = live.aligned.sorted_ids.numel()
        if rows < capacity:
            raise ValueError(f"aligned rows: x has {rows} rows, fewer than the alignment's capacity {capacity}")
        rows = capacity
    block_n = group_block(n, group) if group else min(1024, triton.next_power_of_2(n))
    quant = QUANT_GROUPS if group else QUANT_AMAX if amax is not None else QUANT_NONE
    launch(_silu_and_mul_kernel, (rows, triton.cdiv(n, block_n)))(
        x, out, scales if scales is not None else x, amax if amax is not None else x, *live.kernel_args(x), n,
        x.stride(-2), out.stride(0), x.stride(0) if splits > 1 else 0, scales.stride(0) if scales is not None else 0,
        BLOCK_N=block_n, **live.flags(), SPLITS=splits, QUANT=quant, GROUP=group or 1,
        ROUNDING=_ROUNDING[rounding], EMULATE=emulate_fp8_cast(), GELU=check_activation(activation),
        num_warps=4 if block_n >= 512 else 1)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                 activation: str = "silu", live: LiveRows = ALL_ROWS) -> torch.Tensor:
    """x [rows, 2N] -> silu(x[:, :N]) * x[:, N:] (gelu with activation="gelu") as [rows, N]
    in x's dtype (or `dtype`).

    A 3-D x [splits, rows, 2N] is summed over its first dimension first. Only the rows `live`
    calls live are computed (quantize.LiveRows: aligned positions holding a slot, or slots
    skipping those of another rank's experts); the others of `out` are left as they were.
    """
    rows, two_n = x.shape[-2:]
    if out is None:
        out = torch.empty(rows, two_n // 2, dtype=dtype or x.dtype, device=x.device)
    _launch_silu(x, out, live, activation=activation)
    return out


def silu_and_mul_fp8(x: torch.Tensor, group_size: int | None, *, dtype: torch.dtype, live: LiveRows,
                     activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, 2N] (or [splits, rows, 2N] fp32 partials) -> (fp8 [rows, N], fp32 scales) of
    silu(gate) * up (gelu with activation="gelu") rounded to `dtype`: scales
    [rows, ceil(N / group_size)] per token and group, or [1] for the whole tensor
    (group_size None: two more kernels, see module doc). Only `live` rows are computed (and
    count in the per-tensor scale); the others are left unwritten."""
    rows, two_n = x.shape[-2:]
    n = two_n // 2
    if group_size is None:
        gated = torch.empty(rows, n, dtype=dtype, device=x.device)
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
        _launch_silu(x, gated, live, amax=amax, rounding=dtype, activation=activation)
        return quantize_per_tensor(gated, live=live, amax=amax)
    q = torch.empty(rows, n, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(rows, triton.cdiv(n, group_size), dtype=torch.float32, device=x.device)
    _launch_silu(x, q, live, scales=scales, group=group_size, rounding=dtype, activation=activation)
    return q, scales
