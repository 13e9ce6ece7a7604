"""What the tuner's compile workers build is exactly what the timed launch runs."""

import importlib

import pytest
import torch

from moetune.bench import make_weights
from moetune.bench_layer import ROLES, BatchBench
from moetune.tune import _compile_job

# The module, not the function kernels/__init__ re-exports under the same name.
gg = importlib.import_module("moetune.kernels.grouped_gemm")
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}


def specialisation(pointers, geometry, config, **flags):
    dtypes = tuple(p if isinstance(p, torch.dtype) else p.dtype for p in pointers)
    return dtypes, geometry, dict(config), flags


@pytest.mark.parametrize("role", ROLES)
def test_compile_request_matches_the_launch(role, monkeypatch):
    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    bench = BatchBench(w1, w2, 5, 2, seed=1)
    seen = []
    monkeypatch.setattr(gg, "_launch", lambda call, pointers, geometry, config, **flags:
                        seen.append(specialisation(pointers, geometry, config, **flags)))
    bench.role_call(role, CONFIG)()  # the launch the tuner times
    _compile_job(bench.compile_request(role, CONFIG["BLOCK_SIZE_M"]), CONFIG)  # what a worker compiles
    assert len(seen) == 2
    assert seen[0] == seen[1]


# -- the order of evaluation, and the next study's first trials -------------------------------

from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import optuna  # noqa: E402

from moetune import tune as tune_module  # noqa: E402
from moetune.cli import build_parser  # noqa: E402
from moetune.tune_cli import build_settings  # noqa: E402


def test_a_slow_compile_holds_up_no_trial_compiled_after_it():
    slow, fast = Future(), Future()
    fast.set_result(0.1)
    runner = SimpleNamespace(pending=[("slow", {}, slow), ("fast", {}, fast)], while_waiting=lambda: False)
    assert tune_module.RoleStudy._next_ready(runner) == 1
    slow.set_result(2.0)
    runner.pending.pop(1)
    assert tune_module.RoleStudy._next_ready(runner) == 0
    # Compiled inline (no compile workers): in the order asked.
    assert tune_module.RoleStudy._next_ready(SimpleNamespace(pending=[("a", {}, None), ("b", {}, None)])) == 0


def test_while_no_compile_has_finished_the_tuner_takes_the_steps_it_was_given_one_at_a_time():
    pending = Future()
    steps = []

    def step():
        steps.append(len(steps))
        if len(steps) == 2:
            pending.set_result(0.5)  # finishes during the second step: no third is taken
        return True

    runner = SimpleNamespace(pending=[("trial", {}, pending)], while_waiting=step)
    assert tune_module.RoleStudy._next_ready(runner) == 0
    assert steps == [0, 1]
    # Steps run out: it waits for the compile.
    late = Future()
    ThreadPoolExecutor(1).submit(lambda: __import__("time").sleep(0.2) or late.set_result(0.2))
    runner = SimpleNamespace(pending=[("trial", {}, late)], while_waiting=lambda: False)
    assert tune_module.RoleStudy._next_ready(runner) == 0 and late.done()


class ThreadCompiler(tune_module.Compiler):
    """Compile slots without processes: the interpreter compiles when it launches."""

    def __init__(self, workers: int):
        super().__init__(0)
        self.capacity = workers
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def submit(self, request, config, launcher=False):
        return self.pool.submit(lambda: 0.0)


def test_the_next_study_asks_its_first_trials_while_this_one_finishes(tmp_path, monkeypatch):
    args = build_parser().parse_args(["run", "--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32",
                                      "--trials", "6", "--batch-sizes", "8", "--variants", "unfused",
                                      "--no-progress", "--compile-workers", "0", "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    settings = replace(settings, compile_workers=4)
    monkeypatch.setattr(tune_module, "Compiler", lambda workers: ThreadCompiler(workers or 4))
    assert tune_module.tune(settings, log=lambda line: None)

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "cpu" / "moetune-studies.journal")))
    trials = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        role = summary.study_name.split("/")[-2]
        trials[role] = [t for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials
                        if t.user_attrs.get("status") == "measured"]
    assert len(trials["gemm1"]) == len(trials["gemm2_unfused"]) == 6
    last_of_first = max(t.datetime_complete for t in trials["gemm1"])
    asked_ahead = [t for t in trials["gemm2_unfused"] if t.datetime_start < last_of_first]
    # 6 trials in 4 slots: as gemm1's last 4 finish, gemm2 takes the slots they free (up to 3).
    assert asked_ahead, "the second study asked nothing before the first had finished"
    assert len(asked_ahead) <= 3


def test_while_waiting_the_walk_builds_this_batch_size_then_the_next(tmp_path):
    args = build_parser().parse_args(["run", "--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32",
                                      "--trials", "2", "--batch-sizes", "8,16", "--variants", "unfused",
                                      "--no-progress", "--compile-workers", "0", "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    run = tune_module.TuningRun(settings, tune_module._checked_storage(settings), lambda line: None, True,
                                tune_module.Compiler(0))
    try:
        shape = settings.shapes[0]
        batches = [(shape, 8), (shape, 16)]
        assert run._prepare(batches) and run.benches.holds(shape, 8) and not run.benches.holds(shape, 16)
        assert sorted(run.benches.get(shape, 8)._aligned) == sorted(settings.space.values["BLOCK_SIZE_M"])
        assert run._prepare(batches) and run.benches.holds(shape, 16)
        assert not run._prepare(batches)
    finally:
        run.close()


def test_a_batch_size_s_first_visit_sends_the_default_configs_to_compile_with_their_launchers(tmp_path):
    from moetune.bench_layer import role_compile_request
    from moetune.configs import default_config

    args = build_parser().parse_args(["run", "--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32",
                                      "--trials", "2", "--batch-sizes", "8,16", "--no-progress",
                                      "--compile-workers", "0", "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    sent = []

    class Recording(tune_module.Compiler):
        def submit(self, request, config, launcher=False):
            sent.append((request, config, launcher))

    run = tune_module.TuningRun(settings, tune_module._checked_storage(settings), lambda line: None, True,
                                Recording(0))
    try:
        shape = settings.shapes[0]
        run._visit(shape, 8, "gemm1", 6)
        default = default_config(8, shape.E, shape.N, shape.K, shape.topk)
        dtype = tune_module.TORCH_DTYPES[settings.dtype]
        assert sent == [(role_compile_request(role, 8, shape.E, shape.N, shape.K, shape.topk, dtype,
                                              default["BLOCK_SIZE_M"]), default, True)
                        for role in ("gemm1", "gemm2_unfused", "gemm2_fused")]
        run._visit(shape, 8, "gemm2_unfused", 5)  # the same batch size: nothing more
        assert len(sent) == 3
        run._visit(shape, 16, "gemm1", 4)
        assert len(sent) == 6
    finally:
        run.close()
