"""Routing: scores over the router logits, top-k experts, optional renormalisation.

Scores are softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3) of the logits. DeepSeek-V3's
routing also adds a per-expert correction bias to the scores it chooses by (the weights
stay the unbiased scores) and limits each token to its best `topk_group` of
`num_expert_group` expert groups, a group ranked by its best score, or by the sum of its
two best biased scores when a bias is given. A handful of torch ops, none of which syncs
with the host.
"""

from __future__ import annotations

import torch

SCORING_FUNCS = ("softmax", "sigmoid")


def check_routing(num_experts: int, topk: int, *, scoring_func: str = "softmax",
                  e_score_correction_bias: torch.Tensor | None = None, num_expert_group: int | None = None,
                  topk_group: int | None = None) -> None:
    """ValueError naming the argument that cannot route `num_experts` experts this way."""
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    if e_score_correction_bias is not None:
        if not isinstance(e_score_correction_bias, torch.Tensor) or tuple(e_score_correction_bias.shape) != (num_experts,):
            shape = tuple(getattr(e_score_correction_bias, "shape", ())) or type(e_score_correction_bias).__name__
            raise ValueError(f"e_score_correction_bias must be a tensor of shape [E] = [{num_experts}], got {shape}")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError("num_expert_group and topk_group go together: give both or neither")
    if num_expert_group is None:
        return
    for name, value in (("num_expert_group", num_expert_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_experts % num_expert_group:
        raise ValueError(f"num_expert_group = {num_expert_group} must divide the number of experts E = {num_experts}")
    if topk_group > num_expert_group:
        raise ValueError(f"topk_group = {topk_group} must not exceed num_expert_group = {num_expert_group}")
    reachable = topk_group * (num_experts // num_expert_group)
    if topk > reachable:
        raise ValueError(f"top-k = {topk} exceeds the {reachable} experts of {topk_group} of {num_expert_group} groups")


def select_experts(router_logits: torch.Tensor, topk: int, renormalize: bool, *, scoring_func: str = "softmax",
                   e_score_correction_bias: torch.Tensor | None = None, num_expert_group: int | None = None,
                   topk_group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [M, E] -> (topk_weights fp32 [M, topk], topk_ids int32 [M, topk]).

    Arguments as vLLM's and SGLang's routing names them; check_routing says what is allowed.
    """
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if num_expert_group is not None:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, num_expert_group, experts // num_expert_group)
        if e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, experts)
    ids = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
