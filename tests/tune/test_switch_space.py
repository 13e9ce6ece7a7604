"""The kernel switches in the search space: the `switches:` section of a space file, and each
rule that prunes a switch set before the layer choice times it."""

from __future__ import annotations

import pytest

from moetune.errors import UsageError
from moetune.shapes import DEFAULT_BATCH_SIZES
from moetune.tune.space import load_space
from moetune.tune.switch_search import first_runnable, pair_pool
from moetune.tune.study import RoleResult
from moetune.tune.switch_space import LayerTarget, switch_prune_reason, with_setting
from moetune.types import LaunchConfig, Switches

H200_SMEM, H200_SMS = 232448, 132


def config(bm=16, bn=64, bk=128, group=1, warps=4, stages=3) -> LaunchConfig:
    return LaunchConfig(bm, bn, bk, group, warps, stages)


def deepseek_tp4(M: int, capability=(9, 0)) -> LayerTarget:
    return LayerTarget(M, E=256, N=512, K=7168, topk=8, dtype_bytes=2, shared_memory_bytes=H200_SMEM,
                       sm_count=H200_SMS, compute_capability=capability)


def families(space) -> list[str]:
    return [family for family, _ in space.switches.families()]


def test_the_default_space_searches_every_switch_family_in_order():
    space = load_space()
    assert space.switches.searches
    assert families(space) == ["split_k", "fuse_activation", "sorted_rows", "tma_weights", "persistent"]
    assert space.to_dict()["switches"]["split_k"] == [1, 2, 4, 8]
    # Without the defaults, only what a file lists is searched.
    assert not load_space(default_switches=False).switches.searches


@pytest.mark.parametrize("text, searched", [
    ("switches: {persistent: [false]}\n", ["split_k", "fuse_activation", "sorted_rows", "tma_weights"]),
    ("switches: {split_k: [1], tma_weights: [false], tma_activations: [false]}\n",
     ["fuse_activation", "sorted_rows", "persistent"]),
    ("switches: off\n", []),
])
def test_a_space_file_restricts_the_switches(tmp_path, text, searched):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    space = load_space(path)
    assert families(space) == searched
    assert space.values == load_space().values  # the config keys keep their defaults
    if "tma_activations: [false]" in text:  # the sorted rows without their TMA loads
        assert dict(space.switches.families())["sorted_rows"] == [{"sorted_rows": True}]
    assert families(load_space(path, default_switches=False)) == ([] if "off" in text else [
        family for family in searched if family in text])


@pytest.mark.parametrize("text, words", [
    ("switches: {SPLIT_K: [1]}", "switches: SPLIT_K: unknown switch"),
    ("switches: {split_k: [1, 3]}", "switches: split_k: each value must be one of 1, 2, 4, 8, 16, got 3"),
    ("switches: {persistent: [true]}", "switches: persistent: must include false"),
    ("switches: {split_k: [2]}", "switches: split_k: must include 1"),
    ("switches: {persistent: 'yes'}", "switches: persistent: must be a non-empty list"),
    ("switches: {persistent: [1]}", "persistent: each value must be one of false, true, got 1"),
    ("switches: [persistent]", "switches: must be off or a mapping"),
])
def test_a_bad_switches_section_is_named_in_one_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError) as caught:
        load_space(path)
    assert str(caught.value).startswith(f"{path}: ") and words in str(caught.value)


SPLIT4 = Switches(split_k=4)
TMA = Switches(sorted_rows=True, tma_activations=True, tma_weights=True)


@pytest.mark.parametrize("switches, gemm1, gemm2, target, words", [
    (TMA, config(), config(), deepseek_tp4(4096, capability=(8, 0)), "TMA needs compute capability 9.0"),
    (Switches(tma_weights=True), config(bn=512, bk=32), config(), deepseek_tp4(1), "box 512x32 has a side over 256"),
    (Switches(tma_weights=True), config(), config(),
     LayerTarget(1, 8, 100, 1024, 2, 2, H200_SMEM, H200_SMS, (9, 0)), "rows of 200 B are not 16-byte aligned"),
    (Switches(sorted_rows=True), config(bm=16), config(bm=32), deepseek_tp4(64), "one BLOCK_SIZE_M"),
    (Switches(fuse_activation=True), config(bm=64, bn=128, bk=128, warps=8, stages=4), config(), deepseek_tp4(64),
     "shared memory 327680 B"),
    (SPLIT4, config(), config(), deepseek_tp4(256), "more output tiles than SMs"),
    (Switches(split_k=8), config(), config(bn=128), deepseek_tp4(1), "128 tiles x 8 > 4 programs per SM"),
    (SPLIT4, config(), config(bn=128, bk=256), deepseek_tp4(1), "GEMM 2's 2 K tiles of 256 do not split evenly"),
    (Switches(persistent=True), config(), config(bn=128), deepseek_tp4(1), "under 4 per SM"),
])
def test_each_rule_prunes_with_its_reason(switches, gemm1, gemm2, target, words):
    assert words in switch_prune_reason(switches, gemm1, gemm2, target)


@pytest.mark.parametrize("switches, M, capability", [
    (TMA, 4096, (9, 0)),
    (TMA, 4096, None),  # the interpreter runs the descriptor loads
    (SPLIT4, 1, (9, 0)),  # DeepSeek-V3 at TP4, M = 1: 128 tiles of GEMM 1 on 132 SMs
    (Switches(persistent=True, sorted_rows=True), 8192, (9, 0)),
    (Switches(fuse_activation=True), 64, (9, 0)),
])
def test_what_can_run_and_win_is_kept(switches, M, capability):
    assert switch_prune_reason(switches, config(), config(bn=128), deepseek_tp4(M, capability)) is None


def test_combinations_the_kernels_cannot_run_are_never_built():
    assert with_setting(Switches(fuse_activation=True), {"split_k": 2}) is None
    assert with_setting(Switches(), {"tma_activations": True}) is None
    assert with_setting(Switches(split_k=2), {"sorted_rows": True}) == Switches(split_k=2, sorted_rows=True)


def test_a_switch_set_runs_on_the_best_pair_it_can_run():
    """sorted_rows takes the first pair sharing one BLOCK_SIZE_M; fuse_activation the first
    whose GEMM 1 config fits two weight tiles; the plain path the pair timed fastest."""
    big = config(bm=64, bn=128, bk=128, warps=8, stages=4)  # two weight tiles overflow an H200
    g1 = RoleResult([(10.0, big), (11.0, config(bm=32)), (13.0, config(bm=16))])
    g2 = RoleResult([(5.0, config(bm=16, bn=128)), (6.0, config(bm=32, bn=128))])
    pool = pair_pool([(big, g2.ranked[0][1])], g1, g2)
    assert pool[0] == (big, g2.ranked[0][1]) and len(pool) == 6
    small, large = deepseek_tp4(64), deepseek_tp4(4096)  # the fused SiLU's band, the sorted rows'
    assert first_runnable(Switches(), pool, small) == pool[0]
    assert first_runnable(Switches(sorted_rows=True), pool, large) == (config(bm=32), config(bm=32, bn=128))
    assert first_runnable(Switches(fuse_activation=True), pool, small)[0] == config(bm=32)
    assert first_runnable(Switches(sorted_rows=True), pool, small) is None  # under its band
    assert first_runnable(Switches(split_k=2), pool, deepseek_tp4(16384)) is None


def qwen3(M: int, capability=(9, 0), E: int = 128, global_experts: int | None = None) -> LayerTarget:
    return LayerTarget(M, E=E, N=768, K=2048, topk=8, dtype_bytes=2, shared_memory_bytes=H200_SMEM, sm_count=H200_SMS,
                       compute_capability=capability, global_experts=global_experts)


def kept_at(switches: Switches, target_at) -> list[int]:
    """The default batch sizes at which the rules keep `switches` on a plain pair."""
    return [M for M in DEFAULT_BATCH_SIZES
            if switch_prune_reason(switches, config(), config(bn=128), target_at(M)) is None]


def test_the_band_rules_keep_each_switch_where_it_earned():
    """By mean rows per expert (Qwen3: M / 16, DeepSeek-V3 TP4: M / 32): the sorted rows and
    their TMA loads from 128, the fused SiLU outside 32 to 256, the persistent schedule from
    256; TMA for the weights and split-K by no band (both earned at DeepSeek-V3 TP4, M = 1)."""
    fused_silu = Switches(fuse_activation=True)
    assert kept_at(Switches(sorted_rows=True), qwen3) == [2048, 3072, 4096, 8192, 16384]
    assert kept_at(TMA, deepseek_tp4) == [4096, 8192, 16384]
    assert kept_at(fused_silu, qwen3) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 4096, 8192, 16384]
    assert kept_at(fused_silu, deepseek_tp4) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 8192, 16384]
    assert kept_at(Switches(persistent=True), qwen3) == [4096, 8192, 16384]
    assert kept_at(Switches(tma_weights=True), qwen3) == DEFAULT_BATCH_SIZES
    assert 1 in kept_at(Switches(tma_weights=True), deepseek_tp4) and 1 in kept_at(SPLIT4, deepseek_tp4)
    reason = switch_prune_reason(Switches(sorted_rows=True), config(), config(), qwen3(1024))
    assert "sorted_rows: 64 rows per expert, under the 128" in reason
    assert "fuse_activation: 64 rows per expert" in switch_prune_reason(fused_silu, config(), config(), qwen3(1024))
    # Measured on the GPU: the interpreter keeps every band open.
    assert kept_at(TMA, lambda M: qwen3(M, capability=None)) == DEFAULT_BATCH_SIZES
    # Expert parallelism: the rows spread over the experts routed to, not the rank's 64.
    assert kept_at(Switches(sorted_rows=True), lambda M: qwen3(M, E=64, global_experts=128))[0] == 2048
