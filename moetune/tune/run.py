"""The tuner: one Optuna study per (device, shape, dtype, role, batch size), then the layer.

For each batch size, in ascending order when one process tunes:
  1. tune the roles (gemm1, gemm2_unfused, gemm2_fused) with multivariate TPE (steered to
     configs worth a trial, see sampler.py), warm-started with the neighbouring batch size's
     best, the default heuristic and a baseline table;
     candidates are pruned by rule before compiling, compiled ahead in worker processes,
     checked against the float64 reference, then timed;
  2. per variant, time whole layers for the best GEMM 1 x best GEMM 2 pairs, re-time the
     top few interleaved, and keep the fastest pair that passes the check;
  3. merge the batch size into the table and write it atomically, so a killed run keeps it.
Finished trials live in the Optuna storage: rerunning the same command resumes.

Several processes may share the studies (`run --devices`, `run --worker` on several hosts).
Each visits every study, in an order of its own (walk.py), and joins any that still has
trials to give out: the trials other processes hold RUNNING count against the budget, so
together they overshoot it by at most one trial per process asking at the same instant.
After its walk a process waits until every study is settled, taking over the trials of a
process that died (see study_storage). Only a process that writes tables runs step 2, once
all roles of a batch size are settled, whichever process tuned them (under `--devices`, the
first GPU's process); `--worker` processes write none, and `collect` writes the tables from
the storage.

The GPU's idle moments, while every pending trial is still compiling, go to work it would
otherwise wait for: building the inputs and float64 reference of the current and next batch
size, loading the kernels their checks run, and step 2 of settled batch sizes.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import statistics
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .inputs import (ROLE_VARIANT, ROLES, BatchBench, CompileRequest, HelperRequest, compile_helpers,
                          helper_requests, role_compile_request)
from ..bench import interleaved_times, make_weights
from ..configs import CONFIG_KEYS, check_config, default_config
from ..device import DeviceInfo, fork_is_safe, forked_after_cuda, torch_device
from ..errors import UsageError
from .sampler import KeptConfigSampler
from ..shapes import MoEShape
from .space import Problem, SearchSpace, candidates, optuna_distributions, prune_reason
from .study import (WORKER_ATTR, RoleResult, Sharer, StudyState, config_of, params_key, rejection_reasons,
                      study_name, study_result, study_state, study_suffix)
from .storage import (DEFAULT_HEARTBEAT_S, TrialHeartbeat, ask, default_journal, fail_stale_trials,
                            open_storage)
from ..tables import TORCH_DTYPES, merge_tables, new_table, read_table, table_path, write_table
from .walk import walk_order

COMPILE_TIMEOUT_S = 180.0
COMPILE_NICENESS = 5
MIN_TRIALS_PAST_DEADLINE = 4
# How often a process with nothing left to ask looks again at the studies others hold.
WAIT_POLL_S = 0.5
# How often a table writer, in moments it waits for compiles, looks for settled batch sizes.
SETTLED_LOOK_S = 0.5
# The sampler of every study (wrapped by KeptConfigSampler) and the tables' record of it.
TPE_OPTIONS = {"multivariate": True, "constant_liar": True, "n_startup_trials": 8}


@dataclass
class TuneSettings:
    shapes: list[MoEShape]
    dtype: str
    batch_sizes: list[int]
    variants: list[str]
    trials: int
    out_dir: Path
    device: DeviceInfo
    space: SearchSpace
    seed: int = 0
    storage: str | None = None
    time_budget_min: float | None = None
    baseline_dir: Path | None = None
    compile_workers: int = 0
    top_pairs: int = 3
    retime_rounds: int = 3
    progress: bool = True
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    # Added to the samplers' seeds: processes sharing studies must not propose the same configs.
    sampler_salt: int = 0
    label: str = ""  # names this process in its log lines when several run at once
    bar_position: int | None = None
    # This process's place among the processes of one host sharing the studies (walk.py).
    walk_slot: int = 0
    walk_count: int = 1


def storage_location(settings: TuneSettings) -> str:
    """The --storage URL or journal file, else a journal file beside the tables."""
    return settings.storage or str(default_journal(settings.out_dir, settings.device.key))


def sharer(settings: TuneSettings) -> Sharer:
    where = f"--storage {settings.storage!r}" if settings.storage else repr(storage_location(settings))
    return Sharer(settings.device, settings.heartbeat_s, where)


def run_suffixes(settings: TuneSettings) -> set[str]:
    return {study_suffix(shape, settings.dtype, role, M)
            for shape in settings.shapes for M in settings.batch_sizes for role in roles_for(settings.variants)}


def worker_salt() -> int:
    """A sampler seed offset of its own for each process of a shared run."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


# -- compiling ahead ---------------------------------------------------------------------------

def _compile_job(build: Callable[[], list], capability: tuple[int, int] | None = None,
                 launchers: bool = False) -> float:
    """Runs in a worker process: `build()` compiles kernels into Triton's on-disk cache, for
    a GPU of compute `capability` (None: the GPU this process sees, which CUDA then sets up).
    With `launchers`, also build the C launchers of the kernels' signatures, which the
    timing process would otherwise build (Triton caches them on disk too) at a first launch."""
    from triton.runtime import driver

    start = time.perf_counter()
    if capability is not None:
        try:
            _compile_for(capability)
        except Exception:  # noqa: BLE001 - a Triton without that driver's shape: ask the GPU, as before
            pass
    kernels = build()
    if launchers:
        for kernel in kernels:
            driver.active.launcher_cls(kernel.src, kernel.metadata)
    return time.perf_counter() - start


def _compile_candidate(request: CompileRequest, config: dict) -> list:
    """One candidate's binary: [Triton's compiled kernel]."""
    from moetune.kernels import compile_grouped_gemm

    kernel = compile_grouped_gemm(request.dtype, request.geometry, config, topk=request.topk,
                                  a_rows_per_slot=request.a_rows_per_slot,
                                  mul_routed_weight=request.mul_routed_weight, atomic_add=request.atomic_add)
    return [kernel] if kernel is not None else []


def _compile_for(capability: tuple[int, int]) -> None:
    """Make Triton compile for `capability` without asking the GPU (see compile_only_driver)."""
    from triton.runtime import driver

    active = getattr(driver, "_active", None)  # None until something asks for the driver (asking sets CUDA up)
    if getattr(active, "capability", None) != capability:
        driver.set_active(compile_only_driver(capability))


@functools.cache
def _compile_only_driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import GPUDriver
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    class CompileOnlyDriver(CudaDriver):
        """Triton's CUDA driver with the target given, the device and stream fixed: all that
        compiling asks of it. CUDA stays untouched, which spares each compile process
        setting it up: with 30 processes starting at once (two GPUs' tuners), that set-up
        made their first compile wait seconds."""

        def __init__(self, capability: tuple[int, int]):
            GPUDriver.__init__(self)  # not CudaDriver's: its helpers load binaries onto the GPU
            self.launcher_cls = CudaLauncher
            self.capability = capability
            self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0

        def get_current_target(self):
            return self.target

    return CompileOnlyDriver


def compile_only_driver(capability: tuple[int, int]):
    return _compile_only_driver_class()(capability)


def _start_compile_process(ready) -> None:
    """Each compile process's first step: say at once whether CUDA would work here
    (`ready`, read by the Compiler). Compiles given a compute capability never ask it; one
    without asks the GPU for it."""
    usable = not forked_after_cuda()
    ready.put(usable)
    if usable:
        torch.set_num_threads(1)  # forked, OpenMP's threads are the parent's; compiling needs none
        # Below the tuner that feeds the GPU, which shares the cores with them (and ptxas,
        # started from here, inherits it).
        os.nice(COMPILE_NICENESS)


def _hash_triton() -> None:
    """Triton hashes its own files, its 400 MB library among them, before a process's first
    compile. Done once here, the processes forked after inherit the hash: dozens of
    processes hashing at once each spent a few tenths of a second of CPU on it."""
    try:
        from triton.runtime.cache import triton_key

        triton_key()
    except Exception:  # noqa: BLE001 - a Triton without it: each process hashes as before
        pass


def _started() -> bool:
    """One job per process makes the pool start them all at once."""
    return True


def compiler_for(compile_workers: int, gpu: bool) -> "Compiler":
    """The tuner's compiler: processes on a GPU; inline in the interpreter, which compiles
    nothing ahead."""
    return Compiler(compile_workers if gpu else 0)


class Compiler:
    """Compiles candidates in worker processes while the GPU times others; inline without workers.

    The processes start at once and set up Triton while the tuner opens its studies and
    builds its first inputs. They are forked when this process has not touched CUDA yet
    (create the Compiler first): a forked process has torch and Triton imported already,
    where a spawned one spends seconds importing them, all of them at once."""

    def __init__(self, workers: int):
        self.pool = None
        # The GPU's compute capability, for compiles that need not ask it (set by the tuner
        # once it knows its GPU); None: each process asks.
        self.capability: tuple[int, int] | None = None
        # Candidates kept in flight: one per compiling process, or one at a time inline.
        self.capacity = max(1, workers)
        self.workers = workers
        self.checked = True
        if workers > 0:
            self._start("fork" if fork_is_safe() else "spawn")

    def _start(self, method: str) -> None:
        import multiprocessing

        if method == "fork":
            _hash_triton()
        context = multiprocessing.get_context(method)
        self.ready = context.Queue()
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                        initializer=_start_compile_process, initargs=(self.ready,))
        # The pool starts a process per job waiting, up to its size.
        self.started = [self.pool.submit(_started) for _ in range(self.workers)]
        self.checked = method != "fork"

    def _check_fork(self) -> None:
        """Forked processes where CUDA refuses to work (something had initialized it here
        unnoticed) would fail every compile: replace them with spawned ones. All were forked
        from this one state, so the first to report speaks for all; it reports before its
        set-up, so this waits for a fork, not a compile."""
        import queue

        self.checked = True
        try:
            usable = self.ready.get(timeout=COMPILE_TIMEOUT_S)
        except queue.Empty:
            usable = False
        if not usable:
            self.pool.shutdown(wait=True)
            self._start("spawn")

    def submit(self, request: CompileRequest, config: dict, launcher: bool = False) -> Future | None:
        """Compile `config` ahead (and its launcher, see _compile_job); None without processes."""
        return self._submit(functools.partial(_compile_candidate, request, config), launcher)

    def submit_helpers(self, request: HelperRequest) -> Future | None:
        """Compile a batch size's helper kernels ahead (bench_layer.compile_helpers), with their
        launchers, which the tuning process would otherwise build at its first check."""
        return self._submit(functools.partial(compile_helpers, request), True)

    def _submit(self, build: Callable[[], list], launchers: bool) -> Future | None:
        if self.pool is None:
            return None
        if not self.checked:
            self._check_fork()
        return self.pool.submit(_compile_job, build, self.capability, launchers)

    def close(self) -> None:
        if self.pool is not None:
            # Wait for the compiles in flight: a process started by multiprocessing (each GPU's
            # tuner under --devices) joins its children when it exits, and a pool shut down
            # without waiting leaves it joining them forever.
            self.pool.shutdown(wait=True, cancel_futures=True)


# -- one study ---------------------------------------------------------------------------------

class RoleStudy:
    """Tunes one role at one batch size: ask -> prune -> compile ahead -> check -> time -> tell.

    `bench` builds the batch size's inputs on first use: a study that needs no trial never
    computes the reference.
    """

    def __init__(self, study, role: str, shape: MoEShape, M: int, settings: TuneSettings,
                 bench: Callable[[], BatchBench], compiler: Compiler, clock: "Clock", heartbeat: TrialHeartbeat,
                 on_progress: Callable[[int], None] = lambda counted: None):
        self.study, self.role, self.shape, self.M, self.settings = study, role, shape, M, settings
        self.created = False  # whether this process created the study (and queued its warm starts)
        self.make_bench, self.compiler, self.clock = bench, compiler, clock
        self.heartbeat, self.on_progress = heartbeat, on_progress
        # BLOCK_SIZE_M -> compile request, from the sizes: compiles start before the inputs are built.
        self.compile_request = functools.partial(role_compile_request, role, M, shape.E, shape.N, shape.K,
                                                 shape.topk, TORCH_DTYPES[settings.dtype])
        kind = "gemm1" if role == "gemm1" else "gemm2"
        self.problem = Problem.for_role(kind, M, shape.E, shape.N, shape.K, shape.topk,
                                        TORCH_DTYPES[settings.dtype].itemsize)
        self.distributions = optuna_distributions(settings.space)
        self.worker = {"host": socket.gethostname(), "pid": os.getpid(), "device": settings.label or None}
        self.seen: dict[tuple, float | None] = {}
        self.held: set[tuple] = set()  # configs of the RUNNING trials, at the last look
        # Why this process stopped asking short of the budget: the time budget, or a search
        # space so small that the sampler proposes only configs already tried or pruned.
        self.stopped_short: str | None = None
        self.attempts = 0  # asks since this process last had reason to hope for new configs
        self.pending: list = []  # (trial, config, compile future) asked here, not yet evaluated
        self.deadline = math.inf  # when this process stops asking for more than a few trials
        self.gave_up_at = 0  # trials counted when it stopped for want of new configs
        # Work for the GPU's idle moments (see _next_ready): a step of it per call, False when
        # there is none left.
        self.while_waiting: Callable[[], bool] = lambda: False

    @property
    def bench(self) -> BatchBench:
        return self.make_bench()

    def settled(self) -> bool:
        """Nothing left for this process to do or wait for."""
        fail_stale_trials(self.study)
        state = study_state(self.study)
        if state.in_flight:
            return False
        if state.counted >= self.settings.trials or self.stopped_short == "time budget":
            return True
        # Out of new configs, unless a retry was queued or others measured more since.
        return self.stopped_short is not None and not state.waiting and state.counted <= self.gave_up_at

    def enqueue(self, configs: list[dict]) -> None:
        """Warm starts, queued by the process that creates the study. One the rules would prune
        (the heuristic's tiles can be wider than a small problem) gives way to the nearest
        config they keep, so the sampler starts next to a config that runs."""
        queued = set()
        for config in configs:
            if not all(config[k] in self.settings.space.values[k] for k in CONFIG_KEYS):
                continue
            if params_key(config) not in self.kept:
                config = self._nearest_kept(config)
                if config is None:
                    continue
            key = params_key(config)
            if key not in queued:
                queued.add(key)
                self.study.enqueue_trial(config, skip_if_exists=True)

    @functools.cached_property
    def kept(self) -> dict[tuple, dict]:
        """The configs of the space the pruning rules keep for this problem, by params_key."""
        configs = candidates(self.settings.space, self.problem, self.settings.device.shared_memory_bytes)
        return {params_key(config): config for config in configs}

    def _fresh(self, key: tuple) -> bool:
        return key in self.kept and key not in self.seen and key not in self.held

    def worth_trying(self, params: dict) -> bool:
        """Kept by the rules, and neither measured nor held by any process (the sampler's test)."""
        return self._fresh(params_key(config_of(params)))

    def fresh_configs(self) -> list[dict]:
        """The kept configs nobody has measured or holds."""
        return [config for key, config in self.kept.items() if self._fresh(key)]

    def _nearest_kept(self, config: dict) -> dict | None:
        if not self.kept:
            return None
        return min(self.kept.values(), key=lambda c: sum(abs(math.log2(c[k] / config[k])) for k in CONFIG_KEYS))

    def _survey(self) -> StudyState:
        """The study as all processes left it; learns the configs they finished."""
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state.name in ("COMPLETE", "PRUNED") and trial.params:
                key = params_key(config_of(trial.params))
                value = trial.value if trial.state.name == "COMPLETE" else None
                if value is not None or key not in self.seen:
                    self.seen[key] = value
        state = study_state(self.study, trials)
        self.held = set(state.held.values())
        self.on_progress(state.counted)
        return state

    def run(self, deadline: float, look_ahead: Callable[[int], None] | None = None) -> int:
        """Ask and evaluate while the study has budget no process holds; returns the trials
        evaluated here. Once this study has given out its budget, `look_ahead(free)` may
        use the `free` compile slots it no longer needs for the next study's first trials,
        so that they compile while this study's last ones finish."""
        self.deadline = deadline
        evaluated = 0
        current = None  # the trial being evaluated
        try:
            while True:
                asking = self.fill(self.compiler.capacity)
                if not asking and look_ahead is not None and len(self.pending) < self.compiler.capacity:
                    look_ahead(self.compiler.capacity - len(self.pending))
                if not self.pending:
                    return evaluated
                current, config, future = self.pending.pop(self._next_ready())
                self._evaluate(current, config, future)
                current = None
                evaluated += 1
        finally:
            # Returned, nothing is pending; interrupted, end what was asked and not told.
            if current is not None:
                self.pending.append((current, None, None))
            self.abandon()

    def fill(self, capacity: int) -> bool:
        """Ask new trials until `capacity` are pending here or the study has nothing more to
        give out; returns whether it may still give out more later."""
        target = self.settings.trials
        # Past the deadline a study still measures a few configs (the warm starts come
        # first), so every batch size gets a checked winner.
        floor = min(target, MIN_TRIALS_PAST_DEADLINE)
        self.heartbeat.catch_up()
        fail_stale_trials(self.study)
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
            trial = self._ask()
            config = config_of(trial.params)
            key = params_key(config)
            reason = prune_reason(config, self.problem, self.settings.device.shared_memory_bytes,
                                  self.settings.space)
            if reason is not None:
                trial.set_user_attr("status", "rule_pruned")
                trial.set_user_attr("reason", reason)
                self._tell(trial, state="PRUNED")
                continue
            # Look again: other processes may have taken trials since the last look.
            state = self._survey()
            others = {k for number, k in state.held.items() if number != trial.number}
            if key in self.seen or key in others or any(params_key(c) == key for _, c, _ in self.pending):
                trial.set_user_attr("status", "duplicate")
                value = self.seen.get(key)
                if value is None:
                    self._tell(trial, state="PRUNED")
                else:
                    self._tell(trial, value)
                continue
            # The trials held longest go first: of two processes asking at once, the later yields.
            ahead = sum(1 for number in state.held if number < trial.number)
            if state.counted + ahead >= target:
                trial.set_user_attr("status", "surplus")
                self._tell(trial, state="FAIL")
                return False
            future = self.compiler.submit(self.compile_request(config["BLOCK_SIZE_M"]), config)
            self.pending.append((trial, config, future))
            done = state.counted + state.in_flight
        return done < target

    def _next_ready(self) -> int:
        """Index of the pending trial to evaluate next: the first whose compile has finished,
        waiting for one if none has, so that one slow compile holds up no other trial. While
        none has, this process does what `while_waiting` has for it."""
        futures = [future for _, _, future in self.pending]
        if any(future is None for future in futures):
            return 0  # compiled inline, in order
        while True:
            for index, future in enumerate(futures):
                if future.done():
                    return index
            if not self.while_waiting():
                break
        done, _ = wait(futures, timeout=COMPILE_TIMEOUT_S, return_when=FIRST_COMPLETED)
        return futures.index(next(iter(done))) if done else 0

    def abandon(self) -> None:
        """End the trials asked here and not told, so that no other process waits for them."""
        for trial, _, _ in self.pending:
            try:
                self._tell(trial, state="FAIL")
            except Exception:  # noqa: BLE001 - the storage may be what failed; heartbeats then expire
                pass
        self.pending.clear()

    def _ask(self):
        trial = ask(self.study, self.distributions)
        self.heartbeat.track(trial._trial_id)
        trial.set_user_attr(WORKER_ATTR, {**self.worker, "trial": trial.number})
        return trial

    def _tell(self, trial, value: float | None = None, state: str | None = None) -> None:
        import optuna

        try:
            if state is None:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=optuna.trial.TrialState[state])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # its heartbeat came late and another process failed it: the retry counts instead
        finally:
            self.heartbeat.untrack(trial._trial_id)

    def _evaluate(self, trial, config: dict, future: Future | None) -> None:
        import optuna

        try:
            self._check_and_time(trial, config, future)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.heartbeat.untrack(trial._trial_id)  # failed as stale by another process, see _tell

    def _check_and_time(self, trial, config: dict, future: Future | None) -> None:
        key = params_key(config)

        def reject(status: str, reason: str) -> None:
            trial.set_user_attr("status", status)
            trial.set_user_attr("reason", reason[:500])
            self._tell(trial, state="PRUNED")
            self.seen[key] = None

        if future is not None:
            try:
                trial.set_user_attr("compile_s", round(future.result(timeout=COMPILE_TIMEOUT_S), 2))
            except Exception as error:  # noqa: BLE001 - any compiler failure prunes this trial only
                return reject("compile_failed", f"{type(error).__name__}: {error}".splitlines()[0])
        start = time.monotonic()
        try:
            measured = [v for v in self.seen.values() if v is not None]
            error, value, precise = self.bench.check_and_time_role(self.role, config, measured)
            if value is None:
                return reject("wrong_result", f"relative error {error:.3e} > {self.bench.tolerance:.0e}")
        except Exception as error:  # noqa: BLE001 - out of resources and launch errors prune the trial
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return reject("launch_failed", f"{type(error).__name__}: {error}".splitlines()[0])
        finally:
            self.clock.gpu_s += time.monotonic() - start
        trial.set_user_attr("status", "measured")
        trial.set_user_attr("rel_error", error)
        trial.set_user_attr("precise", precise)
        self._tell(trial, value)
        self.seen[key] = value

    def result(self) -> RoleResult | None:
        return study_result(self.study)


@dataclass
class Clock:
    start: float = field(default_factory=time.monotonic)
    gpu_s: float = 0.0

    def busy_fraction(self) -> float:
        wall = time.monotonic() - self.start
        return self.gpu_s / wall if wall > 0 else 0.0


# -- the layer choice --------------------------------------------------------------------------

def interleaved_medians(bench: BatchBench, layers: list[tuple[str, dict, dict]], rounds: int,
                        clock: Clock) -> list[float]:
    """Median layer time of each (variant, GEMM 1, GEMM 2), timed in interleaved rounds: each
    round times every layer once, so drift between rounds hits all of them alike."""
    start = time.monotonic()
    times = interleaved_times([functools.partial(bench.time_layer, *layer) for layer in layers], rounds)
    clock.gpu_s += time.monotonic() - start
    return [statistics.median(t) for t in times]


def choose_pair(bench: BatchBench, variant: str, gemm1: RoleResult, gemm2: RoleResult, settings: TuneSettings,
                clock: Clock) -> dict:
    """Best (GEMM 1, GEMM 2) pair of one variant by whole-layer time, alignment included:
    every pair of the best few of each role once, then the best few again in rounds."""
    pairs = [(variant, c1, c2) for _, c1 in gemm1.ranked[:settings.top_pairs]
             for _, c2 in gemm2.ranked[:settings.top_pairs]]
    first = interleaved_medians(bench, pairs, 1, clock)
    finalists = [pair for _, pair in sorted(zip(first, pairs), key=lambda item: item[0])][:settings.top_pairs]
    medians = interleaved_medians(bench, finalists, settings.retime_rounds, clock)
    for layer_us, (_, c1, c2) in sorted(zip(medians, finalists), key=lambda item: item[0]):
        error = bench.check_layer(variant, c1, c2)
        if error <= bench.tolerance:
            t1 = next(t for t, c in gemm1.ranked if c == c1)
            t2 = next(t for t, c in gemm2.ranked if c == c2)
            return {"gemm1": c1, "gemm2": c2, "gemm1_us": t1, "gemm2_us": t2, "layer_us": layer_us,
                    "rel_error": error}
    raise RuntimeError(f"no {variant} pair passed the correctness check at M={bench.M}")


def batch_entry(bench: BatchBench, studies: dict[str, object], settings: TuneSettings, clock: Clock) -> dict:
    """The table entry of one batch size, from the settled studies of its roles."""
    results = {}
    for role, study in studies.items():
        results[role] = study_result(study)
        if results[role] is None:
            raise RuntimeError(f"no config of {role} at M={bench.M} compiled, ran and passed the check; "
                               f"reasons: {'; '.join(rejection_reasons(study))[:400]}")
    entry = {}
    for variant in settings.variants:
        entry[variant] = choose_pair(bench, variant, results["gemm1"], results["gemm2_" + variant], settings, clock)
    if len(settings.variants) > 1:
        # At large batches the variants are often closer than the spread of one timing: time
        # their chosen pairs against each other before naming the winner.
        layers = [(v, entry[v]["gemm1"], entry[v]["gemm2"]) for v in settings.variants]
        for variant, layer_us in zip(settings.variants, interleaved_medians(bench, layers, settings.retime_rounds, clock)):
            entry[variant]["layer_us"] = layer_us
    entry["winner"] = min(settings.variants, key=lambda v: entry[v]["layer_us"])
    return entry


# -- the whole run -----------------------------------------------------------------------------

def _baseline_configs(settings: TuneSettings, shape: MoEShape):
    if settings.baseline_dir is None:
        return None
    from ..export import find_baseline

    return find_baseline(settings.baseline_dir, shape.E, shape.N, settings.device.key, settings.dtype)


def warm_starts(role: str, M: int, shape: MoEShape, neighbour_best: list[dict], baseline,
                shared_memory_bytes: int) -> list[dict]:
    """Configs tried first: the previous batch size's best three, the baseline table's
    configs at the two nearest batch sizes, and the default heuristic."""
    warm = list(neighbour_best)
    if baseline is not None:
        table = baseline.gemm1 if role == "gemm1" else baseline.gemm2
        for key in sorted(table, key=lambda k: (abs(k - M), k))[:2]:
            warm.append(check_config(table[key], "baseline config"))
    warm.append(default_config(M, shape.E, shape.N, shape.K, shape.topk, shared_memory_bytes=shared_memory_bytes))
    return warm


def roles_for(variants: list[str]) -> list[str]:
    return ["gemm1"] + [role for role in ROLES[1:] if ROLE_VARIANT[role] in variants]


def search_record(settings: TuneSettings) -> dict:
    tpe = ", ".join(f"{name}={value}" for name, value in TPE_OPTIONS.items())
    return {"sampler": f"KeptConfigSampler(TPESampler({tpe}))", "trials": settings.trials,
            "seed": settings.seed, "time_budget_min": settings.time_budget_min, "space": settings.space.to_dict()}


def _shape_key(shape: MoEShape) -> tuple:
    return shape.E, shape.N, shape.K, shape.topk


class Benches:
    """The weights of one shape and the inputs of its last three batch sizes, built on demand:
    building a batch size computes its float64 reference. Three: a study's last trials, the
    next study's first (asked ahead) and, in the table writer, the layer choice of a batch
    size another process tuned can take turns."""

    KEEP = 3

    def __init__(self, settings: TuneSettings):
        self.settings = settings
        self.device = torch_device()
        self.shape_key, self.weights = None, None
        self.benches: dict[int, BatchBench] = {}  # M -> inputs, least recently used first

    def holds(self, shape: MoEShape, M: int) -> bool:
        return self.shape_key == _shape_key(shape) and M in self.benches

    def drop(self, shape: MoEShape, M: int) -> None:
        if self.holds(shape, M):
            del self.benches[M]

    def get(self, shape: MoEShape, M: int) -> BatchBench:
        if self.shape_key != _shape_key(shape):
            self.benches.clear()
            self.weights = None  # free the previous shape's first
            generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)
            self.weights = make_weights(shape.E, shape.N, shape.K, TORCH_DTYPES[self.settings.dtype],
                                        self.device, generator)
            self.shape_key = _shape_key(shape)
        bench = self.benches.pop(M, None)
        if bench is None:
            while len(self.benches) >= self.KEEP:
                del self.benches[next(iter(self.benches))]  # free before allocating the next
            w1, w2 = self.weights
            bench = BatchBench(w1, w2, M, shape.topk, seed=self.settings.seed * 7919 + M)
        self.benches[M] = bench
        return bench


def table_path_of(settings: TuneSettings, shape: MoEShape) -> Path:
    return table_path(settings.out_dir, settings.device.key, shape.E, shape.N, shape.K, shape.topk, settings.dtype)


def write_batch(settings: TuneSettings, shape: MoEShape, M: int, bench: BatchBench, studies: dict[str, object],
                clock: Clock) -> tuple[Path, dict]:
    """Choose one batch size's pairs from its settled studies and merge it into its table."""
    entry = batch_entry(bench, studies, settings, clock)
    path = table_path_of(settings, shape)
    write_entry(path, settings, shape, M, entry)
    return path, entry


def write_entry(path: Path, settings: TuneSettings, shape: MoEShape, M: int, entry: dict) -> None:
    record = {v: {k: entry[v][k] for k in ("gemm1", "gemm2", "gemm1_us", "gemm2_us", "layer_us")}
              for v in settings.variants}
    record["winner"] = entry["winner"]
    table = new_table(settings.device, shape.E, shape.N, shape.K, shape.topk, settings.dtype, search_record(settings))
    table["batch_sizes"] = {M: record}
    if path.exists():
        table = merge_tables(read_table(path), table)
    write_table(path, table)


class TuningRun:
    """One process's share of a tuning run: walk the studies, wait for the others, write."""

    def __init__(self, settings: TuneSettings, storage, log: Callable[[str], None], write_tables: bool,
                 compiler: Compiler):
        from tqdm import tqdm

        self.settings, self.storage, self.log, self.write_tables = settings, storage, log, write_tables
        self.roles = roles_for(settings.variants)
        self.clock = Clock()
        budget = settings.time_budget_min
        self.deadline = self.clock.start + budget * 60 if budget else math.inf
        self.compiler = compiler
        self.heartbeat = TrialHeartbeat(storage)
        self.benches = Benches(settings)
        self.studies: dict[tuple, RoleStudy] = {}  # (shape key, M, role) -> study
        self.visited: set[tuple] = set()  # the studies the walk opened (or asked ahead in)
        self.shown: dict[tuple, int] = {}  # trials counted on the progress bar, per study
        self.written: dict[tuple, dict] = {}  # (shape key, M) -> table entry
        self.helpers: dict[tuple, list[Future]] = {}  # (shape key, M) -> its helper kernels' compiles
        self.best: dict[tuple, list[dict]] = {}  # (shape key, M, role) -> best configs found here
        self.baselines: dict[tuple, object] = {}  # shape key -> baseline table configs
        self.paths: list[Path] = []
        self.evaluated = 0
        self.next_look = 0.0  # when _write_next_settled may look again
        total = len(settings.shapes) * len(settings.batch_sizes) * len(self.roles) * settings.trials
        self.bar = tqdm(total=total, unit="trial", disable=not settings.progress, dynamic_ncols=True,
                        position=settings.bar_position)

    def close(self) -> None:
        self.bar.close()
        self.heartbeat.close()
        self.compiler.close()

    def execute(self) -> list[Path]:
        self._walk()
        self._wait_for_others()
        for shape in self.settings.shapes:
            rows = [(M, self.written[(_shape_key(shape), M)]) for M in sorted(self.settings.batch_sizes)
                    if (_shape_key(shape), M) in self.written]
            if rows:
                _print_summary(shape, rows, self.log)
        return self.paths

    # -- the walk: every study, in this process's order (walk.py)
    def _walk(self) -> None:
        order = walk_order(self.settings.batch_sizes, self.settings.walk_slot, self.settings.walk_count)
        visits = [(shape, M, role) for shape in self.settings.shapes for M in order for role in self.roles]
        try:
            for index, (shape, M, role) in enumerate(visits):
                self.bar.set_description(f"{self.settings.label} {shape.name or 'custom'} M={M} {role}".strip())
                runner = self._visit(shape, M, role, len(visits) - index)
                look_ahead = None
                upcoming = [(shape, M)]
                if index + 1 < len(visits):
                    look_ahead = functools.partial(self._ask_ahead, visits[index + 1], len(visits) - index - 1)
                    upcoming.append(visits[index + 1][:2])
                runner.while_waiting = functools.partial(self._use_idle_moment, upcoming)
                self.evaluated += runner.run(runner.deadline, look_ahead)
                result = runner.result()
                if result is not None:
                    self.best[(_shape_key(shape), M, role)] = [config for _, config in result.ranked[:3]]
                if self.write_tables and role == self.roles[-1]:
                    for batch in list(self._settled_batches(keep=self._kept_for_later(shape, M))):
                        self._write(*batch)
        finally:
            for runner in self.studies.values():
                runner.abandon()  # trials asked ahead for a study the walk did not reach

    def _kept_for_later(self, shape: MoEShape, M: int) -> tuple | None:
        """Which batch size, of those settled, the walk leaves unwritten as it finishes batch
        size M: alone, M itself, for the next batch size's idle moments, where its layer
        timing costs the GPU no time it could spend on trials. Among other GPUs' workers,
        none: a write put off piles up with the others' batch sizes and is left for the end,
        where those GPUs have nothing to do but wait for it."""
        return (_shape_key(shape), M) if self.settings.walk_count == 1 else None

    def _visit(self, shape: MoEShape, M: int, role: str, visits_left: int) -> RoleStudy:
        """The study, opened on the first visit (warm starts queued, its share of the time
        budget set): by the walk, or earlier to ask its first trials ahead."""
        key = (_shape_key(shape), M, role)
        if key in self.visited:
            return self.studies[key]
        if not any((_shape_key(shape), M, other) in self.visited for other in self.roles):
            self._compile_defaults(shape, M)  # the batch size's first study
        warm = warm_starts(role, M, shape, self._neighbour_best(shape, M, role), self._baseline(shape),
                           self.settings.device.shared_memory_bytes)
        runner = self._open(shape, M, role, warm)
        # The time left is shared evenly by the studies not visited yet.
        now = time.monotonic()
        runner.deadline = now + (self.deadline - now) / max(visits_left, 1)
        self.visited.add(key)
        return runner

    def _compile_defaults(self, shape: MoEShape, M: int) -> None:
        """Ahead of a batch size's first trials: the default config of each role, which the
        checks run in the roles not tuned, the launchers of the roles' signatures, and the
        helper kernels with theirs, so that preparing the batch size (_prepare) and its
        first checks load them instead of compiling."""
        config = default_config(M, shape.E, shape.N, shape.K, shape.topk)
        dtype = TORCH_DTYPES[self.settings.dtype]
        helpers = helper_requests(M, shape.E, shape.N, shape.K, shape.topk, dtype,
                                  self.settings.space.values["BLOCK_SIZE_M"])
        futures = [self.compiler.submit_helpers(request) for request in helpers]
        self.helpers[(_shape_key(shape), M)] = [future for future in futures if future is not None]
        for role in self.roles:
            request = role_compile_request(role, M, shape.E, shape.N, shape.K, shape.topk, dtype,
                                           config["BLOCK_SIZE_M"])
            self.compiler.submit(request, config, launcher=True)

    def _helpers_compiled(self, shape: MoEShape, M: int) -> bool:
        return all(future.done() for future in self.helpers.get((_shape_key(shape), M), ()))

    def _bench(self, shape: MoEShape, M: int) -> BatchBench:
        """The batch size's inputs, for a check: once its helper kernels, compiled ahead, are
        ready to load, or this process would compile them itself."""
        futures = self.helpers.pop((_shape_key(shape), M), ())
        if futures:
            wait(futures, timeout=COMPILE_TIMEOUT_S)
        return self.benches.get(shape, M)

    def _ask_ahead(self, visit: tuple, visits_left: int, free: int) -> None:
        """The next study's first trials, into the `free` compile slots the current one no
        longer needs (the next study's own pending trials count among them)."""
        self._visit(*visit, visits_left).fill(free)

    def _use_idle_moment(self, batches: list[tuple[MoEShape, int]]) -> bool:
        """One step of work for a moment the GPU would wait for compiles; False when there is
        none. First the batch sizes of the walk's current and next study (_prepare), then,
        in a process that writes tables, a batch size whose roles have all settled."""
        return self._prepare(batches) or self._write_next_settled()

    def _write_next_settled(self) -> bool:
        """Write the first batch size whose roles all settled, looking at most every
        SETTLED_LOOK_S (a look reads the unwritten studies); False if none was written."""
        if not self.write_tables or time.monotonic() < self.next_look:
            return False
        self.next_look = time.monotonic() + SETTLED_LOOK_S
        batch = next(self._settled_batches(), None)
        if batch is not None:
            self._write(*batch)
        return batch is not None

    def _settled_batches(self, keep: tuple | None = None):
        """(shape, M) of each unwritten batch size, but `keep` (a shape key and M), whose roles
        have all settled, whichever process tuned them; a batch size's roles are read only
        until one is found unsettled."""
        for shape in self.settings.shapes:
            for M in sorted(self.settings.batch_sizes):
                if (_shape_key(shape), M) in self.written or (_shape_key(shape), M) == keep:
                    continue
                runners = (self._look_up(shape, M, role) for role in self.roles)
                if all(runner is not None and runner.settled() for runner in runners):
                    yield shape, M

    def _prepare(self, batches: list[tuple[MoEShape, int]]) -> bool:
        """One step of what the GPU would otherwise wait for at the start of a batch size,
        taken while it waits for compiles: build the first of `batches` not built yet (its
        inputs, the float64 reference), or load the kernels its checks run besides the
        candidates once they are compiled. Returns False when nothing is left to do now."""
        for shape, M in batches:
            if (_shape_key(shape), M) in self.written:
                continue
            built = self.benches.holds(shape, M)
            bench = self.benches.get(shape, M)
            if not built:
                return True
            if not bench.warmed and self._helpers_compiled(shape, M):
                bench.warm_up(self.settings.space.values["BLOCK_SIZE_M"])
                return True
        return False

    def _baseline(self, shape: MoEShape):
        if _shape_key(shape) not in self.baselines:
            self.baselines[_shape_key(shape)] = _baseline_configs(self.settings, shape)
        return self.baselines[_shape_key(shape)]

    def _neighbour_best(self, shape: MoEShape, M: int, role: str) -> list[dict]:
        """The best configs of the nearest batch size this process has tuned this role at."""
        sizes = sorted(self.settings.batch_sizes)
        tuned = [m for m in sizes if (_shape_key(shape), m, role) in self.best]
        if not tuned:
            return []
        nearest = min(tuned, key=lambda m: (abs(sizes.index(m) - sizes.index(M)), m))
        return self.best[(_shape_key(shape), nearest, role)]

    def _open(self, shape: MoEShape, M: int, role: str, warm: list[dict]) -> RoleStudy:
        """The study, created with `warm` queued first if no process has created it yet."""
        runner = self._look_up(shape, M, role, create=True)
        if runner.created:
            runner.enqueue(warm)
        return runner

    def _look_up(self, shape: MoEShape, M: int, role: str, create: bool = False) -> RoleStudy | None:
        """This process's runner of the study; None when the study does not exist and
        `create` is false."""
        import optuna

        key = (_shape_key(shape), M, role)
        if key in self.studies:
            return self.studies[key]
        seed = (self.settings.seed + M + self.settings.sampler_salt) % 2**32
        tpe = optuna.samplers.TPESampler(**TPE_OPTIONS, seed=seed)
        runner: RoleStudy | None = None  # the sampler asks it what is worth a trial
        sampler = KeptConfigSampler(tpe, optuna_distributions(self.settings.space),
                                    fresh=lambda: runner.fresh_configs(),
                                    worth_trying=lambda params: runner.worth_trying(params), seed=seed)
        name = study_name(self.settings.device, shape, self.settings.dtype, role, M)
        share = sharer(self.settings)
        if create:
            study, created = share.open(self.storage, name, sampler)
        else:
            study, created = share.load(self.storage, name, sampler), False
            if study is None:
                return None
        runner = RoleStudy(study, role, shape, M, self.settings, lambda: self._bench(shape, M), self.compiler,
                           self.clock, self.heartbeat, lambda counted: self._progress(key, counted))
        runner.created = created
        self.studies[key] = runner
        return runner

    def _progress(self, key: tuple, counted: int) -> None:
        counted = min(counted, self.settings.trials)
        if counted > self.shown.get(key, 0):
            self.bar.update(counted - self.shown.get(key, 0))
            self.shown[key] = counted

    # -- after the walk: studies other processes still hold
    def _wait_for_others(self) -> None:
        waited = False
        while True:
            unsettled = self._write_settled(list(self.studies.values()))
            if not unsettled:
                return
            if not waited:
                self.log(f"waiting for {len(unsettled)} studies other processes hold")
                waited = True
            ran = 0
            for runner in unsettled:
                ran += runner.run(self.deadline)
            self.evaluated += ran
            if not ran:
                time.sleep(min(WAIT_POLL_S, self.settings.heartbeat_s))

    def _write_settled(self, runners) -> list[RoleStudy]:
        """Look once at each of `runners` (None: a study nobody created yet) and, if this
        process writes tables, write every batch size whose roles were all found settled;
        returns the unsettled runners of batch sizes not written."""
        settled, unsettled = set(), []
        for runner in runners:
            if runner is None or (_shape_key(runner.shape), runner.M) in self.written:
                continue
            if runner.settled():
                settled.add((_shape_key(runner.shape), runner.M, runner.role))
            else:
                unsettled.append(runner)
        if self.write_tables:
            for shape in self.settings.shapes:
                for M in sorted(self.settings.batch_sizes):
                    if all((_shape_key(shape), M, role) in settled for role in self.roles):
                        self._write(shape, M)
        return unsettled

    def _write(self, shape: MoEShape, M: int) -> None:
        """Choose the batch size's pairs from its settled studies and write it."""
        batch = (_shape_key(shape), M)
        studies = {role: self.studies[(*batch, role)].study for role in self.roles}
        path, entry = write_batch(self.settings, shape, M, self.benches.get(shape, M), studies, self.clock)
        self.benches.drop(shape, M)  # written: neither trials nor layer timings need it again
        self.written[batch] = entry
        if path not in self.paths:
            self.paths.append(path)


def _note_interpreter(settings: TuneSettings, log: Callable[[str], None]) -> None:
    if not settings.device.is_gpu:
        log("note: these timings come from Triton's interpreter on the CPU and mean nothing about speed")


def _log_device_use(clock: Clock, log: Callable[[str], None]) -> None:
    log(f"device busy {100 * clock.busy_fraction():.0f}% of "
        f"{time.monotonic() - clock.start:.0f} s wall time "
        f"(checking and timing; the rest is compiling, sampling and bookkeeping)")


def _checked_storage(settings: TuneSettings):
    """The run's storage, opened and checked against the other runs it holds."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_location(settings), settings.heartbeat_s)
    sharer(settings).check_storage(storage, run_suffixes(settings))
    return storage


def tune(settings: TuneSettings, log: Callable[[str], None] = print, write_tables: bool = True,
         compiler: Compiler | None = None) -> list[Path]:
    """Tune every shape and batch size of `settings`; returns the tables written (and closes
    `compiler`, made by compiler_for if the caller started it before touching CUDA).

    write_tables=False is a worker: it runs trials only and leaves the tables to `collect`."""
    # First, so that the compile processes start while the storage opens and the tuner sets up.
    compiler = compiler or compiler_for(settings.compile_workers, settings.device.is_gpu)
    compiler.capability = settings.device.compute_capability
    try:
        storage = _checked_storage(settings)
    except BaseException:
        compiler.close()
        raise
    run = TuningRun(settings, storage, log, write_tables, compiler)
    try:
        written = run.execute()
    finally:
        run.close()
    _log_device_use(run.clock, log)
    if not write_tables:
        log(f"{run.evaluated} trials evaluated here; "
            f"no table written here (the tables come from the writing process or `moetune collect`)")
    else:
        _note_interpreter(settings, log)
    return written


def collect(settings: TuneSettings, log: Callable[[str], None] = print, allow_incomplete: bool = False) -> list[Path]:
    """Write the tables from studies that workers settled: the pair choice runs here, on
    this one device, so that every batch size's layer times compare."""
    storage = _checked_storage(settings)
    roles = roles_for(settings.variants)
    share = sharer(settings)
    studies: dict[tuple, object] = {}
    for shape in settings.shapes:
        for M in sorted(settings.batch_sizes):
            for role in roles:
                name = study_name(settings.device, shape, settings.dtype, role, M)
                study = share.load(storage, name)
                if study is None:
                    raise UsageError(f"{share.where} has no study {name!r}: run the workers first, "
                                     f"with the same shape, --dtype, --batch-sizes and --variants")
                fail_stale_trials(study)
                state = study_state(study)
                if state.in_flight:
                    raise UsageError(f"study {name!r} has {state.in_flight} trials running: "
                                     f"wait for the workers to finish")
                if state.counted < settings.trials and not allow_incomplete:
                    raise UsageError(f"study {name!r} has {state.counted} of {settings.trials} trials: wait for "
                                     f"the workers, or pass --allow-incomplete (a time budget stops studies short)")
                studies[(_shape_key(shape), M, role)] = study
    clock = Clock()
    benches = Benches(settings)
    written = []
    for shape in settings.shapes:
        rows = []
        for M in sorted(settings.batch_sizes):
            batch = {role: studies[(_shape_key(shape), M, role)] for role in roles}
            _, entry = write_batch(settings, shape, M, benches.get(shape, M), batch, clock)
            rows.append((M, entry))
        written.append(table_path_of(settings, shape))
        _print_summary(shape, rows, log)
    _note_interpreter(settings, log)
    return written


def _print_summary(shape: MoEShape, summary: list, log: Callable[[str], None]) -> None:
    log(f"\n{shape.describe()}")
    log(f"{'batch':>7s} {'unfused us':>11s} {'fused us':>10s} {'speedup':>8s}  winner")
    for M, entry in summary:
        u = entry.get("unfused", {}).get("layer_us")
        f = entry.get("fused", {}).get("layer_us")
        speed = f"{u / f:8.3f}" if u and f else f"{'-':>8s}"
        log(f"{M:7d} {u if u else float('nan'):11.1f} {f if f else float('nan'):10.1f} {speed}  {entry['winner']}")
