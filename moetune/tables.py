"""The tuned-config table: one JSON file per (device, MoE shape, dtype), schema version 1.

This module owns the schema: building a table, validating one, reading and atomically
writing it, and merging a new tuning run into an old table. Where a table is looked up
at run time is loader.py's business; vLLM/SGLang files are export.py's.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from .configs import CONFIG_KEYS, check_config, value_problem
from .device import CPU_KEY, DeviceInfo, device_key
from .errors import TableError

SCHEMA_VERSION = 1
DTYPES = ("bf16", "fp16", "fp32")
VARIANTS = ("unfused", "fused")
TIME_KEYS = ("gemm1_us", "gemm2_us", "layer_us")
SHAPE_INT_KEYS = ("E", "N", "K", "topk")

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_TABLE_FILE_NAME = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),K=(?P<K>\d+),topk=(?P<topk>\d+),dtype=(?P<dtype>\w+)\.json$"
)


def dtype_name(dtype: Any) -> str:
    """Short name of an activation dtype: "bf16", "fp16" or "fp32"."""
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.strip().lower())
    else:
        name = _DTYPE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else None
    if name is None:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {', '.join(DTYPES)} (or torch.bfloat16/float16/float32)")
    return name


def table_file_name(E: int, N: int, K: int, topk: int, dtype: Any) -> str:
    return f"E={E},N={N},K={K},topk={topk},dtype={dtype_name(dtype)}.json"


def parse_table_file_name(name: str) -> tuple[int, int, int, int, str] | None:
    """(E, N, K, topk, dtype) of a table file name, or None when the name is not one."""
    match = _TABLE_FILE_NAME.match(name)
    if match is None or match["dtype"] not in DTYPES:
        return None
    return int(match["E"]), int(match["N"]), int(match["K"]), int(match["topk"]), match["dtype"]


def table_path(root: str | os.PathLike, device_key: str, E: int, N: int, K: int, topk: int, dtype: Any) -> Path:
    return Path(root) / device_key / table_file_name(E, N, K, topk, dtype)


def running_versions() -> dict[str, str]:
    """Versions of what a table's configs were tuned with: triton, torch, moetune."""
    import triton  # imported here: reading and validating tables needs no Triton

    return {"triton": triton.__version__, "torch": torch.__version__, "moetune": _moetune_version()}


def _moetune_version() -> str:
    try:
        from moetune import __version__  # lazily: the package imports this module

        return str(__version__)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("moetune")
        except PackageNotFoundError:
            return "unknown"


def new_table(device: DeviceInfo, E: int, N: int, K: int, topk: int, dtype: Any, search: dict) -> dict:
    """An empty table for one shape; the tuner fills `batch_sizes` and writes it."""
    capability = list(device.compute_capability) if device.compute_capability is not None else None
    return {
        "schema_version": SCHEMA_VERSION,
        "device": {"name": device.name, "key": device.key, "compute_capability": capability},
        "versions": running_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shape": {"E": E, "N": N, "K": K, "topk": topk, "dtype": dtype_name(dtype)},
        "search": dict(search),
        "batch_sizes": {},
    }


# ---------------------------------------------------------------------------------------
# Validation. Every check names the file and the key path, e.g.
#   bad table /x/y.json: batch_sizes["16"].fused.gemm2.BLOCK_SIZE_N: must be a power of two >= 16, got 48


class _Checker:
    def __init__(self, source: str, kind: str = "table") -> None:
        self.source = source
        self.kind = kind

    def fail(self, path: str, problem: str) -> TableError:
        where = f"{path}: " if path else ""
        return TableError(f"bad {self.kind} {self.source}: {where}{problem}")

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
            raise self.fail(path, f"must be an integer, got {value!r}")
        if value <= 0:
            raise self.fail(path, f"must be positive, got {value}")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {value!r}")
        return value

    def time_us(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"must be a number of microseconds, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(path, f"must be a positive finite time in microseconds, got {value!r}")
        return float(value)

    def config(self, value: Any, path: str) -> dict[str, int]:
        if isinstance(value, Mapping):  # a bad value is named by its key path
            for key in CONFIG_KEYS:
                problem = value_problem(key, value[key]) if key in value else None
                if problem is not None:
                    raise self.fail(f"{path}.{key}", problem)
        try:
            return check_config(value, what="")
        except (TypeError, ValueError) as error:  # not a mapping, or keys missing
            raise self.fail(path, str(error).strip()) from None


def checked_config(config: Any, source: str, path: str, kind: str = "table") -> dict[str, int]:
    """configs.check_config, with its error as a TableError naming the file and key path."""
    return _Checker(source, kind).config(config, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _batch_size_key(check: _Checker, key: Any) -> int:
    """Batch sizes are written as canonical positive integer strings ("16", not "016")."""
    if isinstance(key, int) and not isinstance(key, bool):
        number = key
    elif isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key:
        number = int(key)
    else:
        label = json.dumps(key) if isinstance(key, str) else repr(key)
        raise check.fail(f"batch_sizes[{label}]", 'batch size keys must be positive integers written as strings, e.g. "16"')
    if number <= 0:
        raise check.fail(f'batch_sizes["{key}"]', "batch size must be positive")
    return number


def _check_device(check: _Checker, device: Any) -> dict:
    device = check.mapping(device, "device")
    name = check.text(check.field(device, "name", "device"), "device.name")
    key = check.text(check.field(device, "key", "device"), "device.key")
    if key != device_key(name):
        raise check.fail("device.key", f"must be {device_key(name)!r} for device name {name!r}, got {key!r}")
    capability = check.field(device, "compute_capability", "device")
    if capability is not None:
        if (
            not isinstance(capability, (list, tuple))
            or len(capability) != 2
            or any(isinstance(part, bool) or not isinstance(part, int) or part < 0 for part in capability)
        ):
            raise check.fail("device.compute_capability", f"must be [major, minor] or null, got {capability!r}")
        capability = [int(capability[0]), int(capability[1])]
    elif key != CPU_KEY:
        raise check.fail("device.compute_capability", f"may be null only for the {CPU_KEY!r} device")
    if key == CPU_KEY and capability is not None:
        raise check.fail("device.compute_capability", f"must be null for the {CPU_KEY!r} device, got {capability!r}")
    return {**device, "name": name, "key": key, "compute_capability": capability}


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
        raise check.fail("created", f"must be an ISO 8601 time, got {created!r}") from None
    return created


def _check_shape(check: _Checker, shape: Any) -> dict:
    shape = check.mapping(shape, "shape")
    clean = {key: check.positive_int(check.field(shape, key, "shape"), f"shape.{key}") for key in SHAPE_INT_KEYS}
    if clean["topk"] > clean["E"]:
        raise check.fail("shape.topk", f"must not exceed E={clean['E']}, got {clean['topk']}")
    dtype = check.field(shape, "dtype", "shape")
    if dtype not in DTYPES:
        raise check.fail("shape.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {**shape, **clean, "dtype": dtype}


def _check_variant(check: _Checker, variant: Any, path: str) -> dict:
    variant = check.mapping(variant, path)
    clean = dict(variant)
    for gemm in ("gemm1", "gemm2"):
        clean[gemm] = check.config(check.field(variant, gemm, path), f"{path}.{gemm}")
    for key in TIME_KEYS:
        clean[key] = check.time_us(check.field(variant, key, path), f"{path}.{key}")
    return clean


def _check_batch_sizes(check: _Checker, batch_sizes: Any) -> dict[int, dict]:
    batch_sizes = check.mapping(batch_sizes, "batch_sizes")
    if not batch_sizes:
        raise check.fail("batch_sizes", "holds no batch size")
    clean: dict[int, dict] = {}
    for key, entry in batch_sizes.items():
        M = _batch_size_key(check, key)
        path = f'batch_sizes["{M}"]'
        if M in clean:
            raise check.fail(path, "batch size given twice")
        entry = check.mapping(entry, path)
        present = [variant for variant in VARIANTS if variant in entry]
        if not present:
            raise check.fail(path, f"holds neither variant ({' nor '.join(VARIANTS)})")
        checked = dict(entry)
        for variant in present:
            checked[variant] = _check_variant(check, entry[variant], f"{path}.{variant}")
        winner = check.field(entry, "winner", path)
        if winner not in present:
            raise check.fail(f"{path}.winner", f"must name a variant present here ({', '.join(present)}), got {winner!r}")
        clean[M] = checked
    return dict(sorted(clean.items()))


def validate_table(data: object, source: str) -> dict:
    """Check a table against schema version 1 and return a clean copy.

    The copy has batch_sizes keyed by int (sorted), configs reduced to the six launch keys and
    times as floats; keys this version does not know are kept as they are. Anything wrong
    raises TableError naming `source` and the key path.
    """
    check = _Checker(source)
    data = check.mapping(data, "")
    version = check.field(data, "schema_version", "")
    if isinstance(version, bool) or not isinstance(version, int):
        raise check.fail("schema_version", f"must be an integer, got {version!r}")
    if version != SCHEMA_VERSION:
        raise check.fail("schema_version", f"unknown schema version {version} (this moetune reads {SCHEMA_VERSION})")
    clean = dict(data)
    clean["device"] = _check_device(check, check.field(data, "device", ""))
    clean["versions"] = _check_versions(check, check.field(data, "versions", ""))
    clean["created"] = _check_created(check, check.field(data, "created", ""))
    clean["shape"] = _check_shape(check, check.field(data, "shape", ""))
    clean["search"] = dict(check.mapping(check.field(data, "search", ""), "search"))
    clean["batch_sizes"] = _check_batch_sizes(check, check.field(data, "batch_sizes", ""))
    return clean


# ---------------------------------------------------------------------------------------
# Files


def read_table(path: str | os.PathLike) -> dict:
    """Read and validate a table file; any problem (unreadable, truncated, invalid) is a TableError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TableError(f"cannot read table {path}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (empty file)" if not text.strip() else " (truncated or corrupt file?)"
        raise TableError(f"bad table {path}: not valid JSON at line {error.lineno} column {error.colno}: {error.msg}{hint}") from None
    table = validate_table(data, str(path))
    from_name = parse_table_file_name(path.name)
    shape = table["shape"]
    if from_name is not None and from_name != (shape["E"], shape["N"], shape["K"], shape["topk"], shape["dtype"]):
        raise TableError(f"bad table {path}: shape: {_shape_text(shape)} does not match the file name")
    return table


def _shape_text(shape: Mapping) -> str:
    return ",".join(f"{key}={shape[key]}" for key in (*SHAPE_INT_KEYS, "dtype"))


def table_json(table: Mapping) -> str:
    """The text a table is written as: batch sizes as strings, in increasing order."""
    return json.dumps(table, indent=2) + "\n"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) so that readers see the old file
    or the new one, never a part.

    The temporary file lives in the target's folder because os.replace is atomic only
    within one file system; fsync before the rename so a crash cannot leave an empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data.encode("utf-8") if isinstance(data, str) else data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_table(path: str | os.PathLike, table: Mapping) -> None:
    """Validate `table` and write it atomically; an invalid table writes nothing."""
    clean = validate_table(table, str(path))
    write_atomic(path, table_json(clean))


def merge_tables(old: Mapping, new: Mapping) -> dict:
    """Add a new run's batch sizes to an old table of the same device and shape.

    Batch sizes in `new` replace those with the same key in `old`; the others are kept.
    The header (versions, created, search, ...) comes from `new`.
    """
    old_clean = validate_table(old, "old table (merge)")
    new_clean = validate_table(new, "new table (merge)")
    if old_clean["device"]["key"] != new_clean["device"]["key"]:
        raise TableError(f"cannot merge tables of two devices: {old_clean['device']['key']} and {new_clean['device']['key']}")
    old_shape, new_shape = _shape_text(old_clean["shape"]), _shape_text(new_clean["shape"])
    if old_shape != new_shape:
        raise TableError(f"cannot merge tables of two shapes: {old_shape} and {new_shape}")
    merged = dict(new_clean)
    merged["batch_sizes"] = dict(sorted({**old_clean["batch_sizes"], **new_clean["batch_sizes"]}.items()))
    return merged
