"""fp8 (e4m3) quantization as the fp8 MoE checkpoints and kernels lay it out.

Two modes, named by `block_shape` as vLLM's and SGLang's `fused_experts` name them:

- per-tensor (`block_shape=None`): one scale per expert for each weight tensor (`[E]`);
  activations get one dynamic scale for the whole tensor before each GEMM.
- block (`block_shape=[128, 128]`, DeepSeek-V3's layout): weights get one scale per
  block_n x block_k block (`[E, ceil(rows / block_n), ceil(cols / block_k)]`); activations
  get one scale per token and group of block_k columns (`[M, ceil(K / block_k)]`).

A scale is what the quantized value is multiplied by to get the real one back
(`w ~= w_fp8 * scale`), which is how the checkpoints store it (`weight_scale_inv`).
These functions are the definition the kernels follow and the reference emulates.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .reference import gate_activation

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A block of zeros gets this scale instead of 0, so dequantizing never divides by zero.
MIN_SCALE = 1e-12


def check_block_shape(block_shape: Sequence[int] | None, what: str = "block_shape") -> tuple[int, int] | None:
    """(block_n, block_k) of a block shape, or None for per-tensor; ValueError naming the problem."""
    if block_shape is None:
        return None
    if isinstance(block_shape, (str, bytes)) or not isinstance(block_shape, Sequence) or len(block_shape) != 2:
        raise ValueError(f"{what} must be None or [block_n, block_k], got {block_shape!r}")
    for value in block_shape:
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{what} must hold two powers of two >= 16, got {list(block_shape)!r}")
    return int(block_shape[0]), int(block_shape[1])


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 as an IEEE division: torch divides a CUDA tensor by a Python number as a
    multiplication by its reciprocal, one ulp off now and then, which the kernels' div_rn
    (and torch on the CPU) are not."""
    return (amax / amax.new_full((), FP8_MAX)).clamp_min(MIN_SCALE)


def _fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weights(weights: torch.Tensor, block_shape: Sequence[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights [E, rows, cols] as fp8 e4m3 and their fp32 scales.

    block_shape None: scales [E] (one per expert); [block_n, block_k]: scales
    [E, ceil(rows / block_n), ceil(cols / block_k)], the last block of a dimension that the
    block does not divide being partial.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3 or not weights.dtype.is_floating_point:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating tensor [E, rows, cols], got {shape}")
    block = check_block_shape(block_shape)
    w = weights.float()
    if block is None:
        scale = _scale_of(w.abs().amax(dim=(1, 2)))
        return _fp8(w, scale[:, None, None]), scale
    experts, rows, cols = w.shape
    block_n, block_k = block
    row_blocks, col_blocks = -(-rows // block_n), -(-cols // block_k)
    # Pad to whole blocks with zeros (they never raise a block's maximum), then fold.
    padded = w.new_zeros(experts, row_blocks * block_n, col_blocks * block_k)
    padded[:, :rows, :cols] = w
    blocks = padded.view(experts, row_blocks, block_n, col_blocks, block_k)
    scale = _scale_of(blocks.abs().amax(dim=(2, 4)))
    quantized = _fp8(blocks, scale[:, :, None, :, None]).view_as(padded)[:, :rows, :cols].contiguous()
    return quantized, scale


def dequantize_weights(quantized: torch.Tensor, scale: torch.Tensor, block_shape: Sequence[int] | None = None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The real weights an fp8 tensor and its scales stand for, in `dtype`."""
    block = check_block_shape(block_shape)
    values = quantized.to(dtype)
    if block is None:
        return values * scale.to(dtype)[:, None, None]
    block_n, block_k = block
    _, rows, cols = quantized.shape
    expanded = scale.to(dtype).repeat_interleave(block_n, dim=1).repeat_interleave(block_k, dim=2)
    return values * expanded[:, :rows, :cols]


def quantize_activations(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] as fp8 e4m3 and fp32 scales: one scale for the tensor ([1]) when
    `group_size` is None, else one per token and group of `group_size` columns
    ([M, ceil(K / group_size)])."""
    if x.dim() != 2:
        raise ValueError(f"activations must be [M, K], got shape {tuple(x.shape)}")
    values = x.float()
    if group_size is None:
        scale = _scale_of(values.abs().amax()).reshape(1)
        return _fp8(values, scale), scale
    tokens, cols = values.shape
    groups = -(-cols // group_size)
    padded = values.new_zeros(tokens, groups * group_size)
    padded[:, :cols] = values
    grouped = padded.view(tokens, groups, group_size)
    scale = _scale_of(grouped.abs().amax(dim=2))
    quantized = _fp8(grouped, scale[:, :, None]).view(tokens, -1)[:, :cols].contiguous()
    return quantized, scale


def dequantize_activations(quantized: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    values = quantized.to(dtype)
    if group_size is None:
        return values * scale.to(dtype)
    expanded = scale.to(dtype).repeat_interleave(group_size, dim=1)
    return values * expanded[:, : quantized.shape[1]]


# Relative error ||out - ref|| / ||ref|| allowed for the fp8 layer against fp8_moe_reference,
# per mode: the reference quantizes exactly as the kernels do, so what remains is the
# kernels' roundings to the activation dtype (GEMM 2's output, and its [M, topk, K] cache
# in the unfused variant) and the few fp8 roundings that those differences, or fp32 sums,
# tip to the neighbouring fp8 value. Against the unquantized layer the error is several
# times larger (fp8 keeps 3 mantissa bits): reported, never gated.
# Measured on an H200 (scripts/check_fp8.py, bf16 activations, DeepSeek-V3 TP8 and Qwen3):
# 2.4e-3 to 5.4e-3 per block; per tensor 2.4e-3 at M = 16 but 1.1e-2 to 1.6e-2 at M = 4096,
# where each GEMM accumulates its whole K range in the tensor cores' fp8 accumulator. The
# gate allows bf16's own tolerance.
FP8_TOLERANCE = {"per_tensor": 2e-2, "block": 2e-2}


def fp8_tolerance(block_shape: Sequence[int] | None) -> float:
    """The tolerance of the fp8 layer with these weight scales (FP8_TOLERANCE)."""
    return FP8_TOLERANCE["per_tensor" if check_block_shape(block_shape) is None else "block"]


def fp8_moe_reference(hidden_states: torch.Tensor, w1_q: torch.Tensor, w2_q: torch.Tensor, w1_scale: torch.Tensor,
                      w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      block_shape: Sequence[int] | None = None, routed_scaling_factor: float | None = None,
                      activation: str = "silu") -> torch.Tensor:
    """The fp8 MoE layer in float64, its activations quantized as the kernels quantize them.

    w1_q [E, 2N, K] and w2_q [E, K, N] are fp8 with scales as quantize_weights makes them;
    they are dequantized exactly. hidden_states (the activation dtype) are quantized per
    tensor or per token and group of block_k; GEMM 1's result is rounded to the activation
    dtype (as the kernel stores it), silu(gate) * up (gelu with activation="gelu") is
    computed and rounded to the activation dtype again, then quantized the same way (per
    tensor: one scale over the slots routed to experts in [0, E)); GEMM 2 and the
    router-weighted top-k sum follow.
    Slots whose expert id is outside [0, E) contribute nothing (expert parallelism).
    """
    block = check_block_shape(block_shape)
    group = block[1] if block else None
    dtype, device = hidden_states.dtype, hidden_states.device
    x = dequantize_activations(*quantize_activations(hidden_states.detach(), group), group)
    num_experts, two_n, _ = w1_q.shape
    n = two_n // 2
    ids = topk_ids.detach().long()
    weights = topk_weights.detach().double()

    def expert_weights(w_q: torch.Tensor, scale: torch.Tensor, expert: int) -> torch.Tensor:
        # One expert at a time: all of DeepSeek-V3's w1 in float64 would take 7.5 GB.
        return dequantize_weights(w_q[expert:expert + 1], scale[expert:expert + 1], block)[0]

    routed = [torch.nonzero(ids == expert, as_tuple=True) for expert in range(num_experts)]
    gated = torch.zeros(ids.numel(), n, dtype=torch.float64, device=device)  # one row per slot
    for expert, (token, k) in enumerate(routed):
        if token.numel():
            h = (x[token] @ expert_weights(w1_q, w1_scale, expert).T).to(dtype).double()
            act = gate_activation(h[:, :n], activation) * h[:, n:]
            gated[token * ids.shape[1] + k] = act.to(dtype).double()
    live = ((ids >= 0) & (ids < num_experts)).reshape(-1)
    quantized = torch.zeros_like(gated)
    if live.any():
        q, scale = quantize_activations(gated[live].to(dtype), group)
        quantized[live] = dequantize_activations(q, scale, group)

    out = torch.zeros(x.shape[0], w2_q.shape[1], dtype=torch.float64, device=device)
    for expert, (token, k) in enumerate(routed):
        if token.numel():
            y = quantized[token * ids.shape[1] + k] @ expert_weights(w2_q, w2_scale, expert).T
            out.index_add_(0, token, y * weights[token, k][:, None])
    if routed_scaling_factor is not None:
        out *= routed_scaling_factor
    return out
