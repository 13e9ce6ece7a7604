"""One batch size of one shape, ready to check and time launch configs; what it compiles.

The tuner measures three roles per batch size (types.Role):
  gemm1          GEMM 1 alone (shared by both variants),
  gemm2_unfused  GEMM 2 storing [M, topk, K] + the top-k sum, timed together,
  gemm2_fused    zeroing out + GEMM 2 adding atomically into it, timed together,
and then whole layers (alignment included) for the pairs it keeps. Every candidate runs in
a whole layer against the float64 reference (computed once per batch size) before its time
counts; the roles it does not tune run with the default config there.

fp8_w8a8: the weights are quantized once per shape (moetune.quantize_weights), a role's
activations once per batch size as the layer quantizes them, and the gate compares the layer
with fp8_moe_reference within quant.FP8_TOLERANCE.

Expert parallelism (`global_experts` above the weights' E): the weights are one rank's, the
routing picks among all global experts and goes through the rank's expert map, as
fused_experts(expert_map=...) maps it: slots routed to other ranks' experts are -1, cost no
GEMM work and add nothing, and the reference is the rank's own output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..bench import LayerInputs, adaptive_time_us, make_routing, make_weights, wall_time_us
from ..device import torch_device
from ..kernels import LiveRows, align_tokens, gemm_geometry, grouped_gemm, max_padded_rows, silu_and_mul, topk_sum
from ..kernels.align import AlignedTokens
from ..kernels.gemm_operands import Fp8Scales
from ..kernels.grouped_gemm import GemmGeometry
from ..kernels.launch import compile_only
from ..expert_map import local_expert_ids, rank_expert_map
from ..layer import Fp8Weights
from ..loader import default_launch_config
from ..measure import LayerCase, check
from ..quant import FP8_DTYPE, quantize_activations, quantize_weights
from ..shapes import MoEShape
from ..tables import TableDtype
from ..types import OFF, LaunchConfig, Role, Switches, Variant

# Once this many configs of a role are measured, one slower than CUTOFF_FACTOR times the best
# gets only its rough time: it cannot win, and a precise time of a slow config costs the most.
CUTOFF_AFTER = 3
CUTOFF_FACTOR = 2.0


class RoleOperands(NamedTuple):
    a: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor
    topk_weights: torch.Tensor | None  # GEMM 2 multiplies by the router weight
    a_rows_per_slot: int
    atomic_add: bool
    fp8: dict  # fp8: grouped_gemm's a_scale, b_scale and block_shape; else empty


class CompileRequest(NamedTuple):
    """Arguments of kernels.compile_grouped_gemm besides the config; picklable."""
    dtype: torch.dtype
    geometry: GemmGeometry
    topk: int
    a_rows_per_slot: int
    mul_routed_weight: bool
    atomic_add: bool
    out_dtype: torch.dtype | None = None  # fp8: the activations' dtype (None: the operands')
    block_shape: tuple[int, int] | None = None  # block fp8


def role_compile_request(role: Role, M: int, shape: MoEShape, dtype: torch.dtype, block_size_m: int,
                         quant: TableDtype | None = None) -> CompileRequest:
    """What compile_grouped_gemm needs to build the binary a role runs with that
    BLOCK_SIZE_M, from the sizes alone: a tuner can start compiling before it has built the
    batch size's inputs. The operands, on the meta device (shapes and strides, no memory),
    are laid out as BatchBench's:
      gemm1   x [M, K] @ w1 [E, 2N, K] -> gate_up [M*topk, 2N]
      gemm2   activation [M*topk, N] @ w2 [E, K, N] -> down [M*topk, K], or out [M, K] atomically
    `dtype` is the activations'; with an fp8 `quant` both operands are fp8 with their scales.
    """
    role = Role(role)
    E, N, K, topk = shape.E, shape.N, shape.K, shape.topk
    fp8 = quant is not None and quant.fp8
    operand = functools.partial(torch.empty, dtype=FP8_DTYPE if fp8 else dtype, device="meta")
    rows = M * topk
    atomic_add = role is Role.GEMM2_FUSED
    if role is Role.GEMM1:
        a, weights, out = operand(M, K), operand(E, 2 * N, K), torch.empty(rows, 2 * N, dtype=dtype, device="meta")
    else:
        a, weights = operand(rows, N), operand(E, K, N)
        out = torch.empty(*((M, K) if atomic_add else (rows, K)), dtype=dtype, device="meta")
    scales = _meta_scales(a, weights, quant.block_shape) if fp8 else None
    geometry = gemm_geometry(a, weights, out, max_padded_rows(rows, E, block_size_m), topk, atomic_add, fp8=scales)
    # GEMM 1 reads each token's row for all its top-k slots; GEMM 2 weighs by the router weight.
    gemm1 = role is Role.GEMM1
    return CompileRequest(a.dtype, geometry, topk, topk if gemm1 else 1, not gemm1, atomic_add,
                          out_dtype=dtype if fp8 else None, block_shape=quant.block_shape if fp8 else None)


def _meta_scales(a: torch.Tensor, weights: torch.Tensor, block_shape: tuple[int, int] | None) -> Fp8Scales:
    """fp8 scales laid out as quant.py lays them out, on the meta device."""
    meta = functools.partial(torch.empty, dtype=torch.float32, device="meta")
    if block_shape is None:
        return Fp8Scales(meta(1), meta(weights.shape[0]))
    block_n, block_k = block_shape
    groups = -(-a.shape[1] // block_k)
    return Fp8Scales(meta(a.shape[0], groups), meta(weights.shape[0], -(-weights.shape[1] // block_n), groups),
                     block_shape)


class HelperRequest(NamedTuple):
    """The kernels the checks launch at one batch size besides the GEMMs: the alignment at
    `block_size_m`, or with None the activation and the top-k sum; picklable."""
    M: int
    E: int
    N: int
    K: int
    topk: int
    dtype: torch.dtype
    block_size_m: int | None


def helper_requests(M: int, shape: MoEShape, dtype: torch.dtype, block_sizes_m) -> list[HelperRequest]:
    """One request per alignment, then the rest: each can compile in a process of its own."""
    sizes = (M, shape.E, shape.N, shape.K, shape.topk, dtype)
    return [HelperRequest(*sizes, block_size_m) for block_size_m in block_sizes_m] + [HelperRequest(*sizes, None)]


def compile_helpers(request: HelperRequest) -> list:
    """Compile, without launching, what BatchBench launches besides the GEMMs: the same
    launchers, called on meta tensors laid out as BatchBench's (see kernels/launch.py).
    Returns Triton's compiled kernels."""
    r = request
    meta = functools.partial(torch.empty, device="meta")
    topk_ids = meta(r.M, r.topk, dtype=torch.int32)
    with compile_only() as compiled:
        if r.block_size_m is not None:
            align_tokens(topk_ids, r.E, r.block_size_m)
        else:
            # as run_experts passes it: slot rows, those of another rank's experts skipped
            live = LiveRows(slot_experts=topk_ids, num_experts=r.E)
            silu_and_mul(meta(r.M * r.topk, 2 * r.N, dtype=r.dtype), live=live)
            topk_sum(meta(r.M, r.topk, r.K, dtype=r.dtype), topk_ids, r.E, meta(r.M, r.K, dtype=r.dtype))
    return compiled


@dataclass
class BatchBench:
    """Inputs, buffers and reference of one (shape, dtype, M), on the tuning device.
    fp8: w1 and w2 are fp8 with these scales, the activations in `activation_dtype`."""

    w1: torch.Tensor
    w2: torch.Tensor
    M: int
    topk: int
    seed: int
    fp8: Fp8Weights | None = None
    activation_dtype: torch.dtype | None = None  # None: the weights'
    global_experts: int | None = None  # expert parallelism: the routing's experts (None: the weights' E)

    def __post_init__(self) -> None:
        self.E, two_n, self.K = self.w1.shape
        self.global_experts = self.global_experts or self.E
        self.N = two_n // 2
        self.on_gpu = self.w1.device.type == "cuda"
        device, dtype = self.w1.device, self.activation_dtype or self.w1.dtype
        self.dtype = dtype
        self.quant = TableDtype.of(FP8_DTYPE, self.fp8.block_shape) if self.fp8 is not None else None
        # Separately seeded routings: one to time on, one to check against the reference.
        self.timed, self.checked = self._layer_inputs(self.seed), self._layer_inputs(self.seed + 1_000_003)
        # Whole layers are checked and timed by measure.py, as `compare` and check_gpu do.
        self.timed_case, self.checked_case = LayerCase(self.timed, self.fp8), LayerCase(self.checked, self.fp8)
        self.reference = self.checked_case.reference  # computed now: building a batch size holds it
        self.default = default_launch_config(self.M, self.E, self.N, self.K, self.topk, self.quant)
        rows = self.M * self.topk
        self.gate_up = torch.empty(rows, 2 * self.N, dtype=dtype, device=device)
        # GEMM 2's input, shaped like an activation's values; computed by torch, so that
        # building the inputs launches no kernel of ours (those may still be compiling).
        gate, up = torch.randn(rows, 2 * self.N, device=device).chunk(2, dim=1)
        self.activation = (torch.nn.functional.silu(gate) * up).to(dtype)
        self.down = torch.empty(self.M, self.topk, self.K, dtype=dtype, device=device)
        self.out = torch.empty(self.M, self.K, dtype=dtype, device=device)
        self.alignments: dict[int, AlignedTokens] = {}  # BLOCK_SIZE_M -> the timed routing, aligned
        self.kernels_loaded = False
        if self.fp8 is not None:
            # Each GEMM's input quantized once, as the layer quantizes it before that GEMM.
            group = self.fp8.block_shape[1] if self.fp8.block_shape is not None else None
            self.quantized = {Role.GEMM1: quantize_activations(self.timed.x, group),
                              Role.GEMM2_UNFUSED: quantize_activations(self.activation, group)}

    def _layer_inputs(self, seed: int) -> LayerInputs:
        """Drawn as bench.make_layer_inputs draws them, the tokens in the activations' dtype
        (the weights may be fp8), routed over the global experts and mapped to this rank's."""
        device = self.w1.device
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(self.M, self.K, dtype=self.dtype, device=device, generator=generator)
        weights, ids = make_routing(self.M, self.global_experts, self.topk, device, generator)
        if self.global_experts != self.E:
            ids = local_expert_ids(ids, rank_expert_map(self.E, self.global_experts, device=device))
        return LayerInputs(x, self.w1, self.w2, weights, ids)

    @property
    def tolerance(self) -> float:
        return self.checked_case.tolerance

    def synchronize(self) -> None:
        """Wait for the device: after a failed launch, before the next one."""
        if self.on_gpu:
            torch.cuda.synchronize()

    def load_kernels(self, block_sizes_m) -> None:
        """Compile (or load from Triton's cache) and launch once what the checks run besides
        the candidate: the alignment at each BLOCK_SIZE_M, the activation, the top-k sum and
        the default configs of the roles not tuned. A failure here is left to the trial that
        meets it, which reports it with its config."""
        self.kernels_loaded = True
        try:
            for block_size_m in block_sizes_m:
                self.aligned(block_size_m)
            self.check_layer(Variant.UNFUSED, self.default, self.default)
        except Exception:  # noqa: BLE001 - see above
            self.synchronize()

    def aligned(self, block_size_m: int) -> AlignedTokens:
        """The timed routing aligned to `block_size_m`, computed once."""
        if block_size_m not in self.alignments:
            self.alignments[block_size_m] = align_tokens(self.timed.topk_ids, self.E, block_size_m)
        return self.alignments[block_size_m]

    # -- one role: its operands decide both what runs and what other processes compile --------
    def _operands(self, role: Role) -> RoleOperands:
        t = self.timed
        gemm1 = role is Role.GEMM1
        a = t.x if gemm1 else self.activation
        fp8 = {}
        if self.fp8 is not None:
            a, a_scale = self.quantized[Role.GEMM1 if gemm1 else Role.GEMM2_UNFUSED]
            fp8 = {"a_scale": a_scale, "b_scale": self.fp8.w1_scale if gemm1 else self.fp8.w2_scale,
                   "block_shape": self.fp8.block_shape}
        if gemm1:
            return RoleOperands(a, self.w1, self.gate_up, None, self.topk, False, fp8)
        if role is Role.GEMM2_UNFUSED:
            return RoleOperands(a, self.w2, self.down.view(-1, self.K), t.topk_weights, 1, False, fp8)
        return RoleOperands(a, self.w2, self.out, t.topk_weights, 1, True, fp8)

    def compile_request(self, role: Role, block_size_m: int) -> CompileRequest:
        """What compile_grouped_gemm needs to build, in another process, the binary this role
        runs with that BLOCK_SIZE_M."""
        shape = MoEShape(self.E, self.N, self.K, self.topk)
        return role_compile_request(role, self.M, shape, self.dtype, block_size_m, self.quant)

    def role_call(self, role: Role, config: LaunchConfig):
        role = Role(role)
        aligned = self.aligned(config.block_m)
        ops = self._operands(role)
        launch = config.to_json()

        def gemm():
            grouped_gemm(ops.a, ops.weights, ops.out, aligned, launch, topk=self.topk,
                         a_rows_per_slot=ops.a_rows_per_slot, topk_weights=ops.topk_weights,
                         atomic_add=ops.atomic_add, **ops.fp8)

        if role is Role.GEMM1:
            return gemm
        if role is Role.GEMM2_UNFUSED:
            def unfused():
                gemm()
                topk_sum(self.down, self.timed.topk_ids, self.E, self.out)
            return unfused

        def fused():
            self.out.zero_()
            gemm()
        return fused

    def time_role(self, role: Role, config: LaunchConfig, cutoff_us: float | None = None) -> tuple[float, bool]:
        """(µs, precise?) of one role; see bench.adaptive_time_us for the cutoff."""
        return self._time(self.role_call(role, config), cutoff_us)

    def _time(self, fn, cutoff_us: float | None = None) -> tuple[float, bool]:
        if self.on_gpu:
            return adaptive_time_us(fn, cutoff_us=cutoff_us)
        return wall_time_us(fn, repeats=1), True

    def check_and_time_role(self, role: Role, config: LaunchConfig,
                            measured_us: list[float]) -> tuple[float, float | None, bool]:
        """(relative error, µs or None when wrong, precise?) of `config` in `role`: checked
        first, then timed with the cutoff that the role's `measured_us` so far allow."""
        error = self.check_role(role, config)
        if not error <= self.tolerance:
            return error, None, False
        cutoff = CUTOFF_FACTOR * min(measured_us) if len(measured_us) >= CUTOFF_AFTER else None
        value, precise = self.time_role(role, config, cutoff)
        return error, value, precise

    def check_role(self, role: Role, config: LaunchConfig) -> float:
        """Relative error of the whole layer with `config` in this role, defaults elsewhere."""
        role = Role(role)
        if role is Role.GEMM1:
            return self.check_layer(Variant.UNFUSED, config, self.default)
        return self.check_layer(role.variant, self.default, config)

    # -- whole layer: alignment included, since a pair whose GEMMs differ in BLOCK_SIZE_M pays for two
    def time_layer(self, variant: Variant, gemm1: LaunchConfig, gemm2: LaunchConfig, switches: Switches = OFF) -> float:
        return self._time(self.timed_case.layer(variant, gemm1, gemm2, with_alignment=True, switches=switches))[0]

    def check_layer(self, variant: Variant, gemm1: LaunchConfig, gemm2: LaunchConfig, switches: Switches = OFF) -> float:
        """Relative error against the float64 reference (its output poisoned with NaN first)."""
        run = self.checked_case.layer(variant, gemm1, gemm2, with_alignment=True, switches=switches)
        return check(self.checked_case, run).error


class InputCache:
    """The weights of one shape and the inputs of its last three batch sizes, built on demand:
    building a batch size computes its float64 reference. Three: a study's last trials, the
    next study's first (asked ahead) and, in the table writer, the layer choice of a batch
    size another process tuned can take turns."""

    KEEP = 3

    def __init__(self, dtype: torch.dtype, seed: int, quant: TableDtype | None = None, ep_size: int = 1):
        self.dtype, self.seed = dtype, seed  # dtype: the activations'
        self.ep_size = ep_size  # the shapes are one rank's of this many: routing over ep_size * E experts
        self.quant = quant if quant is not None and quant.fp8 else None
        self.device = torch_device()
        self.shape: MoEShape | None = None
        self.weights = None
        self.fp8: Fp8Weights | None = None  # the weights' scales, when fp8
        self.benches: dict[int, BatchBench] = {}  # M -> inputs, least recently used first

    def holds(self, shape: MoEShape, M: int) -> bool:
        return self.shape == shape and M in self.benches

    def drop(self, shape: MoEShape, M: int) -> None:
        if self.holds(shape, M):
            del self.benches[M]

    def get(self, shape: MoEShape, M: int) -> BatchBench:
        if self.shape != shape:
            self.benches.clear()
            self.weights = None  # free the previous shape's first
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
            self.weights = make_weights(shape.E, shape.N, shape.K, self.dtype, self.device, generator)
            if self.quant is not None:  # as the fp8 checkpoints store them
                block = self.quant.block_shape
                (w1, w1_scale), (w2, w2_scale) = (quantize_weights(w, block) for w in self.weights)
                self.weights, self.fp8 = (w1, w2), Fp8Weights(w1_scale, w2_scale, block)
            self.shape = shape
        bench = self.benches.pop(M, None)
        if bench is None:
            while len(self.benches) >= self.KEEP:
                del self.benches[next(iter(self.benches))]  # free before allocating the next
            w1, w2 = self.weights
            bench = BatchBench(w1, w2, M, shape.topk, seed=self.seed * 7919 + M, fp8=self.fp8,
                               activation_dtype=self.dtype, global_experts=shape.E * self.ep_size)
        self.benches[M] = bench
        return bench


def memory_needed(shape: MoEShape, batch_sizes: list[int], dtype_bytes: int) -> tuple[int, int]:
    """(weights, inputs): bytes that tuning `shape` holds at once at the least. The expert
    weights; the inputs, buffers and float64 input and output of the reference of the
    InputCache.KEEP largest batch sizes, which the cache holds together; and the layer's own
    buffers while it runs at the largest."""
    E, N, K, topk = shape.E, shape.N, shape.K, shape.topk
    weights = 3 * E * N * K * dtype_bytes

    def held(M: int) -> int:
        rows = M * topk
        buffers = dtype_bytes * (3 * M * K + rows * (2 * N + N + K))  # two inputs, gate_up, activation, down, out
        return buffers + 4 * rows * 2 * N + 8 * 2 * M * K  # the activation's fp32 draw; the reference's ends

    largest = sorted(batch_sizes)[-InputCache.KEEP:]
    layer = dtype_bytes * largest[-1] * topk * (3 * N + K)  # run_aligned's intermediates
    return weights, sum(held(M) for M in largest) + layer
