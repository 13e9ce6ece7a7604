"""`moetune compare`: the whole MoE layer timed per contender, through the production code path.

Contenders, per shape and batch size M (each runs `run_aligned` with its configs and variant;
routing and alignment stay outside the timed region):
  unfused     the dispatcher's configs for the unfused variant (get_config(variant="unfused"))
  fused       the dispatcher's configs for the fused variant (get_config(variant="fused"))
  dispatcher  what production runs: get_config() with no variant, its configs and its variant
  default     configs.default_config for both GEMMs, unfused
  baseline    vLLM/SGLang configs from --baseline-configs (nearest M), unfused
Beside them, where the device, shape and dtype have anchor figures (another framework's layer
times measured beforehand: anchors.json in the --baseline-configs folder, else those packaged
with moetune, SGLang's best path on the H200), the figure at each of its batch sizes and the
dispatcher's time over it.

With fp8 weights (--dtype fp8_w8a8 [--block-shape BN,BK], or an FP8 preset) the contenders are
instead, on one set of weights and inputs:
  fp8         the fp8 layer as the dispatcher runs it (a tuned fp8 table of the quant mode, or
              the default heuristic), checked against the emulated-quantization float64 reference
  bf16        the same weights unquantized, in the activations' dtype (fp16 in the interpreter),
              as the dispatcher runs them (a tuned table or the default heuristic), checked
              against the float64 reference
  baseline    the shipped vLLM/SGLang fp8 configs of the quant mode (nearest M), unfused, on
              moetune's fp8 kernel

Every config is looked up before anything runs (plan_shape), each contender is checked and
timed with measure.py (measure_shape); compare_output.py writes the results (CSV, JSON, and
two PNGs per shape when matplotlib is installed) only after every measurement succeeded. The
command line is in cli/compare.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .baseline_configs import Anchor, find_anchor
from .device import DeviceInfo, torch_device
from .measure import GRAPH_TIMER, Check, LayerCase, Timing, check, time_interleaved
from .reference import TOLERANCE
from .shapes import MoEShape
from .tables import FP8_W8A8, TORCH_DTYPES, TableDtype
from .types import Variant

CONTENDERS = ("unfused", "fused", "dispatcher", "default", "baseline")
SHORT_NAMES = {"unfused": "unf", "fused": "fus", "dispatcher": "disp", "default": "dflt", "baseline": "base",
               "fp8": "fp8", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
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
    fp8: bool = False  # runs the fp8 weights


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
    block_shape: tuple[int, int] | None = None  # fp8_w8a8: the weights' scale blocks (None: per tensor)
    activations: str | None = None  # fp8_w8a8: the activations' dtype, the unquantized contender's

    @property
    def fp8(self) -> bool:
        return self.dtype == FP8_W8A8

    @property
    def table_dtype(self) -> TableDtype:
        return TableDtype.of(self.dtype, self.block_shape)

    @property
    def unquantized(self) -> str:
        """The dtype of the weights the non-fp8 contenders run."""
        return self.activations or self.dtype

    @property
    def file_dtype(self) -> str:
        """The dtype as the result files' names spell it."""
        block = f"_block{self.block_shape[0]}x{self.block_shape[1]}" if self.fp8 and self.block_shape else ""
        return f"{self.dtype}{block}"


@dataclass
class ShapePlan:
    """Every contender's configs for every batch size of one shape, looked up before running."""

    shape: MoEShape
    contenders: dict[int, list[Contender]]  # M -> contenders, in CONTENDERS order
    notes: list[str] = field(default_factory=list)
    anchor: Anchor | None = None  # measured figures to report the dispatcher against


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
    anchor_us: float | None = None  # the anchor figure at this M, if it has one

    def us(self, name: str) -> float | None:
        return self.measured[name].time_us if name in self.measured else None

    @property
    def speedup(self) -> float:
        """Unfused time over fused time: above 1 means fused is faster."""
        return self.measured["unfused"].time_us / self.measured["fused"].time_us

    @property
    def winner(self) -> str:
        return "fused" if self.measured["fused"].time_us < self.measured["unfused"].time_us else "unfused"

    def ratio(self, name: str, other: str) -> float | None:
        """name's time over other's; None where either did not run."""
        mine, theirs = self.us(name), self.us(other)
        return mine / theirs if mine is not None and theirs is not None else None

    def roofline_ratio(self, name: str) -> float:
        return self.measured[name].time_us / self.roofline_us

    @property
    def anchor_ratio(self) -> float | None:
        """The dispatcher's time over the anchor figure; None without one."""
        return self.us("dispatcher") / self.anchor_us if self.anchor_us is not None else None


@dataclass
class ShapeResult:
    plan: ShapePlan
    rows: list[Row]
    tolerance: float  # the first contender's; fp8 and unquantized contenders differ (tolerances)
    tolerances: dict[str, float] = field(default_factory=dict)  # contender name -> its tolerance

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
    from .loader import ConfigWarning, nearest_batch_size

    notes: list[str] = []
    baseline = _find_baseline(shape, settings, notes)
    anchor = None if settings.fp8 else find_anchor(shape.E, shape.N, shape.K, shape.topk, settings.dtype,
                                                   settings.device.key, settings.baseline_dir)
    contenders: dict[int, list[Contender]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        for M in settings.batch_sizes:
            row = _fp8_contenders(shape, settings, M) if settings.fp8 else _contenders(shape, settings, M)
            if baseline is not None:
                key1, key2 = nearest_batch_size(baseline.gemm1, M), nearest_batch_size(baseline.gemm2, M)
                row.append(Contender("baseline", baseline.gemm1[key1], baseline.gemm2[key2], Variant.UNFUSED,
                                     " + ".join(baseline.sources), key1 if key1 == key2 else None, settings.fp8))
            contenders[M] = row
    for warning in caught:
        if issubclass(warning.category, ConfigWarning):
            notes.append(str(warning.message))
        else:  # not ours to report: pass it on
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return ShapePlan(shape, contenders, notes, anchor)


def _find_baseline(shape: MoEShape, settings: CompareSettings, notes: list[str]):
    """The --baseline-configs files of this shape and quant mode, or None with a note why."""
    if settings.baseline_dir is None:
        if settings.fp8:
            notes.append("no shipped fp8 configs for this shape: no --baseline-configs folder was given")
        return None
    from .baseline_configs import find_baseline

    baseline = find_baseline(settings.baseline_dir, shape.E, shape.N, settings.device.key, settings.table_dtype)
    if baseline is None:
        what = "shipped fp8 configs for this shape" if settings.fp8 else "baseline configs for"
        notes.append(f"no {what} E={shape.E},N={shape.N}{_quant_words(settings)} on {settings.device.key} "
                     f"under {settings.baseline_dir}: no baseline contender")
    return baseline


def _quant_words(settings: CompareSettings) -> str:
    return f" ({settings.table_dtype})" if settings.fp8 else ""


def _lookup(shape: MoEShape, settings: CompareSettings, M: int, variant: str | None, dtype):
    from .loader import get_config

    # Named variants are compared even in deterministic mode; the dispatcher follows it.
    deterministic = False if variant is not None else None
    return get_config(shape.E, shape.N, shape.K, shape.topk, dtype, M, variant=variant,
                      device=settings.device, deterministic=deterministic)


def _contenders(shape: MoEShape, settings: CompareSettings, M: int) -> list[Contender]:
    """The tuned variants, the dispatcher's pick and the default heuristic at batch size M."""
    from .loader import default_selection

    named = [(name, variant, _lookup(shape, settings, M, variant, settings.dtype))
             for name, variant in (("unfused", "unfused"), ("fused", "fused"), ("dispatcher", None))]
    named.append(("default", None, default_selection(shape.E, shape.N, shape.K, shape.topk, M)))
    # The default heuristic's selection says "unfused"; a named contender runs its own variant.
    return [Contender(name, selection.gemm1.to_json(), selection.gemm2.to_json(), Variant(variant or selection.variant),
                      selection.source, selection.batch_size) for name, variant, selection in named]


def _fp8_contenders(shape: MoEShape, settings: CompareSettings, M: int) -> list[Contender]:
    """The fp8 layer and the unquantized one, each as the dispatcher runs it, at batch size M."""
    contenders = []
    for name, dtype, fp8 in (("fp8", settings.table_dtype, True), (settings.unquantized, settings.unquantized, False)):
        selection = _lookup(shape, settings, M, None, dtype)
        contenders.append(Contender(name, selection.gemm1.to_json(), selection.gemm2.to_json(), selection.variant,
                                    selection.source, selection.batch_size, fp8))
    return contenders


# ---------------------------------------------------------------------------------------
# Measuring


def measure_shape(plan: ShapePlan, settings: CompareSettings) -> ShapeResult:
    """Every contender of every batch size checked against the float64 reference and timed:
    one LayerCase per batch size (the same inputs for all its contenders; with fp8, a second
    case of the same inputs on the quantized weights), the contenders interleaved over
    settings.rounds rounds, each one's median kept."""
    from .bench import make_weights, roofline_floor_us

    shape = plan.shape
    dtype = TORCH_DTYPES[settings.unquantized]
    generator = torch.Generator(device=torch_device()).manual_seed(settings.seed)
    w1, w2 = make_weights(shape.E, shape.N, shape.K, dtype, torch_device(), generator)
    quantized = _quantized(w1, w2, settings.block_shape) if settings.fp8 else None
    rows, tolerances = [], {}
    for M, contenders in plan.contenders.items():
        case = LayerCase.random(w1, w2, M, shape.topk, seed=settings.seed * 1_000_003 + M)
        cases = {False: case}
        if quantized is not None:  # the same tokens and routing on the fp8 weights
            (w1_q, w2_q), scales = quantized
            cases[True] = LayerCase(replace(case.inputs, w1=w1_q, w2=w2_q), scales)
        runs = [cases[c.fp8].layer(c.variant, c.gemm1, c.gemm2) for c in contenders]
        checks = [check(cases[c.fp8], run) for c, run in zip(contenders, runs)]
        timings = time_interleaved(runs, settings.rounds, GRAPH_TIMER)
        floor = roofline_floor_us(M, shape.N, shape.K, shape.topk, case.experts_hit, dtype_bytes=dtype.itemsize)
        measured = {c.name: Measurement(c, checked, timing) for c, checked, timing in zip(contenders, checks, timings)}
        anchor_us = plan.anchor.times_us.get(M) if plan.anchor is not None else None
        rows.append(Row(M, case.experts_hit, floor, measured, anchor_us))
        tolerances.update({c.name: cases[c.fp8].tolerance for c in contenders})
        del case, cases, runs
    first = next(iter(tolerances.values()), None)
    return ShapeResult(plan, rows, first if first is not None else TOLERANCE[dtype], tolerances)


def _quantized(w1: torch.Tensor, w2: torch.Tensor, block_shape: tuple[int, int] | None):
    """((w1, w2) in fp8, their scales) as the fp8 checkpoints store them."""
    from .layer import Fp8Weights
    from .quant import quantize_weights

    (w1_q, w1_scale), (w2_q, w2_scale) = (quantize_weights(w, block_shape) for w in (w1, w2))
    return (w1_q, w2_q), Fp8Weights(w1_scale, w2_scale, block_shape)
