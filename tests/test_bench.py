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


def test_a_role_is_timed_with_a_cutoff_once_three_configs_are_measured(monkeypatch):
    """The tuner and the search-quality sweep share this rule: a config cut short cannot win."""
    import torch

    from moetune.bench import make_weights
    from moetune.tune.inputs import BatchBench

    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    bench = BatchBench(w1, w2, 5, 2, seed=1)
    cutoffs = []
    monkeypatch.setattr(bench, "check_role", lambda role, config: 0.0)
    monkeypatch.setattr(bench, "time_role", lambda role, config, cutoff: cutoffs.append(cutoff) or (1.0, True))
    for measured in ([], [5.0, 3.0], [5.0, 3.0, 4.0]):
        assert bench.check_and_time_role("gemm1", {}, measured) == (0.0, 1.0, True)
    assert cutoffs == [None, None, 6.0]

    monkeypatch.setattr(bench, "check_role", lambda role, config: 1.0)  # wrong: never timed
    assert bench.check_and_time_role("gemm1", {}, [5.0, 3.0, 4.0]) == (1.0, None, False)
    assert len(cutoffs) == 3


def test_warming_up_a_batch_size_aligns_at_every_block_size_and_runs_the_default_layer(monkeypatch):
    import torch

    from moetune.bench import make_weights
    from moetune.tune.inputs import BatchBench

    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    bench = BatchBench(w1, w2, 5, 2, seed=1)
    checked = []
    real_check = bench.check_layer
    monkeypatch.setattr(bench, "check_layer", lambda *layer: checked.append(layer) or real_check(*layer))
    bench.warm_up([16, 32])
    assert sorted(bench._aligned) == [16, 32]
    assert checked == [("unfused", bench.default, bench.default)]
    assert not torch.isnan(bench.out).any()  # the layer ran: its NaN poison is overwritten

    def fails(*layer):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(bench, "check_layer", fails)
    bench.warm_up([64])  # left to the trial that meets it, which names its config
