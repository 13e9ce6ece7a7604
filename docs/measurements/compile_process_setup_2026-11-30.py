# Ran on the tree before d1fce22 (it uses _FIRST_REQUEST, which that commit removed); output in the .log beside it.
"""Set-up of N compile processes at once: with CUDA for the target, or with the target given."""
import os, sys, time, multiprocessing
import torch
import moetune.tune as tm
N = int(sys.argv[1]); MODE = sys.argv[2]

def job(q):
    t0 = time.perf_counter()
    from triton.runtime import driver
    active = driver.active
    active.get_current_stream  # creates the driver object
    t1 = time.perf_counter()
    if MODE == "given":
        from triton.backends.compiler import GPUTarget
        active.get_current_target = lambda: GPUTarget("cuda", 90, 32)
        active.get_current_device = lambda: 0
        active.get_current_stream = lambda device=None: 0
    else:
        active.get_current_target()
    t2 = time.perf_counter()
    tm._compile_job(tm._FIRST_REQUEST, tm._FIRST_CONFIG)
    t3 = time.perf_counter()
    q.put((t1 - t0, t2 - t1, t3 - t2, time.time()))

if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    start = time.time()
    ps = [ctx.Process(target=job, args=(q,)) for _ in range(N)]
    for p in ps: p.start()
    rows = [q.get() for _ in ps]
    for p in ps: p.join()
    import statistics as st
    print(f"{MODE} N={N}: driver {st.median(r[0] for r in rows):.2f} s, target {st.median(r[1] for r in rows):.2f} s, "
          f"compile {st.median(r[2] for r in rows):.2f} s (median); all done {max(r[3] for r in rows) - start:.2f} s after fork")
    # does the main process, with CUDA, find the binary compiled without it?
    t = time.perf_counter(); tm._compile_job(tm._FIRST_REQUEST, tm._FIRST_CONFIG); print(f"main compile of the same after: {time.perf_counter() - t:.2f} s")
    smi = os.popen("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader").read().strip().splitlines()
    print(f"compute apps now: {len(smi)}")
