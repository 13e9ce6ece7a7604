"""The layer choice's second step: kernel switches on top of the pairs the studies measured.

Per variant, the search starts from the all-off pair choose.py picked, so the plain kernel
is always a measured point and a table is never slower than one tuned without switches.
It tries the families of switch_space.FAMILIES in turn, each setting of a family on top of
the best layer so far: on the best pair that switch set can run (`pair_pool`), checked
against the float64 reference like any candidate, then timed in interleaved rounds together
with the best so far, which the fastest replaces if it is faster by ADOPT_MARGIN. The order:
split-K first (small M, where it decides most), then SiLU in GEMM 1's epilogue (it changes
which GEMM 1 configs fit), the sorted rows with their TMA loads, TMA for the weights, and the
persistent schedule last (alone it loses; on top of the others it can win). A family costs
one layer per setting that the rules keep: a handful per batch size and variant.

Each layer tried builds up to four kernels the role studies never ran (GEMM 1 and GEMM 2 with
the switches, the activation over sorted rows or split-K partials). They compile ahead in the
compile processes (LayerBuilds): every family's layers on top of the all-off pair are known as
soon as the pair pool is, and once a switch set is adopted, the later families' layers on top
of it; the search waits for a layer's compile just before checking it. Without compile
processes (the interpreter) the check compiles inline, as before.

Dominance across batch sizes is not used: batch sizes are chosen in an order that depends
on the walk and on other processes, so such a rule would make a table depend on the run's
timing; the rules by M (split-K only for small grids, persistent only for large ones) cut
what it would.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, wait
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..switch_candidates import MEASURED, LayerCandidate
from ..types import OFF, LaunchConfig, Switches, Variant
from .compile_pool import COMPILE_TIMEOUT_S
from .inputs import BatchBench
from .settings import Clock
from .study import RoleResult
from .switch_space import PAIR_FREE_RULES, LayerTarget, SwitchSpace, switch_prune_reason, with_setting

# A switch set must beat the best layer so far by this fraction: below it the difference is
# timing noise, and the plain path keeps the table runnable by vLLM and SGLang.
ADOPT_MARGIN = 0.01

Pair = tuple[LaunchConfig, LaunchConfig]


def pair_pool(timed: Iterable[Pair], gemm1: RoleResult, gemm2: RoleResult) -> list[Pair]:
    """The pairs a switch set may run on, best first: those whose whole layers were timed, in
    that order, then every other pair of measured configs by the sum of their role times."""
    pool = list(dict.fromkeys(timed))
    seen = set(pool)
    rest = sorted((t1 + t2, c1, c2) for t1, c1 in gemm1.ranked for t2, c2 in gemm2.ranked if (c1, c2) not in seen)
    return pool + [(c1, c2) for _, c1, c2 in rest]


def first_runnable(switches: Switches, pool: list[Pair], target: LayerTarget) -> Pair | None:
    if not pool or switch_prune_reason(switches, *pool[0], target, PAIR_FREE_RULES) is not None:
        return None  # pruned on every pair: spare the look at each
    return next((pair for pair in pool if switch_prune_reason(switches, *pair, target) is None), None)


Family = tuple[str, list[Mapping[str, Any]]]
# What a layer's kernels depend on: its variant, switches and pair.
BuildKey = tuple[Variant, Switches, LaunchConfig, LaunchConfig]


def family_layers(best: LayerCandidate, settings: Sequence[Mapping[str, Any]], pool: list[Pair], target: LayerTarget,
                  space: SwitchSpace, tried: Iterable[Switches] = ()) -> list[LayerCandidate]:
    """The layers one family adds on top of `best`: each setting's switch set the kernels can
    run, the space allows and the rules keep on some pair of the pool, not `tried` yet, on
    the first such pair (not measured yet)."""
    skip, layers = set(tried), []
    for setting in settings:
        switches = with_setting(best.switches, setting)
        if switches is None or switches in skip or not space.allows(switches):
            continue
        pair = first_runnable(switches, pool, target)
        if pair is not None:
            skip.add(switches)
            layers.append(LayerCandidate(best.variant, switches, *pair, None, MEASURED))
    return layers


def planned_layers(best: LayerCandidate, families: Iterable[Family], pool: list[Pair], target: LayerTarget,
                   space: SwitchSpace, tried: Iterable[Switches] = ()) -> list[LayerCandidate]:
    """The layers the search checks in `families` while `best` stays the best: what it
    compiles ahead."""
    tried = {*tried, best.switches}
    layers = []
    for _, settings in families:
        layers += family_layers(best, settings, pool, target, space, tried)
        tried.update(layer.switches for layer in layers)
    return layers


def build_key(layer: LayerCandidate) -> BuildKey:
    return layer.variant, layer.switches, layer.gemm1, layer.gemm2


class LayerBuilds:
    """The kernels of the layers the search will check, compiling ahead: `submit(layer)` hands
    one to the compile processes (None: there are none, and the check compiles inline)."""

    def __init__(self, submit: Callable[[LayerCandidate], Future | None] | None = None):
        self.submit = submit
        self.futures: dict[BuildKey, Future] = {}
        self.plans: dict[Variant, set[BuildKey]] = {}

    @property
    def ahead(self) -> bool:
        """Whether layers compile ahead (else there is nothing to plan)."""
        return self.submit is not None

    def plan(self, variant: Variant, layers: Iterable[LayerCandidate]) -> None:
        """From now on the variant's search will check these layers: compile those not
        compiling yet, and drop what an earlier plan of the variant queued that this one
        does not hold (unless a process has started it)."""
        if not self.ahead:
            return
        planned = {build_key(layer): layer for layer in layers}
        for key in self.plans.get(variant, set()) - set(planned):
            future = self.futures.get(key)
            if future is not None and future.cancel():
                del self.futures[key]
        for key, layer in planned.items():
            if key not in self.futures:
                future = self.submit(layer)
                if future is not None:
                    self.futures[key] = future
        self.plans[variant] = set(planned)

    def wait(self, layer: LayerCandidate) -> None:
        """Until the layer's kernels are compiled, if they are compiling (a failed compile is
        the check's to meet: it compiles inline and fails with the launch's error)."""
        future = self.futures.get(build_key(layer))
        if future is not None:
            wait([future], timeout=COMPILE_TIMEOUT_S)


def checked(bench: BatchBench, layer: LayerCandidate, clock: Clock) -> LayerCandidate:
    """The layer with its status after the correctness check (not timed yet)."""
    try:
        with clock.busy():
            error = bench.check_layer(layer.variant, layer.gemm1, layer.gemm2, layer.switches)
    except Exception:  # noqa: BLE001 - out of resources or a launch error rejects this switch set only
        bench.synchronize()
        return dataclasses.replace(layer, status="launch_failed")
    return dataclasses.replace(layer, status=MEASURED if error <= bench.tolerance else "wrong_result")


def search_switches(bench: BatchBench, base: LayerCandidate, pool: list[Pair], target: LayerTarget,
                    space: SwitchSpace, rounds: int, clock: Clock, timer,
                    builds: LayerBuilds | None = None) -> tuple[LayerCandidate, list[LayerCandidate]]:
    """(the fastest layer found, every layer tried, `base` first). `base` is the variant's
    measured all-off layer; `timer(layers, rounds)` gives their interleaved median times.
    `builds`: the layers' compiles ahead, which the caller planned for `base`
    (planned_layers); the search plans again after each adoption (None: each check compiles
    inline)."""
    builds = builds or LayerBuilds()
    families = list(space.families())
    best = base
    tried: dict[Switches, LayerCandidate] = {OFF: base}
    for index, (_, settings) in enumerate(families):
        contenders = []
        for layer in family_layers(best, settings, pool, target, space, tried):
            builds.wait(layer)
            layer = tried[layer.switches] = checked(bench, layer, clock)
            if layer.status == MEASURED:
                contenders.append(layer)
        if not contenders:
            continue
        times = timer([best, *contenders], rounds)
        best = tried[best.switches] = dataclasses.replace(best, layer_us=times[0])
        for layer, layer_us in zip(contenders, times[1:]):
            tried[layer.switches] = dataclasses.replace(layer, layer_us=layer_us)
        fastest = min(contenders, key=lambda layer: tried[layer.switches].layer_us)
        if tried[fastest.switches].layer_us < best.layer_us * (1 - ADOPT_MARGIN):
            best = tried[fastest.switches]
            if builds.ahead:  # the later families' layers on top of the new best
                builds.plan(base.variant, planned_layers(best, families[index + 1:], pool, target, space, tried))
    return best, list(tried.values())

