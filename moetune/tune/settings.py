"""What a tune is asked to do, the keys of its batch sizes and studies, and its device clock."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..device import DeviceInfo
from ..errors import TableError, UsageError
from ..loader import default_launch_config
from ..shapes import MoEShape
from ..tables import TORCH_DTYPES, TableDtype, expert_parallel_extra, read_record, table_path
from ..types import LaunchConfig, Role, Variant
from .space import SearchSpace
from .storage import DEFAULT_HEARTBEAT_S, default_journal


@dataclass
class TuneSettings:
    shapes: list[MoEShape]
    # What the tables are keyed by: "bf16", "fp16", or fp8_w8a8 with its block shape (as
    # TableDtype.of takes it; a TableDtype once set). Its str() names the studies.
    dtype: TableDtype | str
    batch_sizes: list[int]
    variants: list[Variant]
    trials: int
    out_dir: Path
    device: DeviceInfo
    space: SearchSpace
    seed: int = 0
    storage: str | None = None
    time_budget_min: float | None = None
    baseline_dir: Path | None = None
    compile_workers: int = 0
    top_pairs: int = 3
    retime_rounds: int = 3
    # Choose the layer pairs again of batch sizes whose table entries are written already.
    retime: bool = False
    progress: bool = True
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    # Added to the samplers' seeds: processes sharing studies must not propose the same configs.
    sampler_salt: int = 0
    label: str = ""  # names this process in its log lines when several run at once
    bar_position: int | None = None
    # This process's place among the processes of one host sharing the studies (walk.py).
    walk_slot: int = 0
    walk_count: int = 1
    # The activations' dtype of an fp8 tune (bf16 on a GPU; fp16 in the interpreter, which
    # has no bf16 atomic add): the configs serve fp8 layers of any activation dtype.
    fp8_activations: str = "bf16"
    # Expert parallelism: `shapes` are one rank's local shapes (E / ep_size experts), routed
    # over the ep_size * E experts of the whole layer (local_shape).
    ep_size: int = 1

    def __post_init__(self) -> None:
        wanted = {Variant(v) for v in self.variants}
        self.variants = [v for v in Variant if v in wanted]  # in the tables' order
        self.dtype = TableDtype.of(self.dtype)

    @property
    def roles(self) -> list[Role]:
        return Role.for_variants(self.variants)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The activations' dtype (and the weights', unless fp8)."""
        return TORCH_DTYPES[self.fp8_activations if self.dtype.fp8 else self.dtype.name]

    def default_config(self, shape: MoEShape, M: int) -> LaunchConfig:
        """The default heuristic's config, which the checks run in the roles not tuned."""
        return default_launch_config(M, shape.E, shape.N, shape.K, shape.topk, self.dtype)

    def global_experts(self, shape: MoEShape) -> int:
        """The experts the routing picks from: all ranks' experts."""
        return shape.E * self.ep_size

    def table_shape_extra(self, shape: MoEShape) -> dict:
        """What a table header adds to its shape: an expert-parallel rank's size and global E."""
        return expert_parallel_extra(self.ep_size, self.global_experts(shape))

    def check_tables_agree(self) -> None:
        """UsageError, before any work, where a table this run would merge into was tuned
        for another expert-parallel size: the two share a file name but not a problem."""
        for shape in self.shapes:
            path = self.table_path(shape)
            if not path.is_file():
                continue
            try:
                found = read_record(path).shape.expert_parallel
            except TableError:
                continue  # refused by name where the run writes it
            wanted = (self.ep_size, self.global_experts(shape)) if self.ep_size > 1 else None
            if found != wanted:
                raise UsageError(f"{path} was tuned for {_ranks(found)}, this run for {_ranks(wanted)}: "
                                 f"use another --out-dir")

    def study_name(self, key: StudyKey) -> str:
        return key.name(self.device, self.dtype, self.ep_size)

    def study_suffix(self, key: StudyKey) -> str:
        return key.suffix(self.dtype, self.ep_size)

    def storage_location(self) -> str:
        """The --storage URL or journal file, else a journal file beside the tables."""
        return self.storage or str(default_journal(self.out_dir, self.device.key))

    def table_path(self, shape: MoEShape) -> Path:
        return table_path(self.out_dir, self.device.key, shape.E, shape.N, shape.K, shape.topk, self.dtype)

    def batches(self) -> list[BatchKey]:
        """Every batch size of every shape: shapes in order, batch sizes ascending."""
        return [BatchKey(shape, M) for shape in self.shapes for M in sorted(self.batch_sizes)]


@dataclass(frozen=True)
class BatchKey:
    """One batch size of one shape: a table entry, tuned by one study per role."""

    shape: MoEShape
    M: int

    def study(self, role: Role) -> StudyKey:
        return StudyKey(self, Role(role))


@dataclass(frozen=True)
class StudyKey:
    batch: BatchKey
    role: Role

    def suffix(self, dtype: str, ep_size: int = 1) -> str:
        """The study's name but the device: what names a study of this run on any device. An
        expert-parallel rank's studies say so: its experts see fewer rows than a layer of
        that many experts."""
        s = self.batch.shape
        ep = f"/ep={ep_size}" if ep_size > 1 else ""
        return f"E={s.E},N={s.N},K={s.K},topk={s.topk}{ep}/{dtype}/{self.role}/M={self.batch.M}"

    def name(self, device: DeviceInfo, dtype: str, ep_size: int = 1) -> str:
        return f"{device.key}/{self.suffix(dtype, ep_size)}"


def _ranks(expert_parallel: tuple[int, int] | None) -> str:
    if expert_parallel is None:
        return "the whole layer (no --ep-size)"
    return f"--ep-size {expert_parallel[0]} (global E {expert_parallel[1]})"


def local_shape(shape: MoEShape, ep_size: int) -> MoEShape:
    """The shape one of `ep_size` expert-parallel ranks holds: E / ep_size experts, as vLLM
    names its tables under --enable-expert-parallel. UsageError for a size that does not
    divide E or leaves fewer local experts than top-k."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise UsageError(f"--ep-size must be a positive integer, got {ep_size!r}")
    if shape.E % ep_size:
        raise UsageError(f"--ep-size {ep_size} does not divide the {shape.E} experts of {shape.describe()}")
    local = shape.E // ep_size
    if local < shape.topk:
        raise UsageError(f"--ep-size {ep_size}: {shape.E} experts / {ep_size} = {local} per rank, fewer than "
                         f"top-k {shape.topk}: not supported")
    return dataclasses.replace(shape, E=local)


def worker_salt() -> int:
    """A sampler seed offset of its own for each process of a shared run."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


@dataclass
class Clock:
    """How long the device was busy checking and timing, of the wall time since `start`."""

    start: float = field(default_factory=time.monotonic)
    device_s: float = 0.0

    @contextmanager
    def busy(self):
        began = time.monotonic()
        try:
            yield
        finally:
            self.device_s += time.monotonic() - began

    def busy_fraction(self) -> float:
        wall = time.monotonic() - self.start
        return self.device_s / wall if wall > 0 else 0.0
