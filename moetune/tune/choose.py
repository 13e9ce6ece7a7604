"""One batch size's layer choice and its table entry.

Per variant, the best few GEMM 1 configs are paired with the best few GEMM 2 configs of that
variant, whole layers (alignment included) are timed, the top few re-timed in interleaved
rounds, and the fastest pair that passes the correctness check is kept. The kernel switches
of the space are then tried on top of it (switch_search.py). The entry, with every switch
candidate measured, is merged into the shape's table, written atomically, and marked on the
batch size's GEMM 1 study with what it was chosen from (the studies' measurements and the
switch space), so that a rerun finding the same studies and the same entry leaves the table
as it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
from dataclasses import dataclass, replace
from typing import Callable

from ..bench import interleaved_times
from ..errors import TableError
from ..kernels.grouped_gemm import default_num_programs
from ..shapes import MoEShape
from ..switch_candidates import MEASURED, SWITCH_CANDIDATES_KEY, LayerCandidate
from ..tables import BatchRecord, VariantRecord, read_table, record_batch
from ..types import OFF, LaunchConfig, Role, Switches, Variant
from .compile_pool import Compiler, LayerRequest
from .inputs import BatchBench
from .sampler import sampler_description
from .settings import BatchKey, Clock, TuneSettings
from .study import RoleResult, rejection_reasons, study_result
from .switch_search import LayerBuilds, Pair, pair_pool, planned_layers, search_switches
from .switch_space import LayerTarget, SwitchSpace

# GEMM 1 study user attribute: the entry written for its batch size, a digest of the
# measured configs it was chosen from and the switch space it searched.
WRITTEN_ATTR = "table_entry"


@dataclass(frozen=True)
class Layer:
    variant: Variant
    gemm1: LaunchConfig
    gemm2: LaunchConfig
    switches: Switches = OFF


@dataclass(frozen=True)
class PairChoice:
    """A variant's chosen all-off layer as its table record, and the all-off pairs whose whole
    layers were timed, fastest first (where the switch search looks for pairs)."""

    record: VariantRecord
    timed: tuple[Pair, ...] = ()


@dataclass(frozen=True)
class BatchEntry:
    pairs: dict[Variant, VariantRecord]
    candidates: tuple[LayerCandidate, ...] = ()  # every switch set tried, per variant (if any was)

    @property
    def winner(self) -> Variant:
        return min(self.pairs, key=lambda variant: self.pairs[variant].layer_us)

    def record(self) -> BatchRecord:
        """The batch size's entry in a table (the record tables.py defines), with the switch
        candidates as an informational key (switch_candidates.py)."""
        extra = {SWITCH_CANDIDATES_KEY: [candidate.to_json() for candidate in self.candidates]} if self.candidates else {}
        return BatchRecord(dict(self.pairs), self.winner, extra)


def interleaved_medians(bench: BatchBench, layers: list[Layer | LayerCandidate], rounds: int,
                        clock: Clock) -> list[float]:
    """Median layer time of each layer, timed in interleaved rounds: each round times every
    layer once, so drift between rounds hits all of them alike."""
    timings = [functools.partial(bench.time_layer, layer.variant, layer.gemm1, layer.gemm2, layer.switches)
               for layer in layers]
    with clock.busy():
        times = interleaved_times(timings, rounds)
    return [statistics.median(t) for t in times]


def choose_pair(bench: BatchBench, variant: Variant, gemm1: RoleResult, gemm2: RoleResult, settings: TuneSettings,
                clock: Clock) -> PairChoice:
    """Best (GEMM 1, GEMM 2) pair of one variant by whole-layer time, alignment included:
    every pair of the best few of each role once, then the best few again in rounds."""
    pairs = [Layer(variant, c1, c2) for _, c1 in gemm1.ranked[:settings.top_pairs]
             for _, c2 in gemm2.ranked[:settings.top_pairs]]
    first = interleaved_medians(bench, pairs, 1, clock)
    ordered = [pair for _, pair in sorted(zip(first, pairs), key=lambda item: item[0])]
    finalists = ordered[:settings.top_pairs]
    medians = interleaved_medians(bench, finalists, settings.retime_rounds, clock)
    retimed = [layer for _, layer in sorted(zip(medians, finalists), key=lambda item: item[0])]
    timed = tuple((layer.gemm1, layer.gemm2) for layer in retimed + ordered[settings.top_pairs:])
    for layer_us, layer in sorted(zip(medians, finalists), key=lambda item: item[0]):
        with clock.busy():
            error = bench.check_layer(variant, layer.gemm1, layer.gemm2)
        if error <= bench.tolerance:
            record = VariantRecord(layer.gemm1, layer.gemm2, role_time(gemm1, layer.gemm1),
                                   role_time(gemm2, layer.gemm2), layer_us)
            return PairChoice(record, timed)
    raise RuntimeError(f"no {variant} pair passed the correctness check at M={bench.M}")


def role_time(result: RoleResult, config: LaunchConfig) -> float:
    return next(t for t, c in result.ranked if c == config)


def layer_target(bench: BatchBench, settings: TuneSettings) -> LayerTarget:
    device = settings.device
    return LayerTarget(bench.M, bench.E, bench.N, bench.K, bench.topk, settings.dtype.operand_bytes,
                       device.shared_memory_bytes, default_num_programs(bench.w1.device), device.compute_capability,
                       bench.global_experts)


def layer_builds(bench: BatchBench, compiler: Compiler | None) -> LayerBuilds:
    """The switch layers' compiles of this batch size, in `compiler`'s processes (none: inline)."""
    if compiler is None:
        return LayerBuilds()
    shape = MoEShape(bench.E, bench.N, bench.K, bench.topk)
    return LayerBuilds(lambda layer: compiler.submit_layer(LayerRequest(
        bench.M, shape, bench.dtype, bench.quant, layer.variant, layer.gemm1, layer.gemm2, layer.switches)))


def plan_switch_layers(builds: LayerBuilds, variant: Variant, pool: list[Pair], target: LayerTarget,
                       space: SwitchSpace) -> None:
    """Compile ahead the layers the variant's switch search checks on its all-off layer: each
    family's settings, on the first pair of `pool` the rules keep."""
    if builds.ahead:
        base = LayerCandidate(variant, OFF, *pool[0], None, MEASURED)  # only its variant and switches count
        builds.plan(variant, planned_layers(base, space.families(), pool, target, space))


def with_switches(bench: BatchBench, variant: Variant, pair: PairChoice, gemm1: RoleResult, gemm2: RoleResult,
                  pool: list[Pair], target: LayerTarget, settings: TuneSettings, clock: Clock,
                  builds: LayerBuilds | None = None) -> tuple[VariantRecord, list[LayerCandidate]]:
    """The variant's choice after the switch search on top of its all-off `pair` (`pool`: the
    pairs the search may run a switch set on), and every switch candidate measured (the
    all-off pair first)."""
    base = LayerCandidate(variant, OFF, pair.record.gemm1, pair.record.gemm2, pair.record.layer_us, MEASURED)
    best, tried = search_switches(bench, base, pool, target, settings.space.switches, settings.retime_rounds, clock,
                                  lambda layers, rounds: interleaved_medians(bench, layers, rounds, clock), builds)
    chosen = VariantRecord(best.gemm1, best.gemm2, role_time(gemm1, best.gemm1), role_time(gemm2, best.gemm2),
                           best.layer_us, best.switches)
    return chosen, tried


def batch_entry(bench: BatchBench, results: dict[Role, RoleResult], settings: TuneSettings, clock: Clock,
                compiler: Compiler | None = None) -> BatchEntry:
    """The table entry of one batch size, from the results of its roles' settled studies.
    With a `compiler`, the switch layers compile in its processes while the pairs are timed:
    first those on the pairs best by summed role time, then, once each variant's pair is
    chosen, those on its pool (which the searches, one variant after the other, wait for)."""
    roles = {variant: (results[Role.GEMM1], results[Role.down(variant)]) for variant in settings.variants}
    space = settings.space.switches
    target = layer_target(bench, settings)
    builds = layer_builds(bench, compiler if space.searches else None)
    for variant, (gemm1, gemm2) in roles.items():
        plan_switch_layers(builds, variant, pair_pool((), gemm1, gemm2), target, space)
    chosen = {variant: choose_pair(bench, variant, *roles[variant], settings, clock) for variant in roles}
    if not space.searches:
        pairs, candidates = {variant: pair.record for variant, pair in chosen.items()}, []
    else:
        pools = {variant: pair_pool(pair.timed, *roles[variant]) for variant, pair in chosen.items()}
        for variant, pool in pools.items():
            plan_switch_layers(builds, variant, pool, target, space)
        pairs, candidates = {}, []
        for variant, pair in chosen.items():
            pairs[variant], tried = with_switches(bench, variant, pair, *roles[variant], pools[variant], target,
                                                  settings, clock, builds)
            candidates += tried
    if len(pairs) > 1:
        # At large batches the variants are often closer than the spread of one timing: time
        # their chosen pairs against each other before naming the winner.
        layers = [Layer(variant, pair.gemm1, pair.gemm2, pair.switches) for variant, pair in pairs.items()]
        for layer, layer_us in zip(layers, interleaved_medians(bench, layers, settings.retime_rounds, clock)):
            pairs[layer.variant] = replace(pairs[layer.variant], layer_us=layer_us)
    return BatchEntry(pairs, tuple(candidates))


def role_results(key: BatchKey, studies: dict[Role, object]) -> dict[Role, RoleResult]:
    """What each role's study measured; raises when one has no config that passed."""
    results = {}
    for role, study in studies.items():
        results[role] = study_result(study)
        if results[role] is None:
            raise RuntimeError(f"no config of {role} at M={key.M} compiled, ran and passed the check; "
                               f"reasons: {'; '.join(rejection_reasons(study))[:400]}")
    return results


def search_record(settings: TuneSettings) -> dict:
    return {"sampler": sampler_description(), "trials": settings.trials, "seed": settings.seed,
            "time_budget_min": settings.time_budget_min, "space": settings.space.to_dict()}


def write_batch(settings: TuneSettings, key: BatchKey, bench: BatchBench, studies: dict[Role, object],
                clock: Clock, compiler: Compiler | None = None) -> dict:
    """Choose one batch size's pairs from its settled studies, write them into its table and
    mark them written; returns the entry's record. `compiler`: where the switch layers compile
    ahead (None: inline)."""
    results = role_results(key, studies)
    shape = key.shape
    record = record_batch(settings.table_path(shape), settings.device, shape.E, shape.N, shape.K, shape.topk,
                          settings.dtype, key.M, batch_entry(bench, results, settings, clock, compiler).record(),
                          search_record(settings), settings.table_shape_extra(shape)).batch_sizes[key.M].to_json()
    digests = {role.value: digest for role, digest in _digests(results).items()}
    studies[Role.GEMM1].set_user_attr(WRITTEN_ATTR, {"results": digests, "record": record,
                                                     "switches": settings.space.switches.to_dict()})
    return record


def written_record(settings: TuneSettings, key: BatchKey, studies: dict[Role, object]) -> dict | None:
    """The batch size's entry in its table, if it is the one written from what these
    studies hold now (nothing measured since) and holds every variant asked for; None when
    the pairs must be chosen (again), and always under --retime."""
    if settings.retime or Role.GEMM1 not in studies:
        return None
    mark = studies[Role.GEMM1].user_attrs.get(WRITTEN_ATTR)
    path = settings.table_path(key.shape)
    if not isinstance(mark, dict) or not path.is_file():
        return None
    try:
        record = read_table(path)["batch_sizes"].get(key.M)
    except TableError:
        return None  # rewritten with the entry, or refused there by name
    if record is None or _canonical(record) != _canonical(mark.get("record")):
        return None
    if _canonical(mark.get("switches")) != _canonical(settings.space.switches.to_dict()):
        return None  # the switch candidates were searched in another space
    if any(variant.value not in record for variant in settings.variants):
        return None
    results = {role: study_result(study) for role, study in studies.items()}
    if any(result is None for result in results.values()):
        return None
    written_from = mark.get("results")
    if not isinstance(written_from, dict) or any(written_from.get(role.value) != digest
                                                 for role, digest in _digests(results).items()):
        return None
    return record


def _canonical(data) -> str:
    return json.dumps(data, sort_keys=True)


def _digests(results: dict[Role, RoleResult]) -> dict[Role, str]:
    """A digest of each role's measured configs and times."""
    return {role: hashlib.sha256(_canonical([(us, config.to_json()) for us, config in result.ranked]).encode())
            .hexdigest() for role, result in results.items()}


def print_summary(shape: MoEShape, rows: list[tuple[int, dict]], log: Callable[[str], None]) -> None:
    """The layer times of each batch size's entry, per variant, and the winner."""
    log(f"\n{shape.describe()}")
    log(f"{'batch':>7s} {'unfused us':>11s} {'fused us':>10s} {'speedup':>8s}  winner")
    for M, record in rows:
        u = record.get(Variant.UNFUSED.value, {}).get("layer_us")
        f = record.get(Variant.FUSED.value, {}).get("layer_us")
        speed = f"{u / f:8.3f}" if u and f else f"{'-':>8s}"
        log(f"{M:7d} {u if u else float('nan'):11.1f} {f if f else float('nan'):10.1f} {speed}  {record['winner']}")
