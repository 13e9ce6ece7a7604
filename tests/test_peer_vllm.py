"""vLLM's MoE layer tests (tests/kernels/moe/test_moe.py), ported to moetune at interpreter sizes.

Ours                                  vLLM's
test_fused_moe_like_vllm[ep1-...]     test_fused_moe, ep_size 1: fused_moe(renormalize=False) on
                                      bf16 inputs scaled by 1/10 against its torch_moe loop,
                                      atol 2e-2, rtol 0 (M 1, E 8, top-k 2)
test_fused_moe_like_vllm[ep2-...]     test_fused_moe, ep_size 2: half the experts local, chosen as
                                      vLLM's test chooses them (torch.randint, so a global expert
                                      may be drawn twice and a local one left unmapped), routing
                                      over all E with top-k 6 > E/R (M 17); run with
                                      activation="gelu", which vLLM's fused_moe also takes, in
                                      GEMM 1's fused epilogue (switch fuse_activation)
test_mixtral_moe_like_vllm            test_mixtral_moe: a Mixtral sparse MoE block (bf16 router
                                      linear, softmax top-2 renormalized, experts w2(silu(w1 x) *
                                      w3 x)) in plain torch against fused_moe(renormalize=True),
                                      rtol = atol = 1e-2 for bf16

Each also checks the relative error of the norm against moetune's float64 reference
(tests/peer_reference.py says why). Both variants run; bf16's fused variant adds into an fp32
buffer (accumulation="fp32"), as Triton's interpreter has no bf16 atomic add.
"""

import pytest
import torch

from moetune import fused_moe
from moetune.reference import TOLERANCE, moe_reference
from tests.peer_reference import CONFIG, assert_matches, naive_moe, softmax_topk

N, K = 24, 40  # K, N: not multiples of the tiles (vLLM's 511 is not either)
DTYPE = torch.bfloat16


def vllm_expert_map(global_experts: int, ep_size: int, generator: torch.Generator):
    """vLLM's test: E / ep_size expert ids drawn with replacement, mapped to 0.. in draw order."""
    local = global_experts // ep_size
    drawn = torch.randint(0, global_experts, (local,), generator=generator)
    expert_map = torch.full((global_experts,), -1, dtype=torch.int32)
    expert_map[drawn] = torch.arange(local, dtype=torch.int32)
    return drawn, expert_map


@pytest.mark.parametrize("ep_size, M, topk, variant, activation, switches", [
    (1, 1, 2, "unfused", "silu", None),
    (2, 17, 6, "fused", "gelu", {"fuse_activation": True}),
], ids=["ep1-unfused-silu", "ep2-fused-gelu"])
def test_fused_moe_like_vllm(rng, poison_empty, ep_size, M, topk, variant, activation, switches):
    E = 8
    a = (torch.randn(M, K, generator=rng) / 10).to(DTYPE)
    w1 = (torch.randn(E, 2 * N, K, generator=rng) / 10).to(DTYPE)
    w2 = (torch.randn(E, K, N, generator=rng) / 10).to(DTYPE)
    score = torch.randn(M, E, generator=rng).to(DTYPE)
    expert_map = None
    if ep_size > 1:
        drawn, expert_map = vllm_expert_map(E, ep_size, rng)
        w1, w2 = w1[drawn], w2[drawn]

    out = fused_moe(a, w1, w2, score, topk, renormalize=False, global_num_experts=E, expert_map=expert_map,
                    activation=activation, variant=variant, config=CONFIG, accumulation="fp32", switches=switches)

    weights, ids = softmax_topk(score, topk)
    local_ids = ids if expert_map is None else expert_map[ids]  # -1: another rank's expert
    assert_matches(out, naive_moe(a, w1, w2, weights, local_ids, activation),
                   moe_reference(a, w1, w2, weights, local_ids, activation=activation),
                   atol=2e-2, rtol=0, tolerance=TOLERANCE[DTYPE])


def mixtral_block(x, gate, w1, w3, w2, topk=2):
    """A Mixtral sparse MoE block in plain torch: the router linear in x's dtype, softmax in
    fp32, top-2 renormalized and cast back, each expert w2 @ (silu(w1 @ x) * (w3 @ x))."""
    weights, ids = softmax_topk(x @ gate.T, topk, renormalize=True)
    out = torch.zeros_like(x)
    for expert in range(gate.shape[0]):
        token, slot = torch.nonzero(ids == expert, as_tuple=True)
        if token.numel():
            rows = x[token]
            y = (torch.nn.functional.silu(rows @ w1[expert].T) * (rows @ w3[expert].T)) @ w2[expert].T
            out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
    return out


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_mixtral_moe_like_vllm(rng, poison_empty, variant):
    E, hidden, intermediate, tokens = 8, K, N, 6

    def linear(rows, cols):  # nn.Linear's default initialisation
        bound = cols ** -0.5
        return ((torch.rand(rows, cols, generator=rng) * 2 - 1) * bound).to(DTYPE)

    gate = linear(E, hidden)
    w1, w3 = (torch.stack([linear(intermediate, hidden) for _ in range(E)]) for _ in range(2))
    w2 = torch.stack([linear(hidden, intermediate) for _ in range(E)])
    x = torch.randn(tokens, hidden, generator=rng).to(DTYPE)

    # vLLM's MixtralMoE: the router linear, then the fused layer on [w1; w3] stacked per expert.
    w13 = torch.cat([w1, w3], dim=1)
    out = fused_moe(x, w13, w2, x @ gate.T, 2, renormalize=True, variant=variant, config=CONFIG,
                    accumulation="fp32")

    weights, ids = softmax_topk(x @ gate.T, 2, renormalize=True)
    assert_matches(out, mixtral_block(x, gate, w1, w3, w2), moe_reference(x, w13, w2, weights, ids),
                   atol=1e-2, rtol=1e-2, tolerance=TOLERANCE[DTYPE])
