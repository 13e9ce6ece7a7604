"""Routing: softmax over the router logits, top-k experts, optional renormalisation.

A handful of torch ops, none of which syncs with the host.
"""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, topk: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [M, E] -> (topk_weights fp32 [M, topk], topk_ids int32 [M, topk])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
