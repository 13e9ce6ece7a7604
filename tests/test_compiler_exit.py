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
