"""Timing helpers that need no GPU."""

import torch

from moetune.bench import LayerInputs, interleaved_times


def test_interleaved_times_takes_each_timing_once_per_round_in_turn():
    order = []

    def timing(name, value):
        def take():
            order.append(name)
            return value
        return take

    times = interleaved_times([timing("a", 1.0), timing("b", 2.0)], rounds=3)
    assert order == ["a", "b"] * 3  # round-robin: drift between rounds hits both alike
    assert times == [[1.0] * 3, [2.0] * 3]


def test_experts_hit_counts_this_rank_s_experts_only():
    """Slots routed to another rank (-1 after the expert map) read no weights of this one."""
    ids = torch.tensor([[0, -1], [2, -1], [0, 2]], dtype=torch.int32)
    x = torch.ones(3, 4)
    inputs = LayerInputs(x, torch.ones(4, 2, 4), torch.ones(4, 4, 1), torch.ones(3, 2), ids)
    assert inputs.experts_hit == 2
