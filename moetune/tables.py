"""The tuned-config table: one JSON file per (device, MoE shape, dtype), schema version 2 (version 1 still reads).

The dtype is a TableDtype: an activation dtype (bf16, fp16, fp32), or fp8_w8a8 with its
weight scale blocks (block_shape, None for per-tensor scales), named in the file name as
vLLM names its files: `E=256,N=256,K=7168,topk=8,dtype=fp8_w8a8,block_shape=[128,128].json`.

This module owns the table record (`Table`, `BatchRecord`, `VariantRecord`), its one
definition: naming table files, reading them (within files.read_json's size and nesting
limits), writing them atomically, and merging a new tuning run into an old table. Every
validation rule is in table_checks.py. Where a table is looked up at run time is
loader.py's business; vLLM/SGLang files are export.py's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from .device import DeviceInfo, shared_memory_for_capability
from .errors import TableError
from .files import folder_lock, read_json, write_atomic  # noqa: F401 - write_atomic: others write through tables
from .quant import FP8_DTYPE, check_block_shape
from .types import OFF, LaunchConfig, Switches, Variant

# Version 2 added each variant's kernel switches; version 1 tables read as all switches off.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
DTYPES = ("bf16", "fp16", "fp32")  # activation dtypes, weights of the same
FP8_W8A8 = "fp8_w8a8"  # fp8 e4m3 weights and activations, outputs in the activation dtype
TABLE_DTYPES = (*DTYPES, FP8_W8A8)
VARIANTS = tuple(variant.value for variant in Variant)
TIME_KEYS = ("gemm1_us", "gemm2_us", "layer_us")
SHAPE_INT_KEYS = ("E", "N", "K", "topk")
MAX_BATCH_SIZE = 10**18 - 1  # a key of 18 digits at most: beyond any token count

_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_TABLE_FILE_NAME = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),K=(?P<K>\d+),topk=(?P<topk>\d+),dtype=(?P<dtype>\w+)"
    r"(?:,block_shape=\[(?P<block_n>\d+),(?P<block_k>\d+)\])?\.json$"
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


@dataclass(frozen=True)
class TableDtype:
    """What a table's configs run: an activation dtype ("bf16", "fp16", "fp32") with weights
    of the same, or "fp8_w8a8" (fp8 e4m3 weights, activations quantized to fp8 on the fly,
    outputs in the activation dtype) with the weights' scale blocks, block_shape
    (block_n, block_k), or None for one scale per expert. str() is the file name's part
    after "dtype=" (vLLM's spelling: `fp8_w8a8,block_shape=[128,128]`)."""

    name: str
    block_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.name not in TABLE_DTYPES:
            raise ValueError(f"unsupported table dtype {self.name!r}: expected one of {', '.join(TABLE_DTYPES)}")
        if self.block_shape is not None:
            if self.name != FP8_W8A8:
                raise ValueError(f"block_shape {self.block_shape!r} is for {FP8_W8A8} only, not {self.name}")
            object.__setattr__(self, "block_shape", check_block_shape(tuple(self.block_shape)))

    @classmethod
    def of(cls, dtype: Any, block_shape: Any = None) -> TableDtype:
        """A TableDtype, a dtype name or alias ("fp8_w8a8" included), or a torch dtype
        (float8_e4m3fn: fp8 weights), with the block shape of fp8 weights."""
        if isinstance(dtype, TableDtype):
            if block_shape is not None and check_block_shape(tuple(block_shape)) != dtype.block_shape:
                raise ValueError(f"block_shape {list(block_shape)} differs from that of dtype {dtype}")
            return dtype
        if dtype is FP8_DTYPE or (isinstance(dtype, str) and dtype.strip().lower() == FP8_W8A8):
            return cls(FP8_W8A8, block_shape)
        if block_shape is not None:
            raise ValueError(f"block_shape is for {FP8_W8A8} only, not {dtype!r}")
        return cls(dtype_name(dtype))

    @property
    def fp8(self) -> bool:
        return self.name == FP8_W8A8

    @property
    def operand_bytes(self) -> int:
        """Bytes per element of the GEMMs' operands, as the shared-memory rule counts them."""
        return 1 if self.fp8 else TORCH_DTYPES[self.name].itemsize

    @property
    def max_block_k(self) -> int | None:
        """The largest BLOCK_SIZE_K a config may have: a K tile lies within one scale block
        (None: any). Every config of a block-fp8 table must divide block_k."""
        return self.block_shape[1] if self.block_shape is not None else None

    def __str__(self) -> str:
        if self.block_shape is None:
            return self.name
        return f"{self.name},block_shape=[{self.block_shape[0]},{self.block_shape[1]}]"


class TableKey(NamedTuple):
    """What a table file name says: the shape and the dtype (block_shape None unless block fp8)."""

    E: int
    N: int
    K: int
    topk: int
    dtype: str
    block_shape: tuple[int, int] | None = None


def table_file_name(E: int, N: int, K: int, topk: int, dtype: Any, block_shape: Any = None) -> str:
    """The one place table files are named; `dtype` as TableDtype.of takes it."""
    return f"E={E},N={N},K={K},topk={topk},dtype={TableDtype.of(dtype, block_shape)}.json"


def parse_table_file_name(name: str) -> TableKey | None:
    """What a table file name says, or None when the name is not one."""
    match = _TABLE_FILE_NAME.match(name)
    if match is None:
        return None
    block = (int(match["block_n"]), int(match["block_k"])) if match["block_n"] else None
    try:
        dtype = TableDtype(match["dtype"], block)
    except ValueError:
        return None
    return TableKey(int(match["E"]), int(match["N"]), int(match["K"]), int(match["topk"]), dtype.name,
                    dtype.block_shape)


def table_path(root: str | os.PathLike, device_key: str, E: int, N: int, K: int, topk: int, dtype: Any,
               block_shape: Any = None) -> Path:
    return Path(root) / device_key / table_file_name(E, N, K, topk, dtype, block_shape)


def running_versions() -> dict[str, str]:
    """Versions of what a table's configs were tuned with: triton, torch, moetune."""
    import triton  # imported here: reading and validating tables needs no Triton

    return {"triton": triton.__version__, "torch": torch.__version__, "moetune": _moetune_version()}


def _moetune_version() -> str:
    from . import __version__  # lazily: the package's names load from this module

    return str(__version__)


# ---------------------------------------------------------------------------------------
# The record. `extra` holds keys this schema version does not know: kept as they are.


@dataclass(frozen=True)
class VariantRecord:
    """One variant at one batch size: the configs of both GEMMs and the times that chose them."""

    gemm1: LaunchConfig
    gemm2: LaunchConfig
    gemm1_us: float
    gemm2_us: float
    layer_us: float
    switches: Switches = OFF
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"gemm1": self.gemm1.to_json(), "gemm2": self.gemm2.to_json(), "switches": self.switches.to_json(),
                "gemm1_us": self.gemm1_us, "gemm2_us": self.gemm2_us, "layer_us": self.layer_us, **self.extra}


@dataclass(frozen=True)
class BatchRecord:
    """One batch size: the variants tuned and the one that ran the layer fastest."""

    variants: Mapping[Variant, VariantRecord]
    winner: Variant
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", {Variant(v): r for v, r in self.variants.items()})
        object.__setattr__(self, "winner", Variant(self.winner))
        if self.winner not in self.variants:
            raise ValueError(f"winner {self.winner.value!r} is not among the variants {[v.value for v in self.variants]}")

    @classmethod
    def from_json(cls, data: Any, source: str = "(in memory)") -> BatchRecord:
        from .table_checks import check_batch_record  # the checks build these records

        return check_batch_record(data, source)

    def to_json(self) -> dict:
        records = {v.value: self.variants[v].to_json() for v in Variant if v in self.variants}
        return {**records, "winner": self.winner.value, **self.extra}


@dataclass(frozen=True)
class TableDevice:
    """The device a table was tuned on."""

    name: str
    key: str
    compute_capability: tuple[int, int] | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, device: DeviceInfo) -> TableDevice:
        capability = tuple(device.compute_capability) if device.compute_capability is not None else None
        return cls(device.name, device.key, capability)

    @property
    def shared_memory_bytes(self) -> int:
        """What the tuner pruned against on this device (Hopper's when unknown)."""
        return shared_memory_for_capability(self.compute_capability)

    def to_json(self) -> dict:
        capability = list(self.compute_capability) if self.compute_capability is not None else None
        return {"name": self.name, "key": self.key, "compute_capability": capability, **self.extra}


# A table tuned for one expert-parallel rank keeps E = its local experts in its name (as
# vLLM names them) and says in its shape how many ranks share how many experts.
EP_SIZE_KEY, GLOBAL_E_KEY = "ep_size", "global_E"


def expert_parallel_extra(ep_size: int, global_experts: int) -> dict:
    """The shape keys of a table tuned for one of `ep_size` ranks (none for one rank)."""
    return {EP_SIZE_KEY: ep_size, GLOBAL_E_KEY: global_experts} if ep_size > 1 else {}


@dataclass(frozen=True)
class TableShape:
    """The MoE shape and dtype a table is for (block_shape: fp8 weights' scale blocks)."""

    E: int
    N: int
    K: int
    topk: int
    dtype: str
    block_shape: tuple[int, int] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, E: int, N: int, K: int, topk: int, dtype: Any, block_shape: Any = None) -> TableShape:
        table_dtype = TableDtype.of(dtype, block_shape)
        return cls(E, N, K, topk, table_dtype.name, table_dtype.block_shape)

    @property
    def table_dtype(self) -> TableDtype:
        return TableDtype(self.dtype, self.block_shape)

    @property
    def dtype_bytes(self) -> int:
        return self.table_dtype.operand_bytes

    def key(self) -> TableKey:
        return TableKey(self.E, self.N, self.K, self.topk, self.dtype, self.block_shape)

    @property
    def expert_parallel(self) -> tuple[int, int] | None:
        """(ep_size, global E) of a table tuned for one expert-parallel rank, else None."""
        if EP_SIZE_KEY not in self.extra:
            return None
        return self.extra[EP_SIZE_KEY], self.extra.get(GLOBAL_E_KEY)

    def file_name(self) -> str:
        return table_file_name(*self.key())

    def __str__(self) -> str:
        return self.file_name().removesuffix(".json")

    def to_json(self) -> dict:
        block = {"block_shape": list(self.block_shape)} if self.block_shape is not None else {}
        return {"E": self.E, "N": self.N, "K": self.K, "topk": self.topk, "dtype": self.dtype, **block, **self.extra}


@dataclass(frozen=True)
class Table:
    """A whole table file: the header and a BatchRecord per tuned batch size."""

    device: TableDevice
    versions: Mapping[str, str]
    created: str
    shape: TableShape
    search: Mapping[str, Any]
    batch_sizes: Mapping[int, BatchRecord]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, device: DeviceInfo | TableDevice, shape: TableShape, search: Mapping[str, Any],
            batch_sizes: Mapping[int, BatchRecord] | None = None) -> Table:
        """A table tuned now, with this process's versions."""
        device = device if isinstance(device, TableDevice) else TableDevice.of(device)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(device, running_versions(), created, shape, dict(search), dict(batch_sizes or {}))

    @classmethod
    def from_json(cls, data: Any, source: str) -> Table:
        """Check a table's JSON form against schema version 1; TableError names `source` and the key path."""
        from .table_checks import check_table  # the checks build these records

        return check_table(data, source)

    def to_json(self) -> dict:
        """The JSON form, batch sizes in increasing order (keyed by int: json.dumps writes them as strings)."""
        return {"schema_version": SCHEMA_VERSION, "device": self.device.to_json(), "versions": dict(self.versions),
                "created": self.created, "shape": self.shape.to_json(), "search": dict(self.search),
                "batch_sizes": {M: self.batch_sizes[M].to_json() for M in sorted(self.batch_sizes)}, **self.extra}

    def merge(self, newer: Table) -> Table:
        """`newer`'s header and batch sizes, with this table's other batch sizes kept."""
        if self.device.key != newer.device.key:
            raise TableError(f"cannot merge tables of two devices: {self.device.key} and {newer.device.key}")
        if self.shape.key() != newer.shape.key():
            raise TableError(f"cannot merge tables of two shapes: {self.shape} and {newer.shape}")
        if self.shape.expert_parallel != newer.shape.expert_parallel:
            raise TableError(f"cannot merge tables of {self.shape} tuned with expert parallelism "
                             f"{self.shape.expert_parallel} and {newer.shape.expert_parallel} (ep_size, global_E)")
        return replace(newer, batch_sizes=dict(sorted({**self.batch_sizes, **newer.batch_sizes}.items())))


def new_table(device: DeviceInfo, E: int, N: int, K: int, topk: int, dtype: Any, search: dict,
              block_shape: Any = None) -> dict:
    """The JSON form of an empty table for one shape; the tuner fills `batch_sizes`."""
    return Table.new(device, TableShape.of(E, N, K, topk, dtype, block_shape), search).to_json()


def checked_config(config: Any, source: str, path: str, kind: str = "table") -> dict[str, int]:
    """A launch config's clean JSON form, or a TableError naming the file and key path.
    Keys the kernel does not know are dropped (other projects' files carry their own)."""
    from .table_checks import check_launch_config

    return check_launch_config(config, source, path, kind).to_json()


def validate_table(data: object, source: str) -> dict:
    """Check a table against schema version 1 and return its clean JSON form (batch sizes
    keyed by int, in order; configs of the six launch keys; times as floats). Anything
    wrong raises TableError naming `source` and the key path."""
    return Table.from_json(data, source).to_json()


def _as_table(table: Table | Mapping, source: str) -> Table:
    return table if isinstance(table, Table) else Table.from_json(table, source)


# ---------------------------------------------------------------------------------------
# Files

def read_record(path: str | os.PathLike) -> Table:
    """Read and validate a table file; any problem (unreadable, truncated, invalid) is a TableError."""
    path = Path(path)
    table = Table.from_json(read_json(path), str(path))
    from_name = parse_table_file_name(path.name)
    if from_name is not None and from_name != table.shape.key():
        raise TableError(f"bad table {path}: shape: {table.shape} does not match the file name")
    return table


def read_table(path: str | os.PathLike) -> dict:
    """read_record, in the JSON form validate_table returns."""
    return read_record(path).to_json()


def table_json(table: Table | Mapping) -> str:
    """The text a table is written as: batch sizes as strings, in increasing order."""
    return json.dumps(table.to_json() if isinstance(table, Table) else table, indent=2) + "\n"


def write_table(path: str | os.PathLike, table: Table | Mapping) -> None:
    """Validate `table` and write it atomically; an invalid table writes nothing."""
    clean = Table.from_json(table.to_json() if isinstance(table, Table) else table, str(path))
    write_atomic(path, table_json(clean))


def merge_tables(old: Table | Mapping, new: Table | Mapping) -> dict:
    """Add a new run's batch sizes to an old table of the same device and shape.

    Batch sizes in `new` replace those with the same key in `old`; the others are kept.
    The header (versions, created, search, ...) comes from `new`.
    """
    return _as_table(old, "old table (merge)").merge(_as_table(new, "new table (merge)")).to_json()


def record_batch(path: str | os.PathLike, device: DeviceInfo, E: int, N: int, K: int, topk: int, dtype: Any,
                 M: int, record: BatchRecord, search: Mapping[str, Any],
                 shape_extra: Mapping[str, Any] | None = None) -> Table:
    """Merge one batch size's record into the table at `path` (created when absent) and
    write it atomically; returns the table written. dtype: as TableDtype.of takes it;
    shape_extra: keys the shape adds (expert_parallel_extra). The header (versions, created,
    search) becomes this run's; a bad existing table is a TableError and is left as it is."""
    path = Path(path)
    shape = replace(TableShape.of(E, N, K, topk, dtype), extra=dict(shape_extra or {}))
    update = Table.new(device, shape, search, {M: record})
    with folder_lock(path.parent):
        table = read_record(path).merge(update) if os.path.lexists(path) else update
        write_table(path, table)
    return table
