# Ran on 3ecf83a, nvidia-h200 x2 host, 2026-12-01, from the repository root (wall 54 s under the profiler):
#   TRITON_CACHE_DIR=/tmp/tcp OUT=... python3 profile_run_2026-12-01.py run --gpu H200 --model Qwen3-30B-A3B \
#       --baseline-configs scripts/anchor_configs --devices 0,1 --out-dir /tmp/prof --no-progress
# Summary of its two stats files: profile_2gpu_2026-12-01.txt
"""moetune's CLI with each --devices worker (or the single process) under cProfile; stats to $OUT."""
import cProfile, os, sys
import moetune.workers as w
out = os.environ["OUT"]
orig = w._work
def _work(settings, write_tables, compiler=None):
    prof = cProfile.Profile(); prof.enable()
    try:
        orig(settings, write_tables, compiler)
    finally:
        prof.disable(); prof.dump_stats(f"{out}/prof_{settings.label.replace(' ', '')}.prof")
w._work = _work
from moetune.cli import main
if "--devices" in sys.argv and "," not in sys.argv[sys.argv.index("--devices") + 1]:
    prof = cProfile.Profile(); prof.enable()
    try:
        code = main(sys.argv[1:])
    finally:
        prof.disable(); prof.dump_stats(f"{out}/prof_single.prof")
    sys.exit(code)
sys.exit(main(sys.argv[1:]))
