"""The studies' storages: a trial whose process stops beating is failed and retried, once, by
Optuna's RDBStorage and by JournalHeartbeat on a journal file."""

import os
import time

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage

from moetune.errors import RunFailure
from moetune.tune.storage import (GRACE_BEATS, JOURNAL_LOCK_GRACE_S, TrialHeartbeat, ask, open_storage,
                                   storage_exists, with_reconnects)


def test_a_trial_whose_heartbeat_stops_is_failed_and_retried_once(tmp_path):
    distributions = {"x": optuna.distributions.IntDistribution(0, 100)}
    runs = []
    for location in (str(tmp_path / "s.journal"), f"sqlite:///{tmp_path / 's.db'}"):
        storage = open_storage(location, heartbeat_s=1)
        study = optuna.create_study(storage=storage.storage, study_name="s")
        heartbeat = TrialHeartbeat(storage)
        alive, dead = ask(study, distributions), ask(study, distributions)
        heartbeat.track(storage.trial_id(study, alive.number))
        heartbeat.track(storage.trial_id(study, dead.number))
        heartbeat.untrack(storage.trial_id(study, dead.number))  # as if its process were killed
        runs.append((storage, study, heartbeat, alive, dead))
    time.sleep(GRACE_BEATS + 1.5)  # past the grace period of both (3 beats of 1 s; SQLite keeps whole seconds)
    for storage, study, heartbeat, alive, dead in runs:
        try:
            storage.fail_stale_trials(study)
            storage.fail_stale_trials(study)  # a second look retries nothing more
        finally:
            heartbeat.close()
        trials = {t.number: t for t in study.trials}
        assert trials[alive.number].state.name == "RUNNING", storage.where
        assert trials[dead.number].state.name == "FAIL", storage.where
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retry) == 1 and retry[0].state.name == "WAITING", storage.where
        assert retry[0].params == trials[dead.number].params


def test_optuna_s_journal_storage_still_has_no_heartbeats_of_its_own():
    """JournalHeartbeat adds what RDBStorage has; once Optuna's journal has it too, use that."""
    assert hasattr(RDBStorage, "record_heartbeat")
    assert not hasattr(JournalStorage, "record_heartbeat")
    assert "heartbeat_interval" not in JournalStorage.__init__.__code__.co_varnames


@pytest.mark.parametrize("location, exists", [
    ("{tmp}/none.journal", False),
    ("{tmp}/a.journal", True),
    ("sqlite:///{tmp}/none.db", False),
    ("postgresql://tuner@host/studies", True),  # a server: asked when opened
])
def test_a_storage_that_does_not_exist_yet_is_told_apart(tmp_path, location, exists):
    (tmp_path / "a.journal").write_text("")
    assert storage_exists(location.replace("{tmp}", str(tmp_path))) == exists


def test_a_renamed_lock_that_a_killed_process_left_is_removed_once_stale(tmp_path, monkeypatch):
    """Optuna releases the journal lock by renaming it, then removing the renamed link; kill -9
    between the two leaves that link beside the journal. The next run removes it once it is
    older than the lock's grace period, and not before (its holder may still be alive)."""
    journal = tmp_path / "studies.journal"
    open_storage(str(journal))
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(journal))
    assert lock.acquire()

    def killed(*args, **kwargs):
        raise SystemExit("killed between the rename and the removal")

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", killed)
        with pytest.raises(SystemExit):
            lock.release()
    left = list(tmp_path.glob("studies.journal.lock*.rename"))
    assert len(left) == 1  # what Optuna leaves: if not, its release changed and so may this cleanup
    open_storage(str(journal))
    assert os.path.lexists(left[0])  # fresh: kept
    stale = time.time() - JOURNAL_LOCK_GRACE_S - 1
    os.utime(left[0], (stale, stale), follow_symlinks=False)
    open_storage(str(journal))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["studies.journal"]


def _database_in(folder) -> tuple[str, RDBStorage]:
    folder.mkdir()
    url = f"sqlite:///{folder / 's.db'}"
    storage = RDBStorage(url)
    optuna.create_study(storage=storage, study_name="s")
    return url, storage


def test_a_lost_database_connection_is_reopened_until_the_database_is_back(tmp_path):
    url, storage = _database_in(tmp_path / "db")
    (tmp_path / "db").rename(tmp_path / "away")  # the server is gone: new connections fail
    storage.engine.dispose()
    lines = []

    def log(line):  # the server comes back after the second failure
        lines.append(line)
        if len(lines) == 2:
            (tmp_path / "away").rename(tmp_path / "db")

    names = with_reconnects(url, lambda: [s.study_name for s in storage.get_all_studies()], log,
                            outage_s=30, pause_s=0.01)
    assert names == ["s"]
    assert lines == ["lost the connection to the storage (OperationalError: (sqlite3.OperationalError) unable to "
                     "open database file); reopening the studies in 0.01 s"] * 2
    assert all("\n" not in line for line in lines)


def test_a_database_that_stays_unreachable_stops_the_run_after_the_outage_limit(tmp_path):
    url, storage = _database_in(tmp_path / "db")
    (tmp_path / "db").rename(tmp_path / "away")
    storage.engine.dispose()
    lines = []
    began = time.monotonic()
    with pytest.raises(RunFailure, match=r"^the storage has been unreachable for \d+ s \(OperationalError: "
                                         r"\(sqlite3.OperationalError\) unable to open database file\)$"):
        with_reconnects(url, storage.get_all_studies, lines.append, outage_s=0.3, pause_s=0.05)
    assert 0.3 <= time.monotonic() - began < 5 and len(lines) >= 2


@pytest.mark.parametrize("journal", [False, True])
def test_errors_that_are_not_a_lost_connection_are_raised_at_once(tmp_path, journal):
    location = str(tmp_path / "s.journal") if journal else f"sqlite:///{tmp_path / 's.db'}"
    calls, lines = [], []

    def attempt():
        calls.append(1)
        if journal:  # a full disk under a journal file: no connection to reopen
            raise OSError(28, "No space left on device")
        raise optuna.exceptions.DuplicatedStudyError("s exists")

    with pytest.raises((OSError, optuna.exceptions.DuplicatedStudyError)):
        with_reconnects(location, attempt, lines.append, outage_s=30, pause_s=0.01)
    assert calls == [1] and lines == []


def test_connections_lost_far_apart_are_separate_outages(tmp_path):
    """A run that loses its connection, resumes, and loses it again long after is not stopped
    for the sum of both outages."""
    url, storage = _database_in(tmp_path / "db")
    (tmp_path / "db").rename(tmp_path / "away")
    storage.engine.dispose()
    lines = []

    def attempt():
        time.sleep(0.25)  # each attempt runs longer than the outage limit before it fails
        return storage.get_all_studies()

    def log(line):
        lines.append(line)
        if len(lines) == 3:
            (tmp_path / "away").rename(tmp_path / "db")

    assert len(with_reconnects(url, attempt, log, outage_s=0.2, pause_s=0.01)) == 1
    assert len(lines) == 3


def test_a_tune_resumed_after_a_lost_connection_keeps_its_compilers_and_what_is_left_of_its_time_budget(tmp_path, monkeypatch):
    from moetune.device import DeviceInfo
    from moetune.tune import run
    from moetune.tune.settings import TuneSettings
    from moetune.tune.space import load_space

    url, storage = _database_in(tmp_path / "db")
    (tmp_path / "db").rename(tmp_path / "away")
    storage.engine.dispose()
    attempts = []

    def attempt(settings, log, write_tables, compiler):
        attempts.append((settings.time_budget_min, compiler))
        if len(attempts) == 1:
            time.sleep(0.6)  # 0.01 of the budget's minute spent, then the server goes
            storage.get_all_studies()
        return []

    monkeypatch.setattr(run, "_tune_once", attempt)
    monkeypatch.setattr(run, "with_reconnects",
                        lambda location, fn, log: with_reconnects(location, fn, log, pause_s=0.01))
    settings = TuneSettings([], "fp16", [1], ["unfused"], 1, tmp_path, DeviceInfo("cpu", "cpu", None, 232448),
                            load_space(), storage=url, time_budget_min=0.5)
    class CallerCompiler:
        closed = 0

        def close(self):
            self.closed += 1

    caller_s = CallerCompiler()
    assert run.tune(settings, log=lambda line: None, compiler=caller_s) == []
    (first, first_compiler), (second, second_compiler) = attempts
    assert 0.5 - 1e-3 < first <= 0.5 and first_compiler is caller_s
    # At least the 0.6 s slept (0.01 min) is spent; the bound above leaves room for a loaded machine.
    assert 0.4 < second <= 0.5 - 0.01
    # One pool of compile processes serves every attempt, closed once the tune ends.
    assert second_compiler is caller_s and caller_s.closed == 1
