"""The search space of launch configs and the rules that prune it for one GEMM problem."""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator, Mapping

import yaml

from ..configs import CONFIG_KEYS, shared_memory_estimate, value_problem
from ..errors import UsageError

DEFAULT_SPACE_FILE = "space.yaml"
ROLES = ("gemm1", "gemm2")
DTYPE_BYTES = (1, 2, 4)  # fp8, bf16/fp16, fp32

# A BLOCK_SIZE_M of 16 is the smallest MMA row count, so it is never padding-bound.
ALWAYS_ALLOWED_BLOCK_M = 16
# Experts get uneven shares of tokens; allow blocks up to this multiple of the mean rows.
BLOCK_M_ROWS_FACTOR = 4
# Smallest per-warp MMA output tile (mma.sync m16n8); warps beyond the tile count replicate work.
MMA_TILE_M = 16
MMA_TILE_N = 8
# fp32 accumulator registers per thread above which ptxas spills (255 registers in all) and
# compiles for minutes: 128x256 with 8 warps, the largest tile vLLM/SGLang ship, needs 128.
MAX_ACCUMULATOR_REGISTERS = 128

# Reason categories, in the order the rules are checked.
PRUNED_SHARED_MEMORY = "shared_memory"
PRUNED_BLOCK_M = "block_m_over_rows"
PRUNED_TILE = "tile_over_problem"
PRUNED_WARPS = "warps_over_tile"
PRUNED_REGISTERS = "accumulator_registers"
PRUNED_GROUP = "group_size_duplicate"
KEPT = "kept"
SUMMARY_KEYS = (PRUNED_SHARED_MEMORY, PRUNED_BLOCK_M, PRUNED_TILE, PRUNED_WARPS, PRUNED_REGISTERS, PRUNED_GROUP,
                KEPT)


def next_pow2(value: int) -> int:
    """Smallest power of two >= value (1 for value <= 1)."""
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class SearchSpace:
    values: dict[str, tuple[int, ...]]  # the six keys in CONFIG_KEYS order, each tuple sorted and unique

    def __post_init__(self) -> None:
        if set(self.values) != set(CONFIG_KEYS):
            raise ValueError(f"a search space needs exactly the keys {', '.join(CONFIG_KEYS)}")
        normalized = {key: tuple(sorted(set(self.values[key]))) for key in CONFIG_KEYS}
        object.__setattr__(self, "values", normalized)

    def size(self) -> int:
        return math.prod(len(choices) for choices in self.values.values())

    def smallest(self, key: str) -> int:
        return self.values[key][0]

    def to_dict(self) -> dict[str, list[int]]:
        return {key: list(choices) for key, choices in self.values.items()}


def _check_choices(key: str, raw: Any, source: str) -> tuple[int, ...]:
    where = f"{source}: {key}"
    if not isinstance(raw, list):
        raise UsageError(f"{where}: must be a list of integers, got {raw!r}")
    if not raw:
        raise UsageError(f"{where}: must list at least one value")
    for value in raw:
        problem = value_problem(key, value)
        if problem is not None:
            raise UsageError(f"{where}: each value {problem}")
    return tuple(raw)


def _read_choices(text: str, source: str) -> dict[str, tuple[int, ...]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"{source}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: must be a mapping of config keys to lists, got {type(data).__name__}")
    unknown = [key for key in data if key not in CONFIG_KEYS]
    if unknown:
        raise UsageError(f"{source}: {unknown[0]}: unknown key, expected some of {', '.join(CONFIG_KEYS)}")
    return {key: _check_choices(key, raw, source) for key, raw in data.items()}


@functools.lru_cache(maxsize=1)
def default_space() -> SearchSpace:
    text = resources.files(__package__).joinpath(DEFAULT_SPACE_FILE).read_text(encoding="utf-8")
    choices = _read_choices(text, DEFAULT_SPACE_FILE)
    missing = [key for key in CONFIG_KEYS if key not in choices]
    if missing:
        raise UsageError(f"{DEFAULT_SPACE_FILE}: {missing[0]}: missing from the default space")
    return SearchSpace(choices)


def load_space(path: str | os.PathLike[str] | None = None) -> SearchSpace:
    """The default space, with the keys a user YAML file lists replacing the defaults."""
    base = default_space()
    if path is None:
        return base
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise UsageError(f"{source}: cannot read the search space: {error.strerror}") from None
    return SearchSpace({**base.values, **_read_choices(text, source)})


@dataclass(frozen=True)
class Problem:
    """One GEMM role at one batch size."""

    role: str  # "gemm1" | "gemm2"
    M: int  # tokens
    E: int  # experts
    topk: int  # experts per token
    n_out: int  # output width
    k_in: int  # reduction length
    dtype_bytes: int  # bytes per element of the operands

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UsageError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        for name in ("M", "E", "topk", "n_out", "k_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.topk > self.E:
            raise UsageError(f"topk ({self.topk}) cannot exceed the number of experts E ({self.E})")
        if self.dtype_bytes not in DTYPE_BYTES:
            raise UsageError(f"dtype_bytes must be one of {DTYPE_BYTES}, got {self.dtype_bytes!r}")

    @classmethod
    def for_role(cls, role: str, M: int, E: int, N: int, K: int, topk: int, dtype_bytes: int) -> Problem:
        # gemm1: hidden [.., K] -> gate/up [.., 2N]; gemm2: activation [.., N] -> hidden [.., K].
        if role == "gemm1":
            return cls(role, M, E, topk, n_out=2 * N, k_in=K, dtype_bytes=dtype_bytes)
        if role == "gemm2":
            return cls(role, M, E, topk, n_out=K, k_in=N, dtype_bytes=dtype_bytes)
        raise UsageError(f"role must be one of {', '.join(ROLES)}, got {role!r}")

    @property
    def rows(self) -> int:
        return self.M * self.topk

    @property
    def rows_per_expert(self) -> int:
        return -(-self.rows // self.E)

    def num_m_blocks(self, block_m: int) -> int:
        """Row blocks the kernel's grid holds, as sized by kernels/align.py's max_padded_rows:
        each non-empty expert (at most min(rows, E) of them) pads up to block_m - 1 rows."""
        padded_rows = self.rows + min(self.rows, self.E) * (block_m - 1)
        return -(-padded_rows // block_m)


def _first_failed_rule(
    config: Mapping[str, int], problem: Problem, smem_limit: int, space: SearchSpace
) -> tuple[str, str] | None:
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    group, warps = config["GROUP_SIZE_M"], config["num_warps"]

    # The kernel would not launch: it asks for more shared memory than a block may have.
    smem = shared_memory_estimate(config, problem.dtype_bytes)
    if smem > smem_limit:
        return PRUNED_SHARED_MEMORY, f"shared memory {smem} B > limit {smem_limit} B"

    # Rows are padded per expert to BLOCK_SIZE_M, so a block far above the mean rows is mostly padding.
    max_bm = max(ALWAYS_ALLOWED_BLOCK_M, space.smallest("BLOCK_SIZE_M"),
                 BLOCK_M_ROWS_FACTOR * next_pow2(problem.rows_per_expert))
    if bm > max_bm:
        return PRUNED_BLOCK_M, f"BLOCK_SIZE_M {bm} > {max_bm} for ~{problem.rows_per_expert} rows per expert"

    # A tile of next_pow2(dim) already covers the whole dim; wider tiles only add masked lanes.
    max_bn = max(space.smallest("BLOCK_SIZE_N"), next_pow2(problem.n_out))
    if bn > max_bn:
        return PRUNED_TILE, f"BLOCK_SIZE_N {bn} > {max_bn} for n_out {problem.n_out}"
    max_bk = max(space.smallest("BLOCK_SIZE_K"), next_pow2(problem.k_in))
    if bk > max_bk:
        return PRUNED_TILE, f"BLOCK_SIZE_K {bk} > {max_bk} for k_in {problem.k_in}"

    # Warps beyond the tile's count of 16x8 MMA tiles hold replicated accumulators and do no new work.
    mma_tiles = (bm // MMA_TILE_M) * (bn // MMA_TILE_N)
    if warps > mma_tiles and warps > space.smallest("num_warps"):
        return PRUNED_WARPS, f"num_warps {warps} > {mma_tiles} MMA tiles of {bm}x{bn}"

    # The fp32 accumulator alone would take most of a thread's registers: spills, slow compiles.
    accumulator = bm * bn // (32 * warps)
    if accumulator > MAX_ACCUMULATOR_REGISTERS:
        return PRUNED_REGISTERS, f"{bm}x{bn} tile on {warps} warps needs {accumulator} accumulator registers per thread"

    # Every GROUP_SIZE_M >= the row-block count maps programs to tiles identically, so only the
    # smallest such value in the space is kept; larger ones are duplicates of it.
    m_blocks = problem.num_m_blocks(bm)
    covering = [value for value in space.values["GROUP_SIZE_M"] if m_blocks <= value < group]
    if covering:
        return PRUNED_GROUP, f"GROUP_SIZE_M {group} duplicates {covering[0]} with {m_blocks} row blocks"
    return None


def prune_reason(
    config: Mapping[str, int], problem: Problem, smem_limit: int, space: SearchSpace | None = None
) -> str | None:
    """None to keep the config, else a short reason. Rules that keep the space's smallest value use `space`
    (the default space when None)."""
    failed = _first_failed_rule(config, problem, smem_limit, space if space is not None else default_space())
    return None if failed is None else failed[1]


def iter_configs(space: SearchSpace) -> Iterator[dict[str, int]]:
    """Every config of the space, in a fixed order (CONFIG_KEYS, values ascending)."""
    for combo in itertools.product(*(space.values[key] for key in CONFIG_KEYS)):
        yield dict(zip(CONFIG_KEYS, combo))


def candidates(space: SearchSpace, problem: Problem, smem_limit: int) -> list[dict[str, int]]:
    """All configs of the space that survive pruning, in iter_configs order."""
    return [config for config in iter_configs(space) if _first_failed_rule(config, problem, smem_limit, space) is None]


def pruning_summary(space: SearchSpace, problem: Problem, smem_limit: int) -> dict[str, int]:
    """Configs per first failed rule, plus "kept"; the counts add up to space.size()."""
    counts = dict.fromkeys(SUMMARY_KEYS, 0)
    for config in iter_configs(space):
        failed = _first_failed_rule(config, problem, smem_limit, space)
        counts[KEPT if failed is None else failed[0]] += 1
    return counts


def optuna_distributions(space: SearchSpace) -> dict[str, Any]:
    """One CategoricalDistribution per config key, for Optuna's define-and-run API."""
    from optuna.distributions import CategoricalDistribution

    return {key: CategoricalDistribution(list(choices)) for key, choices in space.values.items()}
