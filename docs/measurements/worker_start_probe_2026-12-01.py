# Ran on 1594406 with one change tried and not kept (forked workers left CUDA to its first use: the
# `_set_cuda_up()` call in workers._wait_for_work removed), on one H200 with 16 CPU cores, 2026-12-01,
# from the repository root, each run with an empty Triton cache,
# in the order lazy_1, eager_1, lazy_2, eager_2, ... lazy_4, eager_4:
#   export STARTED=$(date +%s.%N); MODE=$mode TRITON_CACHE_DIR=/tmp/tc_${mode}_$i timeout 150 python3 worker_start_probe_2026-12-01.py \
#       run --gpu H200 --model Qwen3-30B-A3B --baseline-configs scripts/anchor_configs --batch-sizes 1,16384 \
#       --devices 0,1 --out-dir /tmp/o_${mode}_$i --no-progress
# Two forked workers (8 compile processes each), both patched onto GPU 0. Seconds since STARTED:
#   eager (CUDA set up before the settings come, as in main): fork -> CUDA set-up begins 0.37-0.46 s (the compile
#   processes starting), CUDA set-up 0.04-0.05 s, settings sent -> storage opened 0.22-0.26 s.
#   lazy (CUDA left to its first use): settings sent -> storage opened 0.41-0.50 s; the first worker set CUDA up
#   in 0.02 s, from the first idle moment (_prepare).
# In every run the second worker on the shared GPU stalled: under lazy until the first had finished, under eager
# in its CUDA set-up until the 150 s limit. So only the first worker of each run is read here, and the lazy
# runs had the second worker compiling beside the first; the change was not kept.
"""Start of a two-worker run on one GPU: when each worker asks, sets CUDA up, finishes its
first trial. MODE=eager sets CUDA up before the settings come, as 1594406 does; MODE=lazy leaves
it to the code tried."""
import functools, os, sys, time, traceback
T0 = float(os.environ["STARTED"])
MODE = os.environ.get("MODE", "lazy")
def say(what):
    print(f"TRACE {os.getpid()} {time.time() - T0:7.2f} {what}", file=sys.stderr, flush=True)
say("python up")
import torch
import moetune.tune as tune
import moetune.workers as workers
import moetune.tune_cli as tune_cli
say("imported")

tune_cli.parse_devices = lambda text: [0, 1]   # slots 0 and 1 ...
workers.visible_device = lambda index: "0"      # ... both on GPU 0
_device_of = workers.device_of
tune_cli.device_of = lambda devices: _device_of([0])

if MODE == "eager":
    original_compiler_for = tune.compiler_for
    def compiler_for(workers_, gpu):
        compiler = original_compiler_for(workers_, gpu)
        if gpu and torch.multiprocessing.current_process().name == "moetune worker":
            say("eager cuda begin"); torch.cuda.init(); say("eager cuda end")
        return compiler
    tune.compiler_for = compiler_for

original_lazy = torch.cuda._lazy_init
def lazy_init():
    if not torch.cuda.is_initialized() and torch.multiprocessing.current_process().name == "moetune worker":
        where = [f"{f.name}" for f in traceback.extract_stack()[-8:-1]]
        say("cuda init begin from " + ">".join(where))
        original_lazy()
        say("cuda init end")
    else:
        original_lazy()
torch.cuda._lazy_init = lazy_init

def traced(owner, name, label):
    original = getattr(owner, name)
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        say(f"{label(*args, **kwargs)} begin")
        try:
            return original(*args, **kwargs)
        finally:
            say(f"{label(*args, **kwargs)} end")
    setattr(owner, name, wrapper)

traced(tune, "_checked_storage", lambda settings: "storage")
traced(tune_cli, "build_settings", lambda args: "build_settings")
traced(workers, "run_workers", lambda *a, **k: "run_workers")
first = {"ask": False, "eval": False}
orig_ask = tune.RoleStudy._ask
def _ask(self):
    if not first["ask"]:
        first["ask"] = True; say(f"first ask M={self.M} {self.role}")
    return orig_ask(self)
tune.RoleStudy._ask = _ask
orig_eval = tune.RoleStudy._evaluate
def _evaluate(self, *a):
    r = orig_eval(self, *a)
    if not first["eval"]:
        first["eval"] = True; say(f"first done M={self.M} {self.role}")
    return r
tune.RoleStudy._evaluate = _evaluate
from moetune.cli import main
code = main(sys.argv[1:])
say("main returned")
sys.stdout.flush()
os._exit(code)
