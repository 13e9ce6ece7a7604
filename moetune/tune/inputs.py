"""One batch size of one shape, ready to check and time launch configs.

The tuner measures three roles per batch size:
  gemm1          GEMM 1 alone (shared by both variants),
  gemm2_unfused  GEMM 2 storing [M, topk, K] + the top-k sum, timed together,
  gemm2_fused    zeroing out + GEMM 2 adding atomically into it, timed together,
and then whole layers (alignment included) for the pairs it keeps. Every candidate runs in
a whole layer against the float64 reference (computed once per batch size) before its time
counts; the roles it does not tune run with the default config there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..bench import adaptive_time_us, make_layer_inputs, on_gpu, wall_time_us
from ..configs import default_config
from ..kernels import align_tokens, gemm_geometry, grouped_gemm, max_padded_rows, silu_and_mul, topk_sum
from ..kernels.align import AlignedTokens
from ..kernels.grouped_gemm import GemmGeometry
from ..kernels.launch import compile_only
from ..layer import align_for, run_aligned
from ..reference import TOLERANCE, moe_reference, relative_error

ROLES = ("gemm1", "gemm2_unfused", "gemm2_fused")
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


class CompileRequest(NamedTuple):
    """Arguments of kernels.compile_grouped_gemm besides the config; picklable."""
    dtype: torch.dtype
    geometry: GemmGeometry
    topk: int
    a_rows_per_slot: int
    mul_routed_weight: bool
    atomic_add: bool


ROLE_VARIANT = {"gemm2_unfused": "unfused", "gemm2_fused": "fused"}


def role_compile_request(role: str, M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype,
                         block_size_m: int) -> CompileRequest:
    """What compile_grouped_gemm needs to build the binary a role runs with that
    BLOCK_SIZE_M, from the sizes alone: a tuner can start compiling before it has built the
    batch size's inputs. The operands, on the meta device (shapes and strides, no memory),
    are laid out as BatchBench's:
      gemm1   x [M, K] @ w1 [E, 2N, K] -> gate_up [M*topk, 2N]
      gemm2   activation [M*topk, N] @ w2 [E, K, N] -> down [M*topk, K], or out [M, K] atomically
    """
    if role != "gemm1" and role not in ROLE_VARIANT:
        raise ValueError(f"unknown role {role!r}")
    meta = functools.partial(torch.empty, dtype=dtype, device="meta")
    rows = M * topk
    atomic_add = role == "gemm2_fused"
    if role == "gemm1":
        a, weights, out = meta(M, K), meta(E, 2 * N, K), meta(rows, 2 * N)
    else:
        a, weights, out = meta(rows, N), meta(E, K, N), meta(M, K) if atomic_add else meta(rows, K)
    geometry = gemm_geometry(a, weights, out, max_padded_rows(rows, E, block_size_m), topk, atomic_add)
    # GEMM 1 reads each token's row for all its top-k slots; GEMM 2 weighs by the router weight.
    return CompileRequest(dtype, geometry, topk, topk if role == "gemm1" else 1, role != "gemm1", atomic_add)


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


def helper_requests(M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype,
                    block_sizes_m) -> list[HelperRequest]:
    """One request per alignment, then the rest: each can compile in a process of its own."""
    return [HelperRequest(M, E, N, K, topk, dtype, block_size_m) for block_size_m in block_sizes_m] + \
        [HelperRequest(M, E, N, K, topk, dtype, None)]


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
            silu_and_mul(meta(r.M * r.topk, 2 * r.N, dtype=r.dtype))
            topk_sum(meta(r.M, r.topk, r.K, dtype=r.dtype), topk_ids, r.E, meta(r.M, r.K, dtype=r.dtype))
    return compiled


@dataclass
class BatchBench:
    """Inputs, buffers and reference of one (shape, dtype, M), on the tuning device."""

    w1: torch.Tensor
    w2: torch.Tensor
    M: int
    topk: int
    seed: int

    def __post_init__(self) -> None:
        self.E, two_n, self.K = self.w1.shape
        self.N = two_n // 2
        # Separately seeded routings: one to time on, one to check against the reference.
        self.timed = make_layer_inputs(self.M, self.w1, self.w2, self.topk, seed=self.seed)
        self.checked = make_layer_inputs(self.M, self.w1, self.w2, self.topk, seed=self.seed + 1_000_003)
        c = self.checked
        self.reference = moe_reference(c.x, c.w1, c.w2, c.topk_weights, c.topk_ids)
        self.default = default_config(self.M, self.E, self.N, self.K, self.topk)
        rows = self.M * self.topk
        device, dtype = self.w1.device, self.w1.dtype
        self.gate_up = torch.empty(rows, 2 * self.N, dtype=dtype, device=device)
        # GEMM 2's input, shaped like an activation's values; computed by torch, so that
        # building the inputs launches no kernel of ours (those may still be compiling).
        gate, up = torch.randn(rows, 2 * self.N, device=device).chunk(2, dim=1)
        self.activation = (torch.nn.functional.silu(gate) * up).to(dtype)
        self.down = torch.empty(self.M, self.topk, self.K, dtype=dtype, device=device)
        self.out = torch.empty(self.M, self.K, dtype=dtype, device=device)
        self._aligned: dict[int, AlignedTokens] = {}
        self.warmed = False

    # -- one role: its operands decide both what runs and what other processes compile --------
    def _operands(self, role: str) -> RoleOperands:
        t = self.timed
        if role == "gemm1":
            return RoleOperands(t.x, self.w1, self.gate_up, None, self.topk, False)
        if role == "gemm2_unfused":
            return RoleOperands(self.activation, self.w2, self.down.view(-1, self.K), t.topk_weights, 1, False)
        return RoleOperands(self.activation, self.w2, self.out, t.topk_weights, 1, True)

    def compile_request(self, role: str, block_size_m: int) -> CompileRequest:
        """What compile_grouped_gemm needs to build, in another process, the binary this role
        runs with that BLOCK_SIZE_M."""
        return role_compile_request(role, self.M, self.E, self.N, self.K, self.topk, self.w1.dtype, block_size_m)

    def warm_up(self, block_sizes_m) -> None:
        """Compile (or load) and launch once what the checks run besides the candidate: the
        alignment at each BLOCK_SIZE_M, the activation, the top-k sum and the default configs
        of the roles not tuned. A failure here is left to the trial that meets it, which
        reports it with its config."""
        self.warmed = True
        try:
            for block_size_m in block_sizes_m:
                self._aligned_for(block_size_m)
            self.check_layer("unfused", self.default, self.default)
        except Exception:  # noqa: BLE001 - see above
            if on_gpu():
                torch.cuda.synchronize()

    def _aligned_for(self, block_size_m: int) -> AlignedTokens:
        if block_size_m not in self._aligned:
            self._aligned[block_size_m] = align_tokens(self.timed.topk_ids, self.E, block_size_m)
        return self._aligned[block_size_m]

    def role_call(self, role: str, config: dict):
        aligned = self._aligned_for(config["BLOCK_SIZE_M"])
        ops = self._operands(role)

        def gemm():
            grouped_gemm(ops.a, ops.weights, ops.out, aligned, config, topk=self.topk,
                         a_rows_per_slot=ops.a_rows_per_slot, topk_weights=ops.topk_weights,
                         atomic_add=ops.atomic_add)

        if role == "gemm1":
            return gemm
        if role == "gemm2_unfused":
            def unfused():
                gemm()
                topk_sum(self.down, self.timed.topk_ids, self.E, self.out)
            return unfused

        def fused():
            self.out.zero_()
            gemm()
        return fused

    def time_role(self, role: str, config: dict, cutoff_us: float | None = None) -> tuple[float, bool]:
        """(µs, precise?) of one role; see bench.adaptive_time_us for the cutoff."""
        return self._time(self.role_call(role, config), cutoff_us)

    def _time(self, fn, cutoff_us: float | None = None) -> tuple[float, bool]:
        if on_gpu():
            return adaptive_time_us(fn, cutoff_us=cutoff_us)
        return wall_time_us(fn, repeats=1), True

    def check_and_time_role(self, role: str, config: dict, measured_us: list[float]) -> tuple[float, float | None, bool]:
        """(relative error, µs or None when wrong, precise?) of `config` in `role`: checked
        first, then timed with the cutoff that the role's `measured_us` so far allow."""
        error = self.check_role(role, config)
        if not error <= self.tolerance:
            return error, None, False
        cutoff = CUTOFF_FACTOR * min(measured_us) if len(measured_us) >= CUTOFF_AFTER else None
        value, precise = self.time_role(role, config, cutoff)
        return error, value, precise

    def check_role(self, role: str, config: dict) -> float:
        """Relative error of the whole layer with `config` in this role, defaults elsewhere."""
        if role == "gemm1":
            return self.check_layer("unfused", config, self.default)
        return self.check_layer(ROLE_VARIANT[role], self.default, config)

    # -- whole layer -------------------------------------------------------------------------
    def layer_call(self, variant: str, gemm1: dict, gemm2: dict, inputs=None):
        t = inputs or self.timed

        def layer():
            a1, a2 = align_for(t.topk_ids, self.E, gemm1, gemm2)
            return run_aligned(t.x, self.w1, self.w2, t.topk_weights, t.topk_ids, a1, a2, gemm1, gemm2,
                               variant=variant, out=self.out)
        return layer

    def time_layer(self, variant: str, gemm1: dict, gemm2: dict) -> float:
        return self._time(self.layer_call(variant, gemm1, gemm2))[0]

    def check_layer(self, variant: str, gemm1: dict, gemm2: dict) -> float:
        self.out.fill_(float("nan"))  # an element the kernels skip stays NaN and fails the check
        out = self.layer_call(variant, gemm1, gemm2, self.checked)()
        return relative_error(out, self.reference)

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.w1.dtype]
