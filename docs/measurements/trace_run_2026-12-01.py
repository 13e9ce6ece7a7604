# Ran on 3ecf83a, nvidia-h200 x2 host, 2026-12-01, from the repository root, each with an empty Triton cache:
#   export STARTED=$(date +%s.%N); TRITON_CACHE_DIR=/tmp/tc_$n python3 trace_run_2026-12-01.py run --gpu H200 --model Qwen3-30B-A3B \
#       --baseline-configs scripts/anchor_configs --devices $d --out-dir /tmp/tr_$n --no-progress
# for d = 0,1 then 0. Wall (python start to exit): 48.66 s on two GPUs, 90.50 s on one.
"""moetune's CLI with timestamps (s since STARTED, epoch) of the steps that bound the wall time."""
import functools, os, sys, time
T0 = float(os.environ["STARTED"])
def say(what):
    print(f"TRACE {os.getpid()} {time.time() - T0:7.2f} {what}", file=sys.stderr, flush=True)
say("python up")
import moetune.tune as tune
import moetune.workers as workers
import moetune.tune_cli as tune_cli
say("imported")

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

traced(tune.TuningRun, "_write", lambda self, shape, M: f"write M={M}")
traced(tune.TuningRun, "_walk", lambda self: "walk")
traced(tune.TuningRun, "_wait_for_others", lambda self: "wait_for_others")
traced(tune.TuningRun, "close", lambda self: "close")
traced(tune, "_checked_storage", lambda settings: "storage")
traced(tune_cli, "build_settings", lambda args: "build_settings")
traced(workers, "run_workers", lambda *a, **k: "run_workers")
traced(tune.Compiler, "close", lambda self: "compiler close")
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
orig_visit = tune.TuningRun._visit
def _visit(self, shape, M, role, left):
    key = (tune._shape_key(shape), M, role)
    if key not in self.visited:
        say(f"visit M={M} {role}")
    return orig_visit(self, shape, M, role, left)
tune.TuningRun._visit = _visit
from moetune.cli import main
code = main(sys.argv[1:])
say("main returned")
sys.exit(code)
