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

Dominance across batch sizes is not used: batch sizes are chosen in an order that depends
on the walk and on other processes, so such a rule would make a table depend on the run's
timing; the rules by M (split-K only for small grids, persistent only for large ones) cut
what it would.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from ..switch_candidates import MEASURED, LayerCandidate
from ..types import OFF, LaunchConfig, Switches
from .inputs import BatchBench
from .settings import Clock
from .study import RoleResult
from .switch_space import LayerTarget, SwitchSpace, switch_prune_reason, with_setting

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
    return next((pair for pair in pool if switch_prune_reason(switches, *pair, target) is None), None)


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
                    space: SwitchSpace, rounds: int, clock: Clock, timer) -> tuple[LayerCandidate, list[LayerCandidate]]:
    """(the fastest layer found, every layer tried, `base` first). `base` is the variant's
    measured all-off layer; `timer(layers, rounds)` gives their interleaved median times."""
    best = base
    tried: dict[Switches, LayerCandidate] = {OFF: base}
    for _, settings in space.families():
        contenders = []
        for setting in settings:
            switches = with_setting(best.switches, setting)
            if switches is None or switches in tried or not space.allows(switches):
                continue
            pair = first_runnable(switches, pool, target)
            if pair is None:
                continue
            layer = checked(bench, LayerCandidate(base.variant, switches, *pair, None, MEASURED), clock)
            tried[switches] = layer
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
    return best, list(tried.values())

