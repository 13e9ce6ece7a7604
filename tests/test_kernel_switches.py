"""The kernel switches (kernels/switches.py) against the float64 reference, on the interpreter.

Every pair of switch values the validation accepts runs together, with both GEMM 2
epilogues (a pairwise cover of the valid combinations); the edge cases
run on two combinations that between them turn on every switch. Shapes are tiny: the
interpreter spends its time per program and per op, not per element.
"""

import importlib
import itertools

import pytest
import torch

from moetune.kernels import KernelSwitches, align_tokens, experts, run_experts
from moetune.reference import TOLERANCE, moe_reference, relative_error
from tests.moe_inputs import make_inputs, make_weights

# N and K are not multiples of any tile below.
N, K = 24, 40
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4,
          "num_stages": 2}
OTHER = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2, "num_warps": 4,
         "num_stages": 2}


def valid_combinations():
    """Every combination the rules below allow, written out independently of validate()."""
    combos = []
    for sorted_rows, fuse_activation, tma_weights, tma_activations, split_k, persistent in itertools.product(
            [False, True], [False, True], [False, True], [False, True], [1, 2], [False, True]):
        if tma_activations and not sorted_rows:
            continue  # GEMM 2's A rows are contiguous only in the sorted intermediate
        if fuse_activation and split_k > 1:
            continue  # silu(gate) * up is not linear in the partials
        combos.append(KernelSwitches(sorted_rows, fuse_activation, tma_weights, tma_activations, split_k, persistent))
    return combos


COMBINATIONS = valid_combinations()


def pairwise_cover(combos):
    """A few combinations in which every pair of switch values that some valid combination
    holds occurs at least once (greedy): the interactions of any two switches, at about a
    third of the interpreter time of all 36."""
    def pairs(switches):
        values = list(vars(switches).items())
        return set(itertools.combinations(values, 2))

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: (len(pairs(c) & uncovered), -combos.index(c)))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


PAIRWISE = pairwise_cover(COMBINATIONS)


def name(switches: KernelSwitches) -> str:
    on = [field if value is True else f"{field}={value}" for field, value in vars(switches).items()
          if value is not False and not (type(value) is int and value == 1)]
    return "+".join(on) or "off"


def run(x, w1, w2, weights, ids, switches, *, atomic_add, config1=CONFIG, config2=CONFIG, scale=1.0,
        num_programs=None):
    """run_experts into a NaN-filled out, aligned as the layer aligns."""
    E = w1.shape[0]
    aligned1 = align_tokens(ids, E, config1["BLOCK_SIZE_M"])
    aligned2 = aligned1 if config2["BLOCK_SIZE_M"] == config1["BLOCK_SIZE_M"] else \
        align_tokens(ids, E, config2["BLOCK_SIZE_M"])
    out = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)
    result = run_experts(x, w1, w2, weights, ids, aligned1, aligned2, config1, config2, switches,
                         atomic_add=atomic_add, out=out, weight_scale=scale, num_programs=num_programs)
    assert result is out
    return out


def no_activation_kernel(*args, **kwargs):
    raise AssertionError("the activation kernel ran although GEMM 1's epilogue computes it")


def assert_close(out, ref, dtype):
    error = relative_error(out, ref)
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e} for {dtype}"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("switches", PAIRWISE, ids=name)
def test_every_pair_of_switches_matches_the_reference_with_both_epilogues(switches, rng, monkeypatch):
    if switches.fuse_activation:  # GEMM 1's epilogue does it: the activation kernel must not run
        monkeypatch.setattr(experts, "silu_and_mul", no_activation_kernel)
    x, w1, w2, weights, ids = make_inputs(2, 3, N, K, 2, torch.float32, rng)
    ref = moe_reference(x, w1, w2, weights, ids)
    assert_close(run(x, w1, w2, weights, ids, switches, atomic_add=False), ref, torch.float32)
    assert_close(run(x, w1, w2, weights, ids, switches, atomic_add=True), ref, torch.float32)


# Two combinations that between them turn on every switch.
EVERY_SWITCH = [KernelSwitches(sorted_rows=True, tma_weights=True, tma_activations=True, split_k=2, persistent=True),
                KernelSwitches(sorted_rows=True, fuse_activation=True, tma_weights=True, persistent=True)]


def idle_experts(M, rng):
    """Experts 1-4, 6 and 7 of 8 get no token; token 0's experts live on other ranks."""
    ids = torch.tensor([[0, 5], [5, 0]], dtype=torch.int32).repeat(M, 1)[:M]
    ids[0] = torch.tensor([-1, 8])
    return 8, ids


def one_expert(M, rng):
    return 4, torch.full((M, 1), 2, dtype=torch.int32)


def top_k_is_e(M, rng):
    return 3, torch.stack([torch.randperm(3, generator=rng) for _ in range(M)]).to(torch.int32)


def random_top2(M, rng):
    return 4, torch.stack([torch.randperm(4, generator=rng)[:2] for _ in range(M)]).to(torch.int32)


# (routing, M, dtype, config, num_programs); OTHER's tiles leave remainders in both N and K.
EDGE_CASES = {
    "idle-experts": (idle_experts, 5, torch.float16, CONFIG, None),
    "one-expert": (one_expert, 20, torch.float32, CONFIG, 1),
    "M=1": (random_top2, 1, torch.float32, CONFIG, None),
    "top-k=E": (top_k_is_e, 3, torch.float16, CONFIG, 3),
    "tile-remainders": (random_top2, 1, torch.float32, OTHER, None),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("switches", EVERY_SWITCH, ids=name)
def test_edge_cases(case, switches, rng):
    routing, M, dtype, config, num_programs = EDGE_CASES[case]
    E, ids = routing(M, rng)
    x = torch.randn(M, K, generator=rng).to(dtype)
    w1, w2 = make_weights(E, N, K, dtype, rng)
    weights = torch.rand(ids.shape, generator=rng) + 0.5
    ref = moe_reference(x, w1, w2, weights, ids)
    for atomic_add in (False, True):
        out = run(x, w1, w2, weights, ids, switches, atomic_add=atomic_add, config1=config, config2=config,
                  num_programs=num_programs)
        assert_close(out, ref, dtype)
        if case == "idle-experts":
            assert torch.all(out[0] == 0)  # no expert here: written as zero, never left as NaN


@pytest.mark.usefixtures("poison_empty")
def test_bf16_and_a_split_with_no_k_tiles(rng):
    """bf16 (STORE epilogue only: the interpreter has no bf16 atomic add), and split_k = 4
    over GEMM 2's single K tile (N = 24 < BLOCK_SIZE_K), whose empty splits store zeros."""
    x, w1, w2, weights, ids = make_inputs(3, 4, N, K, 2, torch.bfloat16, rng)
    switches = KernelSwitches(sorted_rows=True, tma_weights=True, tma_activations=True, split_k=4)
    assert_close(run(x, w1, w2, weights, ids, switches, atomic_add=False, scale=0.5),
                 moe_reference(x, w1, w2, weights, ids, routed_scaling_factor=0.5), torch.bfloat16)


def test_persistent_launches_num_programs_and_the_default_grid_one_per_tile(rng, monkeypatch):
    gemm = importlib.import_module("moetune.kernels.grouped_gemm")  # the attribute is the function

    grids = []
    real_launch = gemm.launch

    def recording(kernel, grid):
        grids.append(tuple(grid))
        return real_launch(kernel, grid)

    monkeypatch.setattr(gemm, "launch", recording)
    x, w1, w2, weights, ids = make_inputs(3, 4, N, K, 2, torch.float32, rng)
    ref = moe_reference(x, w1, w2, weights, ids)
    capacity_blocks = -(-align_tokens(ids, 4, 16).sorted_ids.numel() // 16)
    assert_close(run(x, w1, w2, weights, ids, KernelSwitches(persistent=True), atomic_add=True, num_programs=2),
                 ref, torch.float32)
    assert grids == [(2,), (2,)]
    grids.clear()
    assert_close(run(x, w1, w2, weights, ids, KernelSwitches(split_k=2), atomic_add=True), ref, torch.float32)
    assert grids == [(capacity_blocks * 2,), (capacity_blocks * 2,)]  # one N tile (64 >= 2N, K) and 2 splits


def test_sorted_rows_needs_one_block_size_m_for_both_gemms(rng):
    x, w1, w2, weights, ids = make_inputs(3, 4, N, K, 2, torch.float32, rng)
    wide = dict(CONFIG, BLOCK_SIZE_M=32)
    with pytest.raises(ValueError, match="sorted_rows.*BLOCK_SIZE_M"):
        run(x, w1, w2, weights, ids, KernelSwitches(sorted_rows=True), atomic_add=False, config2=wide)
    # Without the switch the two alignments are fine.
    assert_close(run(x, w1, w2, weights, ids, KernelSwitches(), atomic_add=False, config2=wide),
                 moe_reference(x, w1, w2, weights, ids), torch.float32)


def test_tma_needs_16_byte_aligned_rows(rng):
    # K = 36 in fp16: 72-byte weight rows, which a tensor descriptor cannot address.
    x, w1, w2, weights, ids = make_inputs(3, 4, N, 36, 2, torch.float16, rng)
    with pytest.raises(ValueError, match="tma_weights.*16-byte"):
        run(x, w1, w2, weights, ids, KernelSwitches(tma_weights=True), atomic_add=False)


def all_combinations():
    values = {"split_k": [1, 2]}
    names = [field for field in vars(KernelSwitches())]
    for combo in itertools.product(*(values.get(field, [False, True]) for field in names)):
        yield KernelSwitches(**dict(zip(names, combo)))


def test_validate_accepts_exactly_the_combinations_tested():
    accepted = []
    for switches in all_combinations():
        try:
            accepted.append(switches.validate())
        except ValueError:
            pass
    assert set(accepted) == set(COMBINATIONS)


@pytest.mark.parametrize("switches,message", [
    (KernelSwitches(fuse_activation=True, split_k=2), "fuse_activation and split_k = 2 are incompatible"),
    (KernelSwitches(tma_activations=True), "tma_activations needs sorted_rows"),
    (KernelSwitches(split_k=0), "split_k must be an int >= 1"),
    (KernelSwitches(split_k=2.0), "split_k must be an int >= 1"),
    (KernelSwitches(persistent=1), "persistent must be a bool"),
])
def test_invalid_combinations_raise_naming_the_switches(switches, message, rng, monkeypatch):
    gemm = importlib.import_module("moetune.kernels.grouped_gemm")  # the attribute is the function

    with pytest.raises(ValueError, match=message):
        switches.validate()
    monkeypatch.setattr(gemm, "launch", lambda kernel, grid: pytest.fail("a kernel was launched"))
    x, w1, w2, weights, ids = make_inputs(2, 4, N, K, 2, torch.float32, rng)
    with pytest.raises(ValueError, match=message):
        run(x, w1, w2, weights, ids, switches, atomic_add=False)


def test_grouped_gemm_rejects_what_its_kernel_cannot_run(rng):
    from moetune.kernels import grouped_gemm

    x, w1, w2, weights, ids = make_inputs(2, 4, N, K, 2, torch.float32, rng)
    aligned = align_tokens(ids, 4, 16)
    act = torch.zeros(aligned.sorted_ids.numel(), N)
    down = torch.zeros(4, K)
    gemm2 = {"topk": 2, "a_rows_per_slot": 1, "topk_weights": weights}
    with pytest.raises(ValueError, match="tma_activations needs a_sorted"):
        grouped_gemm(act, w2, down, aligned, CONFIG, tma_activations=True, **gemm2)
    with pytest.raises(ValueError, match="fuse_activation and split_k"):
        grouped_gemm(x, w1, torch.zeros(2, 4, N), aligned, CONFIG, topk=2, a_rows_per_slot=2, fuse_activation=True,
                     split_k=2)
    with pytest.raises(ValueError, match=r"split_k = 2 .* fp32 partials"):
        grouped_gemm(act, w2, down, aligned, CONFIG, a_sorted=True, split_k=2, **gemm2)
    with pytest.raises(ValueError, match="c_sorted .* atomic_add"):
        grouped_gemm(x, w1, torch.zeros(2, 2 * N), aligned, CONFIG, topk=2, a_rows_per_slot=2, c_sorted=True,
                     atomic_add=True)
