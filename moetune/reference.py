"""Float64 reference of the whole MoE layer, a plain loop over experts.

The tests compare the Triton layer with it, and the tuner's correctness gate rejects any
config whose result strays from it by more than the dtype's tolerance.
"""

from __future__ import annotations

import torch

# Relative error ||out - ref|| / ||ref|| allowed per dtype. bf16 keeps 8 mantissa bits and
# the layer rounds twice in between (GEMM 1 output, activation); fp32 matmuls may run as
# tf32 on the GPU.
TOLERANCE = {
    torch.float32: 5e-3,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def routing_reference(router_logits: torch.Tensor, topk: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(router_logits.double(), dim=-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def gate_activation(gate: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """silu(gate) or gelu(gate) (the exact erf form), as the kernels' activation names them."""
    if activation == "gelu":
        return torch.nn.functional.gelu(gate)
    if activation == "silu":
        return torch.nn.functional.silu(gate)
    raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")


def moe_reference(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    routed_scaling_factor: float | None = None,
    activation: str = "silu",
    combine: bool = True,
) -> torch.Tensor:
    """sum_k weight[m, k] * w2[e] @ (silu(w1[e, :N] @ x) * (w1[e, N:] @ x)), e = ids[m, k], in float64
    (gelu for silu with activation="gelu"); with combine=False the [M, topk, K] terms of that sum.

    Slots whose expert id falls outside [0, E) contribute nothing (expert parallelism).
    """
    # On the inputs' device: a GPU computes the float64 reference of large shapes in
    # seconds, where a CPU would take minutes. Weights are upcast one expert at a time.
    x = hidden_states.detach().double()
    weights = topk_weights.detach().double()
    ids = topk_ids.detach().long()
    num_experts, two_n, _ = w1.shape
    n = two_n // 2
    topk = ids.shape[1]
    out = torch.zeros(x.shape[0] * (1 if combine else topk), w2.shape[1], dtype=torch.float64, device=x.device)
    for expert in range(num_experts):
        token, k = torch.nonzero(ids == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token] @ w1[expert].detach().double().T
        act = gate_activation(h[:, :n], activation) * h[:, n:]
        y = (act @ w2[expert].detach().double().T) * weights[token, k][:, None]
        out.index_add_(0, token if combine else token * topk + k, y)
    if routed_scaling_factor is not None:
        out *= routed_scaling_factor
    return out if combine else out.view(x.shape[0], topk, -1)


def fused_moe_reference(hidden_states, w1, w2, router_logits, topk, *, renormalize=True, routed_scaling_factor=None,
                        activation="silu"):
    weights, ids = routing_reference(router_logits, topk, renormalize)
    return moe_reference(hidden_states, w1, w2, weights, ids, routed_scaling_factor, activation)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN or Inf anywhere in out gives inf."""
    out = out.detach().double().to(ref.device)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff
