"""moetune.measure: the layer checked against the float64 reference and timed."""

from __future__ import annotations

import math

import pytest
import torch

from moetune.bench import make_weights
from moetune.measure import GRAPH_TIMER, LayerCase, check, time_interleaved
from moetune.reference import TOLERANCE
from moetune.types import LaunchConfig, Variant

E, N, K, TOPK = 4, 16, 32, 2
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4,
         "num_stages": 2}


@pytest.fixture(scope="module")
def weights():
    return make_weights(E, N, K, torch.float16, "cpu", torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def case(weights):
    return LayerCase.random(*weights, M=3, topk=TOPK, seed=11)


def test_both_variants_pass_and_a_skipped_output_fails(case):
    assert case.M == 3 and case.tolerance == TOLERANCE[torch.float16]
    assert 1 <= case.experts_hit <= E
    unfused = check(case, case.layer("unfused", SMALL, SMALL))
    fused = check(case, case.layer(Variant.FUSED, LaunchConfig.from_json(SMALL), SMALL, with_alignment=True))
    for checked in (unfused, fused):
        assert checked.ok and 0 < checked.error <= case.tolerance
    # A run that writes nothing returns the buffer as check left it: NaN, so an infinite error.
    skipped = check(case, lambda: case.out)
    assert math.isinf(skipped.error) and not skipped.ok
    wrong = check(case, lambda: case.out.zero_())
    assert wrong.error == pytest.approx(1.0) and not wrong.ok


def test_time_interleaved_takes_each_run_once_per_round_in_turn():
    order = []
    values = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 5.0, 9.0])}

    def fake_timer(run):
        return run()

    def run(name):
        def call():
            order.append(name)
            return next(values[name])
        return call

    a, b = time_interleaved([run("a"), run("b")], rounds=3, timer=fake_timer)
    assert order == ["a", "b"] * 3  # drift between rounds hits both alike
    assert a.rounds_us == (3.0, 1.0, 2.0) and a.median_us == 2.0
    assert b.rounds_us == (5.0, 5.0, 9.0) and b.median_us == 5.0
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved([run("a")], rounds=0)


def test_the_interpreter_is_timed_by_the_wall_clock_without_a_warm_up_call():
    calls = []
    (timing,) = time_interleaved([lambda: calls.append(1)], rounds=2, timer=GRAPH_TIMER)
    assert len(calls) == 2 and len(timing.rounds_us) == 2 and all(t > 0 for t in timing.rounds_us)
