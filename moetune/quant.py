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
        scale = (w.abs().amax(dim=(1, 2)) / FP8_MAX).clamp_min(MIN_SCALE)
        return _fp8(w, scale[:, None, None]), scale
    experts, rows, cols = w.shape
    block_n, block_k = block
    row_blocks, col_blocks = -(-rows // block_n), -(-cols // block_k)
    # Pad to whole blocks with zeros (they never raise a block's maximum), then fold.
    padded = w.new_zeros(experts, row_blocks * block_n, col_blocks * block_k)
    padded[:, :rows, :cols] = w
    blocks = padded.view(experts, row_blocks, block_n, col_blocks, block_k)
    scale = (blocks.abs().amax(dim=(2, 4)) / FP8_MAX).clamp_min(MIN_SCALE)
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
        scale = (values.abs().amax() / FP8_MAX).clamp_min(MIN_SCALE).reshape(1)
        return _fp8(values, scale), scale
    tokens, cols = values.shape
    groups = -(-cols // group_size)
    padded = values.new_zeros(tokens, groups * group_size)
    padded[:, :cols] = values
    grouped = padded.view(tokens, groups, group_size)
    scale = (grouped.abs().amax(dim=2) / FP8_MAX).clamp_min(MIN_SCALE)
    quantized = _fp8(grouped, scale[:, :, None]).view(tokens, -1)[:, :cols].contiguous()
    return quantized, scale


def dequantize_activations(quantized: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    values = quantized.to(dtype)
    if group_size is None:
        return values * scale.to(dtype)
    expanded = scale.to(dtype).repeat_interleave(group_size, dim=1)
    return values * expanded[:, : quantized.shape[1]]
