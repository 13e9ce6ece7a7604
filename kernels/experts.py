"""The expert part of the layer after alignment, honouring the kernel switches.

GEMM 1 (w1, gate+up) -> SiLU-and-mul -> GEMM 2 (w2, times router weight) -> top-k sum,
the sum either by the reduce kernel (STORE epilogue) or by GEMM 2's atomic adds into out.
"""

from __future__ import annotations

import torch

from .activation import silu_and_mul
from .align import AlignedTokens
from .grouped_gemm import grouped_gemm
from .reduce import topk_sum
from .switches import OFF, KernelSwitches


def run_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, aligned1: AlignedTokens, aligned2: AlignedTokens, gemm1_config: dict,
                gemm2_config: dict, switches: KernelSwitches = OFF, *, atomic_add: bool, out: torch.Tensor,
                weight_scale: float = 1.0, atomic_sem: str = "relaxed",
                num_programs: int | None = None) -> torch.Tensor:
    """out [M, K] = the MoE layer's expert part; inputs validated as the layer does.

    aligned1 / aligned2: alignments of topk_ids at the configs' BLOCK_SIZE_M. With
    sorted_rows GEMM 2 runs on aligned1 (it reads GEMM 1's rows in that order), and
    aligned2 is not used.
    atomic_add: the fused variant; `out` is zeroed here and GEMM 2 adds into it (pass an
    fp32 buffer for fp32 accumulation and cast afterwards). Otherwise GEMM 2 stores
    [M, topk, K] and the reduce kernel sums it into `out`.
    num_programs: the persistent schedule's program count (default: one per SM; 4 under
    the interpreter).
    """
    switches.validate()
    switches.check_configs(gemm1_config, gemm2_config)
    m, k = hidden_states.shape
    num_experts, two_n, _ = w1.shape
    topk = topk_ids.shape[1]
    slots = m * topk
    dtype, device = hidden_states.dtype, hidden_states.device
    sorted_rows, split_k = switches.sorted_rows, switches.split_k
    if sorted_rows:
        aligned2 = aligned1
    rows = aligned1.sorted_ids.numel() if sorted_rows else slots
    common = {"tma_weights": switches.tma_weights, "split_k": split_k, "persistent": switches.persistent,
              "num_programs": num_programs}

    if switches.fuse_activation:
        activation = torch.empty(rows, two_n // 2, dtype=dtype, device=device)
        grouped_gemm(hidden_states, w1, activation, aligned1, gemm1_config, topk=topk, a_rows_per_slot=topk,
                     c_sorted=sorted_rows, fuse_activation=True, **common)
    else:
        # Split-K leaves fp32 partials, which the activation kernel sums.
        gate_up = torch.empty(split_k, rows, two_n, dtype=torch.float32, device=device) if split_k > 1 else \
            torch.empty(rows, two_n, dtype=dtype, device=device)
        grouped_gemm(hidden_states, w1, gate_up, aligned1, gemm1_config, topk=topk, a_rows_per_slot=topk,
                     c_sorted=sorted_rows, **common)
        activation = silu_and_mul(gate_up, aligned=aligned1 if sorted_rows else None, num_slots=slots, dtype=dtype)

    gemm2 = dict(common, topk=topk, a_rows_per_slot=1, topk_weights=topk_weights, weight_scale=weight_scale,
                 a_sorted=sorted_rows, tma_activations=switches.tma_activations)
    if atomic_add:
        # Tokens whose experts all live on other ranks keep the zero; with split-K every
        # split adds its partial.
        out.zero_()
        grouped_gemm(activation, w2, out, aligned2, gemm2_config, atomic_add=True, atomic_sem=atomic_sem, **gemm2)
        return out
    if split_k > 1:  # fp32 partials, summed by the top-k sum
        down = torch.empty(split_k, m, topk, k, dtype=torch.float32, device=device)
        grouped_gemm(activation, w2, down.view(split_k, slots, k), aligned2, gemm2_config, **gemm2)
    else:
        down = torch.empty(m, topk, k, dtype=dtype, device=device)
        grouped_gemm(activation, w2, down.view(slots, k), aligned2, gemm2_config, **gemm2)
    return topk_sum(down, topk_ids, num_experts, out)
