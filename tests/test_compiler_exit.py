"""A tuning process with compile workers exits once it is done.

`moetune run --devices` runs the tuner in child processes; a child exits only after its
compile workers have, so a pool left running would hang the whole run at its end.
"""

import functools
import multiprocessing

import torch

from moetune.bench import make_weights
from moetune.tune.inputs import BatchBench
from moetune.tune.run import Compiler

CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 2}


def compile_one_and_close() -> None:
    w1, w2 = make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0))
    bench = BatchBench(w1, w2, 5, 2, seed=1)
    compiler = Compiler(2)
    request = bench.compile_request("gemm1", CONFIG["BLOCK_SIZE_M"])
    futures = [compiler.submit(request, CONFIG) for _ in range(6)]
    for future in futures:  # whether the interpreter can compile does not matter here
        future.exception(timeout=120)
    compiler.close()


def test_a_child_process_with_compile_workers_exits():
    child = multiprocessing.get_context("spawn").Process(target=compile_one_and_close)
    child.start()
    child.join(timeout=90)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    assert not alive, "the child hung at exit, waiting for its compile workers"
    assert child.exitcode == 0


def test_compile_processes_are_forked_when_nothing_here_touched_cuda(single_threaded):
    compiler = Compiler(2)
    try:
        assert compiler.pool._mp_context.get_start_method() == "fork"
        assert all(future.result(timeout=60) for future in compiler.started)
    finally:
        compiler.close()


def triton_hashes_held() -> int:
    from triton.runtime.cache import triton_key

    return triton_key.cache_info().currsize


def test_forked_compile_processes_inherit_triton_s_hash_of_itself(single_threaded):
    from triton.runtime.cache import triton_key

    triton_key.cache_clear()
    compiler = Compiler(1)
    try:
        assert compiler.pool.submit(triton_hashes_held).result(timeout=60) == 1
    finally:
        compiler.close()


def test_forked_compile_processes_where_cuda_refuses_are_replaced_by_spawned_ones(single_threaded, monkeypatch):
    import moetune.tune.run as tune

    monkeypatch.setattr(tune, "forked_after_cuda", lambda: True)  # what the forked children will see
    compiler = Compiler(2)
    try:
        request = BatchBench(*make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0)),
                             5, 2, seed=1).compile_request("gemm1", CONFIG["BLOCK_SIZE_M"])
        compiler.submit(request, CONFIG).exception(timeout=120)
        assert compiler.pool._mp_context.get_start_method() == "spawn"
    finally:
        compiler.close()


def test_the_fork_check_waits_for_the_fork_not_for_each_process_to_set_up(single_threaded, monkeypatch):
    import time

    real = torch.set_num_threads
    # What each compile process does after it reports, made slow (forked, it sees this patch).
    monkeypatch.setattr(torch, "set_num_threads", lambda count: time.sleep(5) or real(count))
    compiler = Compiler(2)
    try:
        request = BatchBench(*make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0)),
                             5, 2, seed=1).compile_request("gemm1", CONFIG["BLOCK_SIZE_M"])
        start = time.monotonic()
        future = compiler.submit(request, CONFIG)
        assert time.monotonic() - start < 3
        assert compiler.pool._mp_context.get_start_method() == "fork"
        future.exception(timeout=120)
    finally:
        compiler.close()


def test_compiles_given_a_compute_capability_never_ask_cuda(monkeypatch):
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    import moetune.tune.run as tune

    def no_cuda(*args):
        raise AssertionError("asked CUDA")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    compile_only = tune.compile_only_driver((9, 0))
    assert compile_only.get_current_target() == GPUTarget("cuda", 90, 32)
    assert compile_only.get_current_device() == 0 and compile_only.get_current_stream(0) == 0

    before = driver._active
    try:
        tune._compile_for((9, 0))
        first = driver._active
        assert first.get_current_target() == GPUTarget("cuda", 90, 32)
        tune._compile_for((9, 0))
        assert driver._active is first  # set once per process and capability
        tune._compile_for((8, 0))
        assert driver._active.get_current_target() == GPUTarget("cuda", 80, 32)
    finally:
        driver._active = before


def test_a_compile_only_driver_that_cannot_be_built_leaves_the_compile_to_the_gpu_s_driver(monkeypatch):
    import moetune.kernels
    import moetune.tune.run as tune

    def unbuildable(capability):
        raise TypeError("this Triton's driver takes other arguments")

    compiled = []
    monkeypatch.setattr(tune, "compile_only_driver", unbuildable)
    monkeypatch.setattr(moetune.kernels, "compile_grouped_gemm", lambda *args, **kwargs: compiled.append(args))
    request = BatchBench(*make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0)),
                         5, 2, seed=1).compile_request("gemm1", CONFIG["BLOCK_SIZE_M"])
    assert tune._compile_job(functools.partial(tune._compile_candidate, request, CONFIG), (9, 0)) >= 0
    assert len(compiled) == 1
