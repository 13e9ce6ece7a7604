"""Routing against a per-token float64 loop: softmax and sigmoid scores, the correction bias,
grouped top-k; and the arguments that cannot route, named."""

import math

import pytest
import torch

from moetune.kernels.routing import check_routing, select_experts


def route_one_token(logits, topk, renormalize, scoring_func, bias, num_expert_group, topk_group):
    """One token's (expert -> weight), written as the DeepSeek-V3 paper states the routing."""
    logits = [float(v) for v in logits]
    if scoring_func == "softmax":
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        scores = [v / sum(exps) for v in exps]
    else:
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
    allowed = set(range(len(scores)))
    if num_expert_group is not None:
        size = len(scores) // num_expert_group
        groups = [choice[g * size:(g + 1) * size] for g in range(num_expert_group)]
        rank = [sum(sorted(group)[-2:]) if bias is not None else max(group) for group in groups]
        best = sorted(range(num_expert_group), key=lambda g: rank[g])[-topk_group:]
        allowed = {g * size + i for g in best for i in range(size)}
    chosen = sorted(allowed, key=lambda e: choice[e])[-topk:]
    weights = {e: scores[e] for e in chosen}
    if renormalize:
        total = sum(weights.values())
        weights = {e: w / total for e, w in weights.items()}
    return weights


@pytest.mark.parametrize("scoring_func, use_bias, groups, renormalize", [
    ("softmax", False, None, True),
    ("softmax", False, None, False),
    ("sigmoid", True, (4, 2), True),   # DeepSeek-V3: sigmoid, bias, 8 groups of which 4 (here 4 of which 2)
    ("sigmoid", False, (4, 2), False),
    ("softmax", True, None, True),
])
def test_routing_matches_the_per_token_definition(rng, scoring_func, use_bias, groups, renormalize):
    M, E, topk = 9, 16, 3
    logits = torch.randn(M, E, generator=rng)
    bias = torch.randn(E, generator=rng) * 0.5 if use_bias else None
    num_expert_group, topk_group = groups if groups else (None, None)
    check_routing(E, topk, scoring_func=scoring_func, e_score_correction_bias=bias,
                  num_expert_group=num_expert_group, topk_group=topk_group)
    weights, ids = select_experts(logits, topk, renormalize, scoring_func=scoring_func, e_score_correction_bias=bias,
                                  num_expert_group=num_expert_group, topk_group=topk_group)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    for m in range(M):
        expected = route_one_token(logits[m], topk, renormalize, scoring_func, bias, num_expert_group, topk_group)
        got = dict(zip(ids[m].tolist(), weights[m].tolist()))
        assert set(got) == set(expected)
        for expert, weight in expected.items():
            assert got[expert] == pytest.approx(weight, rel=1e-5)


@pytest.mark.parametrize("kwargs, words", [
    ({"scoring_func": "tanh"}, "scoring_func"),
    ({"e_score_correction_bias": torch.zeros(15)}, "e_score_correction_bias"),
    ({"num_expert_group": 4}, "give both"),
    ({"num_expert_group": 3, "topk_group": 1}, "must divide"),
    ({"num_expert_group": 4, "topk_group": 5}, "topk_group = 5"),
    ({"num_expert_group": 8, "topk_group": 1}, "exceeds"),
    ({"num_expert_group": 4, "topk_group": 0}, "topk_group must be a positive int"),
])
def test_bad_routing_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        check_routing(16, 3, **kwargs)
