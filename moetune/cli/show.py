"""`moetune show`: the tables this machine uses and the configs picked per batch size."""

from __future__ import annotations

import argparse
import os
import warnings

from .. import loader, table_paths
from ..configs import compact_config
from ..device import CPU_KEY, DeviceInfo, device_key, local_device
from ..errors import UsageError
from ..table_listing import FoundTable, find_tables
from ..tables import TableDtype, parse_table_file_name
from ..types import Variant


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", help="device name or key (default: this machine's device)")
    parser.add_argument("--E", type=_positive_int, help="only tables with this many experts")
    parser.add_argument("--topk", type=_positive_int, help="only tables with this top-k")
    parser.add_argument("--hidden", type=_positive_int, help="only tables with this hidden size K")
    parser.add_argument("--intermediate", type=_positive_int, help="only tables with this intermediate size N")
    parser.add_argument("--dtype", help="only tables of this dtype (bf16, fp16, fp32, fp8_w8a8)")


def _check_gpu(gpu: str) -> None:
    """A device that is neither this machine's nor has a folder of tables is a typo."""
    if not gpu.strip():
        raise UsageError("--gpu needs a device name or key")
    local = local_device()
    known = table_paths.device_keys_with_tables()
    if device_key(gpu) not in (local.key, *known):
        raise UsageError(f"--gpu {gpu!r}: no tables for this device and it is not this machine's ({local.name}); "
                         f"devices with tables: {', '.join(known) or 'none'}")


def main(args: argparse.Namespace) -> int:
    dtype = TableDtype.of(args.dtype).name if args.dtype else None
    if args.gpu is not None:
        _check_gpu(args.gpu)
    with warnings.catch_warnings():  # bad tables are listed below, each in one line
        warnings.simplefilter("ignore", loader.ConfigWarning)
        target = loader.resolve_device(args.gpu, strict=False)
        found = find_tables(target)
    wanted = {"E": args.E, "N": args.intermediate, "K": args.hidden, "topk": args.topk, "dtype": dtype}

    def matches(found: FoundTable) -> bool:
        name = parse_table_file_name(found.file.path.name)
        actual = {"E": name.E, "N": name.N, "K": name.K, "topk": name.topk, "dtype": name.dtype}
        return all(value is None or actual[key] == value for key, value in wanted.items())

    found = [entry for entry in found if matches(entry)]
    print(show_text(target, found, loader.env_flag(loader.ENV_DETERMINISTIC)), end="")
    return 0


def show_text(target: DeviceInfo, found: list[FoundTable], deterministic: bool) -> str:
    if target.compute_capability is not None:
        capability = f"compute capability {target.compute_capability[0]}.{target.compute_capability[1]}"
    elif target.key == CPU_KEY:
        capability = "Triton's interpreter"
    else:
        capability = "compute capability unknown: no same-family fallback"
    lines = [f"tables for {target.name} (key {target.key}, {capability})"]
    dirs = os.pathsep.join(map(str, table_paths.config_dirs())) or "(unset)"
    searched = [f"{table_paths.ENV_CONFIG_DIR}={dirs}", f"packaged={table_paths.PACKAGED_DIR}"]
    lines.append("searched: " + ", ".join(searched) + (", then same-family devices" if target.compute_capability else ""))
    if deterministic:
        lines.append(f"{loader.ENV_DETERMINISTIC}=1: the fused (atomic) variant is never picked")
    if not found:
        lines.append("no tables found: every shape uses the default heuristic")
        return "\n".join(lines) + "\n"

    rows = [("#", "status", "source", "file")]
    for number, entry in enumerate(found, 1):
        status = "used" if entry.used else ("invalid" if entry.record is None else "shadowed")
        origin = entry.file.origin
        source = origin if origin != table_paths.FROM_FAMILY else f"{origin} ({entry.file.device_key})"
        rows.append((str(number), status, source, str(entry.file.path)))
    lines += ["", *_aligned(rows)]
    lines += [f"   {entry.error}" for entry in found if entry.record is None]  # one line per bad table

    for entry in found:
        if entry.used:
            lines += ["", *_batch_size_lines(entry, deterministic)]
    return "\n".join(lines) + "\n"


def _batch_size_lines(entry: FoundTable, deterministic: bool) -> list[str]:
    """Per batch size of a used table: the variant picked, why, both configs, the layer time."""
    table, path = entry.record, str(entry.file.path)
    header = f"{entry.file.path.name}  (Triton {table.versions['triton']}, {table.device.name}, {table.created})"
    rows = [("M", "variant", "chosen by", "GEMM 1", "GEMM 2", "layer_us")]
    for M, record in table.batch_sizes.items():
        selection = loader.pick(table, M, Variant.UNFUSED if deterministic else None, path)
        if selection.batch_size is None:
            reason = "default heuristic"
        elif not deterministic:
            reason = "winner"
        elif selection.batch_size != M:
            reason = f"unfused at M={selection.batch_size}"
        else:
            reason = "winner" if record.winner is Variant.UNFUSED else "deterministic"
        timed = table.batch_sizes[selection.batch_size].variants[selection.variant] if selection.batch_size is not None else None
        layer = f"{timed.layer_us:.1f}" if timed is not None else "-"
        rows.append((str(M), selection.variant.value, reason, compact_config(selection.gemm1),
                     compact_config(selection.gemm2), layer))
    return [header, *(f"  {line}" for line in _aligned(rows))]


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
