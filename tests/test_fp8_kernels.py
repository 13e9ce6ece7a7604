"""fp8 kernels on the interpreter: the quantization kernels bit for bit against moetune.quant,
the fp8 layer (run_experts, both scale modes, both GEMM 2 epilogues, the kernel switches)
against the emulated-quantization float64 reference, edge cases and bad input.

The interpreter has no bf16 atomic add: the fused epilogue runs in fp16, as in
test_kernel_switches.py, and bf16 runs the STORE epilogue.
"""

import importlib
from types import SimpleNamespace

import pytest
import torch

from moetune.kernels import (KernelSwitches, LiveRows, align_tokens, grouped_gemm, quantize_per_tensor,
                             quantize_per_token_group, run_experts, silu_and_mul_fp8)
from moetune.quant import (FP8_DTYPE, FP8_TOLERANCE, fp8_moe_reference, fp8_tolerance, quantize_activations,
                           quantize_weights)
from moetune.reference import moe_reference, relative_error
from tests.moe_inputs import make_inputs

# One test worker runs the whole module: the module's inputs are built once.
pytestmark = pytest.mark.xdist_group("fp8-kernels")

OFF = KernelSwitches()
CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4,
          "num_stages": 2}
KERNEL_MODULES = ["activation", "grouped_gemm", "quantize", "reduce"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == FP8_DTYPE and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: bad input must be refused before work starts."""
    for module in KERNEL_MODULES:
        monkeypatch.setattr(importlib.import_module(f"moetune.kernels.{module}"), "launch",
                            lambda kernel, grid: pytest.fail(f"{kernel} was launched"))


# ---------------------------------------------------------------- quantization kernels

def test_the_fp8_cast_rounds_to_nearest_even_on_every_value_and_tie():
    """Scale 1 (amax 448): every finite e4m3 value, every midpoint between neighbours (ties
    go to the even code) and points just beside them, cast exactly as torch casts."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = codes[torch.isfinite(codes) & (codes >= 0)].unique()  # 0 .. 448, ascending
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)])
    x = torch.cat([values, -values]).reshape(-1, 10)
    q, scale = quantize_per_tensor(x)
    assert scale.item() == 1.0
    assert same_bits(q, x.to(FP8_DTYPE))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantization_matches_moetune_quant_bit_for_bit(dtype, rng):
    # Columns spanning nine decades, a zero row, signed zeros, a partial last group (40 = 2 * 16 + 8).
    x = (torch.randn(6, 40, generator=rng) * torch.logspace(-6, 3, 40)).to(dtype)
    x[3] = 0
    x[4, :16] = -0.0
    for group in (16, 32):
        q, scales = quantize_per_token_group(x, group)
        expected_q, expected_scales = quantize_activations(x, group)
        assert same_bits(q, expected_q) and torch.equal(scales, expected_scales)
    q, scale = quantize_per_tensor(x)
    expected_q, expected_scale = quantize_activations(x)
    assert same_bits(q, expected_q) and torch.equal(scale, expected_scale)


@pytest.mark.usefixtures("poison_empty")
def test_dead_rows_are_skipped_and_left_out_of_the_tensor_scale(rng):
    """Slots routed to other ranks' experts: not written, and their values (huge here) do not
    set the per-tensor scale; an all-zero tensor gets the minimum scale."""
    ids = torch.tensor([[0, 9], [-1, 2], [3, 1]], dtype=torch.int32)  # 4 experts here
    x = torch.randn(6, 40, generator=rng).to(torch.bfloat16)
    live = (ids.reshape(-1) >= 0) & (ids.reshape(-1) < 4)
    x[~live] = 1e4
    rows = LiveRows(slot_experts=ids, num_experts=4)
    q, scale = quantize_per_tensor(x, live=rows)
    expected_q, expected_scale = quantize_activations(x[live])
    assert torch.equal(scale, expected_scale) and same_bits(q[live], expected_q)
    assert torch.isnan(q[~live].float()).all()  # never written: still the poison
    q, scales = quantize_per_token_group(x, 16, live=rows)
    expected_q, expected_scales = quantize_activations(x[live], 16)
    assert same_bits(q[live], expected_q) and torch.equal(scales[live], expected_scales)
    assert torch.isnan(scales[~live]).all()
    _, scale = quantize_per_tensor(torch.zeros(3, 16))
    assert scale.item() == pytest.approx(1e-12)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("group", [None, 16])
def test_silu_and_mul_quantizes_the_rounded_activation_of_aligned_rows(group, rng):
    ids = torch.tensor([[0, 2], [2, 1], [0, 1]], dtype=torch.int32)
    aligned = align_tokens(ids, 3, 16)
    capacity = aligned.sorted_ids.numel()
    gate_up = torch.randn(capacity, 48, generator=rng).to(torch.bfloat16)
    q, scale = silu_and_mul_fp8(gate_up, group, dtype=torch.bfloat16, live=LiveRows(aligned=aligned, num_slots=6))
    used = aligned.sorted_ids[:aligned.padded_rows.item()]
    live = torch.zeros(capacity, dtype=torch.bool)
    live[:used.numel()] = used < 6
    g, u = gate_up[live].float().chunk(2, dim=1)
    expected_q, expected_scale = quantize_activations((torch.nn.functional.silu(g) * u).to(torch.bfloat16), group)
    assert same_bits(q[live], expected_q) and torch.equal(scale[live] if group else scale, expected_scale)
    assert torch.isnan(q[~live].float()).all()  # padding rows are skipped


# ---------------------------------------------------------------- the fp8 layer

M, E, N, K, TOPK = 5, 4, 32, 48, 2  # N and K: 16-byte fp8 rows, so TMA can run


@pytest.fixture(scope="module")
def layer():
    """fp16 inputs (both epilogues run in fp16), their exact layer, and per mode the fp8
    weights with the emulated reference."""
    generator = torch.Generator().manual_seed(1234)
    x, w1, w2, weights, ids = make_inputs(M, E, N, K, TOPK, torch.float16, generator)
    ids[0, 1] = -1  # one slot on another rank
    modes = {}
    for block in (None, (16, 16)):
        (w1q, s1), (w2q, s2) = quantize_weights(w1, block), quantize_weights(w2, block)
        modes[block] = (w1q, w2q, s1, s2, fp8_moe_reference(x, w1q, w2q, s1, s2, weights, ids, block))
    return x, weights, ids, moe_reference(x, w1, w2, weights, ids), modes


def run_fp8(x, w1q, w2q, s1, s2, weights, ids, block, switches=OFF, *, atomic_add,
            config1=CONFIG, config2=CONFIG, out_dtype=None):
    num_experts = w1q.shape[0]
    aligned1 = align_tokens(ids, num_experts, config1["BLOCK_SIZE_M"])
    aligned2 = align_tokens(ids, num_experts, config2["BLOCK_SIZE_M"])
    out = torch.full(x.shape, float("nan"), dtype=out_dtype or x.dtype)
    result = run_experts(x, w1q, w2q, weights, ids, aligned1, aligned2, config1, config2, switches,
                         atomic_add=atomic_add, out=out, w1_scale=s1, w2_scale=s2,
                         block_shape=list(block) if block else None)
    assert result is out
    return out


def assert_fp8_close(out, ref, block, exact=None):
    error = relative_error(out, ref)
    assert error <= fp8_tolerance(block), f"relative error {error:.2e} against the emulated reference"
    if exact is not None:  # fp8 keeps 3 mantissa bits: a few percent from the unquantized layer
        loss = relative_error(out, exact)
        print(f"block {block}: {error:.1e} from the emulated reference, {loss:.1e} from the unquantized layer")
        assert loss < 0.15


SWITCHES = {
    "off": OFF,
    "sorted+tma+persistent": KernelSwitches(sorted_rows=True, tma_weights=True, tma_activations=True,
                                            persistent=True),
    "fused-activation": KernelSwitches(fuse_activation=True),
    "sorted+fused-activation+tma": KernelSwitches(sorted_rows=True, fuse_activation=True, tma_weights=True),
    "split-k": KernelSwitches(split_k=2),
}
# Each mode runs every switch set above but one (the pairs cover both modes on each switch).
# All off is tests/test_layer_fp8.py's: both modes, both epilogues, through fused_experts.
LAYER_CASES = [(block, name) for block in (None, (16, 16)) for name in SWITCHES
               if name != "off" and (block, name) not in ((None, "sorted+fused-activation+tma"),
                                                           ((16, 16), "fused-activation"))]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("block, switch_name", LAYER_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fp8_layer_matches_the_emulated_reference_with_both_epilogues(layer, block, switch_name):
    x, weights, ids, exact, modes = layer
    w1q, w2q, s1, s2, ref = modes[block]
    for atomic_add in (False, True):
        out = run_fp8(x, w1q, w2q, s1, s2, weights, ids, block, SWITCHES[switch_name], atomic_add=atomic_add)
        assert_fp8_close(out, ref, block, exact)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("block", [None, [32, 32]])
def test_bf16_layer_with_k_not_a_multiple_of_the_block_and_routed_scaling(block, rng):
    """bf16 activations (STORE epilogue), K = 40 and N = 24 (partial scale blocks and tiles),
    a router scaling factor, and GEMM 2 with a wider BLOCK_SIZE_K than GEMM 1."""
    x, w1, w2, weights, ids = make_inputs(3, 4, 24, 40, 2, torch.bfloat16, rng)
    (w1q, s1), (w2q, s2) = quantize_weights(w1, block), quantize_weights(w2, block)
    config2 = dict(CONFIG, BLOCK_SIZE_K=32)
    aligned = align_tokens(ids, 4, 16)
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    run_experts(x, w1q, w2q, weights, ids, aligned, aligned, CONFIG, config2, atomic_add=False, out=out,
                weight_scale=0.5, w1_scale=s1, w2_scale=s2, block_shape=block)
    ref = fp8_moe_reference(x, w1q, w2q, s1, s2, weights, ids, block, routed_scaling_factor=0.5)
    assert_fp8_close(out, ref, block, moe_reference(x, w1, w2, weights, ids, routed_scaling_factor=0.5))


def idle_and_foreign_experts(M):
    """8 experts, only 0 and 5 used; token 0's experts both live on other ranks."""
    ids = torch.tensor([[0, 5], [5, 0]], dtype=torch.int32).repeat(M, 1)[:M]
    ids[0] = torch.tensor([-1, 8])
    return 8, ids


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("block", [None, (16, 16)], ids=["per-tensor", "block"])
@pytest.mark.parametrize("M_", [1, 4], ids=["M=1", "idle-and-foreign-experts"])
def test_edge_cases(M_, block, rng):
    if M_ == 1:
        num_experts, ids = 4, torch.tensor([[2, 0]], dtype=torch.int32)
    else:
        num_experts, ids = idle_and_foreign_experts(M_)
    x, w1, w2, weights, _ = make_inputs(M_, num_experts, N, K, 2, torch.float16, rng)
    (w1q, s1), (w2q, s2) = quantize_weights(w1, block), quantize_weights(w2, block)
    ref = fp8_moe_reference(x, w1q, w2q, s1, s2, weights, ids, block)
    switches = KernelSwitches(sorted_rows=M_ == 1, persistent=True)
    for atomic_add in (False, True):
        out = run_fp8(x, w1q, w2q, s1, s2, weights, ids, block, switches, atomic_add=atomic_add)
        assert_fp8_close(out, ref, block)
        if M_ > 1:
            assert torch.all(out[0] == 0)  # no local expert: written as zero, never left as NaN


def test_tolerance_is_stated_per_mode():
    assert set(FP8_TOLERANCE) == {"per_tensor", "block"}
    assert fp8_tolerance(None) == FP8_TOLERANCE["per_tensor"] and fp8_tolerance([128, 128]) == FP8_TOLERANCE["block"]
    assert max(FP8_TOLERANCE.values()) <= 2e-2  # no looser than the bf16 layer's own gate


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def fp8_weights():
    generator = torch.Generator().manual_seed(7)
    x, w1, w2, weights, ids = make_inputs(2, 4, 24, 40, 2, torch.bfloat16, generator)
    (w1q, s1), (w2q, s2) = quantize_weights(w1, [16, 16]), quantize_weights(w2, [16, 16])
    return SimpleNamespace(x=x, w1=w1, w2=w2, weights=weights, ids=ids, w1q=w1q, s1=s1, w2q=w2q, s2=s2)


def bad_inputs():
    """(name, the arguments of the block-[16, 16] call it changes, message); `t` is fp8_weights."""
    return [
        ("w1_scale shape", lambda t: {"w1_scale": torch.ones(4, 3, 2)}, r"w1_scale must be float32 \[4, 3, 3\]"),
        ("w2_scale dtype", lambda t: {"w2_scale": t.s2.to(torch.bfloat16)},
         r"w2_scale must be float32 \[4, 3, 2\], got \[4, 3, 2\] torch.bfloat16"),
        ("per-tensor scale shape", lambda t: {"block_shape": None}, r"w1_scale must be float32 \[4\], got \[4, 3, 3\]"),
        ("BLOCK_SIZE_K", lambda t: {"config": dict(CONFIG, BLOCK_SIZE_K=32)},
         r"BLOCK_SIZE_K=32 does not divide block_k=16"),
        ("block_shape", lambda t: {"block_shape": [16, 24]}, r"block_shape must be None or \[block_n, block_k\]"),
        ("unquantized w2", lambda t: {"w2": t.w2}, r"w2 is torch.bfloat16, both must be torch.float8_e4m3fn"),
        ("fp8 activations", lambda t: {"x": t.x.to(FP8_DTYPE)}, r"hidden_states must be bfloat16, float16 or float32"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda case: case[0])
def test_bad_fp8_input_is_refused_before_any_kernel_runs(case, fp8_weights, no_launch):
    _, change, message = case
    t = fp8_weights
    args = {"x": t.x, "w2": t.w2q, "w1_scale": t.s1, "w2_scale": t.s2, "block_shape": [16, 16], "config": CONFIG}
    args.update(change(t))
    aligned = align_tokens(t.ids, 4, 16)
    with pytest.raises(ValueError, match=message):
        run_experts(args["x"], t.w1q, args["w2"], t.weights, t.ids, aligned, aligned, args["config"], CONFIG,
                    atomic_add=False, out=torch.zeros(t.x.shape, dtype=t.x.dtype), w1_scale=args["w1_scale"],
                    w2_scale=args["w2_scale"], block_shape=args["block_shape"])


def test_the_gemm_refuses_fp8_operands_without_scales_and_scales_of_the_wrong_layout(fp8_weights, no_launch):
    x, w1q, s1, ids = fp8_weights.x, fp8_weights.w1q, fp8_weights.s1, fp8_weights.ids
    aligned = align_tokens(ids, 4, 16)
    xq, x_scale = quantize_activations(x, 16)
    gemm1 = {"topk": 2, "a_rows_per_slot": 2}
    out = torch.zeros(4, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp8 operands need a_scale and b_scale"):
        grouped_gemm(xq, w1q, out, aligned, CONFIG, **gemm1)
    with pytest.raises(ValueError, match=r"a_scale \(block_k 16\) must be \[2, 3\] torch.float32, got \(2, 1\)"):
        grouped_gemm(xq, w1q, out, aligned, CONFIG, a_scale=x_scale[:, :1], b_scale=s1, block_shape=(16, 16), **gemm1)
    with pytest.raises(ValueError, match=r"b_scale \(per tensor\) must be \[4\]"):
        grouped_gemm(xq, w1q, out, aligned, CONFIG, a_scale=torch.ones(1), b_scale=s1, **gemm1)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        quantize_per_token_group(x, 24)
