# Ran on 1594406, one H200 with 16 CPU cores (so 16 compile processes by default), 2026-12-01, from the repository root:
#   for i in 1 2; do for nice in 5 19; do TRITON_CACHE_DIR=/tmp/tc_nice${nice}_$i NICE=$nice /usr/bin/time -f "wall %e s" \
#       python3 compile_niceness_2026-12-01.py run --gpu H200 --model Qwen3-30B-A3B --baseline-configs scripts/anchor_configs \
#       --out-dir /tmp/o_nice${nice}_$i --no-progress; done; done
# Wall: 88.40 s, 82.56 s at niceness 5; 82.89 s, 82.80 s at 19. The tuner waited for a core 0.18, 0.10 s (5) and 0.06, 0.05 s (19).
"""`moetune run` with the compile processes at niceness $NICE; prints the tuner's own CPU
time and its time spent runnable but waiting for a core (/proc/self/schedstat)."""
import os, sys, time
nice = int(os.environ.get("NICE", "5"))
import moetune.tune as tune
tune.COMPILE_NICENESS = nice
from moetune.cli import main
t0 = time.monotonic()
code = main(sys.argv[1:])
wall = time.monotonic() - t0
run, wait, slices = open("/proc/self/schedstat").read().split()
print(f"PROBE nice={nice} main_wall={wall:.2f} tuner_cpu={int(run)/1e9:.2f} tuner_waiting_for_core={int(wait)/1e9:.2f} slices={slices}", flush=True)
os._exit(code)
