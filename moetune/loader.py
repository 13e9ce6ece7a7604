"""Which launch configs the layer runs: where a table comes from, nearest M, caching, warnings.

Lookup order for one (device, shape, dtype), first usable table wins:

1. each folder in MOETUNE_CONFIG_DIR (os.pathsep-separated), as `<folder>/<device key>/<table>.json`;
2. the packaged tables (`tuned_configs/`, installed as `moetune.tuned_configs`);
3. a table of the same shape tuned on another device with the same compute capability
   (an H100 table on an H200), with a one-time warning;
4. configs.default_config for both GEMMs, unfused, with a one-time warning that prints
   the command that would tune this shape.

A bad table never crashes the dispatcher: it is skipped with a one-time warning, unless
strict mode (strict=True or MOETUNE_STRICT=1) asks for a TableError instead.

Also the `moetune show` command.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.resources
import operator
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from .configs import default_config
from .device import CPU_KEY, DeviceInfo, device_key, local_device
from .errors import TableError, UsageError
from .tables import VARIANTS, dtype_name, parse_table_file_name, read_table, table_file_name

ENV_CONFIG_DIR = "MOETUNE_CONFIG_DIR"
ENV_STRICT = "MOETUNE_STRICT"
ENV_DETERMINISTIC = "MOETUNE_DETERMINISTIC"
DEFAULT_SOURCE = "default heuristic"

# Origins of a table, in lookup order.
FROM_ENV = ENV_CONFIG_DIR
FROM_PACKAGE = "packaged"
FROM_FAMILY = "same family"


def _packaged_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("moetune.tuned_configs")))
    except ModuleNotFoundError:
        # A source checkout used without installing: the folder sits beside the package.
        return Path(__file__).resolve().parent.parent / "tuned_configs"


PACKAGED_DIR: Path = _packaged_dir()


class ConfigWarning(UserWarning):
    """A table was skipped, borrowed from another device, or none was found."""


@dataclass(frozen=True)
class Selection:
    """The launch configs for one layer call. Shared between calls: do not mutate the dicts."""

    gemm1: dict
    gemm2: dict
    variant: str  # "unfused" | "fused"
    source: str  # the table's path, or "default heuristic"
    batch_size: int | None  # the table key used; None for the default heuristic


@dataclass(frozen=True)
class _Device:
    name: str
    key: str
    compute_capability: tuple[int, int] | None


@dataclass(frozen=True)
class TableFile:
    """A table file that may serve a device, and why it is a candidate."""

    path: Path
    origin: str  # FROM_ENV | FROM_PACKAGE | FROM_FAMILY
    device_key: str  # the folder it sits in


@dataclass(frozen=True)
class _ShapeSource:
    """What serves one shape on one device: a table (or none: the default heuristic) and the
    variant wanted. Found once per shape; each new M only picks from it."""

    E: int
    N: int
    K: int
    topk: int
    table: Mapping | None
    path: str | None
    wanted: str | None  # None: the table's winner

    def select(self, M: int) -> Selection:
        if self.table is None:
            return default_selection(self.E, self.N, self.K, self.topk, M)
        selection = pick(self.table, M, self.wanted, self.path)
        if selection.source == DEFAULT_SOURCE:
            _warn_once(f"novariant:{self.path}:{self.wanted}",
                       f"{self.path} has no {self.wanted} configs; using the default heuristic for that variant")
        return selection


_selections: dict[tuple, Selection] = {}
_sources: dict[tuple, _ShapeSource] = {}  # the _selections key without M
_tables: dict[str, dict | TableError] = {}
_warned: set[str] = set()


def clear_cache() -> None:
    """Forget cached selections, parsed tables and which warnings were given.

    Call after changing MOETUNE_CONFIG_DIR, MOETUNE_STRICT, MOETUNE_DETERMINISTIC,
    PACKAGED_DIR or a table file in a running process.
    """
    _selections.clear()
    _sources.clear()
    _tables.clear()
    _warned.clear()


def get_config(
    E: int,
    N: int,
    K: int,
    topk: int,
    dtype: Any,
    M: int,
    *,
    variant: str | None = None,
    device: str | DeviceInfo | None = None,
    deterministic: bool | None = None,
    strict: bool | None = None,
) -> Selection:
    """Launch configs of both GEMMs for M tokens of one MoE shape.

    dtype: "bf16"/"fp16"/"fp32" or the torch dtype. variant: None picks the table's winner;
    "unfused"/"fused" forces one. device: a device name or key, None for this machine.
    deterministic (default: MOETUNE_DETERMINISTIC=1) never picks the atomic "fused" variant.
    strict (default: MOETUNE_STRICT=1) raises TableError on a bad table instead of skipping it.
    """
    key = (E, N, K, topk, dtype, M, variant, device, deterministic, strict)
    selection = _selections.get(key)
    if selection is None:
        # A new M of a known shape reads no environment, device or folder again: only the pick.
        tokens = _whole_number("M", M, 0)
        shape_key = (E, N, K, topk, dtype, variant, device, deterministic, strict)
        source = _sources.get(shape_key)
        if source is None:
            source = _find_source(E, N, K, topk, dtype, variant, device, deterministic, strict)
            _sources[shape_key] = source
        selection = source.select(tokens)
        _selections[key] = selection
    return selection


def load_table(path: str | os.PathLike, *, strict: bool = True) -> dict | None:
    """Read and validate a table once per process.

    strict: a bad table raises TableError; otherwise it warns once and returns None.
    """
    name = str(path)
    table = _tables.get(name)
    if table is None:
        try:
            table = read_table(path)
        except TableError as error:
            table = error
        _tables[name] = table
    if isinstance(table, TableError):
        if strict:
            raise table
        _warn_once(f"bad:{name}", f"{table}; skipping it")
        return None
    return table


def nearest_batch_size(batch_sizes: Iterable[int], M: int) -> int:
    """The tuned batch size closest to M; a tie goes to the smaller one."""
    keys = sorted(batch_sizes)
    if not keys:
        raise ValueError("no batch sizes to choose from")
    index = bisect.bisect_left(keys, M)
    if index == 0:
        return keys[0]
    if index == len(keys):
        return keys[-1]
    below, above = keys[index - 1], keys[index]
    return below if M - below <= above - M else above


# ---------------------------------------------------------------------------------------
# Where tables are found


def config_dirs() -> list[Path]:
    """The folders named by MOETUNE_CONFIG_DIR, in order."""
    value = os.environ.get(ENV_CONFIG_DIR, "")
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def _roots() -> list[tuple[Path, str]]:
    return [(folder, FROM_ENV) for folder in config_dirs()] + [(Path(PACKAGED_DIR), FROM_PACKAGE)]


def _device_folders(root: Path) -> list[Path]:
    try:
        return sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(("_", ".")))
    except OSError:
        return []


def candidate_files(file_name: str, device: _Device) -> list[TableFile]:
    """Every file that could serve one table name on `device`, in lookup order.

    Same-family candidates are listed by folder; whether their compute capability matches
    is known only once the table is read.
    """
    roots = _roots()
    exact = [TableFile(root / device.key / file_name, origin, device.key) for root, origin in roots]
    family = []
    if device.compute_capability is not None:
        for root, _ in roots:
            for folder in _device_folders(root):
                if folder.name != device.key:
                    family.append(TableFile(folder / file_name, FROM_FAMILY, folder.name))
    return [candidate for candidate in exact + family if candidate.path.is_file()]


def _same_family(table: Mapping, device: _Device) -> bool:
    capability = table["device"]["compute_capability"]
    return capability is not None and tuple(capability) == device.compute_capability


def _resolve_device(device: str | DeviceInfo | None, strict: bool) -> _Device:
    if isinstance(device, DeviceInfo):
        return _Device(device.name, device.key, device.compute_capability)
    if device is not None and (not isinstance(device, str) or not device.strip()):
        raise ValueError(f"device must be a device name or key, got {device!r}")
    local = local_device()
    if device is None or device_key(device) == local.key:
        return _Device(local.name, local.key, local.compute_capability)
    key = device_key(device)
    # Another machine's device: its compute capability, needed for the family fallback,
    # and its full name are known only from a table tuned on it.
    return _device_from_tables(key, strict) or _Device(device.strip(), key, None)


def _device_from_tables(key: str, strict: bool) -> _Device | None:
    for root, _ in _roots():
        folder = root / key
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            table = load_table(path, strict=strict)
            if table is not None:
                device = table["device"]
                capability = device["compute_capability"]
                return _Device(device["name"], key, tuple(capability) if capability is not None else None)
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------
# Choosing the configs


def _whole_number(name: str, value: Any, smallest: int) -> int:
    # operator.index accepts numpy and torch integers as well as int, but not floats.
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < smallest:
        raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")
    return number


def _find_source(E, N, K, topk, dtype, variant, device, deterministic, strict) -> _ShapeSource:
    E, N, K = _whole_number("E", E, 1), _whole_number("N", N, 1), _whole_number("K", K, 1)
    topk = _whole_number("topk", topk, 1)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)} or None, got {variant!r}")
    dtype = dtype_name(dtype)
    strict = _env_flag(ENV_STRICT) if strict is None else bool(strict)
    deterministic = _env_flag(ENV_DETERMINISTIC) if deterministic is None else bool(deterministic)
    if deterministic and variant == "fused":
        raise ValueError(
            f"variant 'fused' uses atomic adds, which deterministic mode forbids "
            f"(deterministic=True or {ENV_DETERMINISTIC}=1)"
        )
    wanted = variant or ("unfused" if deterministic else None)
    target = _resolve_device(device, strict)

    file_name = table_file_name(E, N, K, topk, dtype)
    shape = file_name.removesuffix(".json")
    for candidate in candidate_files(file_name, target):
        table = load_table(candidate.path, strict=strict)
        if table is None:
            continue
        if candidate.origin == FROM_FAMILY:
            if not _same_family(table, target):
                continue
            _warn_once(
                f"family:{candidate.path}:{target.key}",
                f"no table for {shape} on {target.name}; using {candidate.path}, tuned on "
                f"{table['device']['name']} (same compute capability)",
            )
        _warn_if_other_triton(table, candidate.path)
        return _ShapeSource(E, N, K, topk, table, str(candidate.path), wanted)

    _warn_once(
        f"default:{target.key}:{file_name}",
        f"no tuned table for {shape} on {target.name}; using the default heuristic. "
        f"Tune this shape with: {tune_command(target.name, E, N, K, topk, dtype)}",
    )
    return _ShapeSource(E, N, K, topk, None, None, wanted)


def pick(table: Mapping, M: int, variant: str | None, source: str) -> Selection:
    """Configs of a validated table for M tokens: the nearest batch size and its variant.

    variant None takes the winner at the nearest batch size; a named variant takes the
    nearest batch size that has it, or the default heuristic when none has it.
    """
    entries = table["batch_sizes"]
    if variant is None:
        batch_size = nearest_batch_size(entries, M)
        variant = entries[batch_size]["winner"]
    else:
        having = [size for size, entry in entries.items() if variant in entry]
        if not having:
            shape = table["shape"]
            return default_selection(shape["E"], shape["N"], shape["K"], shape["topk"], M)
        batch_size = nearest_batch_size(having, M)
    configs = entries[batch_size][variant]
    return Selection(configs["gemm1"], configs["gemm2"], variant, source, batch_size)


def default_selection(E: int, N: int, K: int, topk: int, M: int) -> Selection:
    config = default_config(M, E, N, K, topk)
    return Selection(config, dict(config), "unfused", DEFAULT_SOURCE, None)


def tune_command(device_name: str, E: int, N: int, K: int, topk: int, dtype: str) -> str:
    return (
        f"moetune run --gpu {shlex.quote(device_name)} --E {E} --topk {topk} "
        f"--hidden {K} --intermediate {N} --dtype {dtype}"
    )


@lru_cache(maxsize=1)
def _running_triton() -> str:
    import triton  # only on a cache miss: the cached path must stay cheap

    return triton.__version__


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def _warn_if_other_triton(table: Mapping, path: Path) -> None:
    tuned_with = table["versions"]["triton"]
    running = _running_triton()
    if _major_minor(tuned_with) != _major_minor(running):
        _warn_once(
            f"triton:{path}",
            f"{path} was tuned with Triton {tuned_with} but Triton {running} is running; "
            f"its configs are used, but may no longer be the fastest",
        )


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, ConfigWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------
# Listing what a device would use (show, export)


@dataclass(frozen=True)
class FoundTable:
    file: TableFile
    table: dict | None  # None: the file is not a valid table
    error: str | None
    used: bool  # False: shadowed by an earlier source, another family, or invalid


def find_tables(device: str | DeviceInfo | None = None) -> list[FoundTable]:
    """Every table file the loader could read for `device`, in lookup order, per shape.

    Bad files are listed with their error instead of raising or warning.
    """
    target = _resolve_device(device, strict=False)
    names: set[str] = set()
    for root, _ in _roots():
        folders = _device_folders(root) if target.compute_capability is not None else [root / target.key]
        for folder in folders:
            names.update(path.name for path in folder.glob("*.json") if parse_table_file_name(path.name))
    found: list[FoundTable] = []
    for name in sorted(names, key=_shape_order):
        used_one = False
        for candidate in candidate_files(name, target):
            try:
                table, error = read_table(candidate.path), None
            except TableError as problem:
                table, error = None, str(problem)
            if table is not None and candidate.origin == FROM_FAMILY and not _same_family(table, target):
                continue
            used = table is not None and not used_one
            used_one = used_one or used
            found.append(FoundTable(candidate, table, error, used))
    return found


def _shape_order(name: str) -> tuple:
    return parse_table_file_name(name) or (0, 0, 0, 0, name)


# ---------------------------------------------------------------------------------------
# moetune show


def compact_config(config: Mapping[str, int]) -> str:
    """e.g. `M64 N128 K64 G8 w4 s3`."""
    return (
        f"M{config['BLOCK_SIZE_M']} N{config['BLOCK_SIZE_N']} K{config['BLOCK_SIZE_K']} "
        f"G{config['GROUP_SIZE_M']} w{config['num_warps']} s{config['num_stages']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", help="device name or key (default: this machine's device)")
    parser.add_argument("--E", type=int, help="only tables with this many experts")
    parser.add_argument("--topk", type=int, help="only tables with this top-k")
    parser.add_argument("--hidden", type=int, help="only tables with this hidden size K")
    parser.add_argument("--intermediate", type=int, help="only tables with this intermediate size N")
    parser.add_argument("--dtype", help="only tables of this dtype (bf16, fp16, fp32)")


def main(args: argparse.Namespace) -> int:
    dtype = dtype_name(args.dtype) if args.dtype else None
    if args.gpu is not None and not args.gpu.strip():
        raise UsageError("--gpu needs a device name or key")
    target = _resolve_device(args.gpu, strict=False)
    wanted = {"E": args.E, "N": args.intermediate, "K": args.hidden, "topk": args.topk, "dtype": dtype}

    def matches(found: FoundTable) -> bool:
        E, N, K, topk, table_dtype = parse_table_file_name(found.file.path.name)
        actual = {"E": E, "N": N, "K": K, "topk": topk, "dtype": table_dtype}
        return all(value is None or actual[key] == value for key, value in wanted.items())

    found = [entry for entry in find_tables(args.gpu) if matches(entry)]
    print(show_text(target, found, _env_flag(ENV_DETERMINISTIC)), end="")
    return 0


def show_text(target: _Device, found: list[FoundTable], deterministic: bool) -> str:
    if target.compute_capability is not None:
        capability = f"compute capability {target.compute_capability[0]}.{target.compute_capability[1]}"
    elif target.key == CPU_KEY:
        capability = "Triton's interpreter"
    else:
        capability = "compute capability unknown: no same-family fallback"
    lines = [f"tables for {target.name} (key {target.key}, {capability})"]
    searched = [f"{ENV_CONFIG_DIR}={os.pathsep.join(map(str, config_dirs())) or '(unset)'}", f"packaged={PACKAGED_DIR}"]
    lines.append("searched: " + ", ".join(searched) + (", then same-family devices" if target.compute_capability else ""))
    if deterministic:
        lines.append(f"{ENV_DETERMINISTIC}=1: the fused (atomic) variant is never picked")
    if not found:
        lines.append("no tables found: every shape uses the default heuristic")
        return "\n".join(lines) + "\n"

    rows = [("#", "status", "source", "file")]
    for number, entry in enumerate(found, 1):
        status = "used" if entry.used else ("invalid" if entry.table is None else "shadowed")
        source = entry.file.origin if entry.file.origin != FROM_FAMILY else f"{FROM_FAMILY} ({entry.file.device_key})"
        rows.append((str(number), status, source, str(entry.file.path)))
    lines += ["", *_aligned(rows)]
    for entry in found:
        if entry.table is None:
            lines.append(f"   {entry.error}")

    for entry in found:
        if not entry.used:
            continue
        table = entry.table
        lines += ["", f"{entry.file.path.name}  (Triton {table['versions']['triton']}, {table['device']['name']}, {table['created']})"]
        rows = [("M", "variant", "chosen by", "GEMM 1", "GEMM 2", "layer_us")]
        for M, table_entry in table["batch_sizes"].items():
            selection = pick(table, M, "unfused" if deterministic else None, str(entry.file.path))
            if selection.batch_size is None:
                reason = "default heuristic"
            elif not deterministic:
                reason = "winner"
            elif selection.batch_size != M:
                reason = f"unfused at M={selection.batch_size}"
            else:
                reason = "winner" if table_entry["winner"] == "unfused" else "deterministic"
            timed = table["batch_sizes"].get(selection.batch_size, {}).get(selection.variant, {})
            layer = f"{timed['layer_us']:.1f}" if timed else "-"
            rows.append((str(M), selection.variant, reason, compact_config(selection.gemm1), compact_config(selection.gemm2), layer))
        lines += [f"  {line}" for line in _aligned(rows)]
    return "\n".join(lines) + "\n"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
