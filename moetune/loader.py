"""Which launch configs the layer runs: where a table comes from, nearest M, caching, warnings.

Lookup order for one (device, shape, dtype), first usable table wins:

1. each folder in MOETUNE_CONFIG_DIR (os.pathsep-separated), as `<folder>/<device key>/<table>.json`;
2. the packaged tables (`tuned_configs/`, installed as `moetune.tuned_configs`);
3. a table of the same shape tuned on another device with the same compute capability
   (an H100 table on an H200), with a one-time warning;
4. configs.default_config for both GEMMs, with a one-time warning that prints the
   command that would tune this shape.

A bad table (anything at a table's path that is not a valid table: a folder, an
unreadable or truncated file, a config out of bounds or too large for its device) never
crashes the dispatcher: it is skipped with a one-time warning, unless strict mode
(strict=True or MOETUNE_STRICT=1) asks for a TableError instead.
"""

from __future__ import annotations

import bisect
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
from .device import DeviceInfo, device_key, local_device, shared_memory_for_capability
from .errors import TableError
from .table_paths import FROM_FAMILY, candidate_files, table_roots
from .tables import Table, TableDtype, read_record, table_file_name
from .types import OFF, LaunchConfig, Switches, Variant

ENV_STRICT = "MOETUNE_STRICT"
ENV_DETERMINISTIC = "MOETUNE_DETERMINISTIC"
DEFAULT_SOURCE = "default heuristic"
# The default heuristic's largest K tile for per-tensor fp8 (block fp8: block_k).
FP8_DEFAULT_MAX_BLOCK_K = 128

class ConfigWarning(UserWarning):
    """A table was skipped, borrowed from another device, or none was found; or a
    config given to the layer holds a key the kernel does not know."""


@dataclass(frozen=True)
class Selection:
    """The launch configs for one layer call (shared between calls)."""

    gemm1: LaunchConfig
    gemm2: LaunchConfig
    variant: Variant
    source: str  # the table's path, or "default heuristic"
    batch_size: int | None  # the table key used; None for the default heuristic
    switches: Switches = OFF  # the kernel switches the table's variant was tuned with


@dataclass(frozen=True)
class _ShapeSource:
    """What serves one shape on one device: a table (or none: the default heuristic) and the
    variant wanted. Found once per shape; each new M only picks from it."""

    E: int
    N: int
    K: int
    topk: int
    dtype: TableDtype
    table: Table | None
    path: str | None
    wanted: Variant | None  # None: the table's winner
    shared_memory_bytes: int  # of the device, for the default heuristic

    def select(self, M: int) -> Selection:
        if self.table is None:
            return default_selection(self.E, self.N, self.K, self.topk, M, self.wanted or Variant.UNFUSED,
                                     shared_memory_bytes=self.shared_memory_bytes, dtype=self.dtype)
        selection = pick(self.table, M, self.wanted, self.path)
        if selection.source == DEFAULT_SOURCE:
            warn_once(f"novariant:{self.path}:{self.wanted}",
                      f"{self.path} has no {self.wanted} configs; using the default heuristic for that variant")
        return selection


_selections: dict[tuple, Selection] = {}
_sources: dict[tuple, _ShapeSource] = {}  # the _selections key without M
_tables: dict[str, Table | TableError] = {}
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


def get_config(E: int, N: int, K: int, topk: int, dtype: Any, M: int, *, variant: str | Variant | None = None,
               device: str | DeviceInfo | None = None, deterministic: bool | None = None,
               strict: bool | None = None, block_shape: Any = None) -> Selection:
    """Launch configs of both GEMMs for M tokens of one MoE shape.

    dtype: "bf16"/"fp16"/"fp32" or the torch dtype; "fp8_w8a8" (or torch.float8_e4m3fn, or
    a tables.TableDtype) for fp8 weights, with their block_shape [block_n, block_k] (None:
    per-tensor scales); an fp8 layer without a table of its block shape gets the default
    heuristic, its K tile within one scale block. variant: None picks the table's winner;
    "unfused"/"fused" forces one (the default heuristic serves either when no table has it).
    device: a device name or key, None for this machine.
    deterministic (default: MOETUNE_DETERMINISTIC=1) never picks the atomic "fused" variant.
    strict (default: MOETUNE_STRICT=1) raises TableError on a bad table instead of skipping it.
    """
    if isinstance(block_shape, list):
        block_shape = tuple(block_shape)  # a cache key
    key = (E, N, K, topk, dtype, block_shape, M, variant, device, deterministic, strict)
    selection = _selections.get(key)
    if selection is None:
        # A new M of a known shape reads no environment, device or folder again: only the pick.
        tokens = _whole_number("M", M, 0)
        shape_key = key[:6] + key[7:]
        source = _sources.get(shape_key)
        if source is None:
            source = _find_source(E, N, K, topk, TableDtype.of(dtype, block_shape), variant, device, deterministic,
                                  strict)
            _sources[shape_key] = source
        selection = source.select(tokens)
        _selections[key] = selection
    return selection


def load_record(path: str | os.PathLike, *, strict: bool = True) -> Table | None:
    """Read and validate a table once per process.

    strict: a bad table raises TableError; otherwise it warns once and returns None.
    """
    name = str(path)
    table = _tables.get(name)
    if table is None:
        try:
            table = read_record(path)
        except TableError as error:
            table = error
        _tables[name] = table
    if isinstance(table, TableError):
        if strict:
            raise table
        warn_once(f"bad:{name}", f"{table}; skipping it")
        return None
    return table


def load_table(path: str | os.PathLike, *, strict: bool = True) -> dict | None:
    """load_record, in the JSON form tables.validate_table returns."""
    table = load_record(path, strict=strict)
    return None if table is None else table.to_json()


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
# Which device a lookup is for


def same_family(table: Table, device: DeviceInfo) -> bool:
    capability = table.device.compute_capability
    return capability is not None and capability == device.compute_capability


def resolve_device(device: str | DeviceInfo | None = None, strict: bool = False) -> DeviceInfo:
    """The device a lookup is for: this machine's (None or its name), or another named one.

    Another machine's compute capability, needed for the family fallback, and its full
    name are known only from a table tuned on it.
    """
    if isinstance(device, DeviceInfo):
        return device
    if device is not None and (not isinstance(device, str) or not device.strip()):
        raise ValueError(f"device must be a device name or key, got {device!r}")
    local = local_device()
    if device is None or device_key(device) == local.key:
        return local
    key = device_key(device)
    for root, _ in table_roots():
        folder = root / key
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            table = load_record(path, strict=strict)
            if table is not None:
                capability = table.device.compute_capability
                return DeviceInfo(table.device.name, key, capability, shared_memory_for_capability(capability))
    return DeviceInfo(device.strip(), key, None, shared_memory_for_capability(None))


def env_flag(name: str) -> bool:
    """Whether an environment variable is set to 1, true, yes or on."""
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


def _variant(variant: Any) -> Variant | None:
    if variant is None:
        return None
    try:
        return Variant(variant)
    except ValueError:
        raise ValueError(f"variant must be one of {', '.join(v.value for v in Variant)} or None, got {variant!r}") from None


def _find_source(E, N, K, topk, dtype: TableDtype, variant, device, deterministic, strict) -> _ShapeSource:
    E, N, K = _whole_number("E", E, 1), _whole_number("N", N, 1), _whole_number("K", K, 1)
    topk = _whole_number("topk", topk, 1)
    variant = _variant(variant)
    strict = env_flag(ENV_STRICT) if strict is None else bool(strict)
    deterministic = env_flag(ENV_DETERMINISTIC) if deterministic is None else bool(deterministic)
    if deterministic and variant is Variant.FUSED:
        raise ValueError(
            f"variant 'fused' uses atomic adds, which deterministic mode forbids "
            f"(deterministic=True or {ENV_DETERMINISTIC}=1)"
        )
    wanted = variant or (Variant.UNFUSED if deterministic else None)
    target = resolve_device(device, strict)

    file_name = table_file_name(E, N, K, topk, dtype)
    shape = file_name.removesuffix(".json")
    for candidate in candidate_files(file_name, target):
        table = load_record(candidate.path, strict=strict)
        if table is None:
            continue
        if candidate.origin == FROM_FAMILY:
            if not same_family(table, target):
                continue
            warn_once(
                f"family:{candidate.path}:{target.key}",
                f"no table for {shape} on {target.name}; using {candidate.path}, tuned on "
                f"{table.device.name} (same compute capability)",
            )
        _warn_if_other_triton(table, candidate.path)
        return _ShapeSource(E, N, K, topk, dtype, table, str(candidate.path), wanted, target.shared_memory_bytes)

    warn_once(
        f"default:{target.key}:{file_name}",
        f"no tuned table for {shape} on {target.name}; using the default heuristic. "
        f"Tune this shape with: {tune_command(target.name, E, N, K, topk, dtype)}",
    )
    return _ShapeSource(E, N, K, topk, dtype, None, None, wanted, target.shared_memory_bytes)


def pick(table: Table | Mapping, M: int, variant: str | Variant | None, source: str) -> Selection:
    """Configs of a table for M tokens: the nearest batch size and its variant.

    variant None takes the winner at the nearest batch size; a named variant takes the
    nearest batch size that has it, or the default heuristic for that variant when none has
    it. `table` is a Table, or its JSON form (validated here, errors naming `source`).
    """
    if not isinstance(table, Table):
        table = Table.from_json(table, source)
    entries = table.batch_sizes
    variant = _variant(variant)
    if variant is None:
        batch_size = nearest_batch_size(entries, M)
        variant = entries[batch_size].winner
    else:
        having = [size for size, entry in entries.items() if variant in entry.variants]
        if not having:
            shape = table.shape
            return default_selection(shape.E, shape.N, shape.K, shape.topk, M, variant,
                                     shared_memory_bytes=table.device.shared_memory_bytes, dtype=shape.table_dtype)
        batch_size = nearest_batch_size(having, M)
    chosen = entries[batch_size].variants[variant]
    return Selection(chosen.gemm1, chosen.gemm2, variant, source, batch_size, chosen.switches)


def default_selection(E: int, N: int, K: int, topk: int, M: int, variant: str | Variant = Variant.UNFUSED, *,
                      shared_memory_bytes: int | None = None, dtype: Any = None) -> Selection:
    """The default heuristic's configs, for either variant (both GEMMs get the same config)."""
    config = default_launch_config(M, E, N, K, topk, dtype, shared_memory_bytes=shared_memory_bytes)
    return Selection(config, config, Variant(variant), DEFAULT_SOURCE, None)


def default_launch_config(M: int, E: int, N: int, K: int, topk: int, dtype: Any = None, *,
                          shared_memory_bytes: int | None = None) -> LaunchConfig:
    """configs.default_config; for fp8 (dtype as TableDtype.of takes it) its K tile cut to lie
    within one scale block (per tensor: at most FP8_DEFAULT_MAX_BLOCK_K)."""
    config = LaunchConfig.from_json(default_config(M, E, N, K, topk, shared_memory_bytes=shared_memory_bytes))
    table_dtype = TableDtype.of(dtype) if dtype is not None else None
    if table_dtype is not None and table_dtype.fp8:
        config = config.replace(block_k=min(config.block_k, table_dtype.max_block_k or FP8_DEFAULT_MAX_BLOCK_K))
    return config


def tune_command(device_name: str, E: int, N: int, K: int, topk: int, dtype: Any) -> str:
    table_dtype = TableDtype.of(dtype)
    block = table_dtype.block_shape
    return (
        f"moetune run --gpu {shlex.quote(device_name)} --E {E} --topk {topk} "
        f"--hidden {K} --intermediate {N} --dtype {table_dtype.name}"
        + (f" --block-shape {block[0]},{block[1]}" if block else "")
    )


@lru_cache(maxsize=1)
def _running_triton() -> str:
    import triton  # only on a cache miss: the cached path must stay cheap

    return triton.__version__


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def _warn_if_other_triton(table: Table, path: Path) -> None:
    tuned_with = table.versions["triton"]
    running = _running_triton()
    if _major_minor(tuned_with) != _major_minor(running):
        warn_once(
            f"triton:{path}",
            f"{path} was tuned with Triton {tuned_with[:40]} but Triton {running} is running; "
            f"its configs are used, but may no longer be the fastest",
        )


def warn_once(key: str, message: str) -> None:
    """A ConfigWarning, given once per `key` until clear_cache()."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, ConfigWarning, stacklevel=4)
