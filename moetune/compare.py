"""`moetune compare`: the whole MoE layer timed per contender, through the production code path.

Contenders, per shape and batch size M (each runs `run_aligned` with its configs and variant;
routing and alignment stay outside the timed region):
  unfused     the dispatcher's configs for the unfused variant (get_config(variant="unfused"))
  fused       the dispatcher's configs for the fused variant (get_config(variant="fused"))
  dispatcher  what production runs: get_config() with no variant, its configs and its variant
  default     configs.default_config for both GEMMs, unfused
  baseline    vLLM/SGLang configs from --baseline-configs (nearest M), unfused

Every config is looked up before anything runs (plan_shape), each contender is checked and
timed with measure.py (measure_shape), and the results are written (CSV, JSON, and two PNGs
per shape when matplotlib is installed) only after every measurement succeeded. The command
line is in cli/compare.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .device import DeviceInfo, torch_device
from .measure import GRAPH_TIMER, Check, LayerCase, Timing, check, time_interleaved
from .shapes import MoEShape
from .tables import TORCH_DTYPES, write_atomic
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


PLOTS_NEED_MATPLOTLIB = "plots need matplotlib: pip install 'moetune[plots]'"


def plots_available() -> bool:
    """Whether matplotlib can draw the PNGs here."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError:
        return False
    return True


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


# ---------------------------------------------------------------------------------------
# The printed report


def _number(value: float | None, width: int, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    text = f"{value:.{digits}f}"
    for shorter in (".3g", ".2g", ".0e"):  # the interpreter's times run to seconds
        if len(text) <= width:
            break
        text = f"{value:{shorter}}"
    return text.rjust(width)


def _error(value: float | None, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return ("inf" if math.isinf(value) else f"{value:.0e}").rjust(width)


def report_text(result: ShapeResult, settings: CompareSettings) -> str:
    """Config sources, then one line per batch size; fits in TABLE_WIDTH columns."""
    shape, names = result.plan.shape, result.names
    lines = [f"{shape.describe()}, tp {settings.tp_size}, {settings.dtype}, on {settings.device.name}"]
    lines.append("contender   runs     configs from")
    for name in names:
        sources = contender_sources(result.rows, name)
        variants = sorted({row.measured[name].contender.variant for row in result.rows})
        lines.append(f"{name:<11s} {'/'.join(variants):<8s} {'; '.join(sources)}")
    lines += [textwrap.fill(f"note: {note}", TABLE_WIDTH, subsequent_indent="  ", break_on_hyphens=False,
                            break_long_words=False) for note in result.plan.notes]

    header = [("M", 6)] + [(f"{SHORT_NAMES[n]} us", 8) for n in names]
    header += [("f/u", 5), ("unf/rf", 6), ("fus/rf", 6), ("win", 3), ("pick", 4)]
    header += [(f"e:{SHORT_NAMES[n]}", 6) for n in names]
    lines.append(" ".join(title.rjust(width) for title, width in header))
    for row in result.rows:
        cells = [str(row.M).rjust(6)]
        cells += [_number(row.us(n), 8) for n in names]
        cells += [_number(row.speedup, 5, 2), _number(row.roofline_ratio("unfused"), 6, 2),
                  _number(row.roofline_ratio("fused"), 6, 2), SHORT_NAMES[row.winner].rjust(3),
                  SHORT_NAMES[row.measured["dispatcher"].contender.variant].rjust(4)]
        cells += [_error(row.measured[n].rel_error, 6) for n in names]
        flag = "  !" if any(not m.checked.ok for m in row.measured.values()) else ""
        lines.append(" ".join(cells) + flag)
    lines.append("us: median per layer call; f/u: unfused us / fused us; x/rf: time over the roofline floor "
                 "(H200 ceilings);")
    lines.append(f"win: faster of unf/fus; pick: the dispatcher's variant; e:x: relative error vs float64 "
                 f"(tolerance {result.tolerance:.0e}, ! above)")
    return "\n".join(lines) + "\n"


def contender_sources(rows: list[Row], name: str) -> list[str]:
    """Distinct config sources of one contender over the batch sizes, in first-seen order."""
    sources: list[str] = []
    for row in rows:
        source = row.measured[name].contender.source
        if source not in sources:
            sources.append(source)
    return sources


# ---------------------------------------------------------------------------------------
# Files


def file_stem(shape: MoEShape, dtype: str, tp_size: int) -> str:
    base = shape.name or f"E{shape.E}_N{shape.N}_K{shape.K}_topk{shape.topk}"
    base = re.sub(r"[^\w.-]", "_", base)
    if shape.name and tp_size > 1:  # a preset's N differs per tensor-parallel size
        base += f"_tp{tp_size}"
    return f"{base}_{dtype}"


def _compact(config: dict) -> str:
    from .loader import compact_config

    return compact_config(config)


def _as_is(value):
    return value


# Per batch size, after the contenders' columns.
SUMMARY_KEYS = ("fused_speedup", "unfused_roofline_ratio", "fused_roofline_ratio", "winner", "dispatcher_pick")
# A contender's CSV columns: `<name>_<suffix>`, from its JSON record's `key`, written by `text`.
CSV_CONTENDER_FIELDS = (
    ("us", "us", _as_is),
    ("rounds_us", "rounds_us", lambda times: " ".join(f"{t:.3f}" for t in times)),
    ("rel_error", "rel_error", _as_is),
    ("variant", "variant", _as_is),
    ("source", "source", _as_is),
    ("table_M", "table_batch_size", lambda value: "" if value is None else value),
    ("gemm1", "gemm1", _compact),
    ("gemm2", "gemm2", _compact),
)


def row_records(result: ShapeResult) -> list[dict]:
    """What the CSV and JSON files say of each batch size, in the JSON's shape."""
    records = []
    for row in result.rows:
        contenders = {}
        for name in result.names:
            measured = row.measured[name]
            c = measured.contender
            contenders[name] = {"us": measured.time_us, "rounds_us": list(measured.timing.rounds_us),
                                "rel_error": measured.rel_error, "variant": c.variant, "source": c.source,
                                "table_batch_size": c.batch_size, "gemm1": c.gemm1, "gemm2": c.gemm2}
        summary = (row.speedup, row.roofline_ratio("unfused"), row.roofline_ratio("fused"), row.winner,
                   row.measured["dispatcher"].contender.variant)
        records.append({"M": row.M, "experts_hit": row.experts_hit, "roofline_us": row.roofline_us,
                        **dict(zip(SUMMARY_KEYS, summary)), "contenders": contenders})
    return records


def csv_columns(names: list[str]) -> list[str]:
    columns = ["M", "experts_hit", "roofline_us"]
    for name in names:
        columns += [f"{name}_{suffix}" for suffix, _, _ in CSV_CONTENDER_FIELDS]
    return columns + list(SUMMARY_KEYS)


def csv_rows(result: ShapeResult) -> list[dict]:
    rows = []
    for record in row_records(result):
        row = {key: record[key] for key in ("M", "experts_hit", "roofline_us")}
        for name, contender in record["contenders"].items():
            row.update({f"{name}_{suffix}": text(contender[key]) for suffix, key, text in CSV_CONTENDER_FIELDS})
        rows.append(row | {key: record[key] for key in SUMMARY_KEYS})
    return rows


def csv_text(result: ShapeResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(result.names), lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buffer.getvalue()


def _finite_or_none(value: float) -> float | None:
    # JSON has no infinity: an error of inf (NaN in the output) is written as null.
    return value if math.isfinite(value) else None


def metadata(settings: CompareSettings) -> dict:
    import triton

    from . import __version__

    return {
        "device": {"name": settings.device.name, "key": settings.device.key,
                   "compute_capability": list(settings.device.compute_capability or []) or None},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "moetune": __version__},
        "command_line": settings.command_line,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": (f"{GRAPH_TIMER.describe()}; median of {settings.rounds} interleaved rounds"
                   if settings.device.is_gpu else "wall clock under Triton's interpreter: meaningless for speed"),
        "roofline": "max(bytes / 4.25 TB/s, FLOPs / 807 TFLOP/s): H200 ceilings",
        "seed": settings.seed,
    }


def json_text(result: ShapeResult, settings: CompareSettings, meta: dict) -> str:
    shape = result.plan.shape
    rows = row_records(result)
    for row in rows:
        for contender in row["contenders"].values():
            contender["rel_error"] = _finite_or_none(contender["rel_error"])
    document = {
        "metadata": {**meta, "config_sources": {name: contender_sources(result.rows, name) for name in result.names},
                     "notes": result.plan.notes},
        "shape": {"name": shape.name, "E": shape.E, "N": shape.N, "K": shape.K, "topk": shape.topk,
                  "tp_size": settings.tp_size, "dtype": settings.dtype},
        "tolerance": result.tolerance,
        "rows": rows,
    }
    return json.dumps(document, indent=2) + "\n"


def _png(draw: Callable) -> bytes:
    # A bare Figure on the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    draw(axes)
    # Long shape descriptions would run off the figure: wrap the title.
    axes.set_title("\n".join(textwrap.wrap(axes.get_title(), 70)), fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def time_plot(result: ShapeResult, title: str) -> bytes:
    def draw(axes) -> None:
        batch_sizes = [row.M for row in result.rows]
        for name in result.names:
            axes.plot(batch_sizes, [row.us(name) for row in result.rows], marker="o", label=name)
        axes.plot(batch_sizes, [row.roofline_us for row in result.rows], linestyle=":", color="gray",
                  label="roofline floor")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("batch size M (tokens)")
        axes.set_ylabel("layer time (µs)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    return _png(draw)


def speedup_plot(result: ShapeResult, title: str) -> bytes:
    def draw(axes) -> None:
        axes.plot([row.M for row in result.rows], [row.speedup for row in result.rows], marker="o")
        axes.axhline(1.0, color="gray", linestyle="--")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("batch size M (tokens)")
        axes.set_ylabel("fused speedup (unfused µs / fused µs)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
    return _png(draw)


def write_results(results: list[ShapeResult], settings: CompareSettings) -> list[Path]:
    """Render every file first, then write each atomically; returns the paths written. The
    PNGs only with settings.plots (they need matplotlib)."""
    meta = metadata(settings)
    files: list[tuple[Path, bytes]] = []
    for result in results:
        stem = file_stem(result.plan.shape, settings.dtype, settings.tp_size)
        files += [
            (settings.out_dir / f"{stem}.csv", csv_text(result).encode()),
            (settings.out_dir / f"{stem}.json", json_text(result, settings, meta).encode()),
        ]
        if settings.plots:
            title = f"{result.plan.shape.describe()}, {settings.dtype}, {settings.device.name}"
            if not settings.device.is_gpu:
                title += "\n(Triton's interpreter: the times mean nothing about speed)"
            files += [
                (settings.out_dir / f"{stem}_time.png", time_plot(result, title)),
                (settings.out_dir / f"{stem}_speedup.png", speedup_plot(result, title)),
            ]
    for path, data in files:
        write_atomic(path, data)
    return [path for path, _ in files]
