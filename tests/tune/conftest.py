"""What the tuner's tests share: the tiny shape, reading a run's studies, and timings that
cost nothing."""

from __future__ import annotations

import zlib
from concurrent.futures import Future

import optuna
import pytest

import moetune.tune.tuning_run as run_module
from moetune.tune import Compiler
from moetune.tune.inputs import BatchBench, role_compile_request
from moetune.tune.storage import database_url
from moetune.tune.study import COUNTED, RoleStudy
from moetune.types import OFF

TINY = ["--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32"]
SHAPE_IN_NAME = "E=4,N=32,K=64,topk=2/"
TABLE = "E=4,N=32,K=64,topk=2,dtype=fp16.json"
QUIET = ["--no-progress", "--compile-workers", "0"]
JOURNAL = "moetune-studies.journal"


def figure(*what) -> float:
    """A made-up time in µs, the same for the same arguments."""
    return float(1 + zlib.crc32(repr(what).encode()) % 1000)


def replace_timings(patch) -> None:
    """The interpreter's timings mean nothing and cost as much as the checks: a made-up
    figure per config instead, so that a tune in a test costs its correctness checks only.
    Forked workers inherit it; `patch` is a pytest MonkeyPatch."""
    patch.setattr(BatchBench, "time_role", lambda self, role, config, cutoff_us=None: (figure(role, config), True))
    patch.setattr(BatchBench, "time_layer", lambda self, variant, gemm1, gemm2, switches=OFF:
                  figure(variant, gemm1, gemm2, *([switches] if switches != OFF else [])))


@pytest.fixture
def made_up_timings(monkeypatch):
    replace_timings(monkeypatch)


def record_walk(patch) -> list:
    """("trial", role, M) for each trial evaluated and ("write", M) for each batch size written."""
    events = []
    real_check, real_write = BatchBench.check_and_time_role, run_module.write_batch
    patch.setattr(BatchBench, "check_and_time_role",
                  lambda self, role, *rest: events.append(("trial", role, self.M)) or real_check(self, role, *rest))
    patch.setattr(run_module, "write_batch",
                  lambda settings, key, *rest: events.append(("write", key.M)) or real_write(settings, key, *rest))
    return events


def studies_in(location: str) -> dict[str, list]:
    """Trials of the tiny shape's studies, read without heartbeats of our own."""
    if "://" in location:
        storage = optuna.storages.RDBStorage(database_url(location))
    else:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(location))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if SHAPE_IN_NAME in s.study_name}


def measured_configs(trials) -> list[tuple]:
    """Configs of the trials measured and told. A process killed between recording a trial's
    status and telling its value leaves it RUNNING with the status: it is failed and retried."""
    return [tuple(sorted(t.params.items())) for t in trials
            if t.state.name == "COMPLETE" and t.user_attrs.get("status") == "measured"]


def counted(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.user_attrs.get("status") in COUNTED]


class HeldCompiler(Compiler):
    """Compile slots without processes (the interpreter compiles when it launches), whose
    candidates finish compiling only once the tuner waits for them (see held_compiler): the
    tuner's idle moments come before. Helper kernels and default configs compile at once.
    Each submission is recorded in `events`, with each wait."""

    def __init__(self, slots: int, settings):
        super().__init__(0)
        self.capacity, self.events, self.configs = slots, [], []  # configs: the candidates, in turn
        shape, dtype = settings.shapes[0], settings.torch_dtype
        # What a request is for: (role, M).
        self.roles = {role_compile_request(role, M, shape, dtype, block_m): (role, M) for role in settings.roles
                      for M in settings.batch_sizes for block_m in settings.space.values["BLOCK_SIZE_M"]}

    def submit(self, request, config, launcher=False):
        role, M = self.roles[request]
        self.events.append(("default" if launcher else "compile", role, M))
        if not launcher:
            self.configs.append(config)
        return self.finished() if launcher else Future()

    def submit_helpers(self, request):
        if ("helpers", request.M) not in self.events:
            self.events.append(("helpers", request.M))
        return self.finished()

    @staticmethod
    def finished() -> Future:
        future = Future()
        future.set_result(0.0)
        return future


@pytest.fixture
def held_compiler(monkeypatch):
    """Makes HeldCompilers: the tuner's wait for a compile records ("wait", role, M) and
    finishes the compiles of that study's pending trials (with last_first, only the one
    asked last)."""
    compilers = []
    real_wait = RoleStudy.wait_for_compile

    def wait_for_compile(study):
        for compiler in compilers:
            compiler.events.append(("wait", study.role, study.key.batch.M))
        compiling = [pending.compiled for pending in study.pending if not pending.compiled.done()]
        for future in compiling[-1:] if compilers[-1].last_first else compiling:
            future.set_result(0.0)
        return real_wait(study)

    monkeypatch.setattr(RoleStudy, "wait_for_compile", wait_for_compile)

    def make(slots: int, settings, last_first: bool = False) -> HeldCompiler:
        compilers.append(HeldCompiler(slots, settings))
        compilers[-1].last_first = last_first
        return compilers[-1]
    return make
