from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetune.configs import CONFIG_KEYS, default_config
from moetune.errors import UsageError
from moetune.tune.space import (
    KEPT,
    PRUNED_BLOCK_M,
    PRUNED_GROUP,
    PRUNED_SHARED_MEMORY,
    PRUNED_TILE,
    PRUNING_CATEGORIES,
    Problem,
    SearchSpace,
    candidates,
    config_of,
    iter_configs,
    load_space,
    optuna_distributions,
    prune_reason,
    pruning_summary,
)
from moetune.types import ConfigError, Gemm, LaunchConfig

HOPPER_SMEM = 232448
DEFAULT_VALUES = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (32, 64, 128, 256),
    "BLOCK_SIZE_K": (32, 64, 128, 256),
    "GROUP_SIZE_M": (1, 4, 8, 16, 32, 64),
    "num_warps": (2, 4, 8),
    "num_stages": (2, 3, 4, 5),
}
# A Mixtral-like layer: big enough that only the rule under test fires.
BIG = Problem.for_gemm(Gemm.GEMM1, M=4096, E=8, N=14336, K=4096, topk=2, dtype_bytes=2)
TINY = Problem(Gemm.GEMM1, M=1, E=4, topk=2, n_out=64, k_in=64, dtype_bytes=2)


def config(bm=64, bn=64, bk=64, group=1, warps=4, stages=3) -> LaunchConfig:
    return LaunchConfig(bm, bn, bk, group, warps, stages)


def space_with(**overrides: tuple[int, ...]) -> SearchSpace:
    return SearchSpace({**DEFAULT_VALUES, **overrides})


def reason(cfg: LaunchConfig, problem: Problem = BIG, smem: int = HOPPER_SMEM, space: SearchSpace | None = None):
    return prune_reason(cfg, problem, smem, space or load_space())


# --- loading -----------------------------------------------------------------------------------

def test_default_space() -> None:
    space = load_space()
    assert space.values == DEFAULT_VALUES
    assert list(space.values) == list(CONFIG_KEYS)
    assert space.size() == 5 * 4 * 4 * 6 * 3 * 4
    assert space.to_dict() == {**{key: list(values) for key, values in DEFAULT_VALUES.items()},
                               "switches": space.switches.to_dict()}


def test_user_yaml_replaces_only_given_keys(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("num_warps: [4]\nBLOCK_SIZE_M: [64, 16, 16]\n")
    space = load_space(path)
    assert space.values["num_warps"] == (4,)
    assert space.values["BLOCK_SIZE_M"] == (16, 64)  # sorted, duplicates dropped
    assert space.values["BLOCK_SIZE_K"] == DEFAULT_VALUES["BLOCK_SIZE_K"]
    assert space.size() == 2 * 4 * 4 * 6 * 1 * 4


def test_empty_user_yaml_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_space(path) == load_space()


@pytest.mark.parametrize(
    "text, key",
    [
        ("BLOCK_SIZE_Q: [16]", "BLOCK_SIZE_Q"),
        ("num_warps: []", "num_warps"),
        ("num_stages: [2, three]", "num_stages"),
        ("num_stages: [2.5]", "num_stages"),
        ("GROUP_SIZE_M: [true]", "GROUP_SIZE_M"),
        ("GROUP_SIZE_M: [0, 4]", "GROUP_SIZE_M"),
        ("num_stages: [-1]", "num_stages"),
        ("BLOCK_SIZE_N: [48]", "BLOCK_SIZE_N"),
        ("BLOCK_SIZE_K: [8, 16]", "BLOCK_SIZE_K"),
        ("num_warps: [3]", "num_warps"),
        ("BLOCK_SIZE_M: 64", "BLOCK_SIZE_M"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad_space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError) as caught:
        load_space(path)
    assert str(path) in str(caught.value)
    assert key in str(caught.value)


@pytest.mark.parametrize("text", ["- 16\n- 32\n", "num_warps: [4\n", "a: b: c\n", "\xff\xfe"])
def test_unusable_yaml_names_file_in_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UsageError, match="broken.yaml") as caught:
        load_space(path)
    assert "\n" not in str(caught.value)


def test_missing_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nowhere.yaml"):
        load_space(tmp_path / "nowhere.yaml")


# --- problems and shared memory ----------------------------------------------------------------

def test_for_gemm_maps_dimensions() -> None:
    gemm1 = Problem.for_gemm(Gemm.GEMM1, M=8, E=16, N=1024, K=2048, topk=4, dtype_bytes=2)
    gemm2 = Problem.for_gemm("gemm2", M=8, E=16, N=1024, K=2048, topk=4, dtype_bytes=2)
    assert (gemm1.n_out, gemm1.k_in) == (2048, 2048)
    assert (gemm2.n_out, gemm2.k_in) == (2048, 1024)
    assert gemm1.rows == 32 and gemm1.rows_per_expert == 2


@pytest.mark.parametrize("gemm, topk, dtype_bytes", [("gemm3", 2, 2), ("gemm1", 9, 2), ("gemm1", 2, 3)])
def test_bad_problem(gemm: str, topk: int, dtype_bytes: int) -> None:
    with pytest.raises(UsageError):
        Problem.for_gemm(gemm, M=8, E=8, N=64, K=64, topk=topk, dtype_bytes=dtype_bytes)


def test_trial_parameters_are_read_as_launch_configs() -> None:
    assert config_of(config().to_json()) == config()
    assert config_of({**config().to_json(), "num_warps": 4.0}) == config()  # Optuna may hand back floats
    with pytest.raises(ConfigError, match="num_stages"):
        config_of({key: value for key, value in config().to_json().items() if key != "num_stages"})


# --- one test per rule: a config that triggers it and one that does not ---------------------------

def test_rule_shared_memory() -> None:
    too_big = config(bm=256, bn=256, bk=128, warps=16, stages=4)  # 4 * 64 KiB
    assert "shared memory" in reason(too_big)
    assert reason(config(bm=128, bn=128, bk=64, stages=3)) is None
    # The same config fits a device with more shared memory.
    assert reason(too_big, smem=too_big.shared_memory_bytes(2)) is None


def test_rule_block_m_over_rows() -> None:
    # 64 tokens * topk 2 / 8 experts = 16 rows per expert: BLOCK_SIZE_M up to 4 * 16.
    problem = Problem.for_gemm(Gemm.GEMM1, M=64, E=8, N=4096, K=4096, topk=2, dtype_bytes=2)
    assert "BLOCK_SIZE_M" in reason(config(bm=128), problem)
    assert reason(config(bm=64), problem) is None
    # BLOCK_SIZE_M 16 survives even a single token; a space without 16 keeps its smallest.
    assert reason(config(bm=16, bn=32, bk=32, warps=2), TINY) is None
    assert "BLOCK_SIZE_M" in reason(config(bm=32, bn=32, bk=32, warps=2), TINY)
    big_blocks = space_with(BLOCK_SIZE_M=(64, 128))
    assert reason(config(bm=64), TINY, space=big_blocks) is None
    assert reason(config(bm=128), TINY, space=big_blocks) is not None


def test_rule_block_m_counts_rows_over_all_ranks_experts_under_expert_parallelism() -> None:
    # One rank of 4 holding 8 of 32 experts: 64 tokens * topk 2 / 32 = 4 rows per expert, not 16.
    rank = Problem.for_gemm(Gemm.GEMM1, M=64, E=8, N=4096, K=4096, topk=2, dtype_bytes=2, routed_experts=32)
    assert rank.rows_per_expert == 4
    assert "BLOCK_SIZE_M 64 > 16 for ~4 rows per expert" in reason(config(bm=64), rank)
    assert reason(config(bm=16), rank) is None
    with pytest.raises(UsageError, match=r"routed_experts \(4\) cannot be fewer than this rank's E \(8\)"):
        Problem.for_gemm(Gemm.GEMM1, M=64, E=8, N=64, K=64, topk=2, dtype_bytes=2, routed_experts=4)


def test_rule_tile_over_problem() -> None:
    problem = Problem(Gemm.GEMM2, M=4096, E=8, topk=2, n_out=64, k_in=100, dtype_bytes=2)
    assert "BLOCK_SIZE_N" in reason(config(bn=128, bk=64), problem)
    assert "BLOCK_SIZE_K" in reason(config(bn=64, bk=256), problem)
    assert reason(config(bn=64, bk=128), problem) is None  # next_pow2(100) = 128
    # A dimension narrower than every choice still keeps the smallest one.
    narrow = Problem(Gemm.GEMM2, M=4096, E=8, topk=2, n_out=20, k_in=20, dtype_bytes=2)
    wide_space = space_with(BLOCK_SIZE_N=(64, 128), BLOCK_SIZE_K=(64, 128))
    assert reason(config(bn=64, bk=64), narrow, space=wide_space) is None
    assert reason(config(bn=128, bk=64), narrow, space=wide_space) is not None


def test_rule_warps_over_tile() -> None:
    # A 16x32 tile holds four 16x8 MMA tiles: eight warps would replicate them.
    assert "num_warps" in reason(config(bm=16, bn=32, warps=8))
    assert reason(config(bm=16, bn=32, warps=4)) is None
    assert reason(config(bm=16, bn=64, warps=8)) is None
    # With no smaller warp count in the space, the only choice stays.
    assert reason(config(bm=16, bn=32, warps=8), space=space_with(num_warps=(8,))) is None


def test_rule_accumulator_registers() -> None:
    # 128x256 on 8 warps is 128 fp32 registers per thread: kept (vLLM/SGLang ship it).
    assert reason(config(bm=128, bn=256, bk=32, warps=8, stages=2)) is None
    # The same tile on 4 warps needs 256: pruned; 256x256 on 8 warps too.
    assert "accumulator registers" in reason(config(bm=128, bn=256, bk=32, warps=4, stages=2))
    assert "accumulator registers" in reason(config(bm=256, bn=256, bk=32, warps=8, stages=2))


def test_rule_group_size_duplicate() -> None:
    # 16 tokens * 2 + 8 experts * 15 padding = 152 rows -> 10 blocks of 16: GROUP_SIZE_M 16 covers it.
    problem = Problem.for_gemm(Gemm.GEMM1, M=16, E=8, N=4096, K=4096, topk=2, dtype_bytes=2)
    assert problem.num_m_blocks(16) == 10
    assert "GROUP_SIZE_M" in reason(config(bm=16, group=32), problem)
    assert "GROUP_SIZE_M" in reason(config(bm=16, group=64), problem)
    assert reason(config(bm=16, group=16), problem) is None
    assert reason(config(bm=16, group=8), problem) is None
    # The big problem has more row blocks than any GROUP_SIZE_M: nothing is a duplicate.
    assert reason(config(bm=64, group=64)) is None


def program_to_tile(group: int, m_blocks: int, n_blocks: int) -> list[tuple[int, int]]:
    """The grouped launch order of the kernel: program id -> (row block, column block)."""
    order = []
    for pid in range(m_blocks * n_blocks):
        per_group = group * n_blocks
        first_m = (pid // per_group) * group
        group_rows = min(m_blocks - first_m, group)
        order.append((first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows))
    return order


@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_group_size_keeps_one_representative_per_launch_order(M: int) -> None:
    space = load_space()
    problem = Problem.for_gemm(Gemm.GEMM2, M=M, E=8, N=512, K=1024, topk=2, dtype_bytes=2)
    # Only block sizes that no other rule prunes (GROUP_SIZE_M 1 is never a duplicate).
    block_sizes = [bm for bm in space.values["BLOCK_SIZE_M"]
                   if prune_reason(config(bm=bm, bn=64, bk=64, group=1), problem, HOPPER_SMEM, space) is None]
    assert block_sizes
    for bm in block_sizes:
        base = config(bm=bm, bn=64, bk=64, warps=4, stages=3)
        m_blocks, n_blocks = problem.num_m_blocks(bm), -(-problem.n_out // 64)
        orders = {}
        for group in space.values["GROUP_SIZE_M"]:
            orders[group] = program_to_tile(group, m_blocks, n_blocks)
        kept = [g for g in orders if prune_reason(base.replace(group_m=g), problem, HOPPER_SMEM, space) is None]
        # Every distinct launch order keeps exactly one config, and every pruned one matches a kept one.
        kept_orders = [tuple(orders[g]) for g in kept]
        assert len(set(kept_orders)) == len(kept_orders)
        assert {tuple(order) for order in orders.values()} == set(kept_orders)


# --- candidates and summaries ------------------------------------------------------------------

@pytest.mark.parametrize("problem", [TINY, BIG, Problem.for_gemm(Gemm.GEMM2, 32, 64, 1408, 2048, 6, 2)])
def test_candidates_are_exactly_the_unpruned(problem: Problem) -> None:
    space = load_space()
    kept = candidates(space, problem, HOPPER_SMEM)
    assert kept == candidates(space, problem, HOPPER_SMEM)
    assert all(prune_reason(cfg, problem, HOPPER_SMEM, space) is None for cfg in kept)
    kept_set = set(kept)
    pruned = [cfg for cfg in iter_configs(space) if cfg not in kept_set]
    assert all(prune_reason(cfg, problem, HOPPER_SMEM, space) for cfg in pruned)
    summary = pruning_summary(space, problem, HOPPER_SMEM)
    assert summary[KEPT] == len(kept)
    assert sum(summary.values()) == space.size()
    assert set(summary) == set(PRUNING_CATEGORIES)


def test_tiny_problem_has_few_candidates() -> None:
    kept = candidates(load_space(), TINY, HOPPER_SMEM)
    assert 0 < len(kept) <= 100
    assert {cfg.block_m for cfg in kept} == {16}
    assert {cfg.block_n for cfg in kept} <= {32, 64}
    summary = pruning_summary(load_space(), TINY, HOPPER_SMEM)
    assert summary[PRUNED_BLOCK_M] > 0 and summary[PRUNED_TILE] > 0 and summary[PRUNED_GROUP] > 0


def test_big_problem_prunes_for_shared_memory() -> None:
    summary = pruning_summary(load_space(), BIG, HOPPER_SMEM)
    assert summary[PRUNED_SHARED_MEMORY] > 0
    assert summary[PRUNED_BLOCK_M] == 0 and summary[PRUNED_TILE] == 0


def test_optuna_distributions() -> None:
    pytest.importorskip("optuna")
    space = load_space()
    distributions = optuna_distributions(space)
    assert list(distributions) == list(CONFIG_KEYS)
    assert all(tuple(distributions[key].choices) == space.values[key] for key in CONFIG_KEYS)


# --- properties --------------------------------------------------------------------------------

DEFAULT = SearchSpace(DEFAULT_VALUES)
problems = st.builds(
    Problem.for_gemm,
    gemm=st.sampled_from(list(Gemm)),
    M=st.integers(1, 65536),
    E=st.integers(8, 256),
    N=st.integers(1, 16384),
    K=st.integers(1, 16384),
    topk=st.integers(1, 8),
    dtype_bytes=st.sampled_from([1, 2, 4]),
)
configs = st.builds(LaunchConfig, *(st.sampled_from(values) for values in DEFAULT_VALUES.values()))


@settings(max_examples=300, deadline=None)
@given(cfg=configs, problem=problems, smem_limit=st.integers(16 * 1024, 256 * 1024))
def test_kept_configs_fit_the_device_by_the_dispatcher_s_rules(cfg: LaunchConfig, problem: Problem,
                                                                smem_limit: int) -> None:
    why = prune_reason(cfg, problem, smem_limit, DEFAULT)
    if why is None:
        assert cfg.fit_problem(problem.dtype_bytes, smem_limit) is None
    else:
        assert isinstance(why, str) and why


@settings(max_examples=25, deadline=None)
@given(problem=problems)
def test_smallest_config_always_survives(problem: Problem) -> None:
    # Every rule but shared memory keeps the space's smallest values, so the tuner always has a candidate.
    smallest = LaunchConfig(*(values[0] for values in DEFAULT_VALUES.values()))
    assert prune_reason(smallest, problem, HOPPER_SMEM, DEFAULT) is None
    assert candidates(DEFAULT, problem, HOPPER_SMEM)


@pytest.mark.parametrize("limit", [232448, 101376, 49152])
def test_default_config_fits_the_shared_memory_it_is_given(limit) -> None:
    # A large batch asks for the widest default tile; smaller GPUs must get one that launches.
    config = LaunchConfig.from_json(default_config(16384, 64, 2560, 3584, 8, shared_memory_bytes=limit))
    assert config.shared_memory_bytes(2) <= limit
    if limit == 232448:  # Hopper: the 128x256x64 4-stage tile that wins at large M
        assert (config.block_n, config.num_stages) == (256, 4)
