"""Several processes sharing the studies: `run --devices`, `run --worker`, `collect`.

Without a GPU each "device" is one more process running the interpreter, so these tests go
through the same code as a multi-GPU run. Forked workers inherit the made-up timings.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch

import moetune.tune.workers as workers
from moetune.cli import main
from moetune.device import fork_is_safe
from moetune.tables import read_table
from moetune.tune.storage import database_url, open_storage
from moetune.tune.study import is_held
from tests.tune.conftest import JOURNAL, QUIET, TABLE, TINY, counted, studies_in

ROLES = ("gemm1", "gemm2_unfused")
RUN = [*TINY, "--batch-sizes", "1,8", "--trials", "1", "--variants", "unfused", *QUIET]


def check_shared_studies(studies: dict[str, list], trials: int, workers: int, batch_sizes: int = 2) -> set[int]:
    """Every study met its budget (two processes asking at the very same instant may add one
    trial each, as documented), nothing is left running, no config was measured twice, and
    each trial was run by one process. Returns the pids that ran trials."""
    assert len(studies) == batch_sizes * len(ROLES)
    pids = set()
    for name, study_trials in studies.items():
        done = counted(study_trials)
        assert trials <= len(done) <= trials + workers - 1, (name, len(done))
        assert not [t for t in study_trials if t.state.name == "RUNNING"], name
        measured = [tuple(sorted(t.params.items())) for t in done if t.user_attrs["status"] == "measured"]
        assert len(set(measured)) == len(measured), name
        assert len({t.number for t in study_trials}) == len(study_trials)
        for trial in done:
            pids.add(trial.user_attrs["worker"]["pid"])
            assert trial.user_attrs["worker"]["trial"] == trial.number
    return pids


def check_table(path, batch_sizes=(1, 8)) -> None:
    table = read_table(path)  # validates the schema
    assert sorted(table["batch_sizes"]) == list(batch_sizes)
    for entry in table["batch_sizes"].values():
        assert entry["winner"] == "unfused"


# -- the real code path, end to end ----------------------------------------------------------

def test_two_devices_share_the_studies_and_the_first_writes_the_table(tmp_path, monkeypatch, capfd, single_threaded,
                                                                       made_up_timings):
    """The workers are forked with the parent's imports, each walks from its own end of the
    batch sizes, and no process asks CUDA anything on a machine without a GPU."""
    def no_cuda(*args):
        raise AssertionError("asked CUDA")

    for name in ("is_available", "device_count", "current_device", "init", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)  # the forked workers see it too
    started = []
    real_start = workers.ForkedWorkers.start
    monkeypatch.setattr(workers.ForkedWorkers, "start", lambda self, jobs: started.append(jobs) or real_start(self, jobs))
    assert main(["run", *RUN, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # the workers' output too: they write to the same descriptor
    assert "2 workers" in out
    assert [writes for _, writes in started[0]] == [True, False]
    assert f"[cpu worker 0] wrote {tmp_path / 'cpu' / TABLE}" in out
    assert "[cpu worker 1] wrote" not in out and "did not finish" not in out
    studies = studies_in(str(tmp_path / "cpu" / JOURNAL))
    pids = check_shared_studies(studies, trials=1, workers=2)
    assert len(pids) == 2 and os.getpid() not in pids  # both workers ran trials; the parent none
    # Each started at its own end of the batch sizes (walk.py): the writer at the largest.
    first = {}
    for name, trials in sorted(studies.items()):
        for trial in trials:
            if "worker" not in trial.user_attrs:
                continue  # a queued warm start nobody needed: never run
            device = trial.user_attrs["worker"]["device"]
            if device not in first or trial.datetime_start < first[device][0]:
                first[device] = (trial.datetime_start, name.rsplit("/M=", 1)[1])
    assert {device: M for device, (_, M) in first.items()} == {"cpu worker 0": "8", "cpu worker 1": "1"}
    check_table(tmp_path / "cpu" / TABLE)
    # Run again: every worker finds nothing left to do.
    assert main(["run", *RUN, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    assert capfd.readouterr().out.count("nothing left to do") == 2


def test_the_parent_writes_the_table_when_the_first_worker_does_not(tmp_path, monkeypatch, capsys, made_up_timings):
    real = workers.run_workers
    # As if the writer had died: the workers run trials only and report no writer.
    monkeypatch.setattr(workers, "run_workers",
                        lambda settings, devices, first_writes, forked: real(settings, devices, first_writes=False,
                                                                             forked=forked))
    run = [*TINY, "--batch-sizes", "1", "--trials", "1", "--variants", "unfused", *QUIET]
    assert main(["run", *run, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "did not finish: writing the tables from the studies here" in out
    assert f"wrote {tmp_path / 'cpu' / TABLE}" in out
    check_table(tmp_path / "cpu" / TABLE, batch_sizes=[1])


def start_worker(out_dir, storage: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "moetune", "run", *TINY, "--batch-sizes", "1", "--trials", "3",
               "--variants", "unfused", *QUIET, "--worker", "--out-dir", str(out_dir), "--storage", storage, *extra]
    return subprocess.Popen(command, env=dict(os.environ, TRITON_INTERPRET="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"worker still running after {timeout} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


def postgres_url() -> str:
    url = os.environ.get("MOETUNE_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("MOETUNE_TEST_POSTGRES_URL is unset: .ci/run starts PostgreSQL and sets it")
        pytest.skip("MOETUNE_TEST_POSTGRES_URL is unset (.ci/run starts a PostgreSQL server and sets it)")
    return url


@pytest.mark.e2e
@pytest.mark.xdist_group("faults")  # tests/test_faults.py restarts the server: never beside it
def test_workers_share_postgres_and_collect_writes_the_table(tmp_path, capsys, made_up_timings):
    url = postgres_url()
    storage = optuna.storages.RDBStorage(database_url(url))
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if "E=4,N=32,K=64,topk=2/" in summary.study_name:  # left by an earlier run of this test
            optuna.delete_study(study_name=summary.study_name, storage=storage)
    processes = [start_worker(tmp_path, url) for _ in range(2)]
    outputs = [finish(process, timeout=150) for process in processes]
    assert all("no table written" in output for output in outputs)
    assert not (tmp_path / "cpu").exists()  # workers write no table
    pids = check_shared_studies(studies_in(url), trials=3, workers=2, batch_sizes=1)
    assert pids == {process.pid for process in processes}

    assert main(["collect", *TINY, "--batch-sizes", "1", "--trials", "3", "--variants", "unfused", "--storage", url,
                 "--out-dir", str(tmp_path)]) == 0
    check_table(tmp_path / "cpu" / TABLE, batch_sizes=[1])
    assert "wrote" in capsys.readouterr().out


def kill_mid_trial(journal: str, device: str, killed: list) -> None:
    """Stop the worker of `device` while it holds a trial, then kill it; `killed` gets the
    (study, trial number) it left RUNNING."""
    deadline = time.monotonic() + 60
    while not killed and time.monotonic() < deadline:
        time.sleep(0.05)
        if not os.path.exists(journal):
            continue

        def held() -> list:
            return [(name, t.number, t.user_attrs["worker"]["pid"]) for name, trials in studies_in(journal).items()
                    for t in trials if is_held(t) and t.user_attrs["worker"]["device"] == device]

        if held():
            pid = held()[0][2]
            os.kill(pid, signal.SIGSTOP)  # hold it still: is it still mid-trial?
            left = held()
            if left:
                killed.extend((name, number) for name, number, _ in left)
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGCONT)


def test_a_killed_worker_does_not_stall_the_others(tmp_path, monkeypatch, capfd, single_threaded, made_up_timings):
    """Its RUNNING trial is failed once its heartbeat stops and its config queued again, once;
    every study still meets its budget and the writer writes the table."""
    journal = str(tmp_path / "cpu" / JOURNAL)
    killed = []
    killer = threading.Thread(target=kill_mid_trial, args=(journal, "cpu worker 1", killed))
    real_start = workers.ForkedWorkers.start
    # Once the workers are forked (another thread alive, nothing forks).
    monkeypatch.setattr(workers.ForkedWorkers, "start", lambda self, jobs: killer.start() or real_start(self, jobs))
    # Heartbeats every second: a silent trial is stale after 3 s.
    run = [*TINY, "--batch-sizes", "1,8", "--trials", "3", "--variants", "unfused", "--heartbeat", "1", *QUIET]
    assert main(["run", *run, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    killer.join()
    assert killed, "the victim never held a trial while running"
    assert "cpu worker 1: worker exited with code -9" in capfd.readouterr().out
    studies = studies_in(journal)
    for name, number in killed:
        trial = studies[name][number]
        assert trial.state.name == "FAIL"  # its heartbeat stopped: failed as stale ...
        retried = [t for t in studies[name] if t.system_attrs.get("failed_trial") == number]
        assert len(retried) == 1  # ... and its config queued again, once
        assert retried[0].params == trial.params
        assert retried[0].state.name != "RUNNING"
    check_shared_studies(studies, trials=3, workers=2)
    check_table(tmp_path / "cpu" / TABLE)


@pytest.mark.e2e
def test_a_worker_forked_after_cuda_was_initialized_starts_afresh(tmp_path, monkeypatch, capfd, single_threaded):
    """CUDA refuses a child forked after its parent initialized it: the child then spawns a
    fresh process for its work (this test makes the first child to ask think so)."""
    asked = multiprocessing.get_context("fork").Value("i", 0)

    def forked_after_cuda() -> bool:
        with asked.get_lock():
            asked.value += 1
            return asked.value == 1

    monkeypatch.setattr(workers, "forked_after_cuda", forked_after_cuda)
    run = [*TINY, "--batch-sizes", "1", "--trials", "1", "--variants", "unfused", *QUIET]
    assert main(["run", *run, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert out.count("starting a fresh process") == 1 and "[cpu worker 0] wrote" in out
    check_table(tmp_path / "cpu" / TABLE, batch_sizes=[1])


# -- the parts, quickly --------------------------------------------------------------------

def make_foreign_study(location: str, name: str, **attrs) -> None:
    study = optuna.create_study(storage=open_storage(location).storage, study_name=name)
    for key, value in attrs.items():
        study.set_user_attr(key, value)


@pytest.mark.parametrize("name,attrs,words", [
    ("cpu/E=4,N=32,K=64,topk=2/fp16/gemm1/M=1", {"device": "NVIDIA H200"}, ["NVIDIA H200", "'cpu'"]),
    ("NVIDIA_H200/E=4,N=32,K=64,topk=2/fp16/gemm2_unfused/M=8", {"device": "NVIDIA H200"}, ["NVIDIA H200"]),
    ("NVIDIA_H100/E=4,N=32,K=64,topk=2/fp16/gemm1/M=8", {}, ["NVIDIA_H100"]),
    ("cpu/E=4,N=32,K=64,topk=2/fp16/gemm1/M=1", {"device": "cpu", "heartbeat_s": 30}, ["--heartbeat"]),
])
@pytest.mark.parametrize("command", ["run", "collect"])
def test_studies_of_another_gpu_are_refused_in_one_line(tmp_path, capsys, name, attrs, words, command):
    journal = str(tmp_path / "studies.journal")
    make_foreign_study(journal, name, **attrs)
    extra = ["--worker", *QUIET] if command == "run" else []
    args = [command, *TINY, "--batch-sizes", "1,8", "--trials", "3", "--variants", "unfused", "--storage", journal,
            "--out-dir", str(tmp_path / "tables"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetune: error:") and err.count("\n") == 1
    assert all(word in err for word in words), err
    assert len(studies_in(journal)) == 1 and not studies_in(journal)[name]  # nothing was tuned
    assert not (tmp_path / "tables").exists()


def test_collect_refuses_missing_and_short_studies_and_writes_nothing_then(tmp_path, capsys, made_up_timings):
    journal = tmp_path / "studies.journal"

    def collect_of(batch_sizes: str) -> list[str]:
        return ["collect", *TINY, "--batch-sizes", batch_sizes, "--variants", "unfused", "--storage", str(journal),
                "--out-dir", str(tmp_path / "tables")]

    collect = collect_of("1")
    assert main([*collect, "--trials", "1"]) == 2
    assert "holds no studies" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []  # no journal, no folder

    assert main(["run", *TINY, "--batch-sizes", "1", "--trials", "1", "--variants", "unfused", "--worker", *QUIET,
                 "--storage", str(journal), "--out-dir", str(tmp_path / "tables")]) == 0
    assert not (tmp_path / "tables").exists()
    assert main([*collect_of("1,8"), "--trials", "1"]) == 2
    assert "no study" in capsys.readouterr().err
    assert main([*collect, "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 trials" in err and "--allow-incomplete" in err and err.count("\n") == 1
    assert not (tmp_path / "tables").exists()
    assert main([*collect, "--trials", "2", "--allow-incomplete"]) == 0
    assert sorted(read_table(tmp_path / "tables" / "cpu" / TABLE)["batch_sizes"]) == [1]
    capsys.readouterr()
    assert main([*collect, "--trials", "2", "--allow-incomplete"]) == 0  # again: nothing to write
    assert "nothing left to do" in capsys.readouterr().out


def test_workers_forked_before_a_refusal_exit_with_the_run(tmp_path, monkeypatch, capsys, single_threaded):
    """The workers start before the parent checks its input; a refused run takes them down."""
    forked = []
    real = workers.ForkedWorkers.__init__
    monkeypatch.setattr(workers.ForkedWorkers, "__init__",
                        lambda self, visible, *rest: forked.append(len(visible)) or real(self, visible, *rest))
    assert main(["run", *RUN, "--devices", "0,1", "--trials", "0", "--out-dir", str(tmp_path / "tables")]) == 2
    assert forked == [2]
    assert "--trials" in capsys.readouterr().err
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "tables").exists()


def test_workers_are_forked_only_without_other_threads(single_threaded):
    assert fork_is_safe()
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert not fork_is_safe()  # it might hold a lock the children inherit
    finally:
        release.set()
        other.join()


def test_the_interpreter_workers_are_labelled_as_processes(tmp_path, monkeypatch, capsys):
    """On a CPU, --devices only says how many interpreter processes to run."""
    import moetune.tune as tune

    seen = {}
    monkeypatch.setattr(workers, "run_workers",
                        lambda settings, devices, first_writes, forked: seen.update(devices=devices, writes=first_writes))
    monkeypatch.setattr(tune, "collect", lambda settings, allow_incomplete: [])
    assert main(["run", *RUN, "--devices", "3,5,7", "--out-dir", str(tmp_path)]) == 0
    assert seen == {"devices": [3, 5, 7], "writes": True}
    assert "3 workers (interpreter processes 3,5,7)" in capsys.readouterr().out


def test_forked_workers_start_their_compile_processes_then_cuda_before_their_settings_come(tmp_path, monkeypatch,
                                                                                 single_threaded):
    """So that the compile processes and CUDA set up while the parent checks the run."""
    import moetune.tune.compile_pool as compile_pool

    def compiler_for(compile_workers, gpu):  # runs in each forked worker
        (tmp_path / f"{os.getpid()}.started").write_text(f"{compile_workers} {gpu} {os.environ.get('CUDA_VISIBLE_DEVICES')}")
        return compile_pool.Compiler(0)

    def set_cuda_up():  # then CUDA, also before the settings
        assert (tmp_path / f"{os.getpid()}.started").exists(), "CUDA set up before the compile processes forked"
        (tmp_path / f"{os.getpid()}.cuda").write_text(os.environ.get("CUDA_VISIBLE_DEVICES"))

    monkeypatch.setattr(compile_pool, "compiler_for", compiler_for)
    monkeypatch.setattr(workers, "set_cuda_up", set_cuda_up)
    forked = workers.ForkedWorkers(["3", "5"], compile_workers=7, gpu=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("*.cuda"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = sorted(path.read_text() for path in tmp_path.glob("*.started"))
        cuda = sorted(path.read_text() for path in tmp_path.glob("*.cuda"))
    finally:
        forked.release()  # no settings: they exit
    assert seen == ["7 True 3", "7 True 5"]
    assert cuda == ["3", "5"]
    assert all(process.exitcode == 0 for process, _ in forked.workers)


def test_a_worker_on_a_gpu_this_process_does_not_see_gets_no_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [workers.visible_device(index) for index in range(3)] == ["2", "3", None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert workers.visible_device(4) == "4"
