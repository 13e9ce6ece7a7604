"""A tuning process with compile workers exits once it is done.

`moetune run --devices` runs the tuner in child processes; a child exits only after its
compile workers have, so a pool left running would hang the whole run at its end.
"""

import multiprocessing

import torch

from moetune.bench import make_weights
from moetune.bench_layer import BatchBench
from moetune.tune import Compiler

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


def test_forked_compile_processes_where_cuda_refuses_are_replaced_by_spawned_ones(single_threaded, monkeypatch):
    import moetune.tune as tune

    monkeypatch.setattr(tune, "forked_after_cuda", lambda: True)  # what the forked children will see
    compiler = Compiler(2)
    try:
        request = BatchBench(*make_weights(4, 32, 64, torch.float16, "cpu", torch.Generator().manual_seed(0)),
                             5, 2, seed=1).compile_request("gemm1", CONFIG["BLOCK_SIZE_M"])
        compiler.submit(request, CONFIG).exception(timeout=120)
        assert compiler.pool._mp_context.get_start_method() == "spawn"
    finally:
        compiler.close()
