"""`moetune compare`: the whole MoE layer timed per contender, through the production code path.

Contenders, per shape and batch size M (each runs `run_aligned` with its configs and variant;
routing and alignment stay outside the timed region):
  unfused     the dispatcher's configs for the unfused variant (get_config(variant="unfused"))
  fused       the dispatcher's configs for the fused variant (get_config(variant="fused"))
  dispatcher  what production runs: get_config() with no variant, its configs and its variant
  default     configs.default_config for both GEMMs, unfused
  baseline    vLLM/SGLang configs from --baseline-configs (nearest M), unfused

Every config is looked up before anything runs (plan_shape), each contender is checked and
timed with measure.py (measure_shape); compare_output.py writes the results (CSV, JSON, and
two PNGs per shape when matplotlib is installed) only after every measurement succeeded. The
command line is in cli/compare.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .device import DeviceInfo, torch_device
from .measure import GRAPH_TIMER, Check, LayerCase, Timing, check, time_interleaved
from .shapes import MoEShape
from .tables import TORCH_DTYPES
from .types import Variant

CONTENDERS = ("unfused", "fused", "dispatcher", "default", "baseline")
SHORT_NAMES = {"unfused": "unf", "fused": "fus", "dispatcher": "disp", "default": "dflt", "baseline": "base"}
TABLE_WIDTH = 120


@dataclass(frozen=True)
class Contender:
    """What one contender runs at one batch size, and where its configs came from."""

    name: str
    gemm1: dict
    gemm2: dict
    variant: Variant
    source: str
    batch_size: int | None  # the table or baseline key the configs were taken from


@dataclass
class CompareSettings:
    shapes: list[MoEShape]
    dtype: str
    batch_sizes: list[int]
    device: DeviceInfo
    out_dir: Path
    baseline_dir: Path | None
    seed: int
    tp_size: int
    command_line: str
    rounds: int = 1
    plots: bool = True  # the PNGs need matplotlib


@dataclass
class ShapePlan:
    """Every contender's configs for every batch size of one shape, looked up before running."""

    shape: MoEShape
    contenders: dict[int, list[Contender]]  # M -> contenders, in CONTENDERS order
    notes: list[str] = field(default_factory=list)


@dataclass
class Measurement:
    contender: Contender
    checked: Check
    timing: Timing

    @property
    def time_us(self) -> float:
        return self.timing.median_us

    @property
    def rel_error(self) -> float:
        return self.checked.error


@dataclass
class Row:
    M: int
    experts_hit: int
    roofline_us: float
    measured: dict[str, Measurement]  # contender name -> measurement

    def us(self, name: str) -> float | None:
        return self.measured[name].time_us if name in self.measured else None

    @property
    def speedup(self) -> float:
        """Unfused time over fused time: above 1 means fused is faster."""
        return self.measured["unfused"].time_us / self.measured["fused"].time_us

    @property
    def winner(self) -> str:
        return "fused" if self.measured["fused"].time_us < self.measured["unfused"].time_us else "unfused"

    def roofline_ratio(self, name: str) -> float:
        return self.measured[name].time_us / self.roofline_us


@dataclass
class ShapeResult:
    plan: ShapePlan
    rows: list[Row]
    tolerance: float

    @property
    def names(self) -> list[str]:
        return [c.name for c in next(iter(self.plan.contenders.values()))]

    def failures(self) -> list[str]:
        """'<contender> at M=<M>' for each measurement above the tolerance."""
        return [f"{name} at M={row.M}" for row in self.rows for name, measured in row.measured.items()
                if not measured.checked.ok]


# ---------------------------------------------------------------------------------------
# Which configs each contender runs


def plan_shape(shape: MoEShape, settings: CompareSettings) -> ShapePlan:
    """Look up every contender's configs now, so that a bad table fails before anything runs."""
    from .loader import ConfigWarning, default_selection, get_config, nearest_batch_size

    baseline = None
    notes: list[str] = []
    if settings.baseline_dir is not None:
        from .export import find_baseline

        baseline = find_baseline(settings.baseline_dir, shape.E, shape.N, settings.device.key, settings.dtype)
        if baseline is None:
            notes.append(f"no baseline configs for E={shape.E},N={shape.N} on {settings.device.key} "
                         f"under {settings.baseline_dir}: no baseline contender")

    def lookup(M: int, variant: str | None):
        # Named variants are compared even in deterministic mode; the dispatcher follows it.
        deterministic = False if variant is not None else None
        return get_config(shape.E, shape.N, shape.K, shape.topk, settings.dtype, M, variant=variant,
                          device=settings.device, deterministic=deterministic)

    contenders: dict[int, list[Contender]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        for M in settings.batch_sizes:
            row = []
            named = [(name, variant, lookup(M, variant))
                     for name, variant in (("unfused", "unfused"), ("fused", "fused"), ("dispatcher", None))]
            named.append(("default", None, default_selection(shape.E, shape.N, shape.K, shape.topk, M)))
            for name, variant, selection in named:
                # The default heuristic's selection says "unfused"; a named contender runs its own variant.
                row.append(Contender(name, selection.gemm1.to_json(), selection.gemm2.to_json(),
                                     Variant(variant or selection.variant),
                                     selection.source, selection.batch_size))
            if baseline is not None:
                key1, key2 = nearest_batch_size(baseline.gemm1, M), nearest_batch_size(baseline.gemm2, M)
                row.append(Contender("baseline", baseline.gemm1[key1], baseline.gemm2[key2], Variant.UNFUSED,
                                     " + ".join(baseline.sources), key1 if key1 == key2 else None))
            contenders[M] = row
    for warning in caught:
        if issubclass(warning.category, ConfigWarning):
            notes.append(str(warning.message))
        else:  # not ours to report: pass it on
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return ShapePlan(shape, contenders, notes)


# ---------------------------------------------------------------------------------------
# Measuring


def measure_shape(plan: ShapePlan, settings: CompareSettings) -> ShapeResult:
    """Every contender of every batch size checked against the float64 reference and timed:
    one LayerCase per batch size (the same inputs for all its contenders), the contenders
    interleaved over settings.rounds rounds, each one's median kept."""
    from .bench import make_weights, roofline_floor_us
    from .reference import TOLERANCE

    shape = plan.shape
    dtype = TORCH_DTYPES[settings.dtype]
    generator = torch.Generator(device=torch_device()).manual_seed(settings.seed)
    w1, w2 = make_weights(shape.E, shape.N, shape.K, dtype, torch_device(), generator)
    rows = []
    for M, contenders in plan.contenders.items():
        case = LayerCase.random(w1, w2, M, shape.topk, seed=settings.seed * 1_000_003 + M)
        runs = [case.layer(c.variant, c.gemm1, c.gemm2) for c in contenders]
        checks = [check(case, run) for run in runs]
        timings = time_interleaved(runs, settings.rounds, GRAPH_TIMER)
        floor = roofline_floor_us(M, shape.N, shape.K, shape.topk, case.experts_hit, dtype_bytes=dtype.itemsize)
        measured = {c.name: Measurement(c, checked, timing) for c, checked, timing in zip(contenders, checks, timings)}
        rows.append(Row(M, case.experts_hit, floor, measured))
        del case, runs
    return ShapeResult(plan, rows, TOLERANCE[dtype])
