"""Faults during a tune: kill -9 at random points, two tunes writing one folder at once, a
disk that fills during a write, the PostgreSQL storage restarting under two workers, and a
rerun of a finished tune.

Every tune is the `moetune run` command in a process of its own (started through
faults_support.Launcher, which saves each the interpreter start); the tests judge what it
leaves through the table files (`read_table`) and the studies, read with Optuna's API.
"""

from __future__ import annotations

import errno
import os
import pwd
import random
import shlex
import shutil
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import optuna
import pytest

from moetune.tables import read_table
from tests.faults_support import Launcher, error_log

# One test worker runs the whole module: its runs are built on each other, and its PostgreSQL
# restart must not meet another test using the server (tests/tune/test_workers.py joins the group).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("faults")]

TINY = ["--E", "4", "--topk", "2", "--hidden", "64", "--intermediate", "32", "--dtype", "fp16"]
TABLE = "E=4,N=32,K=64,topk=2,dtype=fp16.json"
JOURNAL = "moetune-studies.journal"
TRIALS = 3
# Trials report their heartbeat every second, so a killed run's trial is failed and retried
# 3 s later instead of 15.
TUNE = ["run", *TINY, "--variants", "unfused", "--trials", str(TRIALS), "--heartbeat", "1", "--no-progress"]
ROLES = ("gemm1", "gemm2_unfused")
# Trial statuses that use up a study's budget (the others: duplicates, rule-pruned, surplus).
COUNTED = ("measured", "wrong_result", "compile_failed", "launch_failed")
# Seeds of the kill -9 chain: each picks how long one run lives before it is killed.
KILL_SEEDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38_327, 95, 28, 84, 19, 71, 69]
KILL_AFTER_S = (0.3, 2.1)
RUN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


class Job:
    """One `moetune` command started through the launcher; end() waits for its exit code."""

    def __init__(self, launcher: Launcher, args: list, log: Path, **limits) -> None:
        self.launcher, self.log = launcher, log
        self.pid = launcher.start(args, log, **limits)
        self.code: int | None = None

    def end(self, timeout: float = RUN_TIMEOUT_S) -> int:
        if self.code is None:
            self.code = self.launcher.wait(self.pid, timeout)
            if self.code is None:
                self.code = self.launcher.kill(self.pid)
                pytest.fail(f"`moetune` ({self.log.name}) still running after {timeout} s:\n{self.err[-3000:]}")
        return self.code

    @property
    def out(self) -> str:
        return self.log.read_text()

    @property
    def err(self) -> str:
        return error_log(self.log).read_text()


def run_to_end(launcher: Launcher, args: list, log: Path) -> Job:
    job = Job(launcher, args, log)
    job.end()
    return job


# -- reading the studies -------------------------------------------------------------------------

def studies_of(storage, wanted=lambda name: True) -> dict[str, list]:
    """The trials of each study in `storage` whose name is `wanted`."""
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage, include_best_trial=False) if wanted(s.study_name)}


def journal_studies(path: Path) -> dict[str, list]:
    if not path.exists():  # opening a journal creates it: read none that is not there
        return {}
    return studies_of(optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))))


def config_key(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


def counted(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.user_attrs.get("status") in COUNTED]


def states(studies: dict[str, list], state: str) -> set[tuple[str, int]]:
    return {(name, t.number) for name, trials in studies.items() for t in trials if t.state.name == state}


def check_studies(studies: dict[str, list], count: int, trials: int, workers: int = 1, settled: bool = True) -> None:
    """Each study met its budget (two workers asking at the same instant may add one trial
    each), measured no config twice, and (`settled`) holds no trial still marked running.
    (A trial killed between its measurement and its result is failed: its config may run
    again.)"""
    assert len(studies) == count, sorted(studies)
    for name, study_trials in studies.items():
        done = counted(study_trials)
        assert trials <= len(done) <= trials + workers - 1, (name, len(done))
        measured = [config_key(t) for t in done if t.user_attrs["status"] == "measured"]
        assert len(set(measured)) == len(measured), (name, measured)
        running = [t.number for t in study_trials if t.state.name == "RUNNING"]
        if running:
            print(f"{name}: trials {running} still marked running")
        assert not (settled and running), name


def batch_sizes(table_path: Path) -> list[int]:
    return sorted(int(M) for M in read_table(table_path)["batch_sizes"])


# -- two tunes writing one folder at once ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_at_once(launcher, logs, tmp_path_factory) -> Path:
    """Batch sizes 2 and 3 of one shape, tuned by two runs started together into one folder:
    the finished tune the other tests start from."""
    out = tmp_path_factory.mktemp("two-at-once")
    jobs = {M: Job(launcher, [*TUNE, "--batch-sizes", str(M), "--out-dir", out], logs / f"two-{M}.log")
            for M in (2, 3)}
    assert {M: job.end() for M, job in jobs.items()} == {2: 0, 3: 0}, [job.err[-2000:] for job in jobs.values()]
    return out


def test_two_tunes_writing_one_folder_at_once_lose_no_batch_size(two_at_once):
    assert batch_sizes(two_at_once / "cpu" / TABLE) == [2, 3]
    check_studies(journal_studies(two_at_once / "cpu" / JOURNAL), count=2 * len(ROLES), trials=TRIALS)
    assert sorted(p.name for p in (two_at_once / "cpu").iterdir()) == sorted([TABLE, JOURNAL])


# -- reruns of the finished tune, started before the kill -9 chain to run during its sleeps -----

@pytest.fixture(scope="module")
def rerun(launcher, logs, two_at_once, tmp_path_factory) -> dict:
    """The first of the two tunes run again, on a copy: its studies are complete and its
    table entry written."""
    out = Path(shutil.copytree(two_at_once, tmp_path_factory.mktemp("rerun") / "out"))
    return {"table": out / "cpu" / TABLE, "before": (out / "cpu" / TABLE).read_bytes(),
            "journal": out / "cpu" / JOURNAL, "trials": trial_counts(out / "cpu" / JOURNAL),
            "job": Job(launcher, [*TUNE, "--batch-sizes", "2", "--out-dir", out], logs / "rerun.log")}


def trial_counts(journal: Path) -> dict[str, int]:
    return {name: len(trials) for name, trials in journal_studies(journal).items()}


def mount_tmpfs(folder: Path, size: str) -> bool:
    """A RAM file system of `size` at `folder`; False where mounting is not allowed."""
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def fill(folder: Path) -> None:
    """Write into `folder` until its file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def full_disk(launcher, logs, two_at_once, tmp_path_factory):
    """The finished tune's batch size 2 run again so that its table entry is written again
    (re-timed with --retime where the command has it, else with one more trial per study),
    with the tables on a full disk: a tmpfs filled up. Where no tmpfs can be mounted, a file
    size limit of half the table stands in (it applies to every file the run writes: the
    studies' journal may then be the first write to fail). The studies live on another disk,
    as with --storage."""
    base = tmp_path_factory.mktemp("full-disk")
    tables, journal = base / "tables", base / JOURNAL
    shutil.copyfile(two_at_once / "cpu" / JOURNAL, journal)
    before = (two_at_once / "cpu" / TABLE).read_bytes()
    tables.mkdir()
    mounted, job = mount_tmpfs(tables, "64k"), None
    try:
        (tables / "cpu").mkdir()
        (tables / "cpu" / TABLE).write_bytes(before)
        help_text = run_to_end(launcher, ["run", "--help"], logs / "help.log").out
        again = ["--retime"] if "--retime" in help_text else ["--trials", str(TRIALS + 1)]
        args = [*TUNE, *again, "--batch-sizes", "2", "--storage", journal, "--out-dir", tables]
        if mounted:
            fill(tables)
            job = Job(launcher, args, logs / "full-disk.log")
        else:
            job = Job(launcher, args, logs / "full-disk.log", file_size_limit=len(before) // 2)
        yield {"job": job, "before": before, "folder": tables / "cpu", "tmpfs": mounted}
    finally:
        if job is not None:
            job.end()  # before the unmount
        if mounted:
            subprocess.run(["umount", str(tables)], check=True)


# -- kill -9 at random points ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_and_resumed(launcher, logs, two_at_once, rerun, full_disk, tmp_path_factory) -> dict:
    """The finished tune of batch sizes 2 and 3 extended to 1,2,3, killed once per seed (the
    run started again each time), then run to its end. Batch size 1 comes first, so kills
    land in its trials, then in its choice of pairs, all while the table of 2 and 3 stands.
    (`rerun` and `full_disk` are asked for only to start them first: they use the other
    core while this waits to kill.)"""
    out = Path(shutil.copytree(two_at_once, tmp_path_factory.mktemp("killed") / "out"))
    journal, table = out / "cpu" / JOURNAL, out / "cpu" / TABLE
    args = [*TUNE, "--batch-sizes", "1,2,3", "--out-dir", out]
    studies = journal_studies(journal)
    failed_before, running = states(studies, "FAIL"), states(studies, "RUNNING")
    kills = []
    for seed in KILL_SEEDS:
        after = random.Random(seed).uniform(*KILL_AFTER_S)
        job = Job(launcher, args, logs / f"kill-{seed}.log")
        code = launcher.wait(job.pid, after)
        if code is None:
            code = launcher.kill(job.pid)
        table_error = None
        if table.exists():
            try:
                read_table(table)
            except Exception as error:  # noqa: BLE001 - reported by the test
                table_error = repr(error)
        studies = journal_studies(journal)
        # A trial running now that was not before the kill: the killed run held it.
        left_running = states(studies, "RUNNING") - running
        running = states(studies, "RUNNING")
        kills.append({"seed": seed, "after_s": round(after, 2), "code": code, "left_running": len(left_running),
                      "table_error": table_error,
                      "left_files": sorted({p.name for p in table.parent.iterdir()} - {TABLE, JOURNAL})})
    final = run_to_end(launcher, args, logs / "after-kills.log")
    studies = journal_studies(journal)
    return {"kills": kills, "final": final, "studies": studies, "failed": states(studies, "FAIL") - failed_before,
            "table": table, "files": sorted(p.name for p in table.parent.iterdir())}


def test_kill_9_at_random_points_loses_at_most_one_trial_per_kill(killed_and_resumed):
    kills = killed_and_resumed["kills"]
    for kill in kills:
        print(kill)  # the seed, how long the run lived, what it left
    killed = [kill for kill in kills if kill["code"] == -9]
    assert len(killed) >= len(KILL_SEEDS) // 4, "most runs ended before their kill: the chain tested little"
    assert all(kill["code"] == 0 for kill in kills if kill not in killed), kills
    assert not [kill for kill in kills if kill["table_error"]], "a kill left a table that does not read"
    assert all(kill["left_running"] <= 1 for kill in kills), kills
    assert killed_and_resumed["final"].code == 0, killed_and_resumed["final"].err[-3000:]
    assert len(killed_and_resumed["failed"]) <= len(killed)  # each killed trial failed, then ran again
    check_studies(killed_and_resumed["studies"], count=3 * len(ROLES), trials=TRIALS)
    assert batch_sizes(killed_and_resumed["table"]) == [1, 2, 3]
    assert killed_and_resumed["files"] == sorted([TABLE, JOURNAL])  # no temporary or lock file left


# -- what the reruns started above did ------------------------------------------------------------

def test_a_rerun_of_a_finished_tune_leaves_the_table_byte_identical(rerun):
    assert rerun["job"].end() == 0, rerun["job"].err[-3000:]
    assert trial_counts(rerun["journal"]) == rerun["trials"]
    assert rerun["table"].read_bytes() == rerun["before"]


def test_a_table_write_that_fails_half_way_leaves_the_previous_table(full_disk):
    print("full disk on a tmpfs" if full_disk["tmpfs"] else "full disk as a file size limit")
    assert full_disk["job"].end() != 0, full_disk["job"].out[-2000:]
    assert (full_disk["folder"] / TABLE).read_bytes() == full_disk["before"]
    assert sorted(p.name for p in full_disk["folder"].iterdir()) == [TABLE]  # no temporary file left behind


def test_a_table_write_that_fails_half_way_is_one_clear_line(full_disk):
    full_disk["job"].end()
    err = full_disk["job"].err.strip()
    assert err.count("\n") == 0 and err.startswith("moetune:"), err[-3000:]
    assert os.strerror(errno.ENOSPC if full_disk["tmpfs"] else errno.EFBIG) in err


# -- the PostgreSQL storage restarting under two workers ----------------------------------------

SHAPE_IN_NAME = "E=4,N=32,K=64,topk=2/"
POSTGRES_M = 2  # a batch size no other test tunes in the shared database


def driver_url(url: str) -> str:
    """SQLAlchemy >= 2.1 reads postgresql:// as psycopg 3: name psycopg2 where only it is installed."""
    scheme, _, rest = url.partition("://")
    if scheme == "postgresql" and find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def postgres_restarter(url: str):
    """A function that stops the server behind `url`, keeps it down `down_s` seconds and
    starts it again with the options it had, as the user owning its data; skips the test
    where the server is not on this machine or does not say where its data is."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(driver_url(url))
    try:
        with engine.connect() as connection:
            data = Path(connection.exec_driver_sql("SHOW data_directory").scalar())
            bindir = connection.exec_driver_sql("SELECT setting FROM pg_config WHERE name = 'BINDIR'").scalar()
    except Exception as error:  # noqa: BLE001 - not allowed to ask: no restart
        pytest.skip(f"cannot ask the server where its data and pg_ctl are: {error}")
    finally:
        engine.dispose()
    try:
        # How the server was started ("postgres" "-D" "<data>" "-p" "5432" ...), for pg_ctl start.
        options = shlex.split((data / "postmaster.opts").read_text())[1:]
    except OSError as error:
        pytest.skip(f"the server's data is not readable here: {error}")
    while "-D" in options:
        at = options.index("-D")
        del options[at:at + 2]
    pg_ctl = [str(Path(bindir) / "pg_ctl"), "-D", str(data), "-w"]
    owner = data.stat().st_uid
    if os.geteuid() != owner:
        pg_ctl = ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--", *pg_ctl]

    def restart(down_s: float) -> None:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], check=True, capture_output=True, timeout=60)
        time.sleep(down_s)
        subprocess.run([*pg_ctl, "-l", str(data / "restart.log"), "-o", shlex.join(options), "start"],
                       check=True, capture_output=True, timeout=60)

    return restart


@pytest.fixture(scope="module")
def postgres_restarted(launcher, logs, tmp_path_factory) -> dict:
    """Two workers sharing studies in PostgreSQL, the server stopped for 2 s once both have
    finished trials, then started again; then the same run once more to finish the budget."""
    url = os.environ.get("MOETUNE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("MOETUNE_TEST_POSTGRES_URL is unset (.ci/run starts a PostgreSQL server and sets it)")
    restart = postgres_restarter(url)
    storage = optuna.storages.RDBStorage(driver_url(url))

    def ours() -> dict[str, list]:
        return studies_of(storage, lambda name: SHAPE_IN_NAME in name and name.endswith(f"/M={POSTGRES_M}"))

    for name in ours():  # left by an earlier run of this test
        optuna.delete_study(study_name=name, storage=storage)
    out = tmp_path_factory.mktemp("postgres")
    args = [*TUNE, "--batch-sizes", str(POSTGRES_M), "--storage", url, "--out-dir", out]
    job = Job(launcher, [*args, "--devices", "0,1"], logs / "postgres.log")
    deadline = time.monotonic() + 60
    finished = {}
    while len(finished) < 2 and time.monotonic() < deadline:
        assert launcher.wait(job.pid, 0.2) is None, "the run ended before the restart:\n" + job.err
        finished = {(name, t.number): (t.state, t.params, t.value) for name, trials in ours().items()
                    for t in trials if t.state.name == "COMPLETE"}
    assert len(finished) >= 2, "no two trials finished in 60 s"
    storage.engine.dispose()  # this test's own connections: the restart ends them
    restart(down_s=2)
    job.end()
    after_restart = ours()
    return {"job": job, "finished": finished, "after_restart": after_restart,
            "rerun": run_to_end(launcher, args, logs / "postgres-rerun.log"), "studies": ours(),
            "table": out / "cpu" / TABLE}


def test_a_postgres_restart_under_two_workers_loses_nothing(postgres_restarted):
    for (name, number), (state, params, value) in postgres_restarted["finished"].items():
        trial = postgres_restarted["after_restart"][name][number]
        assert (trial.state, trial.params, trial.value) == (state, params, value)
    assert postgres_restarted["rerun"].code == 0, postgres_restarted["rerun"].err[-3000:]
    # A worker that dies between asking for a trial and its first heartbeat leaves that trial
    # marked running: the database storage never judges a trial without a heartbeat stale.
    check_studies(postgres_restarted["studies"], count=len(ROLES), trials=TRIALS, workers=2, settled=False)
    assert batch_sizes(postgres_restarted["table"]) == [POSTGRES_M]


def test_workers_reconnect_to_a_restarted_postgres_and_finish(postgres_restarted):
    """A server down for 2 s is well inside the outage a run rides out (STORAGE_OUTAGE_S): both
    workers reopen their studies and finish, and the writer writes the table."""
    job = postgres_restarted["job"]
    err = job.err
    print(f"the run exited {job.code}:\n{job.out}\n{err}")
    assert job.code == 0, err[-3000:]
    assert "Traceback" not in err and "moetune: error" not in err, err[-3000:]
    assert "exited with code" not in job.out
    assert "lost the connection to the storage (OperationalError: " in job.out + err