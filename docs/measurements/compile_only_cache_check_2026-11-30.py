# Ran on d1fce22's code; output in the .log beside it. Each line: compile in a process without CUDA, then launch here and count new cubins / launchers.
import os, glob, time
import torch
from moetune.tune import compiler_for
compiler = compiler_for(4, True)  # forked before CUDA
from moetune.device import local_device
from moetune.bench import make_weights
from moetune.bench_layer import BatchBench
dev = local_device(); compiler.capability = dev.compute_capability
cubins = lambda: len(glob.glob(os.environ["TRITON_CACHE_DIR"] + "/*/*.cubin"))
launchers = lambda: len(glob.glob(os.environ["TRITON_CACHE_DIR"] + "/*/__triton_launcher*.so"))
w1, w2 = make_weights(128, 768, 2048, torch.bfloat16, "cuda")
bench = BatchBench(w1, w2, 64, 8, seed=1)
for bm in (16, 32): bench._aligned_for(bm)
from moetune.kernels import topk_sum
topk_sum(bench.down, bench.timed.topk_ids, bench.E, bench.out); torch.cuda.synchronize()
configs = [{"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3},
           {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8, "num_stages": 4}]
for role in ("gemm1", "gemm2_unfused", "gemm2_fused"):
    for config in configs:
        t = time.perf_counter()
        compiler.submit(bench.compile_request(role, config["BLOCK_SIZE_M"]), config, launcher=True).result()
        pool_s = time.perf_counter() - t
        before, before_l = cubins(), launchers()
        t = time.perf_counter(); bench.role_call(role, config)(); torch.cuda.synchronize(); main_s = time.perf_counter() - t
        print(f"{role} BM={config['BLOCK_SIZE_M']}: pool {pool_s:.2f} s, main launch {main_s:.3f} s, new cubins from main: {cubins() - before}, new launchers from main: {launchers() - before_l} (of {launchers()})")
compiler.close()
