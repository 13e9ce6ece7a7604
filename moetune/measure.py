"""Check a whole MoE layer against the float64 reference, and time it.

Used by the tuner's pair choice, `moetune compare` and scripts/check_gpu.py:

    case = LayerCase.random(w1, w2, M, topk, seed)      # inputs + output buffer, once per M
    run = case.layer("fused", gemm1, gemm2)              # a call writing case.out
    checked = check(case, run)                           # .error vs float64, .ok within tolerance
    timings = time_interleaved([run, other], rounds=3)   # [.median_us, .rounds_us] per run

The inputs are random (activations stay O(1); never zeros, which would hide wrong rows), the
output buffer is filled with NaN before each check, so an element the kernels skip fails it,
and the float64 reference is computed the first time a check needs it.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .bench import (LayerInputs, adaptive_time_us, cuda_graph_time_us, interleaved_times, make_layer_inputs, on_gpu,
                    wall_time_us)
from .layer import Fp8Weights, align_for, run_aligned
from .quant import fp8_moe_reference, fp8_tolerance
from .reference import TOLERANCE, moe_reference, relative_error
from .types import OFF, Switches

Run = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Timer:
    """How one timing of a run is taken.

    On a GPU the run is captured `calls_per_graph` times in one CUDA graph, each of `replays`
    replays is timed with CUDA events, and the median per call is kept, as vLLM and SGLang
    time their MoE kernels. With calls_per_graph None, a replay holds as many calls (up to 10)
    as last about a millisecond and slow runs get fewer replays (bench.adaptive_time_us),
    which keeps the tuner's timings of large batches short. In Triton's interpreter the wall
    clock of `wall_repeats` calls gives the median, a figure that means nothing for speed.
    """

    calls_per_graph: int | None = 10
    replays: int = 20
    wall_repeats: int = 1

    def __call__(self, run: Callable[[], object]) -> float:
        """µs per call of `run`."""
        if not on_gpu():
            return wall_time_us(run, repeats=self.wall_repeats, warm=False)  # the interpreter compiles nothing
        if self.calls_per_graph is None:
            return adaptive_time_us(run)[0]
        return cuda_graph_time_us(run, calls_per_graph=self.calls_per_graph, replays=self.replays)

    def describe(self) -> str:
        if self.calls_per_graph is None:
            return "CUDA graph of up to 10 calls (about 1 ms a replay), median of 10-20 replays"
        return f"CUDA graph of {self.calls_per_graph} calls, median of {self.replays} replays"


# `moetune compare` and scripts/check_gpu.py.
GRAPH_TIMER = Timer()
# The tuner: a pair choice times many layers, some of them slow.
TUNER_TIMER = Timer(calls_per_graph=None)


def _json_config(config) -> Mapping[str, int]:
    """The kernels read configs by their JSON keys: a LaunchConfig goes in as its JSON form."""
    return config.to_json() if hasattr(config, "to_json") else config


class LayerCase:
    """One batch size of one shape: the layer's inputs, an output buffer and the reference.
    fp8: the scales of fp8 weights; the reference then quantizes as the kernels do."""

    def __init__(self, inputs: LayerInputs, fp8: Fp8Weights | None = None) -> None:
        self.inputs = inputs
        self.fp8 = fp8
        self.out = torch.empty_like(inputs.x)
        self.tolerance = TOLERANCE[inputs.x.dtype] if fp8 is None else fp8_tolerance(fp8.block_shape)
        self._aligned: dict[tuple[int, int], tuple] = {}  # (GEMM 1, GEMM 2 BLOCK_SIZE_M) -> alignments

    @classmethod
    def random(cls, w1: torch.Tensor, w2: torch.Tensor, M: int, topk: int, seed: int) -> LayerCase:
        """M random tokens routed by softmax top-k over random logits (bench.make_layer_inputs)."""
        return cls(make_layer_inputs(M, w1, w2, topk, seed=seed))

    @property
    def M(self) -> int:
        return self.inputs.x.shape[0]

    @property
    def experts_hit(self) -> int:
        return self.inputs.experts_hit

    @functools.cached_property
    def reference(self) -> torch.Tensor:
        """The layer in float64; a case that is only timed never computes it."""
        inputs = self.inputs
        if self.fp8 is not None:
            return fp8_moe_reference(inputs.x, inputs.w1, inputs.w2, self.fp8.w1_scale, self.fp8.w2_scale,
                                     inputs.topk_weights, inputs.topk_ids, self.fp8.block_shape)
        return moe_reference(inputs.x, inputs.w1, inputs.w2, inputs.topk_weights, inputs.topk_ids)

    def layer(self, variant: str, gemm1, gemm2, *, with_alignment: bool = False,
              atomic_sem: str = "relaxed", switches: Switches = OFF) -> Run:
        """The whole layer with these configs (dicts or LaunchConfigs) and kernel switches,
        writing `self.out`.

        The routing is given. Alignment runs once, here, unless `with_alignment`: then every
        call aligns, as the tuner times a pair (a pair whose GEMMs differ in BLOCK_SIZE_M
        pays for two alignments). `moetune compare` times without, as other MoE kernels are
        timed.
        """
        inputs, gemm1, gemm2 = self.inputs, _json_config(gemm1), _json_config(gemm2)
        num_experts = inputs.w1.shape[0]

        def aligned_run(aligned1, aligned2) -> torch.Tensor:
            return run_aligned(inputs.x, inputs.w1, inputs.w2, inputs.topk_weights, inputs.topk_ids, aligned1,
                               aligned2, gemm1, gemm2, variant=variant, out=self.out, atomic_sem=atomic_sem,
                               fp8=self.fp8, switches=switches)

        if with_alignment:
            return lambda: aligned_run(*align_for(inputs.topk_ids, num_experts, gemm1, gemm2))
        block_sizes = (gemm1["BLOCK_SIZE_M"], gemm2["BLOCK_SIZE_M"])
        if block_sizes not in self._aligned:
            # Each alignment orders an expert's rows by atomic arrival: sharing one keeps the
            # layers of this case on the same rows.
            self._aligned[block_sizes] = align_for(inputs.topk_ids, num_experts, gemm1, gemm2)
        aligned = self._aligned[block_sizes]
        return lambda: aligned_run(*aligned)


@dataclass(frozen=True)
class Check:
    """A run's relative error against the float64 reference (inf where any output is NaN/inf)."""

    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def check(case: LayerCase, run: Run) -> Check:
    """Run once into the NaN-filled output buffer and compare the result with the reference."""
    case.out.fill_(float("nan"))
    return Check(relative_error(run(), case.reference), case.tolerance)


@dataclass(frozen=True)
class Timing:
    rounds_us: tuple[float, ...]  # one timing per round: their spread shows the noise

    @property
    def median_us(self) -> float:
        return statistics.median(self.rounds_us)


def time_interleaved(runs: Sequence[Callable[[], object]], rounds: int = 1,
                     timer: Callable[[Callable[[], object]], float] = GRAPH_TIMER) -> list[Timing]:
    """Each run timed once per round, in turn, `rounds` times: drift between rounds (clocks,
    where a graph's buffers land) hits all runs alike. One timing of a large layer now and
    then lands 15-20% high (seen on the H200 at M >= 3072); the median of rounds keeps such
    a draw from deciding."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    times = interleaved_times([functools.partial(timer, run) for run in runs], rounds)
    return [Timing(tuple(own)) for own in times]
