"""`moetune run` on the interpreter: the table, reruns, the correctness gate, compiling ahead.

Most tunes here take made-up timings (conftest.replace_timings): what they cost is their
correctness checks. The end-to-end runs (marked e2e) run the command as it is.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moetune.cli import build_parser, main
from moetune.cli.run import build_settings
from moetune.tables import read_table
from moetune.tune import tune
from moetune.tune.inputs import BatchBench
from moetune.types import Role
from tests.tune.conftest import (JOURNAL, QUIET, TABLE, TINY, measured_configs, record_walk, replace_timings,
                                 studies_in)

# One test worker runs the whole module: the module's tuned tables are built once.
pytestmark = pytest.mark.xdist_group("tune-run")

ENV = dict(os.environ, TRITON_INTERPRET="1")


def run_cli(*args: str) -> tuple[int, str]:
    """`moetune run` in this process: (exit code, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", *args, *QUIET])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tune of two batch sizes and both variants, shared by the tests that read or rerun it
    (each on a copy): (its out-dir, what it printed, its record_walk events)."""
    out_dir = tmp_path_factory.mktemp("tuned")
    with pytest.MonkeyPatch.context() as patch:
        replace_timings(patch)
        events = record_walk(patch)
        code, output = run_cli(*TINY, "--batch-sizes", "1,8", "--trials", "2", "--out-dir", str(out_dir))
    assert code == 0, output
    return out_dir, output, events


@pytest.fixture
def tuned_copy(tuned, tmp_path):
    shutil.copytree(tuned[0], tmp_path / "tables")
    return tmp_path / "tables"


def test_a_tune_writes_a_valid_table_and_says_what_it_found(tuned):
    out_dir, output, _ = tuned
    table = read_table(out_dir / "cpu" / TABLE)  # validates the schema
    assert sorted(table["batch_sizes"]) == [1, 8]
    for entry in table["batch_sizes"].values():
        assert set(entry) == {"unfused", "fused", "winner"}
        assert entry["winner"] == min(("unfused", "fused"), key=lambda v: entry[v]["layer_us"])
    assert table["device"]["key"] == "cpu" and table["shape"]["dtype"] == "fp16"
    assert table["search"]["trials"] == 2
    assert "mean nothing" in output  # interpreter timings are labelled as such
    assert "winner" in output and "speedup" in output  # the summary table
    assert output.splitlines()[-1] == f"wrote {out_dir / 'cpu' / TABLE}"
    studies = studies_in(str(out_dir / "cpu" / JOURNAL))
    assert len(studies) == 2 * 3  # (batch size) x (gemm1, gemm2_unfused, gemm2_fused)
    for trials in studies.values():
        assert len(measured_configs(trials)) == 2


def test_alone_the_walk_ascends_and_leaves_the_batch_size_just_tuned_for_the_next_one_s_idle_moments(tuned):
    """Alone, M=1 is written only after M=8's trials (in whose idle moments it would have
    been, had there been compile processes to wait for)."""
    trials = [("trial", role, M) for M in (1, 8) for role in Role for _ in range(2)]
    assert tuned[2] == [*trials, ("write", 1), ("write", 8)]


def test_a_rerun_with_nothing_left_to_do_does_nothing(tuned_copy, monkeypatch):
    """No trial, no input built, no layer timed: the table keeps its bytes and its time."""
    table, journal = tuned_copy / "cpu" / TABLE, str(tuned_copy / "cpu" / JOURNAL)
    before = (table.read_bytes(), table.stat().st_mtime_ns, {n: len(t) for n, t in studies_in(journal).items()})

    def no_work(*args, **kwargs):
        raise AssertionError("a rerun with nothing left to do built a batch size's inputs")

    monkeypatch.setattr(BatchBench, "__post_init__", no_work)
    code, output = run_cli(*TINY, "--batch-sizes", "1,8", "--trials", "2", "--out-dir", str(tuned_copy))
    assert code == 0
    assert "nothing left to do" in output and "wrote" not in output
    assert "winner" in output  # the entries it found, summed up
    assert (table.read_bytes(), table.stat().st_mtime_ns, {n: len(t) for n, t in studies_in(journal).items()}) == before


def test_retime_chooses_the_pairs_again_and_runs_no_trial(tuned_copy, monkeypatch):
    replace_timings(monkeypatch)
    checks = []
    real_check = BatchBench.check_layer
    monkeypatch.setattr(BatchBench, "check_layer", lambda self, *layer: checks.append(self.M) or real_check(self, *layer))
    journal = str(tuned_copy / "cpu" / JOURNAL)
    trials = {name: len(t) for name, t in studies_in(journal).items()}
    code, output = run_cli(*TINY, "--batch-sizes", "1,8", "--trials", "2", "--out-dir", str(tuned_copy), "--retime")
    assert code == 0 and f"wrote {tuned_copy / 'cpu' / TABLE}" in output
    assert sorted(set(checks)) == [1, 8]  # each batch size's chosen pairs checked again
    assert {name: len(t) for name, t in studies_in(journal).items()} == trials
    # What --retime wrote is the entry a rerun then keeps.
    code, output = run_cli(*TINY, "--batch-sizes", "1,8", "--trials", "2", "--out-dir", str(tuned_copy))
    assert code == 0 and "nothing left to do" in output


def test_a_rerun_with_another_batch_size_tunes_only_that_one(tuned_copy, monkeypatch):
    replace_timings(monkeypatch)
    journal = str(tuned_copy / "cpu" / JOURNAL)
    before = {name: measured_configs(trials) for name, trials in studies_in(journal).items()}
    old = read_table(tuned_copy / "cpu" / TABLE)["batch_sizes"]
    code, _ = run_cli(*TINY, "--batch-sizes", "1,4,8", "--trials", "2", "--variants", "unfused",
                      "--out-dir", str(tuned_copy))
    assert code == 0
    after = studies_in(journal)
    for name, configs in before.items():
        assert measured_configs(after[name]) == configs  # finished studies were not run again
    table = read_table(tuned_copy / "cpu" / TABLE)["batch_sizes"]
    assert sorted(table) == [1, 4, 8]
    assert table[1] == old[1] and table[8] == old[8]  # written before, from the same studies: kept
    assert set(table[4]) == {"unfused", "winner"}


def test_a_config_computing_wrong_results_is_rejected(tmp_path, monkeypatch, made_up_timings):
    """A config whose GEMM 2 output is off never wins, and its trial says why."""
    import importlib

    import moetune.tune.inputs as inputs

    experts = importlib.import_module("moetune.kernels.experts")  # where the layer launches its GEMMs
    real = experts.grouped_gemm

    def corrupting(a, weights, out, aligned, config, **kwargs):
        result = real(a, weights, out, aligned, config, **kwargs)
        if config["BLOCK_SIZE_N"] == 32 and kwargs.get("topk_weights") is not None:
            out.mul_(1.5)  # a GEMM 2 that computes the wrong thing
        return result

    monkeypatch.setattr(experts, "grouped_gemm", corrupting)
    monkeypatch.setattr(inputs, "grouped_gemm", corrupting)
    space = tmp_path / "space.yaml"
    space.write_text("BLOCK_SIZE_M: [16]\nBLOCK_SIZE_N: [32, 64]\nBLOCK_SIZE_K: [32]\nGROUP_SIZE_M: [1]\n"
                     "num_warps: [4]\nnum_stages: [2]\n")
    code, _ = run_cli(*TINY, "--batch-sizes", "4", "--trials", "2", "--space", str(space), "--out-dir", str(tmp_path))
    assert code == 0
    table = read_table(tmp_path / "cpu" / TABLE)
    for variant in ("unfused", "fused"):
        assert table["batch_sizes"][4][variant]["gemm2"]["BLOCK_SIZE_N"] == 64
    trials = studies_in(str(tmp_path / "cpu" / JOURNAL))
    rejected = [t for name, ts in trials.items() if "gemm2" in name for t in ts
                if t.user_attrs.get("status") == "wrong_result"]
    assert len(rejected) == 2 and all(t.params["BLOCK_SIZE_N"] == 32 for t in rejected)
    assert all("relative error" in t.user_attrs["reason"] for t in rejected)
    json.dumps([t.user_attrs for t in rejected])  # reasons are plain data


# -- compiling ahead, through tune() with compile slots on threads -----------------------------

def test_while_trials_compile_the_tuner_prepares_batch_sizes_and_asks_the_next_study_ahead(tmp_path, monkeypatch,
                                                                                       made_up_timings, held_compiler):
    args = build_parser().parse_args(["run", *TINY, "--trials", "1", "--batch-sizes", "8,16", "--variants", "unfused",
                                      *QUIET, "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    compiler = held_compiler(2, settings)
    events = compiler.events
    real_init, real_load, real_check = BatchBench.__post_init__, BatchBench.load_kernels, BatchBench.check_and_time_role
    monkeypatch.setattr(BatchBench, "__post_init__", lambda self: events.append(("built", self.M)) or real_init(self))
    monkeypatch.setattr(BatchBench, "load_kernels",
                        lambda self, sizes: events.append(("loaded", self.M)) or real_load(self, sizes))
    monkeypatch.setattr(BatchBench, "check_and_time_role",
                        lambda self, role, *rest: events.append(("trial", role, self.M)) or real_check(self, role, *rest))
    assert tune(settings, log=lambda line: None, compiler=compiler) == [tmp_path / "cpu" / TABLE]

    g1, g2 = Role.GEMM1, Role.GEMM2_UNFUSED
    assert events[:events.index(("trial", g2, 16)) + 1] == [
        # The batch size's first visit: its helper kernels and the roles' default configs.
        ("helpers", 8), ("default", g1, 8), ("default", g2, 8),
        # GEMM 1 has given out its one trial: the second slot takes GEMM 2's first.
        ("compile", g1, 8), ("compile", g2, 8),
        # While they compile: the batch size's inputs, then the kernels its checks run.
        ("built", 8), ("loaded", 8), ("wait", g1, 8), ("trial", g1, 8),
        # GEMM 2's trial still compiles: the next batch size's first study asks ahead, and
        # that batch size is prepared meanwhile.
        ("helpers", 16), ("default", g1, 16), ("default", g2, 16), ("compile", g1, 16),
        ("built", 16), ("loaded", 16), ("wait", g2, 8), ("trial", g2, 8),
        ("compile", g2, 16), ("wait", g1, 16), ("trial", g1, 16), ("wait", g2, 16), ("trial", g2, 16),
    ]


def test_a_slow_compile_holds_up_no_trial_compiled_after_it(tmp_path, monkeypatch, made_up_timings, held_compiler):
    args = build_parser().parse_args(["run", *TINY, "--trials", "2", "--batch-sizes", "8", "--variants", "unfused",
                                      *QUIET, "--out-dir", str(tmp_path)])
    settings, _ = build_settings(args)
    compiler = held_compiler(2, settings, last_first=True)  # each wait finishes the trial asked last
    checked = []
    real_check = BatchBench.check_and_time_role
    monkeypatch.setattr(BatchBench, "check_and_time_role",
                        lambda self, role, config, *rest: checked.append(config) or real_check(self, role, config, *rest))
    tune(settings, log=lambda line: None, compiler=compiler)
    first, second = compiler.configs[:2]  # GEMM 1's two trials, asked together
    assert checked[:2] == [second, first]


# -- end to end --------------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_command_ends_with_its_exit_code_and_all_its_output(tmp_path):
    """It leaves without the interpreter's teardown: what it printed into a pipe still arrives."""
    command = [sys.executable, "-m", "moetune", "run", *TINY, "--batch-sizes", "4", "--trials", "1",
               "--variants", "unfused", "--out-dir", str(tmp_path), *QUIET]
    # Buffered output, as Python buffers a pipe unless told otherwise.
    env = {name: value for name, value in ENV.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0].startswith("tuning ")
    assert result.stdout.splitlines()[-1] == f"wrote {tmp_path / 'cpu' / TABLE}"
    assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [4]
    refused = subprocess.run([*command[:4], "--E", "4", "--topk", "9"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2
    assert refused.stderr == "moetune: error: --E (4) must be at least --topk (9)\n"


@pytest.mark.e2e
def test_a_killed_run_resumes_without_repeating_finished_trials(tmp_path, made_up_timings):
    # Heartbeats every second: the killed run's trial is stale after 3 s, and retried.
    args = [*TINY, "--batch-sizes", "4", "--trials", "3", "--variants", "unfused", "--heartbeat", "1",
            "--out-dir", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "-m", "moetune", "run", *args, *QUIET], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "cpu" / JOURNAL
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        if journal.exists() and any(measured_configs(t) for t in studies_in(str(journal)).values()):
            break
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = {name: measured_configs(trials) for name, trials in studies_in(str(journal)).items()}
    assert sum(map(len, first.values())) >= 1
    assert not (tmp_path / "cpu" / TABLE).exists()

    code, _ = run_cli(*args)
    assert code == 0
    second = studies_in(str(journal))
    for name, configs in first.items():
        resumed = measured_configs(second[name])
        assert resumed[:len(configs)] == configs  # what finished is kept, in order
        assert len(resumed) == 3  # and topped up to the budget, not re-run from scratch
        assert len(set(resumed)) == len(resumed)  # no config measured twice
    assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [4]
