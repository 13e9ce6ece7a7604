"""The search space of launch configs and the rules that prune it for one GEMM problem."""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterator

import yaml

from ..errors import UsageError
from ..types import CONFIG_KEYS, ConfigError, Gemm, LaunchConfig, value_problem
from .switch_space import SwitchSpace, read_switch_space

DEFAULT_SPACE_FILE = "space.yaml"
DTYPE_BYTES = (1, 2, 4)  # fp8, bf16/fp16, fp32
SWITCHES_KEY = "switches"  # the space file's section of kernel switches (switch_space.py)

# A BLOCK_SIZE_M of 16 is the smallest MMA row count, so it is never padding-bound.
ALWAYS_ALLOWED_BLOCK_M = 16
# Experts get uneven shares of tokens; allow blocks up to this multiple of the mean rows.
BLOCK_M_ROWS_FACTOR = 4
# Smallest per-warp MMA output tile (mma.sync m16n8); warps beyond the tile count replicate work.
MMA_TILE_M = 16
MMA_TILE_N = 8

# Why a config is pruned, one category per rule, in the order the rules are checked.
PRUNED_SHARED_MEMORY = "shared_memory"
PRUNED_REGISTERS = "accumulator_registers"
PRUNED_BLOCK_M = "block_m_over_rows"
PRUNED_TILE = "tile_over_problem"
PRUNED_WARPS = "warps_over_tile"
PRUNED_GROUP = "group_size_duplicate"
KEPT = "kept"
PRUNING_CATEGORIES = (PRUNED_SHARED_MEMORY, PRUNED_REGISTERS, PRUNED_BLOCK_M, PRUNED_TILE, PRUNED_WARPS,
                      PRUNED_GROUP, KEPT)


def next_pow2(value: int) -> int:
    """Smallest power of two >= value (1 for value <= 1)."""
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class SearchSpace:
    values: dict[str, tuple[int, ...]]  # the six keys in CONFIG_KEYS order, each tuple sorted and unique
    # The kernel switches the layer choice tries; built without, a space searches none.
    switches: SwitchSpace = field(default_factory=SwitchSpace.off)

    def __post_init__(self) -> None:
        if set(self.values) != set(CONFIG_KEYS):
            raise ValueError(f"a search space needs exactly the keys {', '.join(CONFIG_KEYS)}")
        normalized = {key: tuple(sorted(set(self.values[key]))) for key in CONFIG_KEYS}
        object.__setattr__(self, "values", normalized)

    def size(self) -> int:
        return math.prod(len(choices) for choices in self.values.values())

    def smallest(self, key: str) -> int:
        return self.values[key][0]

    def to_dict(self) -> dict[str, list]:
        return {**{key: list(choices) for key, choices in self.values.items()}, SWITCHES_KEY: self.switches.to_dict()}

    def without_switches(self) -> SearchSpace:
        return SearchSpace(self.values, SwitchSpace.off())


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


def _read_choices(text: str, source: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple]]:
    """The config keys' lists and the switches' lists a space file gives."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"{source}: not valid YAML{_yaml_place(error)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: must be a mapping of config keys to lists, got {type(data).__name__}")
    switches = read_switch_space(data.pop(SWITCHES_KEY), source) if SWITCHES_KEY in data else {}
    unknown = [key for key in data if key not in CONFIG_KEYS]
    if unknown:
        raise UsageError(f"{source}: {unknown[0]}: unknown key, expected some of {', '.join(CONFIG_KEYS)} "
                         f"or {SWITCHES_KEY}")
    return {key: _check_choices(key, raw, source) for key, raw in data.items()}, switches


def _yaml_place(error: yaml.YAMLError) -> str:
    """Where and why YAML failed, in one line (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or ""
    return f"{where}: {problem}" if problem else where


@functools.lru_cache(maxsize=1)
def default_space() -> SearchSpace:
    text = resources.files(__package__).joinpath(DEFAULT_SPACE_FILE).read_text(encoding="utf-8")
    choices, switches = _read_choices(text, DEFAULT_SPACE_FILE)
    missing = [key for key in (*CONFIG_KEYS, *SwitchSpace.off().values) if key not in {**choices, **switches}]
    if missing:
        raise UsageError(f"{DEFAULT_SPACE_FILE}: {missing[0]}: missing from the default space")
    return SearchSpace(choices, SwitchSpace(switches))


def load_space(path: str | os.PathLike[str] | None = None, default_switches: bool = True) -> SearchSpace:
    """The default space, with the keys a user YAML file lists replacing the defaults (and
    the switches its `switches:` section lists replacing theirs). default_switches=False:
    only the switches the file lists are searched."""
    base = default_space() if default_switches else default_space().without_switches()
    if path is None:
        return base
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise UsageError(f"{source}: cannot read the search space: {reason}") from None
    choices, switches = _read_choices(text, source)
    return SearchSpace({**base.values, **choices}, SwitchSpace({**base.switches.values, **switches}))


@dataclass(frozen=True)
class Problem:
    """One of the layer's two GEMMs at one batch size."""

    gemm: Gemm
    M: int  # tokens
    E: int  # experts
    topk: int  # experts per token
    n_out: int  # output width
    k_in: int  # reduction length
    dtype_bytes: int  # bytes per element of the operands
    block_k: int | None = None  # block fp8: a K tile must lie within one scale block
    # Expert parallelism: the experts the tokens are routed among, all ranks' (None: E). A rank's
    # experts get the rows of M * topk / routed_experts each, not M * topk / E.
    routed_experts: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gemm", _gemm(self.gemm))
        for name in ("M", "E", "topk", "n_out", "k_in"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.routed_experts is not None and self.routed_experts < self.E:
            raise UsageError(f"routed_experts ({self.routed_experts}) cannot be fewer than this rank's E ({self.E})")
        if self.topk > self.experts_routed_to:
            raise UsageError(f"topk ({self.topk}) cannot exceed the number of experts E ({self.experts_routed_to})")
        if self.dtype_bytes not in DTYPE_BYTES:
            raise UsageError(f"dtype_bytes must be one of {DTYPE_BYTES}, got {self.dtype_bytes!r}")

    @classmethod
    def for_gemm(cls, gemm: Gemm | str, M: int, E: int, N: int, K: int, topk: int, dtype_bytes: int,
                 block_k: int | None = None, routed_experts: int | None = None) -> Problem:
        # GEMM 1: hidden [.., K] -> gate/up [.., 2N]; GEMM 2: activation [.., N] -> hidden [.., K].
        n_out, k_in = (2 * N, K) if _gemm(gemm) is Gemm.GEMM1 else (K, N)
        return cls(_gemm(gemm), M, E, topk, n_out=n_out, k_in=k_in, dtype_bytes=dtype_bytes, block_k=block_k,
                   routed_experts=routed_experts)

    @property
    def rows(self) -> int:
        return self.M * self.topk

    @property
    def experts_routed_to(self) -> int:
        return self.routed_experts or self.E

    @property
    def rows_per_expert(self) -> int:
        return -(-self.rows // self.experts_routed_to)

    def num_m_blocks(self, block_m: int) -> int:
        """Row blocks the kernel's grid holds, as sized by kernels/align.py's max_padded_rows:
        each non-empty expert (at most min(rows, E) of them) pads up to block_m - 1 rows."""
        padded_rows = self.rows + min(self.rows, self.E) * (block_m - 1)
        return -(-padded_rows // block_m)


def _gemm(value: Any) -> Gemm:
    try:
        return Gemm(value)
    except ValueError:
        raise UsageError(f"gemm must be one of {', '.join(g.value for g in Gemm)}, got {value!r}") from None


# -- the rules: each returns why it prunes, or None ----------------------------------------------
# Rules that look at one or two keys are checked while the configs are built (see candidates),
# so the grid's pruned corners are never built at all.

def _block_m_rule(bm: int, problem: Problem, space: SearchSpace) -> str | None:
    # Rows are padded per expert to BLOCK_SIZE_M, so a block far above the mean rows is mostly padding.
    max_bm = max(ALWAYS_ALLOWED_BLOCK_M, space.smallest("BLOCK_SIZE_M"),
                 BLOCK_M_ROWS_FACTOR * next_pow2(problem.rows_per_expert))
    if bm > max_bm:
        return f"BLOCK_SIZE_M {bm} > {max_bm} for ~{problem.rows_per_expert} rows per expert"
    return None


def _tile_n_rule(bn: int, problem: Problem, space: SearchSpace) -> str | None:
    # A tile of next_pow2(dim) already covers the whole dim; wider tiles only add masked lanes.
    max_bn = max(space.smallest("BLOCK_SIZE_N"), next_pow2(problem.n_out))
    return f"BLOCK_SIZE_N {bn} > {max_bn} for n_out {problem.n_out}" if bn > max_bn else None


def _tile_k_rule(bk: int, problem: Problem, space: SearchSpace) -> str | None:
    if problem.block_k is not None and problem.block_k % bk:
        return f"BLOCK_SIZE_K {bk} does not divide the fp8 scale block's block_k {problem.block_k}"
    max_bk = max(space.smallest("BLOCK_SIZE_K"), next_pow2(problem.k_in))
    return f"BLOCK_SIZE_K {bk} > {max_bk} for k_in {problem.k_in}" if bk > max_bk else None


def _warps_rule(bm: int, bn: int, warps: int, space: SearchSpace) -> str | None:
    # Warps beyond the tile's count of 16x8 MMA tiles hold replicated accumulators and do no new work.
    mma_tiles = (bm // MMA_TILE_M) * (bn // MMA_TILE_N)
    if warps > mma_tiles and warps > space.smallest("num_warps"):
        return f"num_warps {warps} > {mma_tiles} MMA tiles of {bm}x{bn}"
    return None


def _group_rule(bm: int, group: int, problem: Problem, space: SearchSpace) -> str | None:
    # Every GROUP_SIZE_M >= the row-block count maps programs to tiles identically, so only the
    # smallest such value in the space is kept; larger ones are duplicates of it.
    m_blocks = problem.num_m_blocks(bm)
    covering = [value for value in space.values["GROUP_SIZE_M"] if m_blocks <= value < group]
    if covering:
        return f"GROUP_SIZE_M {group} duplicates {covering[0]} with {m_blocks} row blocks"
    return None


def _first_failed_rule(config: LaunchConfig, problem: Problem, smem_limit: int,
                       space: SearchSpace) -> tuple[str, str] | None:
    # The kernel would not launch (shared memory), or ptxas would spill (registers): the
    # rules the dispatcher validates tables with too.
    unfit = config.fit_problem(problem.dtype_bytes, smem_limit)
    if unfit is not None:
        smem = config.shared_memory_bytes(problem.dtype_bytes) > smem_limit
        return (PRUNED_SHARED_MEMORY if smem else PRUNED_REGISTERS), unfit
    rules = (
        (PRUNED_BLOCK_M, _block_m_rule(config.block_m, problem, space)),
        (PRUNED_TILE, _tile_n_rule(config.block_n, problem, space) or _tile_k_rule(config.block_k, problem, space)),
        (PRUNED_WARPS, _warps_rule(config.block_m, config.block_n, config.num_warps, space)),
        (PRUNED_GROUP, _group_rule(config.block_m, config.group_m, problem, space)),
    )
    for category, reason in rules:
        if reason is not None:
            return category, reason
    return None


def prune_reason(config: LaunchConfig, problem: Problem, smem_limit: int,
                 space: SearchSpace | None = None) -> str | None:
    """None to keep the config, else a short reason. Rules that keep the space's smallest value use `space`
    (the default space when None)."""
    failed = _first_failed_rule(config, problem, smem_limit, space if space is not None else default_space())
    return None if failed is None else failed[1]


def iter_configs(space: SearchSpace) -> Iterator[LaunchConfig]:
    """Every config of the space, in a fixed order (CONFIG_KEYS, values ascending)."""
    for combo in itertools.product(*(space.values[key] for key in CONFIG_KEYS)):
        yield LaunchConfig(*combo)


def candidates(space: SearchSpace, problem: Problem, smem_limit: int) -> list[LaunchConfig]:
    """All configs of the space that survive pruning, in iter_configs order."""
    v = space.values
    kept = []
    for bm in v["BLOCK_SIZE_M"]:
        if _block_m_rule(bm, problem, space):
            continue
        for bn in v["BLOCK_SIZE_N"]:
            if _tile_n_rule(bn, problem, space):
                continue
            for bk in v["BLOCK_SIZE_K"]:
                if _tile_k_rule(bk, problem, space):
                    continue
                for group in v["GROUP_SIZE_M"]:
                    if _group_rule(bm, group, problem, space):
                        continue
                    for warps in v["num_warps"]:
                        if _warps_rule(bm, bn, warps, space):
                            continue
                        for stages in v["num_stages"]:
                            config = LaunchConfig(bm, bn, bk, group, warps, stages)
                            if config.fit_problem(problem.dtype_bytes, smem_limit) is None:
                                kept.append(config)
    return kept


def pruning_summary(space: SearchSpace, problem: Problem, smem_limit: int) -> dict[str, int]:
    """Configs per first failed rule, plus "kept"; the counts add up to space.size()."""
    counts = dict.fromkeys(PRUNING_CATEGORIES, 0)
    for config in iter_configs(space):
        failed = _first_failed_rule(config, problem, smem_limit, space)
        counts[KEPT if failed is None else failed[0]] += 1
    return counts


def optuna_distributions(space: SearchSpace) -> dict[str, Any]:
    """One CategoricalDistribution per config key, for Optuna's define-and-run API."""
    from optuna.distributions import CategoricalDistribution

    return {key: CategoricalDistribution(list(choices)) for key, choices in space.values.items()}


def config_of(params: dict) -> LaunchConfig:
    """The config of an Optuna trial's parameters (the one place the tuner reads them)."""
    try:
        return LaunchConfig.from_json({key: int(params[key]) for key in CONFIG_KEYS}, "trial parameters")
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"trial parameters {params!r} are no launch config: {error}") from None
