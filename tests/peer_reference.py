"""What the ported vLLM and SGLang tests compare with: the peers' naive torch MoE (a loop over
experts in the activation dtype, router weights applied after GEMM 2), their tolerances, and
the relative-norm check against moetune's float64 reference that we add to each.

Their absolute tolerances (2e-2 and 1e-2) exceed the outputs of their own inputs at the
interpreter's shapes (std 0.01 or 0.1 inputs give outputs of 1e-3 to 1e-8), so an all-zeros
output would pass them; the relative error of the norm would be 1 for it.
"""

from __future__ import annotations

import torch

from moetune.reference import gate_activation, relative_error

# Launch config for the interpreter: few programs (each runs in Python), one N tile of the
# small weights below.
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
          "num_stages": 2}


def softmax_topk(router_logits: torch.Tensor, topk: int, renormalize: bool = False):
    """The peers' routing: softmax in fp32, top-k, optionally renormalized."""
    weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def naive_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              activation: str = "silu", combine: bool = True) -> torch.Tensor:
    """Each slot's row through its expert in x's dtype, times its router weight, summed over
    top-k (or not, with combine=False: [M, topk, K]). Ids outside [0, E) give zero rows, as
    vLLM's reference treats the -1 of an expert map."""
    tokens, topk = ids.shape
    rows = x.repeat_interleave(topk, dim=0)
    flat_ids = ids.reshape(-1)
    n = w1.shape[1] // 2
    out = torch.zeros(tokens * topk, w2.shape[1], dtype=x.dtype)
    for expert in range(w1.shape[0]):
        mine = flat_ids == expert
        if mine.any():
            h = rows[mine] @ w1[expert].T
            out[mine] = (gate_activation(h[:, :n], activation) * h[:, n:]) @ w2[expert].T
    weighted = out.view(tokens, topk, -1) * weights.view(tokens, topk, 1).to(x.dtype)
    return weighted.sum(dim=1) if combine else weighted


def assert_matches(out: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor, *, atol: float, rtol: float,
                   tolerance: float) -> None:
    """The peer's check (assert_close against its naive reference) and ours (relative error
    of the norm against the float64 reference)."""
    assert out.shape == naive.shape == exact.shape
    assert out.dtype == naive.dtype
    torch.testing.assert_close(out, naive, atol=atol, rtol=rtol)
    error = relative_error(out, exact)
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"
