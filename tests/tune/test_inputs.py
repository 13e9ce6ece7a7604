"""A batch size's inputs: the cutoff of slow configs, loading the kernels its checks run, and
the memory a tune of a shape holds."""

import pytest
import torch

from moetune.bench import make_weights
from moetune.shapes import MoEShape
from moetune.tune.inputs import BatchBench, memory_needed
from moetune.types import LaunchConfig, Role, Variant

CONFIG = LaunchConfig(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=2)


@pytest.fixture
def bench(poison_empty):
    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    return BatchBench(w1, w2, 5, 2, seed=1)


def test_a_role_is_timed_with_a_cutoff_once_three_configs_are_measured(bench, monkeypatch):
    """The tuner and the search-quality sweep share this rule: a config cut short cannot win."""
    cutoffs = []
    monkeypatch.setattr(bench, "check_role", lambda role, config: 0.0)
    monkeypatch.setattr(bench, "time_role", lambda role, config, cutoff: cutoffs.append(cutoff) or (1.0, True))
    for measured in ([], [5.0, 3.0], [5.0, 3.0, 4.0]):
        assert bench.check_and_time_role(Role.GEMM1, CONFIG, measured) == (0.0, 1.0, True)
    assert cutoffs == [None, None, 6.0]

    monkeypatch.setattr(bench, "check_role", lambda role, config: 1.0)  # wrong: never timed
    assert bench.check_and_time_role(Role.GEMM1, CONFIG, [5.0, 3.0, 4.0]) == (1.0, None, False)
    assert len(cutoffs) == 3


def test_loading_a_batch_size_s_kernels_aligns_at_every_block_size_and_runs_the_default_layer(bench, monkeypatch):
    checked = []
    real_check = bench.check_layer
    monkeypatch.setattr(bench, "check_layer", lambda *layer: checked.append(layer) or real_check(*layer))
    bench.load_kernels([16, 32])
    assert sorted(bench.alignments) == [16, 32]
    assert checked == [(Variant.UNFUSED, bench.default, bench.default)]
    assert not torch.isnan(bench.checked_case.out).any()  # the layer ran: its NaN poison is overwritten

    def fails(*layer):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(bench, "check_layer", fails)
    bench.load_kernels([64])  # left to the trial that meets it, which names its config
    assert bench.kernels_loaded


def test_the_memory_a_tune_holds_grows_with_the_weights_and_the_largest_batch_sizes():
    shape = MoEShape(E=8, N=14336, K=4096, topk=2)
    weights, inputs = memory_needed(shape, [1, 16], dtype_bytes=2)
    assert weights == 3 * 8 * 14336 * 4096 * 2  # w1 [E, 2N, K] and w2 [E, K, N]
    _, more = memory_needed(shape, [1, 16, 4096], dtype_bytes=2)
    _, most = memory_needed(shape, [1, 16, 4096, 8192, 16384], dtype_bytes=2)
    assert 0 < inputs < more < most
    # Only the three largest batch sizes are held at once.
    assert memory_needed(shape, [1, 2, 4096, 8192, 16384], dtype_bytes=2)[1] == most
