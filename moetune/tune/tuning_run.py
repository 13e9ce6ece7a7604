"""One process's share of a tune (run.py starts it): walk the studies in its order, keep the
device busy while candidates compile, wait for the studies others hold, and write each batch
size's table entry once its roles settle."""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..types import Role
from .choose import print_summary, write_batch, written_record
from .compile_pool import COMPILE_TIMEOUT_S, Compiler
from .inputs import BatchBench, InputCache, helper_requests, role_compile_request
from .settings import BatchKey, StudyKey, TuneSettings
from .storage import StudyStorage, TrialHeartbeat
from .study import RoleStudy, StudyContext, open_study
from .walk import walk_order
from .warm import WarmStarts

# How often a process with nothing left to ask looks again at the studies others hold.
WAIT_POLL_S = 0.5
# How often a table writer, in moments it waits for compiles, looks for settled batch sizes.
SETTLED_LOOK_S = 0.5


@dataclass
class Batch:
    """One batch size as this process sees it."""

    key: BatchKey
    studies: dict[Role, RoleStudy] = field(default_factory=dict)  # this process's handles on its studies
    visited: set[Role] = field(default_factory=set)  # the roles the walk opened (or asked ahead in)
    helpers: list[Future] = field(default_factory=list)  # its helper kernels' compiles
    shown: dict[Role, int] = field(default_factory=dict)  # trials counted on the progress bar
    complete: bool = False  # every study had its trials when the run started
    record: dict | None = None  # its table entry, once written here (or found written)


class TuningRun:
    """One process's share of a tuning run: walk the studies, wait for the others, write."""

    def __init__(self, settings: TuneSettings, storage: StudyStorage, log: Callable[[str], None], write_tables: bool,
                 compiler: Compiler):
        self.settings, self.log, self.write_tables = settings, log, write_tables
        self.context = StudyContext(settings, storage, compiler, TrialHeartbeat(storage))
        self.roles = settings.roles
        budget = settings.time_budget_min
        self.deadline = self.context.clock.start + budget * 60 if budget else math.inf
        self.batches = {key: Batch(key) for key in settings.batches()}
        self.inputs = InputCache(settings.torch_dtype, settings.seed, settings.dtype, settings.ep_size)
        self.warm_starts = WarmStarts(settings)
        self.visits: dict[StudyKey, int] = {}  # the walk's studies -> their place in it
        self.paths: list[Path] = []
        self.evaluated = 0
        self.next_look = 0.0  # when _write_next_settled may look again
        self.bar = None

    def close(self) -> None:
        """End the trials asked here and not told (the run was interrupted, or asked ahead for
        a study it did not reach), so that no other process waits for them; then the rest
        (the compile processes are the caller's to close: they outlive a reconnect)."""
        for batch in self.batches.values():
            for study in batch.studies.values():
                study.abandon()
        if self.bar is not None:
            self.bar.close()
        self.context.heartbeat.close()
        self.context.storage.remove_abandoned_locks()

    # -- before: what earlier runs left -------------------------------------------------------
    def look_at_earlier_runs(self, settled: bool = False) -> None:
        """Which batch sizes' studies all have their trials, and which entries were written
        from what their studies hold now (`settled`: studies collect takes as they are)."""
        for batch in self.batches.values():
            studies = [self._look_up(batch, role) for role in self.roles]
            batch.complete = all(study is not None and study.complete() for study in studies)
            if (batch.complete or settled and None not in studies) and self.write_tables:
                batch.record = written_record(self.settings, batch.key, {study.role: study.study for study in studies})

    def nothing_left(self) -> bool:
        return all(batch.complete and (batch.record is not None or not self.write_tables)
                   for batch in self.batches.values())

    # -- the walk: every study not complete, in this process's order (walk.py) -----------------
    def walk(self) -> None:
        from tqdm import tqdm

        s = self.settings
        order = walk_order(s.batch_sizes, s.walk_slot, s.walk_count)
        visits = [BatchKey(shape, M).study(role) for shape in s.shapes for M in order for role in self.roles
                  if not self.batches[BatchKey(shape, M)].complete]
        self.visits = {visit: index for index, visit in enumerate(visits)}
        if not visits:
            return  # every study complete: only entries to write (--retime)
        self.bar = tqdm(total=len(visits) * s.trials, unit="trial", disable=not s.progress, dynamic_ncols=True,
                        position=s.bar_position)
        for index, visit in enumerate(visits):
            self.bar.set_description(f"{s.label} {visit.batch.shape.name or 'custom'} "
                                     f"M={visit.batch.M} {visit.role}".strip())
            study = self._visit(visit)
            self.evaluated += self._tune(study, visits[index + 1] if index + 1 < len(visits) else None)
            self.warm_starts.learn(visit, study.result())
            if self.write_tables and visit.role == self.roles[-1]:
                self._write_settled(keep=self._kept_for_later(visit.batch))

    def _tune(self, study: RoleStudy, following: StudyKey | None) -> int:
        """Ask and evaluate until the study has given out its budget and nothing asked here
        is pending; returns the trials evaluated. Once this study has given out its budget,
        the compile slots it no longer needs take the `following` study's first trials, so
        that they compile while this study's last ones finish."""
        capacity = self.context.compiler.capacity
        upcoming = [study.key.batch] + ([following.batch] if following is not None else [])
        evaluated = 0
        while True:
            asking = study.fill(capacity)
            self._show_progress(study)
            if not asking and following is not None and len(study.pending) < capacity:
                ahead = self._visit(following)
                ahead.fill(capacity - len(study.pending))
                self._show_progress(ahead)
            if not study.pending:
                return evaluated
            index = study.first_compiled()
            while index is None and self._use_idle_moment(upcoming):
                index = study.first_compiled()
            if index is None:
                index = study.wait_for_compile()
            study.evaluate(index, self.prepare(study.key.batch))
            evaluated += 1

    def _visit(self, key: StudyKey) -> RoleStudy:
        """The study, opened on the first visit (warm starts queued, its share of the time
        budget set): by the walk, or earlier to ask its first trials ahead."""
        batch = self.batches[key.batch]
        if key.role in batch.visited:
            return batch.studies[key.role]
        if not batch.visited:
            self._compile_ahead(batch)  # the batch size's first study
        study = self._look_up(batch, key.role, create=True)
        if study.created:
            study.enqueue(self.warm_starts.configs(key))
        # The time left is shared evenly by the studies not visited yet.
        now = time.monotonic()
        study.deadline = now + (self.deadline - now) / max(len(self.visits) - self.visits.get(key, 0), 1)
        batch.visited.add(key.role)
        return study

    def _compile_ahead(self, batch: Batch) -> None:
        """Ahead of a batch size's first trials: the default config of each role, which the
        checks run in the roles not tuned, the launchers of the roles' signatures, and the
        helper kernels with theirs, so that preparing the batch size and its first checks
        load them instead of compiling."""
        s, (shape, M) = self.settings, (batch.key.shape, batch.key.M)
        compiler = self.context.compiler
        default = s.default_config(shape, M)
        requests = helper_requests(M, shape, s.torch_dtype, s.space.values["BLOCK_SIZE_M"])
        batch.helpers = [future for future in map(compiler.submit_helpers, requests) if future is not None]
        for role in self.roles:
            compiler.submit(role_compile_request(role, M, shape, s.torch_dtype, default.block_m, s.dtype), default,
                            launcher=True)

    def prepare(self, key: BatchKey) -> BatchBench:
        """The batch size's inputs, for a check or the layer choice: built once its helper
        kernels, compiled ahead, are ready to load, or this process would compile them itself."""
        batch = self.batches[key]
        if batch.helpers:
            wait(batch.helpers, timeout=COMPILE_TIMEOUT_S)
            batch.helpers = []
        return self.inputs.get(key.shape, key.M)

    # -- the device's idle moments, while every pending trial compiles ------------------------
    def _use_idle_moment(self, upcoming: list[BatchKey]) -> bool:
        """One step of work for a moment the device would wait for compiles; False when there
        is none. First the batch sizes of the walk's current and next study, then, in a
        process that writes tables, a batch size whose roles have all settled."""
        return self._prepare_step(upcoming) or self._write_next_settled()

    def _prepare_step(self, upcoming: list[BatchKey]) -> bool:
        """Build the first of `upcoming` not built yet (its inputs, the float64 reference), or
        load the kernels its checks run besides the candidates once they are compiled."""
        for key in upcoming:
            batch = self.batches[key]
            if batch.record is not None:
                continue
            built = self.inputs.holds(key.shape, key.M)
            bench = self.inputs.get(key.shape, key.M)
            if not built:
                return True
            if not bench.kernels_loaded and all(future.done() for future in batch.helpers):
                bench.load_kernels(self.settings.space.values["BLOCK_SIZE_M"])
                return True
        return False

    def _write_next_settled(self) -> bool:
        """Write the first batch size whose roles all settled, looking at most every
        SETTLED_LOOK_S (a look reads the unwritten studies); False if none was written."""
        if not self.write_tables or time.monotonic() < self.next_look:
            return False
        self.next_look = time.monotonic() + SETTLED_LOOK_S
        batch = next((batch for batch in self._unwritten() if self._settled(batch)), None)
        if batch is not None:
            self.write(batch)
        return batch is not None

    def _settled(self, batch: Batch) -> bool:
        """Whether every role of the batch size settled, whichever process tuned it; reads its
        studies only until one is found unsettled."""
        for role in self.roles:
            study = self._look_up(batch, role)
            if study is None or not study.settled():
                return False
        return True

    # -- after the walk: the studies other processes still hold --------------------------------
    def wait_for_others(self) -> None:
        waited = False
        while True:
            unsettled = self._write_settled()
            if not unsettled:
                return
            if not waited:
                self.log(f"waiting for {len(unsettled)} studies other processes hold")
                waited = True
            ran = 0
            for study in unsettled:
                study.deadline = self.deadline
                ran += self._tune(study, None)
            self.evaluated += ran
            if not ran:
                time.sleep(min(WAIT_POLL_S, self.settings.heartbeat_s))

    # -- the tables ----------------------------------------------------------------------------
    def _unwritten(self) -> list[Batch]:
        return [batch for batch in self.batches.values() if batch.record is None]

    def _kept_for_later(self, key: BatchKey) -> BatchKey | None:
        """Which batch size, of those settled, the walk leaves unwritten as it finishes batch
        size `key`: alone, that one itself, for the next batch size's idle moments, where its
        layer timing costs the device no time it could spend on trials. Among other GPUs'
        workers, none: a write put off piles up with the others' batch sizes and is left for
        the end, where those GPUs have nothing to do but wait for it."""
        return key if self.settings.walk_count == 1 else None

    def _write_settled(self, keep: BatchKey | None = None) -> list[RoleStudy]:
        """Look once at each study of the batch sizes not written (but `keep`) and, if this
        process writes tables, write every batch size whose roles were all found settled;
        returns the unsettled studies."""
        unsettled = []
        for batch in self._unwritten():
            if batch.key == keep:
                continue
            studies = [self._look_up(batch, role) for role in self.roles]
            waiting = [study for study in studies if study is None or not study.settled()]
            unsettled += [study for study in waiting if study is not None]
            if not waiting and self.write_tables:
                self.write(batch)
        return unsettled

    def write(self, batch: Batch) -> None:
        """Choose the batch size's pairs from its settled studies and write it."""
        studies = {role: batch.studies[role].study for role in self.roles}
        batch.record = write_batch(self.settings, batch.key, self.prepare(batch.key), studies, self.context.clock,
                                   self.context.compiler)
        self.inputs.drop(batch.key.shape, batch.key.M)  # written: neither trials nor layer timings need it again
        path = self.settings.table_path(batch.key.shape)
        if path not in self.paths:
            self.paths.append(path)

    def print_summaries(self) -> None:
        for shape in self.settings.shapes:
            rows = [(key.M, batch.record) for key, batch in self.batches.items()
                    if key.shape == shape and batch.record is not None]
            if rows:
                print_summary(shape, rows, self.log)

    def log_device_use(self) -> None:
        clock = self.context.clock
        self.log(f"device busy {100 * clock.busy_fraction():.0f}% of {time.monotonic() - clock.start:.0f} s wall "
                 f"time (checking and timing; the rest is compiling, sampling and bookkeeping)")

    # -- this process's handles on the studies -------------------------------------------------
    def _look_up(self, batch: Batch, role: Role, create: bool = False) -> RoleStudy | None:
        """This process's handle on the study; None when the study does not exist and
        `create` is false."""
        if role not in batch.studies:
            study = open_study(batch.key.study(role), self.context, create)
            if study is None:
                return None
            batch.studies[role] = study
        return batch.studies[role]

    def _show_progress(self, study: RoleStudy) -> None:
        shown = self.batches[study.key.batch].shown
        counted = min(study.counted, self.settings.trials)
        if self.bar is not None and counted > shown.get(study.role, 0):
            self.bar.update(counted - shown.get(study.role, 0))
            shown[study.role] = counted
