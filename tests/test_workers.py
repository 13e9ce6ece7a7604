"""Several processes sharing the studies: `run --devices`, `run --worker`, `collect`.

Without a GPU each "device" is one more process running the interpreter, so these tests go
through the same code as a multi-GPU run.
"""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from moetune.cli import main
from moetune.tune.study import COUNTED, is_held
from moetune.tune.storage import TrialHeartbeat, ask, database_url, fail_stale_trials, open_storage
from moetune.tables import read_table

TINY = ["--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32"]
SHAPE_IN_NAME = "E=4,N=32,K=64,topk=2/"
TABLE = "E=4,N=32,K=64,topk=2,dtype=fp16.json"
RUN = [*TINY, "--batch-sizes", "1,8", "--trials", "3", "--no-progress", "--compile-workers", "0"]
ROLES = ("gemm1", "gemm2_unfused", "gemm2_fused")


def studies_in(location: str) -> dict[str, list]:
    """Trials of the tiny shape's studies, read without heartbeats of our own."""
    if "://" in location:
        storage = optuna.storages.RDBStorage(database_url(location))
    else:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(location))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if SHAPE_IN_NAME in s.study_name}


def counted(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.user_attrs.get("status") in COUNTED]


def check_shared_studies(studies: dict[str, list], trials: int, workers: int) -> set[int]:
    """Every study met its budget (two processes asking at the very same instant may add one
    trial each, as documented), nothing is left running, no config was measured twice, and
    each trial was run by one process. Returns the pids that ran trials."""
    assert len(studies) == 2 * len(ROLES)
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


def check_table(path) -> None:
    table = read_table(path)  # validates the schema
    assert sorted(table["batch_sizes"]) == [1, 8]
    for entry in table["batch_sizes"].values():
        assert entry["winner"] == min(("unfused", "fused"), key=lambda v: entry[v]["layer_us"])


def start_worker(out_dir, storage: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "moetune", "run", *RUN, "--worker", "--out-dir", str(out_dir),
               "--storage", storage, *extra]
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


# -- the real code path, end to end ----------------------------------------------------------

def test_two_devices_share_the_studies_and_the_first_writes_the_table(tmp_path, capfd):
    assert main(["run", *RUN, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # the workers' output too: they write to the same descriptor
    assert "2 workers" in out
    assert f"[cpu worker 0] wrote {tmp_path / 'cpu' / TABLE}" in out
    assert "[cpu worker 1] wrote" not in out and "did not finish" not in out
    studies = studies_in(str(tmp_path / "cpu" / "moetune-studies.journal"))
    pids = check_shared_studies(studies, trials=3, workers=2)
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


def test_the_parent_writes_the_table_when_the_first_worker_does_not(tmp_path, monkeypatch, capsys):
    import moetune.tune.workers as workers

    real = workers.run_workers
    # As if the writer had died: the workers run trials only and report no writer.
    monkeypatch.setattr(workers, "run_workers",
                        lambda settings, devices, first_writes, forked: real(settings, devices, first_writes=False,
                                                                             forked=forked))
    assert main(["run", *RUN, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "did not finish: writing the tables from the studies here" in out
    assert f"wrote {tmp_path / 'cpu' / TABLE}" in out
    check_table(tmp_path / "cpu" / TABLE)


def postgres_url() -> str:
    url = os.environ.get("MOETUNE_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("MOETUNE_TEST_POSTGRES_URL is unset: .ci/run starts PostgreSQL and sets it")
        pytest.skip("MOETUNE_TEST_POSTGRES_URL is unset (.ci/run starts a PostgreSQL server and sets it)")
    return url


def test_workers_share_postgres_and_collect_writes_the_table(tmp_path, capsys):
    url = postgres_url()
    storage = optuna.storages.RDBStorage(database_url(url))
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if SHAPE_IN_NAME in summary.study_name:  # left by an earlier run of this test
            optuna.delete_study(study_name=summary.study_name, storage=storage)
    workers = [start_worker(tmp_path, url) for _ in range(2)]
    outputs = [finish(worker, timeout=150) for worker in workers]
    assert all("no table written" in output for output in outputs)
    assert not (tmp_path / "cpu").exists()  # workers write no table
    pids = check_shared_studies(studies_in(url), trials=3, workers=2)
    assert pids == {worker.pid for worker in workers}

    assert main(["collect", *TINY, "--batch-sizes", "1,8", "--trials", "3", "--storage", url,
                 "--out-dir", str(tmp_path)]) == 0
    check_table(tmp_path / "cpu" / TABLE)
    assert "wrote" in capsys.readouterr().out


def test_a_killed_worker_does_not_stall_the_other(tmp_path, capsys):
    journal = str(tmp_path / "studies.journal")
    # Heartbeats every second: a silent trial is stale after 3 s.
    victim = start_worker(tmp_path, journal, "--heartbeat", "1")
    survivor = start_worker(tmp_path, journal, "--heartbeat", "1")
    deadline = time.monotonic() + 60

    def held_by_victim() -> list[tuple[str, int]]:
        return [(name, t.number) for name, trials in studies_in(journal).items() for t in trials
                if is_held(t) and t.user_attrs["worker"]["pid"] == victim.pid]

    left_running = []
    while not left_running and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.1)
        if os.path.exists(journal) and held_by_victim():
            victim.send_signal(signal.SIGSTOP)  # hold it still: is it still mid-trial?
            left_running = held_by_victim()
            if not left_running:
                victim.send_signal(signal.SIGCONT)
    assert left_running, "the victim never held a trial while running"
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    killed_at = time.monotonic()

    finish(survivor, timeout=90)
    assert time.monotonic() - killed_at < 60
    studies = studies_in(journal)
    for name, number in left_running:
        trial = studies[name][number]
        assert trial.state.name == "FAIL"  # its heartbeat stopped: failed as stale ...
        retried = [t for t in studies[name] if t.system_attrs.get("failed_trial") == number]
        assert len(retried) == 1  # ... and its config queued again, once
        assert retried[0].params == trial.params
        assert retried[0].state.name != "RUNNING"
    check_shared_studies(studies, trials=3, workers=2)
    assert not (tmp_path / "cpu").exists()

    assert main(["collect", *TINY, "--batch-sizes", "1,8", "--trials", "3", "--storage", journal,
                 "--heartbeat", "1", "--out-dir", str(tmp_path)]) == 0
    check_table(tmp_path / "cpu" / TABLE)


# -- the parts, quickly --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_trial_whose_heartbeat_stops_is_failed_and_retried(tmp_path, kind):
    location = str(tmp_path / "s.journal") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(location, heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="s")
    distributions = {"x": optuna.distributions.IntDistribution(0, 100)}
    heartbeat = TrialHeartbeat(storage)
    try:
        alive, dead = ask(study, distributions), ask(study, distributions)
        heartbeat.track(alive._trial_id)
        heartbeat.track(dead._trial_id)
        heartbeat.untrack(dead._trial_id)  # as if its process were killed
        time.sleep(4.5)  # past the grace period of 3 heartbeats
        fail_stale_trials(study)
    finally:
        heartbeat.close()
    states = {t.number: t for t in study.trials}
    assert states[alive.number].state.name == "RUNNING"
    assert states[dead.number].state.name == "FAIL"
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state.name == "WAITING" and retry[0].params == states[dead.number].params


def make_foreign_study(location: str, name: str, **attrs) -> None:
    storage = open_storage(location)
    study = optuna.create_study(storage=storage, study_name=name)
    for key, value in attrs.items():
        study.set_user_attr(key, value)


@pytest.mark.parametrize("name,attrs,words", [
    ("cpu/E=4,N=32,K=64,topk=2/fp16/gemm1/M=1", {"device": "NVIDIA H200"}, ["NVIDIA H200", "'cpu'"]),
    ("NVIDIA_H200/E=4,N=32,K=64,topk=2/fp16/gemm2_fused/M=8", {"device": "NVIDIA H200"}, ["NVIDIA H200"]),
    ("NVIDIA_H100/E=4,N=32,K=64,topk=2/fp16/gemm1/M=8", {}, ["NVIDIA_H100"]),
    ("cpu/E=4,N=32,K=64,topk=2/fp16/gemm1/M=1", {"device": "cpu", "heartbeat_s": 30}, ["--heartbeat"]),
])
@pytest.mark.parametrize("command", ["run", "collect"])
def test_studies_of_another_gpu_are_refused_in_one_line(tmp_path, capsys, name, attrs, words, command):
    journal = str(tmp_path / "studies.journal")
    make_foreign_study(journal, name, **attrs)
    extra = ["--worker", "--no-progress"] if command == "run" else []
    args = [command, *TINY, "--batch-sizes", "1,8", "--trials", "3", "--storage", journal,
            "--out-dir", str(tmp_path / "tables"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetune: error:") and err.count("\n") == 0
    assert all(word in err for word in words), err
    assert len(studies_in(journal)) == 1 and not studies_in(journal)[name]  # nothing was tuned
    assert not (tmp_path / "tables").exists()


def test_collect_refuses_missing_and_short_studies(tmp_path, capsys):
    journal = str(tmp_path / "studies.journal")
    collect = ["collect", *TINY, "--batch-sizes", "1", "--storage", journal, "--out-dir", str(tmp_path)]
    assert main([*collect, "--trials", "1"]) == 2
    assert "no study" in capsys.readouterr().err

    assert main(["run", *TINY, "--batch-sizes", "1", "--trials", "1", "--worker", "--no-progress",
                 "--storage", journal, "--out-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "cpu").exists()
    assert main([*collect, "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 trials" in err and "--allow-incomplete" in err and err.count("\n") == 1
    assert not (tmp_path / "cpu").exists()
    assert main([*collect, "--trials", "2", "--allow-incomplete"]) == 0
    assert sorted(read_table(tmp_path / "cpu" / TABLE)["batch_sizes"]) == [1]


@pytest.mark.parametrize("args,words", [
    (["--devices", "x"], "--devices"),
    (["--devices", "0,0"], "twice"),
    (["--devices", ""], "--devices"),
    (["--heartbeat", "0"], "--heartbeat"),
])
def test_bad_worker_flags_are_one_line_exit_2(tmp_path, capsys, args, words):
    assert main(["run", *TINY, *args, "--out-dir", str(tmp_path / "tables"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err
    assert not (tmp_path / "tables").exists()


def test_workers_forked_before_a_refusal_exit_with_the_run(tmp_path, monkeypatch, capsys, single_threaded):
    """The workers start before the parent checks its input; a refused run takes them down."""
    import multiprocessing

    import moetune.tune.workers as workers

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
    import threading

    from moetune.device import fork_is_safe

    assert fork_is_safe()
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert not fork_is_safe()  # it might hold a lock the children inherit
    finally:
        release.set()
        other.join()


def test_workers_are_forked_with_the_parents_imports(tmp_path, monkeypatch, capfd, single_threaded):
    import moetune.tune.workers as workers


    started = []
    real = workers.ForkedWorkers.start
    monkeypatch.setattr(workers.ForkedWorkers, "start", lambda self, jobs: started.append(jobs) or real(self, jobs))
    assert main(["run", *RUN, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    assert len(started) == 1 and [writes for _, writes in started[0]] == [True, False]
    assert "[cpu worker 0] wrote" in capfd.readouterr().out


def test_a_worker_forked_after_cuda_was_initialized_starts_afresh(tmp_path, monkeypatch, capfd, single_threaded):
    """CUDA refuses a child forked after its parent initialized it: the child then spawns a
    fresh process for its work (this test makes every child think so)."""
    import moetune.tune.workers as workers

    monkeypatch.setattr(workers, "forked_after_cuda", lambda: True)
    assert main(["run", *RUN, "--devices", "0,1", "--out-dir", str(tmp_path)]) == 0
    assert "[cpu worker 0] wrote" in capfd.readouterr().out
    pids = check_shared_studies(studies_in(str(tmp_path / "cpu" / "moetune-studies.journal")), trials=3, workers=2)
    assert len(pids) == 2


def test_the_interpreter_workers_are_labelled_as_processes(tmp_path, monkeypatch, capsys):
    """On a CPU, --devices only says how many interpreter processes to run."""
    import moetune.tune.workers as workers
    import moetune.tune.run as tune

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
    import time

    import moetune.tune.run as tune
    import moetune.tune.workers as workers

    def compiler_for(compile_workers, gpu):  # runs in each forked worker
        (tmp_path / f"{os.getpid()}.started").write_text(f"{compile_workers} {gpu} {os.environ.get('CUDA_VISIBLE_DEVICES')}")
        return tune.Compiler(0)

    def set_cuda_up():  # then CUDA, also before the settings
        assert (tmp_path / f"{os.getpid()}.started").exists(), "CUDA set up before the compile processes forked"
        (tmp_path / f"{os.getpid()}.cuda").write_text(os.environ.get("CUDA_VISIBLE_DEVICES"))

    monkeypatch.setattr(tune, "compiler_for", compiler_for)
    monkeypatch.setattr(workers, "_set_cuda_up", set_cuda_up)
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
    import moetune.tune.workers as workers

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [workers.visible_device(index) for index in range(3)] == ["2", "3", None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert workers.visible_device(4) == "4"
