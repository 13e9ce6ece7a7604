"""Compiling ahead: processes that compile candidates while the GPU times others.

The processes start at once and set up Triton while the tuner opens its studies and builds
its first inputs. They are forked when this process has not touched CUDA yet (create the
Compiler first): a forked process has torch and Triton imported already, where a spawned
one spends seconds importing them, all of them at once. Given the GPU's compute capability,
they compile for it without asking CUDA (CompileOnlyDriver).

What they compile: a role's candidate config (CompileRequest), a batch size's helper kernels
(HelperRequest), and the whole layers with kernel switches that the layer choice will check
(LayerRequest): each of those builds up to four kernels the role studies never ran.
"""

from __future__ import annotations

import functools
import os
import queue
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, NamedTuple

import torch

from ..device import fork_is_safe, forked_after_cuda
from ..shapes import MoEShape
from ..tables import TableDtype
from ..types import LaunchConfig, Switches, Variant
from .inputs import CompileRequest, HelperRequest, compile_helpers

COMPILE_TIMEOUT_S = 180.0
COMPILE_NICENESS = 5
# The compute capability this process's Triton compiles for, once compile_for has set it.
_compiling_for: tuple[int, int] | None = None


def compile_job(build: Callable[[], list], capability: tuple[int, int] | None = None,
                launchers: bool = False) -> float:
    """Runs in a compile process: `build()` compiles kernels into Triton's on-disk cache, for
    a GPU of compute `capability` (None: the GPU this process sees, which CUDA then sets up).
    With `launchers`, also build the C launchers of the kernels' signatures, which the
    timing process would otherwise build (Triton caches them on disk too) at a first launch.
    Returns the seconds it took."""
    from triton.runtime import driver

    start = time.perf_counter()
    if capability is not None:
        try:
            compile_for(capability)
        except Exception:  # noqa: BLE001 - a Triton without that driver's shape: ask the GPU, as before
            pass
    kernels = build()
    if launchers:
        for kernel in kernels:
            driver.active.launcher_cls(kernel.src, kernel.metadata)
    return time.perf_counter() - start


def compile_candidate(request: CompileRequest, config: LaunchConfig) -> list:
    """One candidate's binary: [Triton's compiled kernel]."""
    from moetune.kernels import compile_grouped_gemm

    kernel = compile_grouped_gemm(request.dtype, request.geometry, config.to_json(), topk=request.topk,
                                  a_rows_per_slot=request.a_rows_per_slot,
                                  mul_routed_weight=request.mul_routed_weight, atomic_add=request.atomic_add,
                                  out_dtype=request.out_dtype, block_shape=request.block_shape)
    return [kernel] if kernel is not None else []


class LayerRequest(NamedTuple):
    """One whole layer with kernel switches at one batch size, as the layer choice checks
    and times it; picklable."""
    M: int
    shape: MoEShape
    dtype: torch.dtype  # the activations'
    quant: TableDtype | None  # fp8_w8a8: the weights' scales; None or another dtype: none
    variant: Variant
    gemm1: LaunchConfig
    gemm2: LaunchConfig
    switches: Switches


def compile_layer(request: LayerRequest) -> list:
    """Compile, without launching, every kernel of the layer that request names: the layer
    the tuner checks (measure.LayerCase, alignment included), called on meta tensors laid
    out as BatchBench's inputs (see kernels/launch.py). Returns Triton's compiled kernels."""
    from ..bench import LayerInputs
    from ..kernels.launch import compile_only
    from ..layer import Fp8Weights
    from ..measure import LayerCase
    from ..quant import FP8_DTYPE

    r, (E, N, K, topk) = request, (request.shape.E, request.shape.N, request.shape.K, request.shape.topk)
    meta = functools.partial(torch.empty, device="meta")
    fp8 = r.quant is not None and r.quant.fp8
    weight_dtype = FP8_DTYPE if fp8 else r.dtype
    weights = (meta(E, 2 * N, K, dtype=weight_dtype), meta(E, K, N, dtype=weight_dtype))
    inputs = LayerInputs(meta(r.M, K, dtype=r.dtype), *weights, meta(r.M, topk, dtype=torch.float32),
                         meta(r.M, topk, dtype=torch.int32))
    scales = None
    if fp8:  # laid out as quant.quantize_weights lays them out
        block = r.quant.block_shape
        scales = Fp8Weights(*(meta(E, dtype=torch.float32) if block is None else
                              meta(E, -(-w.shape[1] // block[0]), -(-w.shape[2] // block[1]), dtype=torch.float32)
                              for w in weights), block)
    with compile_only() as compiled:
        LayerCase(inputs, scales).layer(r.variant, r.gemm1, r.gemm2, with_alignment=True, switches=r.switches)()
    return compiled


def compile_for(capability: tuple[int, int]) -> None:
    """Make this process's Triton compile for `capability` without asking the GPU (see
    compile_only_driver); set once per process and capability."""
    global _compiling_for
    from triton.runtime import driver

    if _compiling_for != capability:
        driver.set_active(compile_only_driver(capability))
        _compiling_for = capability


@functools.cache
def _compile_only_driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import GPUDriver
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    class CompileOnlyDriver(CudaDriver):
        """Triton's CUDA driver with the target given, the device and stream fixed: all that
        compiling asks of it. CUDA stays untouched, which spares each compile process
        setting it up: with 30 processes starting at once (two GPUs' tuners), that set-up
        made their first compile wait seconds."""

        def __init__(self, capability: tuple[int, int]):
            GPUDriver.__init__(self)  # not CudaDriver's: its helpers load binaries onto the GPU
            self.launcher_cls = CudaLauncher
            self.capability = capability
            self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0

        def get_current_target(self):
            return self.target

    return CompileOnlyDriver


def compile_only_driver(capability: tuple[int, int]):
    return _compile_only_driver_class()(capability)


def _start_compile_process(ready) -> None:
    """Each compile process's first step: say at once whether CUDA would work here
    (`ready`, read by the Compiler). Compiles given a compute capability never ask it; one
    without asks the GPU for it."""
    usable = not forked_after_cuda()
    ready.put(usable)
    if usable:
        torch.set_num_threads(1)  # forked, OpenMP's threads are the parent's; compiling needs none
        # Below the tuner that feeds the GPU, which shares the cores with them (and ptxas,
        # started from here, inherits it).
        os.nice(COMPILE_NICENESS)


def _hash_triton() -> None:
    """Triton hashes its own files, its 400 MB library among them, before a process's first
    compile. Done once here, the processes forked after inherit the hash: dozens of
    processes hashing at once each spent a few tenths of a second of CPU on it."""
    try:
        from triton.runtime.cache import triton_key

        triton_key()
    except Exception:  # noqa: BLE001 - a Triton without it: each process hashes as before
        pass


def _started() -> bool:
    """One job per process makes the pool start them all at once."""
    return True


def compiler_for(compile_workers: int, gpu: bool) -> "Compiler":
    """The tuner's compiler: processes on a GPU; inline in the interpreter, which compiles
    nothing ahead."""
    return Compiler(compile_workers if gpu else 0)


class Compiler:
    """Compiles candidates in worker processes while the GPU times others; inline without workers."""

    def __init__(self, workers: int):
        self.pool = None
        self.start_method: str | None = None  # "fork" or "spawn"; None without processes
        # The GPU's compute capability, for compiles that need not ask it (set by the tuner
        # once it knows its GPU); None: each process asks.
        self.capability: tuple[int, int] | None = None
        # Candidates kept in flight: one per compiling process, or one at a time inline.
        self.capacity = max(1, workers)
        self.workers = workers
        self.checked = True
        self.started: list[Future] = []
        if workers > 0:
            self._start("fork" if fork_is_safe() else "spawn")

    def _start(self, method: str) -> None:
        import multiprocessing

        if method == "fork":
            _hash_triton()
        context = multiprocessing.get_context(method)
        self.ready = context.Queue()
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                        initializer=_start_compile_process, initargs=(self.ready,))
        self.start_method = method
        # The pool starts a process per job waiting, up to its size.
        self.started = [self.pool.submit(_started) for _ in range(self.workers)]
        self.checked = method != "fork"

    def _check_fork(self) -> None:
        """Forked processes where CUDA refuses to work (something had initialized it here
        unnoticed) would fail every compile: replace them with spawned ones. All were forked
        from this one state, so the first to report speaks for all; it reports before its
        set-up, so this waits for a fork, not a compile."""
        self.checked = True
        try:
            usable = self.ready.get(timeout=COMPILE_TIMEOUT_S)
        except queue.Empty:
            usable = False
        if not usable:
            self.pool.shutdown(wait=True)
            self._start("spawn")

    def submit(self, request: CompileRequest, config: LaunchConfig, launcher: bool = False) -> Future | None:
        """Compile `config` ahead (and its launcher, see compile_job); None without processes."""
        return self._submit(functools.partial(compile_candidate, request, config), launcher)

    def submit_layer(self, request: LayerRequest) -> Future | None:
        """Compile a whole layer's kernels ahead (compile_layer), with their launchers; None
        without processes."""
        return self._submit(functools.partial(compile_layer, request), True)

    def submit_helpers(self, request: HelperRequest) -> Future | None:
        """Compile a batch size's helper kernels ahead (inputs.compile_helpers), with their
        launchers, which the tuning process would otherwise build at its first check."""
        return self._submit(functools.partial(compile_helpers, request), True)

    def _submit(self, build: Callable[[], list], launchers: bool) -> Future | None:
        if self.pool is None:
            return None
        if not self.checked:
            self._check_fork()
        return self.pool.submit(compile_job, build, self.capability, launchers)

    def close(self) -> None:
        if self.pool is not None:
            # Wait for the compiles in flight: a process started by multiprocessing (each GPU's
            # tuner under --devices) joins its children when it exits, and a pool shut down
            # without waiting leaves it joining them forever.
            self.pool.shutdown(wait=True, cancel_futures=True)
