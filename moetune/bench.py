"""Timing, the roofline floor and random layer inputs.

GPU: the work is captured `calls_per_graph` times in one CUDA graph and the graph replayed;
each replay is timed with CUDA events and the median per call is reported, as vLLM and
SGLang time their MoE kernels. Without a GPU (Triton's interpreter) the wall clock is used
and the numbers mean nothing beyond "it ran".
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .device import interpreter_enabled
from .kernels import select_experts

# Ceilings measured on the H200 (device copy counting bytes read + written; bf16 matmul
# 8192^3 on random data). Used for the roofline floor.
H200_BANDWIDTH = 4.25e12
H200_BF16_FLOPS = 807e12


def on_gpu() -> bool:
    return torch.cuda.is_available() and not interpreter_enabled()


def warm_up(fn: Callable[[], object], calls: int) -> None:
    """Run `fn` on a side stream, as graph capture wants: compiles, allocates and loads
    modules before any capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def cuda_graph_time_us(fn: Callable[[], object], *, calls_per_graph: int = 10, replays: int = 20,
                       warmup: int = 3, warm_calls: int = 2) -> float:
    """Median over `replays` graph replays of the time per call of `fn`, in µs."""
    if warm_calls:
        warm_up(fn, warm_calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    for _ in range(warmup):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 / calls_per_graph for s, e in zip(starts, ends)]
    del graph
    return statistics.median(times)


def quick_time_us(fn: Callable[[], object], repeats: int = 3) -> float:
    """Rough time of one call: a one-call graph replayed a few times (no launch gaps)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / repeats


def adaptive_time_us(fn: Callable[[], object], *, cutoff_us: float | None = None,
                     graph_us: float = 1000.0) -> tuple[float, bool]:
    """Tuner timing: (µs per call, precise?).

    A candidate whose rough time already exceeds `cutoff_us` (a multiple of the best so
    far) gets its rough time back: precision would not change the ranking. Otherwise calls
    per graph are chosen so a replay lasts about `graph_us`, and slow kernels get fewer
    replays, which keeps a trial of a large batch from costing seconds.
    """
    warm_up(fn, 1)
    rough = quick_time_us(fn)
    if cutoff_us is not None and rough > cutoff_us:
        return rough, False
    calls = max(1, min(10, round(graph_us / max(rough, 1e-3))))
    replays = 20 if rough * calls <= 2 * graph_us else 10
    return cuda_graph_time_us(fn, calls_per_graph=calls, replays=replays, warmup=2, warm_calls=0), True


def interleaved_times(timings: Sequence[Callable[[], float]], rounds: int) -> list[list[float]]:
    """Each timing taken once per round, in turn, `rounds` times: drift between rounds (clocks,
    where a graph's buffers land) hits all of them alike. Returns the times of each."""
    times: list[list[float]] = [[] for _ in timings]
    for _ in range(rounds):
        for own, timing in zip(times, timings):
            own.append(timing())
    return times


def wall_time_us(fn: Callable[[], object], *, repeats: int = 3, warm: bool = True) -> float:
    """Median wall clock of `repeats` calls, after one untimed call when `warm`."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def time_us(fn: Callable[[], object], **kwargs) -> float:
    """µs per call: CUDA-graph replay (10 calls a graph, median of 20) on a GPU, else the wall clock."""
    return cuda_graph_time_us(fn, **kwargs) if on_gpu() else wall_time_us(fn)


def roofline_floor_us(M: int, N: int, K: int, topk: int, experts_hit: int, *, dtype_bytes: int = 2,
                      bandwidth: float = H200_BANDWIDTH, flops: float = H200_BF16_FLOPS) -> float:
    """The layer cannot beat max(bytes / bandwidth, FLOPs / matmul rate).

    Bytes: the weights of every expert hit (w1 2N x K plus w2 K x N) read once, the input
    read and the output written once. FLOPs: 2 * M * topk * (2N*K + N*K).
    """
    weight_bytes = experts_hit * 3 * N * K * dtype_bytes
    io_bytes = 2 * M * K * dtype_bytes
    return max((weight_bytes + io_bytes) / bandwidth, 6 * M * topk * N * K / flops) * 1e6


@dataclass
class LayerInputs:
    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor

    @property
    def experts_hit(self) -> int:
        """Experts of these weights that some slot is routed to (-1: another rank's, not counted)."""
        hit = torch.unique(self.topk_ids)
        return int((hit >= 0).sum())


def make_weights(E: int, N: int, K: int, dtype: torch.dtype, device, generator=None):
    """Random expert weights scaled so that activations stay O(1); never zeros."""
    w1 = torch.randn(E, 2 * N, K, dtype=dtype, device=device, generator=generator).mul_(K ** -0.5)
    w2 = torch.randn(E, K, N, dtype=dtype, device=device, generator=generator).mul_(N ** -0.5)
    return w1, w2


def make_routing(M: int, E: int, topk: int, device, generator=None, renormalize: bool = True):
    """Softmax over random logits, top-k, renormalised: the routing the anchors use."""
    return select_experts(torch.randn(M, E, device=device, generator=generator), topk, renormalize)


def make_layer_inputs(M: int, w1: torch.Tensor, w2: torch.Tensor, topk: int, seed: int) -> LayerInputs:
    device = w1.device
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, w1.shape[2], dtype=w1.dtype, device=device, generator=generator)
    weights, ids = make_routing(M, w1.shape[0], topk, device, generator)
    return LayerInputs(x, w1, w2, weights, ids)
