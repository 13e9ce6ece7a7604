"""moetune.measure: the layer checked against the float64 reference and timed, and
scripts/check_gpu.py, which measures with it (its check path runs here in the interpreter)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from moetune.bench import make_weights
from moetune.configs import default_config
from moetune.measure import GRAPH_TIMER, LayerCase, check, time_interleaved
from moetune.reference import TOLERANCE
from moetune.types import LaunchConfig, Switches, Variant

# One test worker runs the whole module: the module's cases are built once.
pytestmark = pytest.mark.xdist_group("measure")

REPO = Path(__file__).resolve().parent.parent
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


# --- scripts/check_gpu.py ------------------------------------------------------------------

@pytest.fixture(scope="module")
def check_gpu():
    spec = importlib.util.spec_from_file_location("check_gpu", REPO / "scripts" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_gpu_help_and_its_packaged_configs(check_gpu, capsys):
    with pytest.raises(SystemExit) as exited:
        check_gpu.main(["--help"])
    assert exited.value.code == 0 and "--check-m" in capsys.readouterr().out
    for key, (_, _, _, _, _, file1, file2) in check_gpu.SHAPES.items():
        assert check_gpu.load_configs(file1) and (file2 is None or check_gpu.load_configs(file2))
        assert list(check_gpu.anchor_of(key).times_us) == check_gpu.M_VALUES


def test_check_gpu_checks_and_times_a_tiny_shape(check_gpu, weights, capsys):
    table = {1: default_config(1, E, N, K, TOPK), 8: SMALL}
    checks = check_gpu.check_shape("toy", TOPK, table, table, *weights, check_m=[5], dtypes=(torch.float16,))
    rows = check_gpu.time_shape("toy", N, K, TOPK, table, table, *weights, anchors=[(2, 10.0)])
    printed = capsys.readouterr().out
    assert [(c["variant"], c["ok"]) for c in checks] == [("unfused", True), ("fused", True)]
    assert [row["M"] for row in rows] == [2] and rows[0]["gemm1"] == table[1]
    assert rows[0]["unfused_us"] > 0 and rows[0]["fused_us"] > 0 and rows[0]["fused_acq_rel_us"] is None
    assert printed.count("check toy") == 2 and printed.count("time  toy") == 1
    summary = check_gpu.summary_text(rows, checks).splitlines()
    assert summary[0].split()[:3] == ["shape", "M", "unfused"]
    assert summary[1].split()[:2] == ["toy", "2"]
    assert summary[-1].startswith("correctness: 2/2 within tolerance")
    assert rows[0]["tuned_us"] > 0 and rows[0]["tuned_source"] == "default heuristic"


def test_check_gpu_checks_switch_sets_with_configs_they_can_run(check_gpu, weights, capsys):
    sets = check_gpu.all_switch_sets()
    assert len(set(sets)) == len(sets) == 36  # every valid combination, split-K 1 and 2
    chosen = [Switches(), Switches(sorted_rows=True, tma_activations=True, tma_weights=True, persistent=True),
              Switches(fuse_activation=True)]
    assert set(chosen) <= set(sets)
    down = dict(SMALL, BLOCK_SIZE_M=32)  # sorted rows need GEMM 1's BLOCK_SIZE_M in GEMM 2 too
    checks = check_gpu.check_switches("toy", TOPK, {8: SMALL}, {8: down}, *weights, switch_m=[3],
                                      switch_sets=chosen)
    assert [(c["switches"], c["variant"], c["ok"]) for c in checks] == [
        (label, variant, True) for label in ("off", "sorted_rows=True,tma_weights=True,tma_activations=True,"
                                             "persistent=True", "fuse_activation=True")
        for variant in ("unfused", "fused")]
    summary = check_gpu.summary_text([], checks).splitlines()
    assert summary[-2] == "switches: 3 sets x variants x M, 6/6 within tolerance"
