"""The kernel switches (kernels/switches.py) against the float64 reference, on the interpreter.

Every combination the validation accepts runs with both GEMM 2 epilogues; the edge cases
run on a few combinations that between them exercise every switch. Shapes are tiny: the
interpreter spends its time per program and per op, not per element.
"""

import itertools

import pytest
import torch

from moetune.kernels import KernelSwitches, align_tokens, experts, run_experts
from moetune.reference import TOLERANCE, moe_reference, relative_error
from tests.moe_inputs import make_inputs, make_weights

# N and K are not multiples of any tile below.
N, K = 24, 40
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4,
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


def name(switches: KernelSwitches) -> str:
    on = [field if value is True else f"{field}={value}" for field, value in vars(switches).items()
          if value is not False and not (type(value) is int and value == 1)]
    return "+".join(on) or "off"


def run(x, w1, w2, weights, ids, switches, *, atomic_add, config1=CONFIG, config2=CONFIG, scale=1.0):
    """run_experts into a NaN-filled out, aligned as the layer aligns."""
    E = w1.shape[0]
    aligned1 = align_tokens(ids, E, config1["BLOCK_SIZE_M"])
    aligned2 = aligned1 if config2["BLOCK_SIZE_M"] == config1["BLOCK_SIZE_M"] else \
        align_tokens(ids, E, config2["BLOCK_SIZE_M"])
    out = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)
    result = run_experts(x, w1, w2, weights, ids, aligned1, aligned2, config1, config2, switches,
                         atomic_add=atomic_add, out=out, weight_scale=scale)
    assert result is out
    return out


def no_activation_kernel(*args, **kwargs):
    raise AssertionError("the activation kernel ran although GEMM 1's epilogue computes it")


def assert_close(out, ref, dtype):
    error = relative_error(out, ref)
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e} for {dtype}"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("switches", COMBINATIONS, ids=name)
def test_every_combination_matches_the_reference_with_both_epilogues(switches, rng, monkeypatch):
    if switches.fuse_activation:  # GEMM 1's epilogue does it: the activation kernel must not run
        monkeypatch.setattr(experts, "silu_and_mul", no_activation_kernel)
    x, w1, w2, weights, ids = make_inputs(3, 4, N, K, 2, torch.float32, rng)
    ref = moe_reference(x, w1, w2, weights, ids)
    assert_close(run(x, w1, w2, weights, ids, switches, atomic_add=False), ref, torch.float32)
    assert_close(run(x, w1, w2, weights, ids, switches, atomic_add=True), ref, torch.float32)


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
