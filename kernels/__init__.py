"""Triton kernels of the MoE layer, one file per kernel with its launcher beside it.

Imported as `moetune.kernels` (never as a top-level `kernels`).
"""

from .activation import silu_and_mul, silu_and_mul_fp8
from .align import AlignedTokens, align_tokens, max_padded_rows
from .experts import check_fp8_layer, run_experts
from .grouped_gemm import GemmGeometry, compile_grouped_gemm, gemm_geometry, grouped_gemm, interpreted_kernels
from .quantize import LiveRows, quantize_per_tensor, quantize_per_token_group
from .reduce import topk_sum
from .routing import select_experts
from .switches import KernelSwitches

__all__ = ["AlignedTokens", "GemmGeometry", "KernelSwitches", "LiveRows", "align_tokens", "check_fp8_layer",
           "compile_grouped_gemm", "gemm_geometry", "grouped_gemm", "interpreted_kernels", "max_padded_rows",
           "quantize_per_tensor", "quantize_per_token_group", "run_experts", "select_experts", "silu_and_mul",
           "silu_and_mul_fp8", "topk_sum"]
