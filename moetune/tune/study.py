"""One role's study at one batch size: ask -> prune -> compile ahead -> check -> time -> tell.

A RoleStudy gives out trials while its study has budget no process holds (`fill`), tells
which of the trials asked here has compiled (`first_compiled`, `wait_for_compile`), and
checks and times one with the batch size's inputs it is handed (`evaluate`). What to do
between those steps, and when, is the run's business (run.py).
"""

from __future__ import annotations

import math
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import optuna

from ..types import LaunchConfig, Role
from .compile_pool import COMPILE_TIMEOUT_S, Compiler
from .inputs import BatchBench, role_compile_request
from .sampler import Candidates, study_sampler
from .settings import Clock, StudyKey, TuneSettings
from .space import Problem, config_of, optuna_distributions, prune_reason
from .storage import WORKER_ATTR, Sharer, StudyStorage, TrialHeartbeat, ask

# A trial's "status" user attribute; the COUNTED ones use up --trials.
MEASURED = "measured"
COUNTED = (MEASURED, "wrong_result", "compile_failed", "launch_failed")
MIN_TRIALS_PAST_DEADLINE = 4


@dataclass
class RoleResult:
    ranked: list[tuple[float, LaunchConfig]]  # (µs, config) of the measured configs, best first, each once


@dataclass
class StudyState:
    counted: int  # finished trials that used up the budget
    held: dict[int, LaunchConfig]  # trial number -> config, of the RUNNING trials live processes hold
    waiting: int  # queued trials: warm starts, and the retries of trials whose worker died

    @property
    def in_flight(self) -> int:
        return len(self.held)


def is_held(trial) -> bool:
    """RUNNING and beating. A trial retried after its worker died inherits that worker's
    attribute: only one naming this very trial counts."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    return trial.state.name == "RUNNING" and isinstance(worker, dict) and worker.get("trial") == trial.number


def study_state(study, trials: list | None = None) -> StudyState:
    counted, held, waiting = 0, {}, 0
    for trial in trials if trials is not None else study.get_trials(deepcopy=False):
        # Finished ones only: a retried trial inherits its predecessor's attributes.
        if trial.state.name in ("COMPLETE", "PRUNED") and trial.user_attrs.get("status") in COUNTED:
            counted += 1
        elif is_held(trial) and trial.params:
            held[trial.number] = config_of(trial.params)
        elif trial.state.name == "WAITING":
            waiting += 1
    return StudyState(counted, held, waiting)


def study_result(study) -> RoleResult | None:
    """The measured configs, fastest first, each once."""
    measured = [(t.value, config_of(t.params)) for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("status") == MEASURED and t.value is not None
                and t.user_attrs.get("precise", True)]
    if not measured:
        return None
    measured.sort(key=lambda item: item[0])
    unique, seen = [], set()
    for value, config in measured:
        if config not in seen:
            seen.add(config)
            unique.append((value, config))
    return RoleResult(unique)


def unsettled_for_collect(study, trials: int, allow_incomplete: bool) -> str | None:
    """Why `collect` may not write from this study yet (trials running, or short of `trials`), or None."""
    state = study_state(study)
    if state.in_flight:
        return f"has {state.in_flight} trials running: wait for the workers to finish"
    if state.counted < trials and not allow_incomplete:
        return (f"has {state.counted} of {trials} trials: wait for the workers, or pass --allow-incomplete "
                f"(a time budget stops studies short)")
    return None


def rejection_reasons(study) -> list[str]:
    return sorted({t.user_attrs["reason"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("reason")})


@dataclass
class StudyContext:
    """What every study of one process shares."""

    settings: TuneSettings
    storage: StudyStorage
    compiler: Compiler
    heartbeat: TrialHeartbeat
    clock: Clock = field(default_factory=Clock)


@dataclass
class Pending:
    """A trial asked here and not told yet, its config compiling (None: compiled inline)."""

    trial: optuna.trial.Trial
    trial_id: int
    config: LaunchConfig
    compiled: Future | None


def open_study(key: StudyKey, context: StudyContext, create: bool) -> RoleStudy | None:
    """This process's handle on the study of `key`, its sampler attached; None when the study
    does not exist and `create` is false. Created here, its warm starts are still to queue
    (RoleStudy.created)."""
    settings = context.settings
    shape, M = key.batch.shape, key.batch.M
    problem = Problem.for_gemm(key.role.gemm, M, shape.E, shape.N, shape.K, shape.topk,
                               settings.dtype.operand_bytes, settings.dtype.max_block_k,
                               routed_experts=settings.global_experts(shape))
    candidates = Candidates(settings.space, problem, settings.device.shared_memory_bytes)
    sampler = study_sampler(settings.space, candidates, seed=(settings.seed + M + settings.sampler_salt) % 2**32)
    sharer = Sharer(settings.device, settings.heartbeat_s)
    name = settings.study_name(key)
    if create:
        study, created = sharer.open(context.storage, name, sampler)
    else:
        study, created = sharer.load(context.storage, name, sampler), False
        if study is None:
            return None
    return RoleStudy(key, study, candidates, created, context)


class RoleStudy:
    """Tunes one role at one batch size, this process's share of it."""

    def __init__(self, key: StudyKey, study, candidates: Candidates, created: bool, context: StudyContext):
        self.key, self.study, self.candidates, self.created = key, study, candidates, created
        self.context, self.settings = context, context.settings
        self.distributions = optuna_distributions(self.settings.space)
        self.worker = {"host": socket.gethostname(), "pid": os.getpid(), "device": self.settings.label or None}
        self.counted = 0  # trials that used up the budget, at the last look
        # Why this process stopped asking short of the budget: the time budget, or a search
        # space so small that the sampler proposes only configs already tried or pruned.
        self.stopped_short: str | None = None
        self.attempts = 0  # asks since this process last had reason to hope for new configs
        self.gave_up_at = 0  # trials counted when it stopped for want of new configs
        self.pending: list[Pending] = []
        self.deadline = math.inf  # when this process stops asking for more than a few trials

    @property
    def role(self) -> Role:
        return self.key.role

    def _look(self) -> StudyState:
        self.context.storage.fail_stale_trials(self.study)
        state = study_state(self.study)
        self.counted = state.counted
        return state

    def complete(self) -> bool:
        """Every trial of the budget counted, none running."""
        state = self._look()
        return not state.in_flight and state.counted >= self.settings.trials

    def settled(self) -> bool:
        """Nothing left for this process to do or wait for."""
        state = self._look()
        if state.in_flight:
            return False
        if state.counted >= self.settings.trials or self.stopped_short == "time budget":
            return True
        # Out of new configs, unless a retry was queued or others measured more since.
        return self.stopped_short is not None and not state.waiting and state.counted <= self.gave_up_at

    def enqueue(self, configs: list[LaunchConfig]) -> None:
        """Warm starts, queued by the process that creates the study. One the rules would prune
        (the heuristic's tiles can be wider than a small problem) gives way to the nearest
        config they keep, so the sampler starts next to a config that runs."""
        queued = set()
        space = self.settings.space.values
        for config in configs:
            if not all(value in space[key] for key, value in config.to_json().items()):
                continue
            if config not in self.candidates.kept:
                config = self.candidates.nearest_kept(config)
                if config is None:
                    continue
            if config not in queued:
                queued.add(config)
                self.study.enqueue_trial(config.to_json(), skip_if_exists=True)

    def _survey(self) -> StudyState:
        """The study as all processes left it; learns the configs they finished."""
        trials = self.study.get_trials(deepcopy=False)
        measured = self.candidates.measured
        for trial in trials:
            if trial.state.name in ("COMPLETE", "PRUNED") and trial.params:
                config = config_of(trial.params)
                value = trial.value if trial.state.name == "COMPLETE" else None
                if value is not None or config not in measured:
                    measured[config] = value
        state = study_state(self.study, trials)
        self.candidates.held = set(state.held.values())
        self.counted = state.counted
        return state

    def fill(self, capacity: int) -> bool:
        """Ask new trials until `capacity` are pending here or the study has nothing more to
        give out; returns whether it may still give out more later."""
        target = self.settings.trials
        # Past the deadline a study still measures a few configs (the warm starts come
        # first), so every batch size gets a checked winner.
        floor = min(target, MIN_TRIALS_PAST_DEADLINE)
        self.context.heartbeat.catch_up()
        self.context.storage.fail_stale_trials(self.study)
        state = self._survey()
        if self.stopped_short == "no new configs" and state.counted > self.gave_up_at:
            self.stopped_short, self.attempts = None, 0  # the sampler has learnt more since
        done = state.counted + state.in_flight
        while len(self.pending) < capacity and done < target:
            if time.monotonic() >= self.deadline and done >= floor:
                self.stopped_short = "time budget"
                return False
            if self.attempts >= 20 * target + 50 and not state.waiting:
                self.stopped_short, self.gave_up_at = "no new configs", state.counted
                return False
            self.attempts += 1
            trial, trial_id = self._ask()
            config = config_of(trial.params)
            reason = prune_reason(config, self.candidates.problem, self.settings.device.shared_memory_bytes,
                                  self.settings.space)
            if reason is not None:
                self._tell(trial, trial_id, state="PRUNED", status="rule_pruned", reason=reason)
                continue
            # Look again: other processes may have taken trials since the last look.
            state = self._survey()
            others = {c for number, c in state.held.items() if number != trial.number}
            if config in self.candidates.measured or config in others or any(p.config == config for p in self.pending):
                value = self.candidates.measured.get(config)
                self._tell(trial, trial_id, value, state=None if value is not None else "PRUNED", status="duplicate")
                continue
            # The trials held longest go first: of two processes asking at once, the later yields.
            ahead = sum(1 for number in state.held if number < trial.number)
            if state.counted + ahead >= target:
                self._tell(trial, trial_id, state="FAIL", status="surplus")
                return False
            request = role_compile_request(self.role, self.key.batch.M, self.key.batch.shape,
                                           self.settings.torch_dtype, config.block_m, self.settings.dtype)
            self.pending.append(Pending(trial, trial_id, config, self.context.compiler.submit(request, config)))
            done = state.counted + state.in_flight
        return done < target

    def first_compiled(self) -> int | None:
        """Index of the first pending trial whose compile has finished (compiled inline: the
        first asked), or None while every one is still compiling."""
        for index, pending in enumerate(self.pending):
            if pending.compiled is None or pending.compiled.done():
                return index
        return None

    def wait_for_compile(self) -> int:
        """Index of a pending trial whose compile has finished, waiting for the first to finish."""
        futures = [pending.compiled for pending in self.pending]
        done, _ = wait(futures, timeout=COMPILE_TIMEOUT_S, return_when=FIRST_COMPLETED)
        return futures.index(next(iter(done))) if done else 0

    def evaluate(self, index: int, bench: BatchBench) -> None:
        """Check and time pending trial `index` on `bench` (its batch size's inputs), and tell."""
        pending = self.pending.pop(index)
        try:
            self._check_and_time(pending, bench)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.context.heartbeat.untrack(pending.trial_id)  # failed as stale by another process, see _tell
        except BaseException:
            self.pending.append(pending)  # interrupted: end it with the others asked here
            self.abandon()
            raise

    def abandon(self) -> None:
        """End the trials asked here and not told, so that no other process waits for them."""
        for pending in self.pending:
            try:
                self._tell(pending.trial, pending.trial_id, state="FAIL")
            except Exception:  # noqa: BLE001 - the storage may be what failed; heartbeats then expire
                pass
        self.pending.clear()

    def result(self) -> RoleResult | None:
        return study_result(self.study)

    def _ask(self):
        trial = ask(self.study, self.distributions)
        trial_id = self.context.storage.trial_id(self.study, trial.number)
        self.context.heartbeat.track(trial_id)
        trial.set_user_attr(WORKER_ATTR, {**self.worker, "trial": trial.number})
        return trial, trial_id

    def _tell(self, trial, trial_id: int, value: float | None = None, state: str | None = None,
              status: str | None = None, reason: str | None = None) -> None:
        if status is not None:
            trial.set_user_attr("status", status)
        if reason is not None:
            trial.set_user_attr("reason", reason[:500])
        try:
            if state is None:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=optuna.trial.TrialState[state])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # its heartbeat came late and another process failed it: the retry counts instead
        finally:
            self.context.heartbeat.untrack(trial_id)

    def _check_and_time(self, pending: Pending, bench: BatchBench) -> None:
        trial, config = pending.trial, pending.config

        def reject(status: str, reason: str) -> None:
            self._tell(trial, pending.trial_id, state="PRUNED", status=status, reason=reason)
            self.candidates.measured[config] = None

        if pending.compiled is not None:
            try:
                trial.set_user_attr("compile_s", round(pending.compiled.result(timeout=COMPILE_TIMEOUT_S), 2))
            except Exception as error:  # noqa: BLE001 - any compiler failure prunes this trial only
                return reject("compile_failed", f"{type(error).__name__}: {error}".splitlines()[0])
        try:
            with self.context.clock.busy():
                measured = [v for v in self.candidates.measured.values() if v is not None]
                error, value, precise = bench.check_and_time_role(self.role, config, measured)
        except Exception as error:  # noqa: BLE001 - out of resources and launch errors prune the trial
            bench.synchronize()
            return reject("launch_failed", f"{type(error).__name__}: {error}".splitlines()[0])
        if value is None:
            return reject("wrong_result", f"relative error {error:.3e} > {bench.tolerance:.0e}")
        trial.set_user_attr("rel_error", error)
        trial.set_user_attr("precise", precise)
        self._tell(trial, pending.trial_id, value, status=MEASURED)
        self.candidates.measured[config] = value
