# Ran on 3ecf83a, nvidia-h200 x2 host, 2026-12-01. Command, from the repository root, for M in 1 16384:
#   TRITON_CACHE_DIR=/tmp/tca_$M python3 helpers_ahead_cache_check_2026-12-01.py ahead $M
#   TRITON_CACHE_DIR=/tmp/tcb_$M python3 helpers_ahead_cache_check_2026-12-01.py inproc $M
"""Helper kernels compiled ahead in compile-only processes: does the tuning process load them all?"""
import os, sys, time, torch
t0 = time.perf_counter()
from moetune import tune
from moetune.bench import make_weights
from moetune.bench_layer import ROLES, BatchBench, helper_requests, role_compile_request
from moetune.configs import default_config
from moetune.space import load_space
print(f"import {time.perf_counter()-t0:.2f} s")
cache = os.environ["TRITON_CACHE_DIR"]
ahead = sys.argv[1] == "ahead"
M, E, N, K, topk = int(sys.argv[2]), 128, 768, 2048, 8
bms = load_space(None).values["BLOCK_SIZE_M"]
cfg = default_config(M, E, N, K, topk)
if ahead:
    c = tune.Compiler(8); c.capability = (9, 0)
    t = time.perf_counter()
    futs = [c.submit_helpers(r) for r in helper_requests(M, E, N, K, topk, torch.bfloat16, bms)]
    futs += [c.submit(role_compile_request(role, M, E, N, K, topk, torch.bfloat16, cfg["BLOCK_SIZE_M"]), cfg, launcher=True) for role in ROLES]
    print("pool compile s:", [round(f.result(), 2) for f in futs], f"all in {time.perf_counter()-t:.2f} s")
    c.close()
def entries():
    return {d: sorted(os.listdir(os.path.join(cache, d))) for d in os.listdir(cache)} if os.path.isdir(cache) else {}
before = entries()
t = time.perf_counter(); torch.cuda.init(); torch.zeros(1, device="cuda"); print(f"cuda init {time.perf_counter()-t:.2f} s")
w1, w2 = make_weights(E, N, K, torch.bfloat16, "cuda", torch.Generator(device="cuda").manual_seed(0))
t = time.perf_counter(); bench = BatchBench(w1, w2, M, topk, seed=1); torch.cuda.synchronize(); print(f"bench build {time.perf_counter()-t:.2f} s")
t = time.perf_counter(); bench.warm_up(bms); torch.cuda.synchronize(); print(f"warm_up {time.perf_counter()-t:.2f} s")
t = time.perf_counter(); err = bench.check_layer("unfused", bench.default, bench.default); print(f"check again {time.perf_counter()-t:.3f} s err {err:.2e}")
after = entries()
new = {d: f for d, f in after.items() if d not in before}
kinds = sorted(name.split(".")[0] for files in new.values() for name in files if name.endswith((".cubin", ".so")))
print(f"{'ahead' if ahead else 'in-process'} M={M}: {len(new)} new cache entries in the tuning process: {kinds}")
