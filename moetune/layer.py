"""The public MoE layer: fused_experts / fused_moe. Validates input, picks configs, runs the kernels.

Data path: align token slots per expert -> GEMM 1 (w1, gate+up) -> SiLU-and-mul (or
GeLU-and-mul) -> GEMM 2 (w2, times router weight) -> sum over top-k. The last step has two
variants:
  "unfused": GEMM 2 stores [M, topk, K] and a reduce kernel sums in fp32;
  "fused":   GEMM 2 atomically adds into out[M, K] (zeroed first), no reduce kernel.
no_combine returns the unfused variant's [M, topk, K] without the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .device import INTERPRET_ENV, interpreter_enabled
from .expert_map import check_expert_map, local_expert_ids
from .kernels import align_tokens, run_experts, select_experts
from .kernels.activation import check_activation
from .kernels.routing import check_routing
from .loader import get_config, warn_once
from .quant import FP8_DTYPE, check_block_shape
from .tables import FP8_W8A8, TORCH_DTYPES
from .types import OFF, LaunchConfig, Switches, SwitchError, Variant, unknown_keys

ACTIVATION_DTYPES = tuple(TORCH_DTYPES.values())  # torch dtypes the layer computes in
ACCUMULATIONS = (None, "fp32")


def _check_tensor(name: str, tensor: Any, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def _check_output_options(activation, no_combine, inplace, out, variant) -> None:
    """The activation and the output's form, checked before routing or any kernel."""
    check_activation(activation)
    if not isinstance(no_combine, bool):
        raise TypeError(f"no_combine must be a bool, got {no_combine!r}")
    if not no_combine:
        return
    if inplace:
        raise ValueError("no_combine=True returns [M, top-k, K], which cannot be written into hidden_states: "
                         "do not pass inplace=True as well")
    if out is not None:
        raise ValueError("no_combine=True returns a new [M, top-k, K] tensor: do not pass out as well")
    if variant is not None and Variant.parse(variant) is not Variant.UNFUSED:
        raise ValueError(f"no_combine=True needs the unfused variant (its GEMM 2 stores each slot's row), "
                         f"got variant={variant!r}")


def _check_inputs(hidden_states, w1, w2, topk_weights, topk_ids, out, global_experts: int) -> None:
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
    if hidden_states.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"hidden_states dtype {hidden_states.dtype} is not supported; use bf16, fp16 or fp32")
    for name, tensor in (("w1", w1), ("w2", w2)):
        if tensor.dtype != hidden_states.dtype and tensor.dtype != FP8_DTYPE:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from hidden_states dtype {hidden_states.dtype} "
                            f"(or is fp8 e4m3 with w1_scale / w2_scale)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
    topk = topk_ids.shape[1]
    if topk_ids.shape[0] != m:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must have M = {m} rows like hidden_states")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must have the shape of topk_ids {tuple(topk_ids.shape)}")
    if not 1 <= topk <= global_experts:
        raise ValueError(f"top-k = {topk} must be between 1 and the number of experts E = {global_experts}")
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


def _select_configs(hidden_states, w1, topk, variant, config, down_config, deterministic, fp8: bool = False,
                    block_shape=None):
    """The (GEMM 1 config, GEMM 2 config, variant, switches) to run: given, or from the
    tuned tables. fp8 weights take a table of the same quant mode (`block_shape`: their
    scale blocks), else the default heuristic with BLOCK_SIZE_K cut to lie within one block."""
    if config is None and down_config is None:
        m, k = hidden_states.shape
        e, two_n, _ = w1.shape
        selection = get_config(e, two_n // 2, k, topk, FP8_W8A8 if fp8 else hidden_states.dtype, m,
                               variant=variant, deterministic=deterministic, block_shape=block_shape if fp8 else None)
        return selection.gemm1, selection.gemm2, selection.variant, selection.switches
    if config is None:
        raise ValueError("down_config was given without config; pass both or neither")
    gemm1 = _given_config(config, "config")
    gemm2 = _given_config(down_config, "down_config") if down_config is not None else gemm1
    return gemm1, gemm2, variant or Variant.UNFUSED, OFF


def _given_switches(switches: Switches | Mapping, gemm1: LaunchConfig, gemm2: LaunchConfig) -> Switches:
    if not isinstance(switches, Switches):
        switches = Switches.from_json(switches)
    problem = switches.config_problem(gemm1, gemm2)
    if problem is not None:
        raise SwitchError(problem)
    return switches


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
    expert_map: torch.Tensor | None = None,
    global_num_experts: int | None = None,
    apply_router_weight_on_input: bool = False,
    inplace: bool = False,
    switches: Switches | Mapping | None = None,
    use_fp8_w8a8: bool | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
    activation: str = "silu",
    no_combine: bool = False,
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
    expert_map / global_num_experts: expert parallelism as vLLM names it. topk_ids then hold
        global expert ids in [0, global_num_experts); expert_map [global_num_experts] maps
        each to its local index in w1/w2, or to -1 for an expert on another rank: such slots
        cost no GEMM work and add nothing. Tables are looked up for the local shape.
    apply_router_weight_on_input: multiply each token's input by its router weight before
        GEMM 1 instead of GEMM 2's output by it (top-k must be 1).
    inplace: write the result into hidden_states (and return it).
    switches: kernel switches (moetune.Switches or its JSON form) for the given configs;
        None takes the table's with its configs, all off with given configs.
    use_fp8_w8a8 / w1_scale / w2_scale / block_shape: fp8 e4m3 weights with their scales,
        as moetune.quantize_weights makes them and vLLM and SGLang name them: per expert
        ([E]) with block_shape None, else per block_n x block_k block ([E, ceil(2N/bn),
        ceil(K/bk)] and [E, ceil(K/bn), ceil(N/bk)]). Activations are quantized on the fly
        (per tensor, or per token and group of block_k columns); out keeps hidden_states'
        dtype. use_fp8_w8a8 None infers it from the weights' dtype.
    activation: "silu" (silu(gate) * up) or "gelu" (gelu(gate) * up, gelu's exact erf form
        as vLLM's GeluAndMul and SGLang's gelu_and_mul compute it).
    no_combine: return [M, topk, K], each slot's expert output times its router weight (and
        routed_scaling_factor, so that the sum over top-k is the combined output; SGLang
        leaves that factor out), zeros for slots of experts on other ranks. Runs the
        unfused variant's GEMM 2 store and skips the top-k sum; the fused variant, inplace
        and out are refused with it.
    Returns out [M, K] (or [M, topk, K]) in the input dtype.
    """
    if variant is not None:
        variant = Variant.parse(variant)
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation must be None or 'fp32', got {accumulation!r}")
    if routed_scaling_factor is not None and not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor must be a number, got {routed_scaling_factor!r}")
    fp8 = _fp8_requested(use_fp8_w8a8, w1, w2, w1_scale, w2_scale, block_shape)
    _check_output_options(activation, no_combine, inplace, out, variant)
    if no_combine:
        variant = Variant.UNFUSED
    if inplace:
        if out is not None:
            raise ValueError("inplace=True writes into hidden_states: do not pass out as well")
        out = hidden_states
    global_experts = check_expert_map(expert_map, global_num_experts, w1)
    _check_inputs(hidden_states, w1, w2, topk_weights, topk_ids, out, global_experts)
    if apply_router_weight_on_input:
        if topk_ids.shape[1] != 1:
            raise ValueError(f"apply_router_weight_on_input needs top-k = 1, got top-k = {topk_ids.shape[1]}")
        # The weight scales the token's input; GEMM 2 then multiplies by one.
        hidden_states = (hidden_states * topk_weights.to(hidden_states.dtype)).to(hidden_states.dtype)
        topk_weights = torch.ones_like(topk_weights)
    if expert_map is not None:
        topk_ids = local_expert_ids(topk_ids, expert_map)
    m, k = hidden_states.shape
    num_experts = w1.shape[0]
    topk = topk_ids.shape[1]
    if out is None:
        shape = (m, topk, k) if no_combine else (m, k)
        out = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device)
    if m == 0:
        return out
    gemm1, gemm2, variant, chosen = _select_configs(hidden_states, w1, topk, variant, config, down_config,
                                                    deterministic, fp8, block_shape)
    switches = chosen if switches is None else _given_switches(switches, gemm1, gemm2)

    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    aligned1, aligned2 = align_for(topk_ids, num_experts, gemm1, gemm2)
    return run_aligned(hidden_states, w1, w2, topk_weights, topk_ids, aligned1, aligned2, gemm1, gemm2,
                       variant=variant, routed_scaling_factor=routed_scaling_factor, out=out,
                       accumulation=accumulation, switches=switches,
                       fp8=Fp8Weights(w1_scale, w2_scale, block_shape) if fp8 else None,
                       activation=activation, combine=not no_combine)


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


@dataclass(frozen=True)
class Fp8Weights:
    """The scales of fp8 weights and their block shape (None: one scale per expert)."""

    w1_scale: torch.Tensor
    w2_scale: torch.Tensor
    block_shape: list[int] | None

    def kernel_arguments(self) -> dict:
        return {"w1_scale": self.w1_scale, "w2_scale": self.w2_scale, "block_shape": self.block_shape}


def _fp8_requested(use_fp8_w8a8, w1, w2, w1_scale, w2_scale, block_shape) -> bool:
    """Whether the weights are fp8, checked against what the caller says and passes."""
    fp8_weights = [isinstance(w, torch.Tensor) and w.dtype == FP8_DTYPE for w in (w1, w2)]
    fp8 = all(fp8_weights) if use_fp8_w8a8 is None else bool(use_fp8_w8a8)
    if fp8 and not all(fp8_weights):
        raise TypeError(f"use_fp8_w8a8 needs w1 and w2 in {FP8_DTYPE}, got {w1.dtype} and {w2.dtype}")
    if not fp8 and any(fp8_weights):
        raise TypeError("w1 and w2 must both be fp8 e4m3 (with w1_scale and w2_scale) or neither")
    if fp8 and (w1_scale is None or w2_scale is None):
        raise ValueError("fp8 weights need w1_scale and w2_scale")
    if not fp8 and (w1_scale is not None or w2_scale is not None or block_shape is not None):
        raise ValueError("w1_scale, w2_scale and block_shape are for fp8 weights only")
    check_block_shape(block_shape)
    return fp8


def run_aligned(hidden_states, w1, w2, topk_weights, topk_ids, aligned1, aligned2, gemm1, gemm2, *,
                variant, routed_scaling_factor=None, out=None, accumulation=None, atomic_sem="relaxed",
                switches: Switches = OFF, fp8: Fp8Weights | None = None, activation: str = "silu",
                combine: bool = True):
    """The layer after alignment, on validated input; combine=False (unfused only) returns
    out [M, topk, K] without the top-k sum.

    `moetune compare` times this alone, routing and alignment outside, so that its timings
    compare with other MoE kernels timed that way. The tuner's pair choice times alignment
    with it, since a pair whose GEMMs differ in BLOCK_SIZE_M pays for two alignments.
    """
    m, k = hidden_states.shape
    gemm1, gemm2 = _kernel_config(gemm1), _kernel_config(gemm2)
    if out is None:
        shape = (m, k) if combine else (m, topk_ids.shape[1], k)
        out = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device)
    scale = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    quantized = fp8.kernel_arguments() if fp8 is not None else {}
    if Variant(variant) is Variant.UNFUSED:
        return run_experts(hidden_states, w1, w2, topk_weights, topk_ids, aligned1, aligned2, gemm1, gemm2,
                           switches, atomic_add=False, out=out, weight_scale=scale, activation=activation,
                           combine=combine, **quantized)
    # Fused: every (token, k) slot adds into the zeroed target; tokens whose experts all
    # live on other ranks keep the zero.
    target = out if accumulation is None or out.dtype == torch.float32 else \
        torch.empty(m, k, dtype=torch.float32, device=out.device)
    run_experts(hidden_states, w1, w2, topk_weights, topk_ids, aligned1, aligned2, gemm1, gemm2, switches,
                atomic_add=True, out=target, weight_scale=scale, atomic_sem=atomic_sem, activation=activation,
                combine=combine, **quantized)
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
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Routing, then fused_experts(**kwargs).

    Routing as vLLM and SGLang name it: scores by `scoring_func` ("softmax" or "sigmoid"),
    `e_score_correction_bias` added to choose by, and with `use_grouped_topk` each token
    limited to its best `topk_group` of `num_expert_group` expert groups (DeepSeek-V3);
    weights renormalized over the top-k when `renormalize`. Under expert parallelism
    (`expert_map` in kwargs) router_logits cover all global experts.
    """
    _check_output_options(kwargs.get("activation", "silu"), kwargs.get("no_combine", False),
                          kwargs.get("inplace", False), kwargs.get("out"), kwargs.get("variant"))
    _check_tensor("router_logits", router_logits, 2)
    _check_tensor("w1", w1, 3)
    _check_tensor("hidden_states", hidden_states, 2)
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {topk!r}")
    num_experts = check_expert_map(kwargs.get("expert_map"), kwargs.get("global_num_experts"), w1)
    if tuple(router_logits.shape) != (hidden_states.shape[0], num_experts):
        raise ValueError(f"router_logits {tuple(router_logits.shape)} must be [M, E] = "
                         f"{(hidden_states.shape[0], num_experts)}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"top-k = {topk} must be between 1 and the number of experts E = {num_experts}")
    if not use_grouped_topk and (num_expert_group is not None or topk_group is not None):
        raise ValueError("num_expert_group and topk_group need use_grouped_topk=True")
    if use_grouped_topk and (num_expert_group is None or topk_group is None):
        raise ValueError("use_grouped_topk=True needs num_expert_group and topk_group")
    routing = dict(scoring_func=scoring_func, e_score_correction_bias=e_score_correction_bias,
                   num_expert_group=num_expert_group, topk_group=topk_group)
    check_routing(num_experts, topk, **routing)
    topk_weights, topk_ids = select_experts(router_logits, topk, renormalize, **routing)
    return fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, **kwargs)
