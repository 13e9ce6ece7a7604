"""Triton kernels of the MoE layer, one file per kernel with its launcher beside it.

Imported as `moetune.kernels` (never as a top-level `kernels`).
"""

from .activation import silu_and_mul
from .align import AlignedTokens, align_tokens, max_padded_rows
from .experts import run_experts
from .grouped_gemm import GemmGeometry, compile_grouped_gemm, gemm_geometry, grouped_gemm, interpreted_kernels
from .reduce import topk_sum
from .routing import select_experts
from .switches import KernelSwitches

__all__ = ["AlignedTokens", "GemmGeometry", "KernelSwitches", "align_tokens", "compile_grouped_gemm", "gemm_geometry",
           "grouped_gemm", "interpreted_kernels", "max_padded_rows", "run_experts", "select_experts", "silu_and_mul", "topk_sum"]
