# Ran on the tree before d1fce22 (it uses _FIRST_REQUEST, which that commit removed), with 16 and 1 workers; output (16) in the .log beside it.
"""Where the first seconds of a tune go: compile processes' set-up, the first layer launches."""
import os, sys, time
T0 = time.perf_counter()
import torch
import moetune.tune as tune_mod
from concurrent.futures import ProcessPoolExecutor, wait
import multiprocessing
T_IMPORT = time.perf_counter() - T0
WORKERS = int(sys.argv[1]) if len(sys.argv) > 1 else 16
PHASES = {}

def init():
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from triton.runtime import driver
    target = driver.active.get_current_target()
    t1 = time.perf_counter()
    tune_mod._compile_job(tune_mod._FIRST_REQUEST, tune_mod._FIRST_CONFIG)
    t2 = time.perf_counter()
    PHASES.update(target=t1 - t0, first_compile=t2 - t1, done_at=time.time())

def report():
    time.sleep(0.05)
    return os.getpid(), dict(PHASES)

def main():
    print(f"import moetune.tune: {T_IMPORT:.2f} s")
    start = time.time()
    pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork"), initializer=init)
    futures = [pool.submit(report) for _ in range(WORKERS)]
    # main's own set-up meanwhile
    t = time.perf_counter(); torch.cuda.init(); torch.zeros(1, device="cuda"); print(f"main cuda init: {time.perf_counter()-t:.2f} s")
    from moetune.bench import make_weights
    from moetune.bench_layer import BatchBench
    t = time.perf_counter()
    w1, w2 = make_weights(128, 768, 2048, torch.bfloat16, "cuda")
    torch.cuda.synchronize(); print(f"weights: {time.perf_counter()-t:.2f} s")
    for M in (16384, 1, 256):
        t = time.perf_counter(); b = BatchBench(w1, w2, M, 8, seed=M); torch.cuda.synchronize()
        print(f"M={M} bench build: {time.perf_counter()-t:.2f} s")
        for role in ("gemm1", "gemm2_unfused", "gemm2_fused"):
            for n in (1, 2):
                t = time.perf_counter(); err = b.check_role(role, b.default); torch.cuda.synchronize()
                print(f"M={M} check {role} #{n}: {time.perf_counter()-t:.3f} s (err {err:.1e})")
            t = time.perf_counter(); b.time_role(role, b.default); print(f"M={M} time {role}: {time.perf_counter()-t:.3f} s")
    wait(futures)
    rows = [f.result() for f in futures]
    pids = {pid for pid, _ in rows}
    print(f"pool: {len(pids)} distinct processes reported; all ready {max(p['done_at'] for _, p in rows if p) - start:.2f} s after start")
    for pid, p in sorted(rows)[:WORKERS]:
        if p: print(f"  pid {pid}: target {p['target']:.2f} s, first compile {p['first_compile']:.2f} s, ready at {p['done_at']-start:.2f} s")
    pool.shutdown()

if __name__ == "__main__":
    main()
