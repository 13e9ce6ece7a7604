"""Compiling ahead: what the compile processes build is exactly what the timed launch runs,
and the processes start, check CUDA and end as they should."""

import importlib
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

from moetune.bench import make_weights
from moetune.shapes import MoEShape
from moetune.tune import Compiler
from moetune.quant import FP8_DTYPE, quantize_weights
from moetune.layer import Fp8Weights
from moetune.tune.compile_pool import LayerRequest, compile_candidate, compile_for, compile_layer, compile_only_driver
from moetune.tune.inputs import BatchBench, compile_helpers, helper_requests
from moetune.types import LaunchConfig, Role, Switches, Variant

# The modules, not the functions kernels/__init__ re-exports under the same names.
LAUNCHING_MODULES = [importlib.import_module(f"moetune.kernels.{name}")
                     for name in ("align", "activation", "reduce", "grouped_gemm", "quantize")]
CONFIG = LaunchConfig(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=2)


def tiny_bench(M: int = 5, block_shape=None, fp8: bool = False) -> BatchBench:
    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    if not fp8:
        return BatchBench(w1, w2, M, 2, seed=1)
    (w1, w1_scale), (w2, w2_scale) = (quantize_weights(w, block_shape) for w in (w1, w2))
    return BatchBench(w1, w2, M, 2, seed=1, fp8=Fp8Weights(w1_scale, w2_scale, block_shape),
                      activation_dtype=torch.float16)


def record_launches(monkeypatch, layout: bool) -> list:
    """Every launch the kernels' launchers make, compile-only or not, recorded instead of run:
    (kernel, grid, arguments, keywords). A tensor is recorded as its dtype, and with `layout`
    its shape and strides too (a compile request passes bare dtypes for the GEMM's pointers)."""
    seen = []

    def describe(value):
        if isinstance(value, torch.Tensor):
            return (value.dtype, tuple(value.shape), value.stride()) if layout else value.dtype
        return value

    def recorder(kernel, grid):
        def record(*args, **kwargs):
            seen.append((kernel.fn.__name__, tuple(grid), tuple(map(describe, args)),
                         tuple(sorted((k, describe(v)) for k, v in kwargs.items()))))
        return record

    for module in LAUNCHING_MODULES:
        monkeypatch.setattr(module, "launch", recorder)
    return seen


def test_a_compile_request_is_exactly_the_launch_the_tuner_times(monkeypatch):
    bench = tiny_bench()
    bench.aligned(CONFIG.block_m)
    seen = record_launches(monkeypatch, layout=False)
    for role in Role:
        bench.role_call(role, CONFIG)()  # the launch the tuner times
        timed = [launch for launch in seen if launch[0] == "_grouped_gemm_kernel"]
        seen.clear()
        compile_candidate(bench.compile_request(role, CONFIG.block_m), CONFIG)  # what a compile process builds
        assert len(timed) == 1
        assert seen == timed, role
        seen.clear()


def test_the_helper_kernels_compiled_ahead_are_those_the_checks_launch(monkeypatch):
    """compile_helpers, on meta tensors, makes the very launches BatchBench makes besides the
    GEMMs: the alignment at every BLOCK_SIZE_M, the activation and the top-k sum."""
    block_sizes_m = [16, 32, 64]
    seen = record_launches(monkeypatch, layout=True)
    bench = tiny_bench()
    assert not seen  # building the inputs launches nothing of ours
    bench.load_kernels(block_sizes_m)
    launched = {launch for launch in seen if launch[0] != "_grouped_gemm_kernel"}
    seen.clear()
    for request in helper_requests(5, MoEShape(4, 32, 64, 2), torch.float16, block_sizes_m):
        compile_helpers(request)
    assert set(seen) == launched
    assert {launch[0] for launch in launched} == {"_count_kernel", "_offsets_kernel", "_scatter_kernel",
                                                  "_silu_and_mul_kernel", "_topk_sum_kernel"}
    offsets = [dict(launch[3])["BLOCK_SIZE_M"] for launch in launched if launch[0] == "_offsets_kernel"]
    assert sorted(offsets) == block_sizes_m


HELPERS_FOR_A_GPU = """
import sys
import torch
from triton.runtime import driver
from moetune.shapes import MoEShape
from moetune.tune.compile_pool import compile_only_driver
from moetune.tune.inputs import compile_helpers, helper_requests

driver.set_active(compile_only_driver((9, 0)))
for request in helper_requests(8, MoEShape(4, 32, 64, 2), torch.float16, [16]):
    names = sorted(kernel.name for kernel in compile_helpers(request))
    print(request.block_size_m, names, sorted({kernel.metadata.target.arch for kernel in compile_helpers(request)}))
"""


@pytest.mark.e2e
def test_the_helper_kernels_compile_for_a_gpu_without_one(tmp_path):
    """Outside the interpreter, compile_only() really compiles, on meta tensors, for a GPU
    this machine need not have."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", HELPERS_FOR_A_GPU], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "16 ['_count_kernel', '_offsets_kernel', '_scatter_kernel'] [90]",
        "None ['_silu_and_mul_kernel', '_topk_sum_kernel'] [90]",
    ]
    assert len(list(tmp_path.rglob("*.cubin"))) == 5


@pytest.mark.parametrize("variant, switches, fp8", [
    (Variant.UNFUSED, Switches(sorted_rows=True, tma_activations=True, tma_weights=True, split_k=2, persistent=True),
     None),
    (Variant.FUSED, Switches(fuse_activation=True, tma_weights=True), (16, 32)),
    (Variant.UNFUSED, Switches(sorted_rows=True, split_k=2), "per tensor"),
])
def test_a_layer_compile_request_is_exactly_the_layer_the_tuner_checks(monkeypatch, variant, switches, fp8):
    """compile_layer, on meta tensors, makes the very launches of the switch search's check
    of that layer: alignment, both GEMMs, the activation and top-k sum they need, fp8's
    quantization; bf16 and fp8 alike."""
    bench = tiny_bench(fp8=fp8 is not None, block_shape=fp8 if isinstance(fp8, tuple) else None)
    seen = record_launches(monkeypatch, layout=True)
    bench.check_layer(variant, CONFIG, CONFIG, switches)  # what the search checks, then times
    checked = list(seen)
    seen.clear()
    compile_layer(LayerRequest(bench.M, MoEShape(4, 32, 64, 2), bench.dtype, bench.quant, variant, CONFIG, CONFIG,
                               switches))
    assert sum(launch[0] == "_grouped_gemm_kernel" for launch in checked) == 2
    assert seen == checked
    assert (bench.w1.dtype == FP8_DTYPE) == (fp8 is not None)


# -- the compile processes -----------------------------------------------------------------------

def compile_in_a_child_then_exit(request, report) -> None:
    compiler = Compiler(1)
    for future in [compiler.submit(request, CONFIG) for _ in range(3)]:
        future.exception(timeout=120)  # whether the interpreter can compile does not matter here
    report.put(compiler.start_method)
    compiler.close()


def test_a_child_process_with_compile_processes_exits(single_threaded):
    """`moetune run --devices` runs the tuner in child processes; a child exits only after
    its compile processes have, so a pool left running would hang the whole run at its end."""
    context = multiprocessing.get_context("fork")
    report = context.Queue()
    request = tiny_bench().compile_request(Role.GEMM1, CONFIG.block_m)
    # (Made here: a parallel torch op in a forked child would wait for OpenMP threads forever.)
    child = context.Process(target=compile_in_a_child_then_exit, args=(request, report))
    child.start()
    child.join(timeout=90)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    assert not alive, "the child hung at exit, waiting for its compile processes"
    assert child.exitcode == 0
    assert report.get(timeout=5) == "fork"  # nothing in the child had touched CUDA


def triton_hashes_held() -> int:
    from triton.runtime.cache import triton_key

    return triton_key.cache_info().currsize


def test_forked_compile_processes_inherit_triton_s_hash_of_itself(single_threaded):
    from triton.runtime.cache import triton_key

    triton_key.cache_clear()
    compiler = Compiler(1)
    try:
        assert compiler.start_method == "fork"
        assert all(future.result(timeout=60) for future in compiler.started)
        assert compiler.pool.submit(triton_hashes_held).result(timeout=60) == 1
    finally:
        compiler.close()


def test_forked_compile_processes_where_cuda_refuses_are_replaced_by_spawned_ones(single_threaded, monkeypatch):
    import moetune.tune.compile_pool as compile_pool

    monkeypatch.setattr(compile_pool, "forked_after_cuda", lambda: True)  # what the forked children will see
    compiler = Compiler(1)
    try:
        compiler.submit(tiny_bench().compile_request(Role.GEMM1, CONFIG.block_m), CONFIG).exception(timeout=120)
        assert compiler.start_method == "spawn"
    finally:
        compiler.close()


def test_the_fork_check_waits_for_the_fork_not_for_each_process_to_set_up(single_threaded, monkeypatch, tmp_path):
    """Each compile process reports whether CUDA works before its set-up: the first submit
    reads that report, and waits for no process to finish setting up."""
    release = tmp_path / "release"
    real = torch.set_num_threads

    def stuck(count):  # what each compile process does after it reports, held until released
        while not release.exists():
            threading.Event().wait(0.05)
        real(count)

    monkeypatch.setattr(torch, "set_num_threads", stuck)  # forked, the processes see it
    compiler = Compiler(2)
    try:
        request = tiny_bench().compile_request(Role.GEMM1, CONFIG.block_m)
        submitted = []
        submitting = threading.Thread(target=lambda: submitted.append(compiler.submit(request, CONFIG)))
        submitting.start()
        submitting.join(timeout=60)
        assert submitted, "the first submit waited for the compile processes to set up"
        assert compiler.start_method == "fork"
    finally:
        release.touch()
        compiler.close()


def compile_for_a_gpu_in_a_child(report) -> None:
    from triton.runtime import driver

    compile_for((9, 0))
    first = driver.active
    compile_for((9, 0))
    same = driver.active is first  # set once per process and capability
    compile_for((8, 0))
    report.put((str(first.get_current_target().arch), same, str(driver.active.get_current_target().arch)))


def test_compiles_given_a_compute_capability_never_ask_cuda(monkeypatch):
    def no_cuda(*args):
        raise AssertionError("asked CUDA")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    driver = compile_only_driver((9, 0))
    assert (driver.get_current_target().backend, driver.get_current_target().arch) == ("cuda", 90)
    assert driver.get_current_device() == 0 and driver.get_current_stream(0) == 0
    # In a process of its own, as the compile processes do (it changes Triton's active driver).
    context = multiprocessing.get_context("fork")
    report = context.Queue()
    child = context.Process(target=compile_for_a_gpu_in_a_child, args=(report,))
    child.start()
    child.join(timeout=60)
    assert report.get(timeout=5) == ("90", True, "80")


def test_a_compile_only_driver_that_cannot_be_built_leaves_the_compile_to_the_gpu_s_driver(monkeypatch,
                                                                                           single_threaded):
    import moetune.tune.compile_pool as compile_pool

    def unbuildable(capability):
        raise TypeError("this Triton's driver takes other arguments")

    monkeypatch.setattr(compile_pool, "compile_only_driver", unbuildable)  # forked, the process sees it
    compiler = Compiler(1)
    compiler.capability = (9, 0)
    try:
        future = compiler.submit(tiny_bench().compile_request(Role.GEMM1, CONFIG.block_m), CONFIG)
        assert future.result(timeout=120) >= 0  # compiled (by the interpreter here) all the same
    finally:
        compiler.close()
