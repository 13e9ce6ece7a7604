"""The rest of the frameworks' fused_experts / fused_moe surface, against the float64 reference:
expert parallelism through an expert map, the router weight on the input, in-place output,
the uncombined [M, top-k, K] output, DeepSeek-V3 routing; and their bad input, named before
anything runs. tests/test_peer_vllm.py and tests/test_peer_sglang.py run the frameworks' own
test cases, GeLU among them."""

import pytest
import torch

from moetune import fused_experts, fused_moe
from moetune.kernels.routing import select_experts
from moetune.reference import TOLERANCE, moe_reference, relative_error
from tests.moe_inputs import make_weights

N, K = 12, 20
CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}
DTYPE = torch.float32  # the interpreter's fp32 path covers both variants


def ep_rank(global_experts: int, ranks: int, rank: int) -> torch.Tensor:
    """vLLM's layout: rank r holds experts [r * E/R, (r + 1) * E/R) as local 0.. E/R - 1."""
    local = global_experts // ranks
    expert_map = torch.full((global_experts,), -1, dtype=torch.int32)
    expert_map[rank * local:(rank + 1) * local] = torch.arange(local, dtype=torch.int32)
    return expert_map


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_expert_parallel_ranks_add_up_to_the_whole_layer(rng, poison_empty, variant):
    """Top-k 6 over 8 global experts, 4 local per rank: more than a rank holds, as the
    frameworks allow. Each rank computes only its experts' share; the shares sum to the
    full layer, and each share matches the reference with the other rank's slots dropped."""
    M, E, topk, ranks = 9, 8, 6, 2
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(E, N, K, DTYPE, rng)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), topk, True)
    ids[0] = torch.tensor([4, 5, 6, 7, 4, 5], dtype=torch.int32)[:topk]  # token 0 never visits rank 0
    total = torch.zeros(M, K, dtype=torch.float64)
    for rank in range(ranks):
        expert_map = ep_rank(E, ranks, rank)
        local = slice(rank * 4, (rank + 1) * 4)
        out = fused_experts(x, w1[local], w2[local], weights, ids, variant=variant, config=CFG,
                            expert_map=expert_map, global_num_experts=E)
        mine = torch.where(expert_map[ids.long()] >= 0, expert_map[ids.long()], -1)
        expected = moe_reference(x, w1[local], w2[local], weights, mine)
        assert relative_error(out, expected) <= TOLERANCE[DTYPE]
        if rank == 0:
            assert torch.equal(out[0], torch.zeros(K, dtype=DTYPE))  # a token with no local expert adds nothing
        total += out.double()
    assert relative_error(total, moe_reference(x, w1, w2, weights, ids)) <= TOLERANCE[DTYPE]


def test_a_rank_that_receives_no_tokens_returns_zeros(rng, poison_empty):
    x = torch.randn(4, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(2, N, K, DTYPE, rng)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    ids[:, 1] = 1  # every slot goes to experts 0 and 1, which live on rank 0
    weights = torch.full((4, 2), 0.5)
    out = fused_experts(x, w1, w2, weights, ids, variant="unfused", config=CFG, expert_map=ep_rank(4, 2, 1))
    assert torch.equal(out, torch.zeros_like(out))


def test_fused_moe_routes_over_all_global_experts(rng, poison_empty):
    M, E, topk = 6, 8, 3
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(E, N, K, DTYPE, rng)
    logits = torch.randn(M, E, generator=rng)
    expert_map = ep_rank(E, 2, 1)
    out = fused_moe(x, w1[4:], w2[4:], logits, topk, config=CFG, variant="unfused", expert_map=expert_map)
    weights, ids = select_experts(logits, topk, True)
    mine = torch.where(expert_map[ids.long()] >= 0, expert_map[ids.long()], -1)
    assert relative_error(out, moe_reference(x, w1[4:], w2[4:], weights, mine)) <= TOLERANCE[DTYPE]


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_router_weight_on_the_input(rng, poison_empty, variant):
    M, E = 7, 4
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(E, N, K, DTYPE, rng)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), 1, False)
    out = fused_experts(x, w1, w2, weights, ids, variant=variant, config=CFG, apply_router_weight_on_input=True)
    # The weight scales GEMM 1's input: silu is not linear, so this differs from weighting the output.
    expected = moe_reference(x * weights.to(DTYPE), w1, w2, torch.ones_like(weights), ids)
    assert relative_error(out, expected) <= TOLERANCE[DTYPE]
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) > 10 * TOLERANCE[DTYPE]


@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_inplace_writes_the_result_into_the_input(rng, variant):
    M, E, topk = 5, 4, 2
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(E, N, K, DTYPE, rng)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), topk, True)
    expected = moe_reference(x, w1, w2, weights, ids)
    result = fused_experts(x, w1, w2, weights, ids, variant=variant, config=CFG, inplace=True)
    assert result is x
    assert relative_error(x, expected) <= TOLERANCE[DTYPE]


def test_no_combine_under_expert_parallelism_keeps_each_slot_apart(rng, poison_empty):
    """Each slot's router-weighted output, scaled; another rank's slots are zeros. Split-K's
    fp32 partials are summed per slot."""
    M, E, topk = 5, 8, 3
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(4, N, K, DTYPE, rng)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), topk, True)
    expert_map = ep_rank(E, 2, 1)
    out = fused_experts(x, w1, w2, weights, ids, config=CFG, expert_map=expert_map, no_combine=True,
                        routed_scaling_factor=2.0, switches={"split_k": 2})
    mine = expert_map[ids.long()]
    expected = moe_reference(x, w1, w2, weights, mine, routed_scaling_factor=2.0, combine=False)
    assert out.shape == (M, topk, K)
    assert relative_error(out, expected) <= TOLERANCE[DTYPE]
    assert torch.equal(out[mine < 0], torch.zeros_like(out[mine < 0]))
    assert relative_error(out.sum(dim=1), moe_reference(x, w1, w2, weights, mine, 2.0)) <= TOLERANCE[DTYPE]


def test_deepseek_routing_through_fused_moe(rng, poison_empty):
    M, E, topk = 6, 16, 4
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(E, N, K, DTYPE, rng)
    logits, bias = torch.randn(M, E, generator=rng), torch.randn(E, generator=rng) * 0.3
    routing = dict(scoring_func="sigmoid", e_score_correction_bias=bias, num_expert_group=4, topk_group=2)
    out = fused_moe(x, w1, w2, logits, topk, use_grouped_topk=True, config=CFG, variant="unfused", **routing)
    weights, ids = select_experts(logits, topk, True, **routing)
    assert relative_error(out, moe_reference(x, w1, w2, weights, ids)) <= TOLERANCE[DTYPE]


def _inputs(rng, M=3, E=4, topk=2):
    x = torch.randn(M, K, generator=rng, dtype=DTYPE)
    w1, w2 = make_weights(E, N, K, DTYPE, rng)
    weights, ids = select_experts(torch.randn(M, E, generator=rng), topk, True)
    return x, w1, w2, weights, ids


@pytest.mark.parametrize("kwargs, words", [
    ({"expert_map": torch.zeros(8, dtype=torch.float32)}, "expert_map must be a 1-D int32/int64"),
    ({"expert_map": torch.zeros(8, 1, dtype=torch.int32)}, "expert_map must be a 1-D"),
    ({"expert_map": torch.tensor([0, 1, 2, 3, 4, -1, -1, -1], dtype=torch.int32)}, r"local ids in \[0, 4\)"),
    ({"expert_map": torch.tensor([0, 1, 2, 3, -2, -1, -1, -1], dtype=torch.int32)}, "got values in"),
    ({"expert_map": torch.tensor([0, 1, 2, 3], dtype=torch.int32), "global_num_experts": 8}, "4 entries"),
    ({"global_num_experts": 8}, "pass the expert_map"),
    ({"global_num_experts": 0}, "global_num_experts must be a positive int"),
    ({"apply_router_weight_on_input": True}, "top-k = 1"),
    ({"inplace": True, "out": "given"}, "do not pass out"),
    ({"activation": "relu"}, "activation must be one of 'silu', 'gelu', got 'relu'"),
    ({"no_combine": True, "inplace": True}, "do not pass inplace=True"),
    ({"no_combine": True, "out": "given"}, "do not pass out"),
    ({"no_combine": True, "variant": "fused"}, "needs the unfused variant"),
])
def test_bad_surface_arguments_are_named(rng, kwargs, words):
    x, w1, w2, weights, ids = _inputs(rng)
    if kwargs.get("out") == "given":
        kwargs = dict(kwargs, out=torch.empty_like(x))
    with pytest.raises(ValueError, match=words):
        fused_experts(x, w1, w2, weights, ids, config=CFG, **{"variant": "unfused", **kwargs})


@pytest.mark.parametrize("kwargs, words", [
    ({"num_expert_group": 2, "topk_group": 1}, "use_grouped_topk=True"),
    ({"use_grouped_topk": True}, "needs num_expert_group"),
    ({"use_grouped_topk": True, "num_expert_group": 3, "topk_group": 1}, "must divide"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"activation": "swiglu"}, "activation must be one of"),
])
def test_bad_routing_through_fused_moe_is_named(rng, kwargs, words):
    x, w1, w2, _, _ = _inputs(rng)
    with pytest.raises(ValueError, match=words):
        fused_moe(x, w1, w2, torch.randn(3, 4, generator=rng), 2, config=CFG, **kwargs)
