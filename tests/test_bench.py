"""Timing helpers that need no GPU."""

from moetune.bench import interleaved_times


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
