"""What `moetune compare` reports: the printed table, the CSV and JSON files and the plots
(matplotlib, optional), from the results compare.py measured."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .compare import SHORT_NAMES, TABLE_WIDTH, CompareSettings, Row, ShapeResult
from .configs import compact_config
from .measure import GRAPH_TIMER
from .shapes import MoEShape
from .tables import write_atomic

PLOTS_NEED_MATPLOTLIB = "plots need matplotlib: pip install 'moetune[plots]'"


def plots_available() -> bool:
    """Whether matplotlib can draw the PNGs here."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError:
        return False
    return True


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
    lines = [f"{shape.describe()}, tp {settings.tp_size}, {settings.table_dtype}, on {settings.device.name}"]
    lines.append("contender   runs     configs from")
    for name in names:
        sources = contender_sources(result.rows, name)
        variants = sorted({row.measured[name].contender.variant for row in result.rows})
        lines.append(f"{name:<11s} {'/'.join(variants):<8s} {'; '.join(sources)}")
    lines += [textwrap.fill(f"note: {note}", TABLE_WIDTH, subsequent_indent="  ", break_on_hyphens=False,
                            break_long_words=False) for note in result.plan.notes]

    header = [("M", 6)] + [(f"{SHORT_NAMES[n]} us", 8) for n in names]
    if settings.fp8:
        unquantized = SHORT_NAMES[settings.unquantized]
        header += [(f"fp8/{unquantized}", 9), ("fp8/base", 8), ("pick", 4)]
    else:
        header += [("f/u", 5), ("unf/rf", 6), ("fus/rf", 6), ("win", 3), ("pick", 4)]
    header += [(f"e:{SHORT_NAMES[n]}", 6) for n in names]
    lines.append(" ".join(title.rjust(width) for title, width in header))
    for row in result.rows:
        cells = [str(row.M).rjust(6)]
        cells += [_number(row.us(n), 8) for n in names]
        if settings.fp8:
            cells += [_number(row.ratio("fp8", settings.unquantized), 9, 2), _number(row.ratio("fp8", "baseline"), 8, 2),
                      SHORT_NAMES[row.measured["fp8"].contender.variant].rjust(4)]
        else:
            cells += [_number(row.speedup, 5, 2), _number(row.roofline_ratio("unfused"), 6, 2),
                      _number(row.roofline_ratio("fused"), 6, 2), SHORT_NAMES[row.winner].rjust(3),
                      SHORT_NAMES[row.measured["dispatcher"].contender.variant].rjust(4)]
        cells += [_error(row.measured[n].rel_error, 6) for n in names]
        flag = "  !" if any(not m.checked.ok for m in row.measured.values()) else ""
        lines.append(" ".join(cells) + flag)
    if settings.fp8:
        tolerances = ", ".join(f"{SHORT_NAMES[name]} {tolerance:.0e}" for name, tolerance in result.tolerances.items())
        lines.append("us: median per layer call; fp8/x: fp8 us / x us; pick: the fp8 layer's variant;")
        lines.append(f"e:x: relative error vs float64, fp8 with its quantization emulated (tolerance {tolerances}; "
                     f"! above)")
    else:
        lines.append("us: median per layer call; f/u: unfused us / fused us; x/rf: time over the roofline floor "
                     "(H200 ceilings);")
        lines.append(f"win: faster of unf/fus; pick: the dispatcher's variant; e:x: relative error vs float64 "
                     f"(tolerance {result.tolerance:.0e}, ! above)")
    if result.plan.anchor is not None:
        lines += anchor_lines(result)
    return "\n".join(lines) + "\n"


def anchor_lines(result: ShapeResult) -> list[str]:
    """The anchor figures beside the dispatcher's times: a table of their own, as the main one
    has no room left within TABLE_WIDTH."""
    anchor = result.plan.anchor
    lines = [textwrap.fill(f"anchor: {anchor.source} ({anchor.path})", TABLE_WIDTH, subsequent_indent="  ",
                           break_on_hyphens=False, break_long_words=False)]
    lines.append(f"{'M':>6s} {'disp us':>8s} {'anchor us':>9s} {'disp/anchor':>11s}")
    for row in result.rows:
        lines.append(f"{row.M:6d} {_number(row.us('dispatcher'), 8)} {_number(row.anchor_us, 9)} "
                     f"{_number(row.anchor_ratio, 11, 2)}")
    lines.append("anchor us: its figure at that batch size (- where it has none); disp/anchor: disp us / anchor us")
    return lines


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


def _as_is(value):
    return value


# Per batch size, after the contenders' columns.
SUMMARY_KEYS = ("fused_speedup", "unfused_roofline_ratio", "fused_roofline_ratio", "winner", "dispatcher_pick")


def summary(result: ShapeResult, row: Row) -> dict:
    """The per-batch-size figures after the contenders': the variants' speedup and, where the
    shape has anchor figures, the anchor's time and the dispatcher's over it; or with fp8 the
    fp8 layer's time over the unquantized layer's and over the shipped configs' (None without
    those)."""
    if "fp8" in result.names:
        unquantized = result.names[1]
        return {f"fp8_over_{unquantized}": row.ratio("fp8", unquantized), "fp8_over_baseline": row.ratio("fp8", "baseline"),
                "fp8_pick": row.measured["fp8"].contender.variant}
    values = (row.speedup, row.roofline_ratio("unfused"), row.roofline_ratio("fused"), row.winner,
              row.measured["dispatcher"].contender.variant)
    figures = dict(zip(SUMMARY_KEYS, values))
    if result.plan.anchor is not None:  # None (blank in the CSV) at a batch size it has no figure for
        figures |= {"anchor_us": row.anchor_us, "dispatcher_over_anchor": row.anchor_ratio}
    return figures
# A contender's CSV columns: `<name>_<suffix>`, from its JSON record's `key`, written by `text`.
CSV_CONTENDER_FIELDS = (
    ("us", "us", _as_is),
    ("rounds_us", "rounds_us", lambda times: " ".join(f"{t:.3f}" for t in times)),
    ("rel_error", "rel_error", _as_is),
    ("variant", "variant", _as_is),
    ("source", "source", _as_is),
    ("table_M", "table_batch_size", lambda value: "" if value is None else value),
    ("gemm1", "gemm1", compact_config),
    ("gemm2", "gemm2", compact_config),
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
        records.append({"M": row.M, "experts_hit": row.experts_hit, "roofline_us": row.roofline_us,
                        **summary(result, row), "contenders": contenders})
    return records


def csv_columns(result: ShapeResult) -> list[str]:
    columns = ["M", "experts_hit", "roofline_us"]
    for name in result.names:
        columns += [f"{name}_{suffix}" for suffix, _, _ in CSV_CONTENDER_FIELDS]
    return columns + list(summary(result, result.rows[0])) if result.rows else columns


def csv_rows(result: ShapeResult) -> list[dict]:
    rows = []
    for record in row_records(result):
        row = {key: record[key] for key in ("M", "experts_hit", "roofline_us")}
        for name, contender in record["contenders"].items():
            row.update({f"{name}_{suffix}": text(contender[key]) for suffix, key, text in CSV_CONTENDER_FIELDS})
        summed = {key: value for key, value in record.items() if key not in row and key != "contenders"}
        rows.append(row | {key: "" if value is None else value for key, value in summed.items()})
    return rows


def csv_text(result: ShapeResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(result), lineterminator="\n")
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
        "roofline": "max(bytes / 4.25 TB/s, FLOPs / 807 TFLOP/s): H200 ceilings" +
                    (f" (of the {settings.unquantized} layer)" if settings.fp8 else ""),
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
                     "notes": result.plan.notes, **_anchor_metadata(result)},
        "shape": {"name": shape.name, "E": shape.E, "N": shape.N, "K": shape.K, "topk": shape.topk,
                  "tp_size": settings.tp_size, "dtype": settings.dtype, **_fp8_shape(settings)},
        "tolerance": result.tolerance,
        **({"tolerances": result.tolerances} if settings.fp8 else {}),
        "rows": rows,
    }
    return json.dumps(document, indent=2) + "\n"


def _anchor_metadata(result: ShapeResult) -> dict:
    """Where the anchor figures came from, if the shape has them."""
    anchor = result.plan.anchor
    return {} if anchor is None else {"anchor": {"source": anchor.source, "file": str(anchor.path)}}


def _fp8_shape(settings: CompareSettings) -> dict:
    """What the JSON's shape adds for fp8: the scale blocks and the activations' dtype."""
    if not settings.fp8:
        return {}
    block = list(settings.block_shape) if settings.block_shape else None
    return {"block_shape": block, "activations": settings.unquantized}


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
    """The fused variant's speedup, or with fp8 the fp8 layer's time ratios."""
    fp8 = "fp8" in result.names

    def draw(axes) -> None:
        batch_sizes = [row.M for row in result.rows]
        if fp8:
            for other in result.names[1:]:
                axes.plot(batch_sizes, [row.ratio("fp8", other) for row in result.rows], marker="o",
                          label=f"fp8 µs / {other} µs")
            axes.legend()
        else:
            axes.plot(batch_sizes, [row.speedup for row in result.rows], marker="o")
        axes.axhline(1.0, color="gray", linestyle="--")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("batch size M (tokens)")
        axes.set_ylabel("fp8 time ratio" if fp8 else "fused speedup (unfused µs / fused µs)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
    return _png(draw)


def write_results(results: list[ShapeResult], settings: CompareSettings) -> list[Path]:
    """Render every file first, then write each atomically; returns the paths written. The
    PNGs only with settings.plots (they need matplotlib)."""
    meta = metadata(settings)
    files: list[tuple[Path, bytes]] = []
    for result in results:
        stem = file_stem(result.plan.shape, settings.file_dtype, settings.tp_size)
        files += [
            (settings.out_dir / f"{stem}.csv", csv_text(result).encode()),
            (settings.out_dir / f"{stem}.json", json_text(result, settings, meta).encode()),
        ]
        if settings.plots:
            title = f"{result.plan.shape.describe()}, {settings.table_dtype}, {settings.device.name}"
            if not settings.device.is_gpu:
                title += "\n(Triton's interpreter: the times mean nothing about speed)"
            files += [
                (settings.out_dir / f"{stem}_time.png", time_plot(result, title)),
                (settings.out_dir / f"{stem}_speedup.png", speedup_plot(result, title)),
            ]
    for path, data in files:
        write_atomic(path, data)
    return [path for path, _ in files]
