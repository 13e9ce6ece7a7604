"""A tune, top to bottom: one Optuna study per (device, shape, dtype, role, batch size), then the layer.

For each batch size, in ascending order when one process tunes:
  1. tune the roles (gemm1, gemm2_unfused, gemm2_fused) with multivariate TPE (steered to
     configs worth a trial, see sampler.py), warm-started with the neighbouring batch size's
     best, the default heuristic and a baseline table; candidates are pruned by rule,
     compiled ahead in worker processes, checked against the float64 reference, then timed
     (study.py);
  2. per variant, time whole layers for the best GEMM 1 x best GEMM 2 pairs, re-time the
     top few interleaved, and keep the fastest pair that passes the check (choose.py);
  3. merge the batch size into the table and write it atomically, so a killed run keeps it.
Finished trials live in the Optuna storage: rerunning the same command resumes, and a batch
size whose studies are complete and whose entry is written costs nothing (`--retime` chooses
its pairs again).

Processes sharing the studies (`run --devices`, `run --worker` on several hosts) each visit
every study in an order of their own (walk.py) and join any with trials left to give out;
the RUNNING trials of others count against the budget, so together they overshoot it by at
most one trial per process asking at the same instant. After its walk a process waits until
every study is settled, taking over the trials of a process that died (storage.py). Only a
process that writes tables runs step 2, once all roles of a batch size are settled,
whichever process tuned them; `--worker` processes write none, and `collect` writes the
tables from the storage.

The device's idle moments, while every pending trial is still compiling, go to work it would
otherwise wait for: building the inputs and float64 reference of the current and next batch
size, loading the kernels their checks run, and step 2 of settled batch sizes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import optuna

from ..errors import UsageError
from .compile_pool import Compiler, compiler_for
from .settings import TuneSettings
from .storage import Sharer, StudyStorage, open_storage, storage_exists, with_reconnects
from .study import unsettled_for_collect
from .tuning_run import TuningRun

# A budget spent by an outage still lets each study measure its few configs past the deadline.
MIN_BUDGET_LEFT_MIN = 1e-3
INTERPRETER_NOTE = "note: these timings come from Triton's interpreter on the CPU and mean nothing about speed"


def tune(settings: TuneSettings, log: Callable[[str], None] = print, write_tables: bool = True,
         compiler: Compiler | None = None) -> list[Path]:
    """Tune every shape and batch size of `settings`; returns the tables written (and closes
    `compiler`, made by compiler_for if the caller started it before touching CUDA).

    write_tables=False is a worker: it runs trials only and leaves the tables to `collect`.
    A lost database connection reopens the studies and resumes (storage.with_reconnects)."""
    # The compile processes first: they start while the storage opens and the run sets up. One
    # pool serves every attempt: a reconnect must not start (and import into) fresh processes.
    compiler = compiler or compiler_for(settings.compile_workers, settings.device.is_gpu)
    compiler.capability = settings.device.compute_capability
    started = time.monotonic()

    def attempt() -> list[Path]:
        # A resumed attempt spends what is left of the run's --time-budget, not a fresh one.
        budget = settings.time_budget_min
        if budget is not None:
            budget = max(budget - (time.monotonic() - started) / 60, MIN_BUDGET_LEFT_MIN)
        return _tune_once(replace(settings, time_budget_min=budget), log, write_tables, compiler)

    try:
        return with_reconnects(settings.storage_location(), attempt, log)
    finally:
        compiler.close()


def _tune_once(settings: TuneSettings, log: Callable[[str], None], write_tables: bool,
               compiler: Compiler) -> list[Path]:
    storage = open_checked_storage(settings)
    run = TuningRun(settings, storage, log, write_tables, compiler)
    try:
        run.look_at_earlier_runs()  # complete studies, and the entries written from them
        if run.nothing_left():
            run.print_summaries()
            log("nothing left to do: every study has its trials" +
                (" and every table entry is written (--retime chooses the layer pairs again)" if write_tables else ""))
            return []
        run.walk()  # every study not complete yet; each batch size written once its roles settle
        run.wait_for_others()  # the studies other processes hold, and the last batch sizes
        run.print_summaries()
        run.log_device_use()
        if not write_tables:
            log(f"{run.evaluated} trials evaluated here; no table written here "
                f"(the tables come from the writing process or `moetune collect`)")
        elif not settings.device.is_gpu:
            log(INTERPRETER_NOTE)
    finally:
        run.close()
    return run.paths


def collect(settings: TuneSettings, log: Callable[[str], None] = print, allow_incomplete: bool = False) -> list[Path]:
    """Write the tables from studies that workers settled: the pair choice runs here, on
    this one device, so that every batch size's layer times compare. Returns the tables written."""
    if not storage_exists(settings.storage_location()):  # opening it would create it, empty
        raise UsageError(f"{_storage_name(settings)} holds no studies: run the workers first "
                         f"(`moetune run --worker`), with the same --storage")
    storage = open_checked_storage(settings)
    sharer = Sharer(settings.device, settings.heartbeat_s)
    for key in settings.batches():
        for role in settings.roles:
            name = settings.study_name(key.study(role))
            study = sharer.load(storage, name)
            if study is None:
                raise UsageError(f"{storage.where} has no study {name!r}: run the workers first, "
                                 f"with the same shape, --dtype, --batch-sizes and --variants")
            storage.fail_stale_trials(study)
            refusal = unsettled_for_collect(study, settings.trials, allow_incomplete)
            if refusal is not None:
                raise UsageError(f"study {name!r} {refusal}")
    run = TuningRun(settings, storage, log, True, Compiler(0))
    try:
        run.look_at_earlier_runs(settled=True)
        for batch in run.batches.values():
            if batch.record is None:
                run.write(batch)
        run.print_summaries()
    finally:
        run.close()
    if not run.paths:
        log("nothing left to do: every table entry is written (--retime chooses the layer pairs again)")
    elif not settings.device.is_gpu:
        log(INTERPRETER_NOTE)
    return run.paths


def open_checked_storage(settings: TuneSettings) -> StudyStorage:
    """The run's storage, opened and checked against the other runs it holds."""
    # Optuna's warnings are storage hiccups it recovers from, logged as many-line SQL dumps;
    # what fails, moetune says in one line itself.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(settings.storage_location(), settings.heartbeat_s, _storage_name(settings))
    suffixes = {settings.study_suffix(key.study(role)) for key in settings.batches() for role in settings.roles}
    Sharer(settings.device, settings.heartbeat_s).check_run_studies(storage, suffixes)
    return storage


def _storage_name(settings: TuneSettings) -> str:
    return f"--storage {settings.storage!r}" if settings.storage else repr(settings.storage_location())
