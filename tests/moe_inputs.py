"""Random MoE layer inputs for tests on the CPU (never zeros): moetune.bench's generators."""

from __future__ import annotations

import torch

from moetune import bench


def make_weights(E, N, K, dtype, generator):
    return bench.make_weights(E, N, K, dtype, "cpu", generator)


def make_inputs(M, E, N, K, topk, dtype, generator):
    x = torch.randn(M, K, generator=generator).to(dtype)
    w1, w2 = make_weights(E, N, K, dtype, generator)
    weights, ids = bench.make_routing(M, E, topk, "cpu", generator)
    return x, w1, w2, weights, ids
