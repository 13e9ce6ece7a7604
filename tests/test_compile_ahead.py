"""What the tuner's compile workers build is exactly what the timed launch runs."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from moetune.bench import make_weights
from moetune.tune.inputs import ROLES, BatchBench, compile_helpers, helper_requests
from moetune.tune.run import _compile_candidate

# The modules, not the functions kernels/__init__ re-exports under the same names.
LAUNCHING_MODULES = [importlib.import_module(f"moetune.kernels.{name}")
                     for name in ("align", "activation", "reduce", "grouped_gemm")]
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}


def record_launches(monkeypatch, layout: bool) -> list:
    """Every launch the kernels' launchers make, compile-only or not, recorded instead of run:
    (kernel, grid, arguments, keywords). A tensor is recorded as its dtype, and with `layout`
    its shape and strides too (a compile request passes bare dtypes for the GEMM's pointers)."""
    seen = []

    def describe(value):
        if isinstance(value, torch.Tensor):
            return (value.dtype, tuple(value.shape), value.stride()) if layout else value.dtype
        return value

    def recorder(kernel, grid):
        def record(*args, **kwargs):
            seen.append((kernel.fn.__name__, tuple(grid), tuple(map(describe, args)),
                         tuple(sorted((k, describe(v)) for k, v in kwargs.items()))))
        return record

    for module in LAUNCHING_MODULES:
        monkeypatch.setattr(module, "launch", recorder)
    return seen


@pytest.mark.parametrize("role", ROLES)
def test_compile_request_matches_the_launch(role, monkeypatch):
    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    bench = BatchBench(w1, w2, 5, 2, seed=1)
    bench._aligned_for(CONFIG["BLOCK_SIZE_M"])
    seen = record_launches(monkeypatch, layout=False)
    bench.role_call(role, CONFIG)()  # the launch the tuner times
    timed = [launch for launch in seen if launch[0] == "_grouped_gemm_kernel"]
    seen.clear()
    _compile_candidate(bench.compile_request(role, CONFIG["BLOCK_SIZE_M"]), CONFIG)  # what a worker compiles
    assert len(timed) == 1
    assert seen == timed


def test_the_helper_kernels_compiled_ahead_are_those_the_checks_launch(monkeypatch):
    """compile_helpers, on meta tensors, makes the very launches BatchBench makes besides the
    GEMMs: the alignment at every BLOCK_SIZE_M, the activation and the top-k sum."""
    M, E, N, K, topk = 5, 4, 32, 64, 2
    block_sizes_m = [16, 32, 64]
    w1, w2 = make_weights(E, N, K, torch.float16, "cpu", torch.Generator().manual_seed(0))
    seen = record_launches(monkeypatch, layout=True)
    bench = BatchBench(w1, w2, M, topk, seed=1)
    assert not seen  # building the inputs launches nothing of ours
    bench.warm_up(block_sizes_m)
    launched = {launch for launch in seen if launch[0] != "_grouped_gemm_kernel"}
    seen.clear()
    for request in helper_requests(M, E, N, K, topk, torch.float16, block_sizes_m):
        compile_helpers(request)
    assert set(seen) == launched
    assert {launch[0] for launch in launched} == {"_count_kernel", "_offsets_kernel", "_scatter_kernel",
                                                  "_silu_and_mul_kernel", "_topk_sum_kernel"}
    offsets = [dict(launch[3])["BLOCK_SIZE_M"] for launch in launched if launch[0] == "_offsets_kernel"]
    assert sorted(offsets) == block_sizes_m


HELPERS_FOR_A_GPU = """
import sys
import torch
from triton.runtime import driver
from moetune.tune import run as tune
from moetune.tune.inputs import compile_helpers, helper_requests

driver.set_active(tune.compile_only_driver((9, 0)))
for request in helper_requests(8, 4, 32, 64, 2, torch.float16, [16]):
    names = sorted(kernel.name for kernel in compile_helpers(request))
    print(request.block_size_m, names, sorted({kernel.metadata.target.arch for kernel in compile_helpers(request)}))
"""


def test_the_helper_kernels_compile_for_a_gpu_without_one(tmp_path):
    """Outside the interpreter, compile_only() really compiles, on meta tensors, for a GPU
    this machine need not have."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", HELPERS_FOR_A_GPU], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "16 ['_count_kernel', '_offsets_kernel', '_scatter_kernel'] [90]",
        "None ['_silu_and_mul_kernel', '_topk_sum_kernel'] [90]",
    ]
    assert len(list(tmp_path.rglob("*.cubin"))) == 5


# -- the order of evaluation, and the next study's first trials -------------------------------

from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import optuna  # noqa: E402

from moetune.tune import run as tune_module  # noqa: E402
from moetune.cli import build_parser  # noqa: E402
from moetune.cli.run import build_settings  # noqa: E402


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


def tiny_run(tmp_path, batch_sizes: str):
    """A writing TuningRun of a tiny shape, compiling inline, and its settings."""
    args = build_parser().parse_args(["run", "--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32",
                                      "--trials", "2", "--batch-sizes", batch_sizes, "--variants", "unfused",
                                      "--no-progress", "--compile-workers", "0", "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    return tune_module.TuningRun(settings, tune_module._checked_storage(settings), lambda line: None, True,
                                 tune_module.Compiler(0)), settings


def test_while_waiting_the_walk_builds_this_batch_size_then_the_next(tmp_path):
    run, settings = tiny_run(tmp_path, "8,16")
    try:
        shape = settings.shapes[0]
        batches = [(shape, 8), (shape, 16)]
        assert run._prepare(batches) and run.benches.holds(shape, 8) and not run.benches.holds(shape, 16)
        assert not run.benches.get(shape, 8)._aligned  # built, one step; the kernels are the next
        assert run._prepare(batches) and not run.benches.holds(shape, 16)
        assert sorted(run.benches.get(shape, 8)._aligned) == sorted(settings.space.values["BLOCK_SIZE_M"])
        assert run._prepare(batches) and run.benches.holds(shape, 16)
        assert run._prepare(batches) and run.benches.get(shape, 16)._aligned
        assert not run._prepare(batches)
    finally:
        run.close()


def test_a_batch_size_s_kernels_are_loaded_only_once_its_helpers_compiled_ahead(tmp_path):
    """Launched before the compile processes are done, the helper kernels would be compiled
    by the tuning process as well: the idle moments leave them until then, and a check waits."""
    run, settings = tiny_run(tmp_path, "8")
    try:
        shape = settings.shapes[0]
        compiling = Future()
        run.helpers[(tune_module._shape_key(shape), 8)] = [compiling]
        assert run._prepare([(shape, 8)])  # the inputs need no kernel of ours
        assert not run._prepare([(shape, 8)])  # nothing more to do while the helpers compile
        assert not run.benches.get(shape, 8)._aligned
        ThreadPoolExecutor(1).submit(lambda: __import__("time").sleep(0.2) or compiling.set_result(0.2))
        assert run._bench(shape, 8) is run.benches.get(shape, 8) and compiling.done()  # a check waits
        assert run._prepare([(shape, 8)]) and run.benches.get(shape, 8)._aligned
    finally:
        run.close()


def test_a_batch_size_s_first_visit_sends_its_helper_kernels_and_default_configs_to_compile(tmp_path):
    from moetune.tune.inputs import role_compile_request
    from moetune.configs import default_config

    args = build_parser().parse_args(["run", "--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32",
                                      "--trials", "2", "--batch-sizes", "8,16", "--no-progress",
                                      "--compile-workers", "0", "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    sent = []

    class Recording(tune_module.Compiler):
        def submit(self, request, config, launcher=False):
            sent.append((request, config, launcher))

        def submit_helpers(self, request):
            sent.append(request)

    run = tune_module.TuningRun(settings, tune_module._checked_storage(settings), lambda line: None, True,
                                Recording(0))
    try:
        shape = settings.shapes[0]
        run._visit(shape, 8, "gemm1", 6)
        default = default_config(8, shape.E, shape.N, shape.K, shape.topk)
        dtype = tune_module.TORCH_DTYPES[settings.dtype]
        helpers = helper_requests(8, shape.E, shape.N, shape.K, shape.topk, dtype,
                                  settings.space.values["BLOCK_SIZE_M"])
        assert sent == helpers + [(role_compile_request(role, 8, shape.E, shape.N, shape.K, shape.topk, dtype,
                                                        default["BLOCK_SIZE_M"]), default, True)
                                  for role in ("gemm1", "gemm2_unfused", "gemm2_fused")]
        run._visit(shape, 8, "gemm2_unfused", 5)  # the same batch size: nothing more
        assert len(sent) == len(helpers) + 3
        run._visit(shape, 16, "gemm1", 4)
        assert len(sent) == 2 * (len(helpers) + 3)
    finally:
        run.close()
