"""Random MoE layer inputs for tests (never zeros)."""

from __future__ import annotations

import torch


def make_weights(E, N, K, dtype, generator):
    # Scaled so activations stay O(1) and relative errors mean something.
    w1 = (torch.randn(E, 2 * N, K, generator=generator) / K**0.5).to(dtype)
    w2 = (torch.randn(E, K, N, generator=generator) / N**0.5).to(dtype)
    return w1, w2


def make_routing(M, E, topk, generator):
    logits = torch.randn(M, E, generator=generator)
    weights, ids = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def make_inputs(M, E, N, K, topk, dtype, generator):
    x = torch.randn(M, K, generator=generator).to(dtype)
    w1, w2 = make_weights(E, N, K, dtype, generator)
    weights, ids = make_routing(M, E, topk, generator)
    return x, w1, w2, weights, ids
