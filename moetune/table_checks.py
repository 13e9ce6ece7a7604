"""Validation of a table's JSON form: every rule of the schema, in one place.

Each check builds the typed record (tables.Table and the records it holds) or raises a
TableError naming the file and the key path, e.g.

    bad table /x/y.json: batch_sizes["16"].fused.gemm2.BLOCK_SIZE_N: must be a power of two >= 16, got 48

Configs obey types.LaunchConfig's bounds, and must fit the device the table is for by
the rules the tuner prunes with (shared memory, accumulator registers).
"""

from __future__ import annotations

import json
import math
import reprlib
from datetime import datetime
from typing import Any, Mapping

from .device import CPU_KEY, device_key
from .errors import TableError
from .quant import check_block_shape
from .tables import (FP8_W8A8, MAX_BATCH_SIZE, READABLE_SCHEMA_VERSIONS, SHAPE_INT_KEYS, TABLE_DTYPES, TIME_KEYS,
                     VARIANTS, BatchRecord, Table, TableDevice, TableShape, VariantRecord)
from .types import CONFIG_KEYS, KNOWN_FOREIGN_KEYS, OFF, LaunchConfig, Switches, SwitchError, Variant, value_problem

_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 40


def _short(value: Any) -> str:
    """repr of a value, cut short: a message stays one readable line."""
    try:
        return _short_repr.repr(value)
    except ValueError:  # an int too long to print
        return f"an integer of {value.bit_length()} bits"


class _Checker:
    def __init__(self, source: str, kind: str = "table") -> None:
        self.source = source
        self.kind = kind
        self.device: TableDevice | None = None  # set once known: configs must fit it
        self.dtype_bytes = 2
        self.block_shape: tuple[int, int] | None = None  # block fp8: BLOCK_SIZE_K must divide block_k

    def fail(self, path: str, problem: str) -> TableError:
        where = f"{path}: " if path else ""
        message = f"bad {self.kind} {self.source}: {where}{problem}"
        return TableError(" ".join(message.splitlines()))  # one line, whatever the names hold

    def mapping(self, value: Any, path: str) -> Mapping:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be a JSON object, got {_json_type(value)}")
        return value

    def field(self, parent: Mapping, key: str, path: str) -> Any:
        if key not in parent:
            raise self.fail(_join(path, key), "missing")
        return parent[key]

    def positive_int(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {_short(value)}")
        if value <= 0:
            raise self.fail(path, f"must be positive, got {_short(value)}")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {_short(value)}")
        return value

    def time_us(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"must be a number of microseconds, got {_short(value)}")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(path, f"must be a positive finite time in microseconds, got {_short(value)}")
        return float(value)

    def config(self, value: Any, path: str, unknown: str = "reject", weight_tiles: int = 1) -> LaunchConfig:
        """A launch config; in a table it must also fit the table's device."""
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be a dict with keys {', '.join(CONFIG_KEYS)}, got {_json_type(value)}")
        missing = [key for key in CONFIG_KEYS if key not in value]
        if missing:
            raise self.fail(path, f"is missing key(s) {', '.join(missing)}")
        for key in CONFIG_KEYS:
            problem = value_problem(key, value[key])
            if problem is not None:
                raise self.fail(f"{path}.{key}", problem)
        foreign = [key for key in value if key not in CONFIG_KEYS and key not in KNOWN_FOREIGN_KEYS]
        if foreign and unknown == "reject":
            raise self.fail(f"{path}.{_key_label(foreign[0])}", f"unknown launch config key (value "
                                                                f"{_short(value[foreign[0]])}); the kernel takes {', '.join(CONFIG_KEYS)}")
        config = LaunchConfig.from_json(value, unknown="ignore")
        if self.device is not None:
            problem = config.fit_problem(self.dtype_bytes, self.device.shared_memory_bytes, weight_tiles)
            if problem is not None:
                raise self.fail(path, f"does not fit {self.device.name}: {problem}")
        if self.block_shape is not None and self.block_shape[1] % config.block_k:
            raise self.fail(f"{path}.BLOCK_SIZE_K", f"must divide block_k {self.block_shape[1]} of the fp8 block shape "
                                                    f"{list(self.block_shape)} (a K tile lies within one scale "
                                                    f"block), got {config.block_k}")
        return config


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key_label(key: Any) -> str:
    """A key as a key path shows it: short, and quoted when it is not plain text."""
    text = key[:40] if isinstance(key, str) else _short(key)
    return text if text.isprintable() and text.strip() == text and text else json.dumps(text)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _extra(data: Mapping, known: tuple[str, ...]) -> dict:
    return {key: value for key, value in data.items() if key not in known}


def _batch_size_key(check: _Checker, key: Any) -> int:
    """Batch sizes are written as canonical positive integer strings ("16", not "016")."""
    if isinstance(key, int) and not isinstance(key, bool):
        number = key
    elif isinstance(key, str) and key.isascii() and key.isdigit() and (len(key) == 1 or key[0] != "0"):
        number = int(key) if len(key) <= 18 else MAX_BATCH_SIZE + 1
    else:
        label = json.dumps(key[:40]) if isinstance(key, str) else _short(key)
        raise check.fail(f"batch_sizes[{label}]", 'batch size keys must be positive integers written as strings, e.g. "16"')
    if not 0 < number <= MAX_BATCH_SIZE:
        label = key[:40] if isinstance(key, str) else _short(key)  # digits only
        raise check.fail(f'batch_sizes["{label}"]', f"batch size must be between 1 and {MAX_BATCH_SIZE}")
    return number


def _check_device(check: _Checker, device: Any) -> TableDevice:
    device = check.mapping(device, "device")
    name = check.text(check.field(device, "name", "device"), "device.name")
    key = check.text(check.field(device, "key", "device"), "device.key")
    if key != device_key(name):
        raise check.fail("device.key", f"must be {_short(device_key(name))} for device name {_short(name)}, got {_short(key)}")
    capability = check.field(device, "compute_capability", "device")
    if capability is not None:
        if (
            not isinstance(capability, (list, tuple))
            or len(capability) != 2
            or any(isinstance(part, bool) or not isinstance(part, int) or part < 0 for part in capability)
        ):
            raise check.fail("device.compute_capability", f"must be [major, minor] or null, got {_short(capability)}")
        capability = (int(capability[0]), int(capability[1]))
    elif key != CPU_KEY:
        raise check.fail("device.compute_capability", f"may be null only for the {CPU_KEY!r} device")
    if key == CPU_KEY and capability is not None:
        raise check.fail("device.compute_capability", f"must be null for the {CPU_KEY!r} device, got {list(capability)}")
    return TableDevice(name, key, capability, _extra(device, ("name", "key", "compute_capability")))


def _check_versions(check: _Checker, versions: Any) -> dict:
    versions = check.mapping(versions, "versions")
    for key in ("triton", "torch", "moetune"):
        check.text(check.field(versions, key, "versions"), f"versions.{key}")
    return dict(versions)


def _check_created(check: _Checker, created: Any) -> str:
    created = check.text(created, "created")
    try:
        datetime.fromisoformat(created)
    except ValueError:
        raise check.fail("created", f"must be an ISO 8601 time, got {_short(created)}") from None
    return created


def _check_shape(check: _Checker, shape: Any) -> TableShape:
    shape = check.mapping(shape, "shape")
    sizes = {key: check.positive_int(check.field(shape, key, "shape"), f"shape.{key}") for key in SHAPE_INT_KEYS}
    if sizes["topk"] > sizes["E"]:
        raise check.fail("shape.topk", f"must not exceed E={sizes['E']}, got {sizes['topk']}")
    dtype = check.field(shape, "dtype", "shape")
    if dtype not in TABLE_DTYPES:
        raise check.fail("shape.dtype", f"must be one of {', '.join(TABLE_DTYPES)}, got {_short(dtype)}")
    block = shape.get("block_shape")
    if block is not None:
        if dtype != FP8_W8A8:
            raise check.fail("shape.block_shape", f"is for dtype {FP8_W8A8} only, not {dtype}")
        try:
            block = check_block_shape(block)
        except ValueError:
            raise check.fail("shape.block_shape", f"must be [block_n, block_k], two powers of two >= 16, "
                                                  f"got {_short(block)}") from None
    return TableShape(**sizes, dtype=dtype, block_shape=block,
                      extra=_extra(shape, (*SHAPE_INT_KEYS, "dtype", "block_shape")))


def _check_switches(check: _Checker, variant: Mapping, path: str) -> Switches:
    """A variant's kernel switches; absent (schema version 1) is the plain path."""
    if "switches" not in variant:
        return OFF
    try:
        return Switches.from_json(variant["switches"], "")
    except SwitchError as error:
        raise check.fail(_join(path, "switches"), str(error).removeprefix(": ")) from None


def _check_variant(check: _Checker, variant: Any, path: str) -> VariantRecord:
    variant = check.mapping(variant, path)
    switches = _check_switches(check, variant, path)
    gemm1 = check.config(check.field(variant, "gemm1", path), f"{path}.gemm1", weight_tiles=switches.weight_tiles)
    gemm2 = check.config(check.field(variant, "gemm2", path), f"{path}.gemm2")
    problem = switches.config_problem(gemm1, gemm2)
    if problem is not None:
        raise check.fail(_join(path, "switches"), problem)
    times = {key: check.time_us(check.field(variant, key, path), f"{path}.{key}") for key in TIME_KEYS}
    return VariantRecord(gemm1, gemm2, **times, switches=switches,
                         extra=_extra(variant, ("gemm1", "gemm2", "switches", *TIME_KEYS)))


def _check_batch(check: _Checker, entry: Any, path: str) -> BatchRecord:
    entry = check.mapping(entry, path)
    present = [variant for variant in Variant if variant.value in entry]
    if not present:
        raise check.fail(path, f"holds neither variant ({' nor '.join(VARIANTS)})")
    records = {variant: _check_variant(check, entry[variant.value], _join(path, variant.value)) for variant in present}
    winner = check.field(entry, "winner", path)
    if not isinstance(winner, str) or winner not in present:
        names = ", ".join(variant.value for variant in present)
        raise check.fail(_join(path, "winner"), f"must name a variant present here ({names}), got {_short(winner)}")
    return BatchRecord(records, Variant(winner), _extra(entry, (*VARIANTS, "winner")))


def _check_batch_sizes(check: _Checker, batch_sizes: Any) -> dict[int, BatchRecord]:
    batch_sizes = check.mapping(batch_sizes, "batch_sizes")
    if not batch_sizes:
        raise check.fail("batch_sizes", "holds no batch size")
    records: dict[int, BatchRecord] = {}
    for key, entry in batch_sizes.items():
        M = _batch_size_key(check, key)
        path = f'batch_sizes["{M}"]'
        if M in records:
            raise check.fail(path, "batch size given twice")
        records[M] = _check_batch(check, entry, path)
    return dict(sorted(records.items()))


def _check_table(check: _Checker, data: Any) -> Table:
    data = check.mapping(data, "")
    version = check.field(data, "schema_version", "")
    if isinstance(version, bool) or not isinstance(version, int):
        raise check.fail("schema_version", f"must be an integer, got {_short(version)}")
    if version not in READABLE_SCHEMA_VERSIONS:
        readable = " and ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise check.fail("schema_version", f"unknown schema version {_short(version)} (this moetune reads {readable})")
    device = _check_device(check, check.field(data, "device", ""))
    versions = _check_versions(check, check.field(data, "versions", ""))
    created = _check_created(check, check.field(data, "created", ""))
    shape = _check_shape(check, check.field(data, "shape", ""))
    search = dict(check.mapping(check.field(data, "search", ""), "search"))
    # The same rules the tuner prunes with, against the device the table is for.
    check.device, check.dtype_bytes, check.block_shape = device, shape.dtype_bytes, shape.block_shape
    batch_sizes = _check_batch_sizes(check, check.field(data, "batch_sizes", ""))
    extra = _extra(data, ("schema_version", "device", "versions", "created", "shape", "search", "batch_sizes"))
    return Table(device, versions, created, shape, search, batch_sizes, extra)


def check_table(data: Any, source: str) -> Table:
    return _check_table(_Checker(source), data)


def check_batch_record(data: Any, source: str) -> BatchRecord:
    return _check_batch(_Checker(source, kind="batch record"), data, "")


def check_launch_config(config: Any, source: str, path: str, kind: str = "table") -> LaunchConfig:
    """A config of another project's file: keys the kernel does not know are dropped."""
    return _Checker(source, kind).config(config, path, unknown="ignore")
