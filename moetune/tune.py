"""The tuner: one Optuna study per (device, shape, dtype, role, batch size), then the layer.

For each batch size, in ascending order:
  1. tune the roles (gemm1, gemm2_unfused, gemm2_fused) with multivariate TPE, warm-started
     with the neighbouring batch size's best, the default heuristic and a baseline table;
     candidates are pruned by rule before compiling, compiled ahead in worker processes,
     checked against the float64 reference, then timed;
  2. per variant, time whole layers for the best GEMM 1 x best GEMM 2 pairs, re-time the
     top few interleaved, and keep the fastest pair that passes the check;
  3. merge the batch size into the table and write it atomically, so a killed run keeps it.
Finished trials live in the Optuna storage: rerunning the same command resumes.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .bench_layer import ROLE_VARIANT, ROLES, BatchBench
from .bench import make_weights
from .configs import CONFIG_KEYS, check_config, default_config
from .device import DeviceInfo
from .shapes import MoEShape
from .space import Problem, SearchSpace, optuna_distributions, prune_reason
from .tables import merge_tables, new_table, read_table, table_path, write_table

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STUDY_FILE = "moetune-studies.journal"
COMPILE_TIMEOUT_S = 180.0
MIN_TRIALS_PAST_DEADLINE = 4
# Status of a trial, in its user attributes; "counted" ones use up --trials.
COUNTED = ("measured", "wrong_result", "compile_failed", "launch_failed")


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


@dataclass
class RoleResult:
    config: dict
    time_us: float
    ranked: list[tuple[float, dict]] = field(default_factory=list)  # best first


def storage_for(settings: TuneSettings):
    """The Optuna storage: the given URL, else a journal file beside the tables."""
    import optuna

    if settings.storage:
        return optuna.storages.RDBStorage(settings.storage) if "://" in settings.storage else \
            optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(settings.storage))
    folder = settings.out_dir / settings.device.key
    folder.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(folder / STUDY_FILE))
    return optuna.storages.JournalStorage(backend)


def study_name(device: DeviceInfo, shape: MoEShape, dtype: str, role: str, M: int) -> str:
    return f"{device.key}/E={shape.E},N={shape.N},K={shape.K},topk={shape.topk}/{dtype}/{role}/M={M}"


def config_of(params: dict) -> dict:
    return {key: int(params[key]) for key in CONFIG_KEYS}


def _params_key(config: dict) -> tuple:
    return tuple(config[key] for key in CONFIG_KEYS)


# -- compiling ahead ---------------------------------------------------------------------------

def _compile_job(role: str, dtype: str, geometry, config: dict, topk: int) -> float:
    """Runs in a worker process: compile one candidate into Triton's on-disk cache."""
    from moetune.kernels import compile_grouped_gemm

    start = time.perf_counter()
    torch_dtype = TORCH_DTYPES[dtype]
    compile_grouped_gemm(torch_dtype, geometry, config, topk=topk,
                         a_rows_per_slot=topk if role == "gemm1" else 1,
                         mul_routed_weight=role != "gemm1", atomic_add=role == "gemm2_fused")
    return time.perf_counter() - start


class Compiler:
    """Compiles candidates in worker processes while the GPU times others; inline without workers."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 0:
            import multiprocessing

            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, role, dtype, geometry, config, topk) -> Future | None:
        if self.pool is None:
            return None
        return self.pool.submit(_compile_job, role, dtype, geometry, config, topk)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# -- one study ---------------------------------------------------------------------------------

class RoleStudy:
    """Tunes one role at one batch size: ask -> prune -> compile ahead -> check -> time -> tell."""

    def __init__(self, study, role: str, bench: BatchBench, settings: TuneSettings, compiler: Compiler,
                 clock: "Clock", on_trial: Callable[[], None]):
        self.study, self.role, self.bench, self.settings = study, role, bench, settings
        self.compiler, self.clock, self.on_trial = compiler, clock, on_trial
        kind = "gemm1" if role == "gemm1" else "gemm2"
        b = bench
        self.problem = Problem.for_role(kind, b.M, b.E, b.N, b.K, b.topk, b.w1.element_size())
        self.distributions = optuna_distributions(settings.space)
        self.seen: dict[tuple, float | None] = {}
        for trial in study.trials:
            if trial.state.name in ("COMPLETE", "PRUNED") and trial.params:
                key = _params_key(config_of(trial.params))
                self.seen[key] = trial.value if trial.state.name == "COMPLETE" else None

    def counted(self) -> int:
        return sum(1 for t in self.study.trials if t.user_attrs.get("status") in COUNTED)

    def enqueue(self, configs: list[dict]) -> None:
        """Warm starts, queued only when the study is new (a resumed one has them already)."""
        if self.study.trials:
            return
        queued = set()
        for config in configs:
            key = _params_key(config)
            in_space = all(config[k] in self.settings.space.values[k] for k in CONFIG_KEYS)
            if key not in queued and in_space:
                queued.add(key)
                self.study.enqueue_trial(config, skip_if_exists=True)

    def run(self, deadline: float) -> None:
        import optuna

        target = self.settings.trials
        attempts = 0
        pending: list = []  # (trial, config, future) compiled ahead
        batch = max(1, self.compiler.pool._max_workers if self.compiler.pool else 1)
        while True:
            done = self.counted() + sum(1 for _ in pending)
            # Past the deadline a study still measures a few configs (the warm starts come
            # first), so every batch size gets a checked winner.
            floor = min(target, MIN_TRIALS_PAST_DEADLINE)
            while (len(pending) < batch and done < target and attempts < 20 * target + 50
                   and (time.monotonic() < deadline or done < floor)):
                attempts += 1
                trial = self.study.ask(self.distributions)
                config = config_of(trial.params)
                key = _params_key(config)
                reason = prune_reason(config, self.problem, self.settings.device.shared_memory_bytes,
                                      self.settings.space)
                if reason is not None:
                    trial.set_user_attr("status", "rule_pruned")
                    trial.set_user_attr("reason", reason)
                    self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                if key in self.seen or any(_params_key(c) == key for _, c, _ in pending):
                    trial.set_user_attr("status", "duplicate")
                    value = self.seen.get(key)
                    if value is None:
                        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    else:
                        self.study.tell(trial, value)
                    continue
                geometry = self.bench.geometry(self.role, config["BLOCK_SIZE_M"])
                future = self.compiler.submit(self.role, self.settings.dtype, geometry, config, self.bench.topk)
                pending.append((trial, config, future))
                done += 1
            if not pending:
                return
            trial, config, future = pending.pop(0)
            self._evaluate(trial, config, future)
            self.on_trial()

    def _evaluate(self, trial, config: dict, future: Future | None) -> None:
        import optuna

        key = _params_key(config)

        def reject(status: str, reason: str) -> None:
            trial.set_user_attr("status", status)
            trial.set_user_attr("reason", reason[:500])
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.seen[key] = None

        if future is not None:
            try:
                trial.set_user_attr("compile_s", round(future.result(timeout=COMPILE_TIMEOUT_S), 2))
            except Exception as error:  # noqa: BLE001 - any compiler failure prunes this trial only
                return reject("compile_failed", f"{type(error).__name__}: {error}".splitlines()[0])
        start = time.monotonic()
        try:
            error = self.bench.check_role(self.role, config)
            if not error <= self.bench.tolerance:
                return reject("wrong_result", f"relative error {error:.3e} > {self.bench.tolerance:.0e}")
            best = [v for v in self.seen.values() if v is not None]
            # Once a few configs are in, anything twice as slow as the best needs no precise time.
            cutoff = 2.0 * min(best) if len(best) >= 3 else None
            value, precise = self.bench.time_role(self.role, config, cutoff)
        except Exception as error:  # noqa: BLE001 - out of resources and launch errors prune the trial
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return reject("launch_failed", f"{type(error).__name__}: {error}".splitlines()[0])
        finally:
            self.clock.gpu_s += time.monotonic() - start
        trial.set_user_attr("status", "measured")
        trial.set_user_attr("rel_error", error)
        trial.set_user_attr("precise", precise)
        self.study.tell(trial, value)
        self.seen[key] = value

    def result(self) -> RoleResult | None:
        measured = [(t.value, config_of(t.params)) for t in self.study.trials
                    if t.user_attrs.get("status") == "measured" and t.value is not None
                    and t.user_attrs.get("precise", True)]
        if not measured:
            return None
        measured.sort(key=lambda item: item[0])
        unique, keys = [], set()
        for value, config in measured:
            if _params_key(config) not in keys:
                keys.add(_params_key(config))
                unique.append((value, config))
        return RoleResult(unique[0][1], unique[0][0], unique)


@dataclass
class Clock:
    start: float = field(default_factory=time.monotonic)
    gpu_s: float = 0.0

    def busy_fraction(self) -> float:
        wall = time.monotonic() - self.start
        return self.gpu_s / wall if wall > 0 else 0.0


# -- the layer choice --------------------------------------------------------------------------

def choose_pair(bench: BatchBench, variant: str, gemm1: RoleResult, gemm2: RoleResult, settings: TuneSettings,
                clock: Clock) -> dict:
    """Best (GEMM 1, GEMM 2) pair of one variant by whole-layer time, alignment included."""
    start = time.monotonic()
    pairs = [(c1, c2) for _, c1 in gemm1.ranked[:settings.top_pairs] for _, c2 in gemm2.ranked[:settings.top_pairs]]
    first = sorted(((bench.time_layer(variant, c1, c2), c1, c2) for c1, c2 in pairs), key=lambda item: item[0])
    finalists = [(c1, c2) for _, c1, c2 in first[:settings.top_pairs]]
    # Interleaved re-timing: each round times every finalist once, so drift hits all alike.
    times: list[list[float]] = [[] for _ in finalists]
    for _ in range(settings.retime_rounds):
        for i, (c1, c2) in enumerate(finalists):
            times[i].append(bench.time_layer(variant, c1, c2))
    ranked = sorted(((statistics.median(t), c1, c2) for t, (c1, c2) in zip(times, finalists)), key=lambda x: x[0])
    clock.gpu_s += time.monotonic() - start
    for layer_us, c1, c2 in ranked:
        error = bench.check_layer(variant, c1, c2)
        if error <= bench.tolerance:
            t1 = next(t for t, c in gemm1.ranked if c == c1)
            t2 = next(t for t, c in gemm2.ranked if c == c2)
            return {"gemm1": c1, "gemm2": c2, "gemm1_us": t1, "gemm2_us": t2, "layer_us": layer_us,
                    "rel_error": error}
    raise RuntimeError(f"no {variant} pair passed the correctness check at M={bench.M}")


# -- the whole run -----------------------------------------------------------------------------

def _baseline_configs(settings: TuneSettings, shape: MoEShape):
    if settings.baseline_dir is None:
        return None
    from .export import find_baseline

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


def tune(settings: TuneSettings, log: Callable[[str], None] = print) -> list[Path]:
    """Tune every shape and batch size of `settings`; returns the tables written."""
    import optuna
    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(settings)
    device = torch.device("cuda") if settings.device.is_gpu else torch.device("cpu")
    dtype = TORCH_DTYPES[settings.dtype]
    roles = roles_for(settings.variants)
    clock = Clock()
    deadline_all = clock.start + settings.time_budget_min * 60 if settings.time_budget_min else math.inf
    studies_total = len(settings.shapes) * len(settings.batch_sizes) * len(roles)
    studies_done = 0
    compiler = Compiler(settings.compile_workers if settings.device.is_gpu else 0)
    bar = tqdm(total=studies_total * settings.trials, unit="trial", disable=not settings.progress,
               dynamic_ncols=True)
    written: list[Path] = []
    search = {"sampler": "TPESampler(multivariate=True, constant_liar=True)", "trials": settings.trials,
              "seed": settings.seed, "time_budget_min": settings.time_budget_min,
              "space": settings.space.to_dict()}
    try:
        for shape in settings.shapes:
            generator = torch.Generator(device=device).manual_seed(settings.seed)
            w1, w2 = make_weights(shape.E, shape.N, shape.K, dtype, device, generator)
            baseline = _baseline_configs(settings, shape)
            path = table_path(settings.out_dir, settings.device.key, shape.E, shape.N, shape.K, shape.topk,
                              settings.dtype)
            best_before: dict[str, list[dict]] = {}
            summary = []
            for M in sorted(settings.batch_sizes):
                bench = BatchBench(w1, w2, M, shape.topk, seed=settings.seed * 7919 + M)
                results: dict[str, RoleResult] = {}
                for role in roles:
                    bar.set_description(f"{shape.name or 'custom'} M={M} {role}")
                    sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                                         seed=settings.seed + M, n_startup_trials=8)
                    study = optuna.create_study(study_name=study_name(settings.device, shape, settings.dtype, role, M),
                                                storage=storage, sampler=sampler, direction="minimize",
                                                load_if_exists=True)
                    _fail_stale(study)
                    runner = RoleStudy(study, role, bench, settings, compiler, clock, lambda: bar.update(1))
                    already = min(runner.counted(), settings.trials)
                    bar.update(already)
                    warm = warm_starts(role, M, shape, best_before.get(role, []), baseline,
                                       settings.device.shared_memory_bytes)
                    runner.enqueue(warm)
                    remaining = studies_total - studies_done
                    study_deadline = time.monotonic() + (deadline_all - time.monotonic()) / max(remaining, 1)
                    before = runner.counted()
                    runner.run(study_deadline)
                    bar.update(max(0, settings.trials - already - (runner.counted() - before)))
                    studies_done += 1
                    result = runner.result()
                    if result is None:
                        reasons = {t.user_attrs.get("reason") for t in study.trials if t.user_attrs.get("reason")}
                        raise RuntimeError(f"no config of {role} at M={M} compiled, ran and passed the check; "
                                           f"reasons: {'; '.join(sorted(reasons))[:400]}")
                    results[role] = result
                    best_before[role] = [config for _, config in result.ranked[:3]]
                entry = {}
                for variant in settings.variants:
                    role2 = "gemm2_" + variant
                    entry[variant] = choose_pair(bench, variant, results["gemm1"], results[role2], settings, clock)
                entry["winner"] = min(settings.variants, key=lambda v: entry[v]["layer_us"])
                summary.append((M, entry))
                _write_entry(path, settings, shape, M, entry, search)
                del bench
            if path not in written:
                written.append(path)
            _print_summary(shape, summary, log)
            del w1, w2
    finally:
        bar.close()
        compiler.close()
    log(f"device busy {100 * clock.busy_fraction():.0f}% of {time.monotonic() - clock.start:.0f} s wall time "
        f"(checking and timing; the rest is compiling, sampling and bookkeeping)")
    if not settings.device.is_gpu:
        log("note: these timings come from Triton's interpreter on the CPU and mean nothing about speed")
    return written


def _fail_stale(study) -> None:
    """Trials left RUNNING by a killed run never finish: mark them failed so they are retried."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def _write_entry(path: Path, settings: TuneSettings, shape: MoEShape, M: int, entry: dict, search: dict) -> None:
    record = {v: {k: entry[v][k] for k in ("gemm1", "gemm2", "gemm1_us", "gemm2_us", "layer_us")}
              for v in settings.variants}
    record["winner"] = entry["winner"]
    table = new_table(settings.device, shape.E, shape.N, shape.K, shape.topk, settings.dtype, search)
    table["batch_sizes"] = {M: record}
    if path.exists():
        table = merge_tables(read_table(path), table)
    write_table(path, table)


def _print_summary(shape: MoEShape, summary: list, log: Callable[[str], None]) -> None:
    log(f"\n{shape.describe()}")
    log(f"{'batch':>7s} {'unfused us':>11s} {'fused us':>10s} {'speedup':>8s}  winner")
    for M, entry in summary:
        u = entry.get("unfused", {}).get("layer_us")
        f = entry.get("fused", {}).get("layer_us")
        speed = f"{u / f:8.3f}" if u and f else f"{'-':>8s}"
        log(f"{M:7d} {u if u else float('nan'):11.1f} {f if f else float('nan'):10.1f} {speed}  {entry['winner']}")
