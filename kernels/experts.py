"""The expert part of the layer after alignment, honouring the kernel switches.

GEMM 1 (w1, gate+up) -> SiLU-and-mul (or GeLU-and-mul) -> GEMM 2 (w2, times router weight)
-> top-k sum, the sum either by the reduce kernel (STORE epilogue) or by GEMM 2's atomic adds
into out; or no sum (combine=False): GEMM 2 stores each slot's row into out [M, topk, K].

fp8 weights (w1_scale / w2_scale given): hidden_states are quantized before GEMM 1 (per
tensor, or per token in groups of block_k), and GEMM 2's input after the activation: the
activation kernel quantizes per token group in the same pass; per tensor it also yields the
amax, and one more kernel quantizes with the scale from it (the scale needs every row's max
first). With fuse_activation, GEMM 1's epilogue stores silu(gate) * up in the activation
dtype and a quantization pass follows. Every switch works with both modes.
"""

from __future__ import annotations

import torch

from .activation import check_activation, silu_and_mul, silu_and_mul_fp8
from .align import AlignedTokens
from .gemm_operands import FP8_DTYPE, check_block_k
from .grouped_gemm import grouped_gemm
from .quantize import LiveRows, quantize_per_tensor, quantize_per_token_group
from .reduce import topk_sum
from .switches import OFF, KernelSwitches


def _scale_shape_error(name: str, scale, shape: tuple) -> ValueError:
    got = f"{list(scale.shape)} {scale.dtype}" if isinstance(scale, torch.Tensor) else type(scale).__name__
    return ValueError(f"{name} must be float32 {list(shape)}, got {got}")


def check_fp8_layer(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w1_scale, w2_scale,
                    block_shape, gemm1_config: dict, gemm2_config: dict) -> tuple[int, int] | None:
    """Raise ValueError naming the argument unless the fp8 layer can run; returns block_shape
    as (block_n, block_k), or None for per-tensor scales."""
    if w1.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"w1_scale / w2_scale are for fp8 weights: w1 is {w1.dtype}, w2 is {w2.dtype}, both must "
                         f"be {FP8_DTYPE}")
    if hidden_states.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hidden_states must be bfloat16, float16 or float32 (they are quantized here), "
                         f"got {hidden_states.dtype}")
    block = None
    if block_shape is not None:
        values = list(block_shape) if isinstance(block_shape, (list, tuple)) else None
        if values is None or len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 16
                                                     or v & (v - 1) for v in values):
            raise ValueError(f"block_shape must be None or [block_n, block_k], two powers of two >= 16, "
                             f"got {block_shape!r}")
        block = (values[0], values[1])
    experts, two_n, k = w1.shape
    n = two_n // 2

    def blocks(rows: int, cols: int) -> tuple:
        return (experts,) if block is None else (experts, -(-rows // block[0]), -(-cols // block[1]))

    for name, scale, shape in (("w1_scale", w1_scale, blocks(two_n, k)), ("w2_scale", w2_scale, blocks(k, n))):
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != shape or scale.dtype != torch.float32:
            raise _scale_shape_error(name, scale, shape)
    check_block_k(block, gemm1_config, "GEMM 1's config")
    check_block_k(block, gemm2_config, "GEMM 2's config")
    return block


def run_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, aligned1: AlignedTokens, aligned2: AlignedTokens, gemm1_config: dict,
                gemm2_config: dict, switches: KernelSwitches = OFF, *, atomic_add: bool, out: torch.Tensor,
                weight_scale: float = 1.0, atomic_sem: str = "relaxed", num_programs: int | None = None,
                w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                block_shape: list[int] | tuple[int, int] | None = None, activation: str = "silu",
                combine: bool = True) -> torch.Tensor:
    """out [M, K] = the MoE layer's expert part; inputs validated as the layer does.

    aligned1 / aligned2: alignments of topk_ids at the configs' BLOCK_SIZE_M. With
    sorted_rows GEMM 2 runs on aligned1 (it reads GEMM 1's rows in that order), and
    aligned2 is not used.
    atomic_add: the fused variant; `out` is zeroed here and GEMM 2 adds into it (pass an
    fp32 buffer for fp32 accumulation and cast afterwards). Otherwise GEMM 2 stores
    [M, topk, K] and the reduce kernel sums it into `out`.
    num_programs: the persistent schedule's program count (default: one per SM; 4 under
    the interpreter).
    fp8: w1 [E, 2N, K] and w2 [E, K, N] float8_e4m3fn with w1_scale / w2_scale as
    moetune.quant.quantize_weights makes them (per expert [E] for block_shape None, per
    block_n x block_k block otherwise); hidden_states stay in the activation dtype, as does
    `out`. Both configs' BLOCK_SIZE_K must divide block_k.
    activation: "silu" or "gelu", of the gate (kernels/activation.py).
    combine=False (STORE only): `out` is [M, topk, K], each slot's output times its router
    weight, not summed; slots whose expert is not in [0, E) hold zeros.
    """
    check_activation(activation)
    if not combine and atomic_add:
        raise ValueError("combine=False needs the STORE epilogue: GEMM 2's atomic adds sum over top-k")
    switches.validate()
    switches.check_configs(gemm1_config, gemm2_config)
    fp8 = w1_scale is not None or w2_scale is not None or FP8_DTYPE in (w1.dtype, w2.dtype)
    if fp8:
        block = check_fp8_layer(hidden_states, w1, w2, w1_scale, w2_scale, block_shape, gemm1_config, gemm2_config)
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
    gemm1 = dict(common, topk=topk, a_rows_per_slot=topk, c_sorted=sorted_rows)
    gemm2 = dict(common, topk=topk, a_rows_per_slot=1, topk_weights=topk_weights, weight_scale=weight_scale,
                 a_sorted=sorted_rows, tma_activations=switches.tma_activations)
    a1 = hidden_states
    # The rows of GEMM 1's output that hold a slot of this rank (the others are never written,
    # so the activation skips them too: under expert parallelism, the other ranks' slots).
    live = LiveRows(aligned=aligned1, num_slots=slots) if sorted_rows else \
        LiveRows(slot_experts=topk_ids, num_experts=num_experts)
    if fp8:
        group = block[1] if block else None
        a1, a1_scale = quantize_per_token_group(hidden_states, group) if group else quantize_per_tensor(hidden_states)
        gemm1.update(a_scale=a1_scale, b_scale=w1_scale, block_shape=block)

    if switches.fuse_activation:
        gated = torch.empty(rows, two_n // 2, dtype=dtype, device=device)
        grouped_gemm(a1, w1, gated, aligned1, gemm1_config, fuse_activation=True, activation=activation, **gemm1)
        if fp8:
            gated, a2_scale = quantize_per_token_group(gated, group, live=live) if group else \
                quantize_per_tensor(gated, live=live)
    else:
        # Split-K leaves fp32 partials, which the activation kernel sums.
        gate_up = torch.empty(split_k, rows, two_n, dtype=torch.float32, device=device) if split_k > 1 else \
            torch.empty(rows, two_n, dtype=dtype, device=device)
        grouped_gemm(a1, w1, gate_up, aligned1, gemm1_config, **gemm1)
        if fp8:
            gated, a2_scale = silu_and_mul_fp8(gate_up, group, dtype=dtype, live=live, activation=activation)
        else:
            gated = silu_and_mul(gate_up, dtype=dtype, activation=activation, live=live)
    if fp8:
        gemm2.update(a_scale=a2_scale, b_scale=w2_scale, block_shape=block)

    if atomic_add:
        # Tokens whose experts all live on other ranks keep the zero; with split-K every
        # split adds its partial.
        out.zero_()
        grouped_gemm(gated, w2, out, aligned2, gemm2_config, atomic_add=True, atomic_sem=atomic_sem, **gemm2)
        return out
    if not combine:
        return _store_slots(gated, w2, aligned2, gemm2_config, gemm2, out, split_k)
    if split_k > 1:  # fp32 partials, summed by the top-k sum
        down = torch.empty(split_k, m, topk, k, dtype=torch.float32, device=device)
        grouped_gemm(gated, w2, down.view(split_k, slots, k), aligned2, gemm2_config, **gemm2)
    else:
        down = torch.empty(m, topk, k, dtype=dtype, device=device)
        grouped_gemm(gated, w2, down.view(slots, k), aligned2, gemm2_config, **gemm2)
    return topk_sum(down, topk_ids, num_experts, out)


def _store_slots(gated: torch.Tensor, w2: torch.Tensor, aligned2: AlignedTokens, gemm2_config: dict, gemm2: dict,
                 out: torch.Tensor, split_k: int) -> torch.Tensor:
    """GEMM 2 stores each slot's row into out [M, topk, K] (contiguous), no top-k sum. The
    GEMM never writes a slot whose expert lives on another rank: zeroed first."""
    m, topk, k = out.shape
    if split_k == 1:
        out.zero_()
        grouped_gemm(gated, w2, out.view(m * topk, k), aligned2, gemm2_config, **gemm2)
        return out
    partials = torch.zeros(split_k, m * topk, k, dtype=torch.float32, device=out.device)
    grouped_gemm(gated, w2, partials, aligned2, gemm2_config, **gemm2)
    return out.copy_(partials.sum(dim=0).view(m, topk, k))
