"""The public MoE layer: fused_experts / fused_moe. Validates input, picks configs, runs the kernels.

Data path: align token slots per expert -> GEMM 1 (w1, gate+up) -> SiLU-and-mul ->
GEMM 2 (w2, times router weight) -> sum over top-k. The last step has two variants:
  "unfused": GEMM 2 stores [M, topk, K] and a reduce kernel sums in fp32;
  "fused":   GEMM 2 atomically adds into out[M, K] (zeroed first), no reduce kernel.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .device import INTERPRET_ENV, interpreter_enabled
from .kernels import align_tokens, grouped_gemm, select_experts, silu_and_mul, topk_sum
from .loader import get_config, warn_once
from .tables import TORCH_DTYPES
from .types import LaunchConfig, Variant, unknown_keys

DTYPES = tuple(TORCH_DTYPES.values())
ACCUMULATIONS = (None, "fp32")


def _check_tensor(name: str, tensor: Any, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def _check_inputs(hidden_states, w1, w2, topk_weights, topk_ids, out) -> None:
    _check_tensor("hidden_states", hidden_states, 2)
    _check_tensor("w1", w1, 3)
    _check_tensor("w2", w2, 3)
    _check_tensor("topk_weights", topk_weights, 2)
    _check_tensor("topk_ids", topk_ids, 2)
    m, k = hidden_states.shape
    e, two_n, k1 = w1.shape
    if k1 != k:
        raise ValueError(f"w1 {tuple(w1.shape)} must be [E, 2N, K] with K = hidden_states.shape[1] = {k}")
    if two_n % 2:
        raise ValueError(f"w1.shape[1] = {two_n} must be even: gate and up projections of N rows each")
    if tuple(w2.shape) != (e, k, two_n // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} must be [E, K, N] = {(e, k, two_n // 2)} to match w1 {tuple(w1.shape)}")
    if hidden_states.dtype not in DTYPES:
        raise TypeError(f"hidden_states dtype {hidden_states.dtype} is not supported; use bf16, fp16 or fp32")
    for name, tensor in (("w1", w1), ("w2", w2)):
        if tensor.dtype != hidden_states.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from hidden_states dtype {hidden_states.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
    topk = topk_ids.shape[1]
    if topk_ids.shape[0] != m:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must have M = {m} rows like hidden_states")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must have the shape of topk_ids {tuple(topk_ids.shape)}")
    if not 1 <= topk <= e:
        raise ValueError(f"top-k = {topk} must be between 1 and the number of experts E = {e}")
    if out is not None:
        _check_tensor("out", out, 2)
        if tuple(out.shape) != (m, k) or out.dtype != hidden_states.dtype:
            raise ValueError(f"out must be {(m, k)} {hidden_states.dtype}, got {tuple(out.shape)} {out.dtype}")
    tensors = {"hidden_states": hidden_states, "w1": w1, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
    if out is not None:
        tensors["out"] = out
    device = hidden_states.device
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but hidden_states is on {device}")
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"tensors are on {device}: the kernels need a CUDA device, or Triton's interpreter on the "
                         f"CPU (set {INTERPRET_ENV}=1 before moetune's kernels are first imported)")


def _given_config(config: LaunchConfig | Mapping, what: str) -> LaunchConfig:
    """A config passed in; a key the kernel does not know is ignored with a warning (once)."""
    if isinstance(config, LaunchConfig):
        return config
    checked = LaunchConfig.from_json(config, what, unknown="ignore")
    for key in unknown_keys(config):
        warn_once(f"unknown key:{key}", f"{what}[{key!r}]: the kernel has no such launch config key; ignoring it")
    return checked


def _select_configs(hidden_states, w1, topk, variant, config, down_config, deterministic):
    """The (GEMM 1 config, GEMM 2 config, variant) to run: given, or from the tuned tables."""
    if config is None and down_config is None:
        m, k = hidden_states.shape
        e, two_n, _ = w1.shape
        selection = get_config(e, two_n // 2, k, topk, hidden_states.dtype, m,
                               variant=variant, deterministic=deterministic)
        return selection.gemm1, selection.gemm2, selection.variant
    if config is None:
        raise ValueError("down_config was given without config; pass both or neither")
    gemm1 = _given_config(config, "config")
    gemm2 = _given_config(down_config, "down_config") if down_config is not None else gemm1
    return gemm1, gemm2, variant or Variant.UNFUSED


def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    variant: str | Variant | None = None,
    config: LaunchConfig | Mapping | None = None,
    down_config: LaunchConfig | Mapping | None = None,
    routed_scaling_factor: float | None = None,
    out: torch.Tensor | None = None,
    accumulation: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """The MoE layer given the routing: hidden_states [M, K], w1 [E, 2N, K], w2 [E, K, N].

    variant: "unfused" or "fused"; None takes the tuned table's winner for this M (or
        "unfused" when `config` is given).
    config / down_config: launch configs of GEMM 1 / GEMM 2 (LaunchConfigs, or dicts of the
        six keys; other keys are ignored with a warning); down_config defaults to config;
        without either, the dispatcher picks them from the tables (the default heuristic
        serves a shape no table has, for the variant asked).
    routed_scaling_factor: multiplies the output (applied with the router weight).
    accumulation: "fp32" makes the fused variant add into an fp32 buffer and cast once,
        which matches the unfused result; None adds in the output dtype.
    deterministic: never pick the atomic (fused) path when choosing from the tables.
    Returns out [M, K] in the input dtype.
    """
    if variant is not None:
        variant = Variant.parse(variant)
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation must be None or 'fp32', got {accumulation!r}")
    if routed_scaling_factor is not None and not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor must be a number, got {routed_scaling_factor!r}")
    _check_inputs(hidden_states, w1, w2, topk_weights, topk_ids, out)
    m, k = hidden_states.shape
    num_experts = w1.shape[0]
    topk = topk_ids.shape[1]
    if out is None:
        out = torch.empty(m, k, dtype=hidden_states.dtype, device=hidden_states.device)
    if m == 0:
        return out
    gemm1, gemm2, variant = _select_configs(hidden_states, w1, topk, variant, config, down_config, deterministic)

    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    aligned1, aligned2 = align_for(topk_ids, num_experts, gemm1, gemm2)
    return run_aligned(hidden_states, w1, w2, topk_weights, topk_ids, aligned1, aligned2, gemm1, gemm2,
                       variant=variant, routed_scaling_factor=routed_scaling_factor, out=out,
                       accumulation=accumulation)


def _kernel_config(config: LaunchConfig | Mapping) -> Mapping[str, int]:
    """The form the kernels take: a dict of the six keys (they import nothing from moetune)."""
    return config.to_json() if isinstance(config, LaunchConfig) else config


def align_for(topk_ids: torch.Tensor, num_experts: int, gemm1: LaunchConfig | Mapping, gemm2: LaunchConfig | Mapping):
    """Alignments for GEMM 1 and GEMM 2: one when their BLOCK_SIZE_M agree, else two."""
    block1, block2 = _kernel_config(gemm1)["BLOCK_SIZE_M"], _kernel_config(gemm2)["BLOCK_SIZE_M"]
    aligned1 = align_tokens(topk_ids, num_experts, block1)
    if block2 == block1:
        return aligned1, aligned1
    return aligned1, align_tokens(topk_ids, num_experts, block2)


def run_aligned(hidden_states, w1, w2, topk_weights, topk_ids, aligned1, aligned2, gemm1, gemm2, *,
                variant, routed_scaling_factor=None, out=None, accumulation=None, atomic_sem="relaxed"):
    """The layer after alignment, on validated input.

    `moetune compare` times this alone, routing and alignment outside, so that its timings
    compare with other MoE kernels timed that way. The tuner's pair choice times alignment
    with it, since a pair whose GEMMs differ in BLOCK_SIZE_M pays for two alignments.
    """
    m, k = hidden_states.shape
    num_experts, two_n, _ = w1.shape
    topk = topk_ids.shape[1]
    gemm1, gemm2 = _kernel_config(gemm1), _kernel_config(gemm2)
    if out is None:
        out = torch.empty(m, k, dtype=hidden_states.dtype, device=hidden_states.device)
    scale = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)

    gate_up = torch.empty(m * topk, two_n, dtype=hidden_states.dtype, device=hidden_states.device)
    grouped_gemm(hidden_states, w1, gate_up, aligned1, gemm1, topk=topk, a_rows_per_slot=topk)
    activation = silu_and_mul(gate_up)

    if Variant(variant) is Variant.UNFUSED:
        down = torch.empty(m, topk, k, dtype=hidden_states.dtype, device=hidden_states.device)
        grouped_gemm(activation, w2, down.view(m * topk, k), aligned2, gemm2, topk=topk, a_rows_per_slot=1,
                     topk_weights=topk_weights, weight_scale=scale)
        return topk_sum(down, topk_ids, num_experts, out)

    # Fused: every (token, k) slot adds into out[token]; tokens whose experts all live on
    # other ranks keep the zero.
    target = out if accumulation is None or out.dtype == torch.float32 else \
        torch.empty(m, k, dtype=torch.float32, device=out.device)
    target.zero_()
    grouped_gemm(activation, w2, target, aligned2, gemm2, topk=topk, a_rows_per_slot=1,
                 topk_weights=topk_weights, weight_scale=scale, atomic_add=True, atomic_sem=atomic_sem)
    if target is not out:
        out.copy_(target)
    return out


def fused_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    topk: int,
    *,
    renormalize: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """Routing (softmax, top-k, optional renormalisation) then fused_experts(**kwargs)."""
    _check_tensor("router_logits", router_logits, 2)
    _check_tensor("w1", w1, 3)
    _check_tensor("hidden_states", hidden_states, 2)
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {topk!r}")
    num_experts = w1.shape[0]
    if tuple(router_logits.shape) != (hidden_states.shape[0], num_experts):
        raise ValueError(f"router_logits {tuple(router_logits.shape)} must be [M, E] = "
                         f"{(hidden_states.shape[0], num_experts)}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"top-k = {topk} must be between 1 and the number of experts E = {num_experts}")
    topk_weights, topk_ids = select_experts(router_logits, topk, renormalize)
    return fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, **kwargs)
