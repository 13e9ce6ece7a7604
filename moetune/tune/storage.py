"""Where the Optuna studies live, and how processes sharing them notice one that died.

Every storage has heartbeats on: a process records one for each trial it holds while the
trial runs (TrialHeartbeat), and before asking for a trial each process calls Optuna's
fail_stale_trials, which marks FAIL the RUNNING trials whose heartbeat is older than the
grace period and queues their config again (RetryHeartbeatStaleTrialCallback). So a worker
killed mid-trial never stalls the others, and a live trial is never failed for being RUNNING.

  postgresql://..., sqlite:///...  Optuna's RDBStorage, which has heartbeats built in;
  anything else                    a journal file, shared by the processes of one host (or a
                                   shared file system); Optuna's JournalStorage has no
                                   heartbeats, so HeartbeatJournalStorage adds them.
"""

from __future__ import annotations

import threading
import time
import warnings
from importlib.util import find_spec
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
# RDBStorage implements this interface; fail_stale_trials accepts any storage that does.
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

STUDY_FILE = "moetune-studies.journal"
DEFAULT_HEARTBEAT_S = 5
# A trial is stale after this many heartbeats are missed: generous, because a process busy
# in a long call that holds the GIL (a compile, a graph capture) beats late.
GRACE_BEATS = 3
# A config whose trial keeps killing its worker is not queued again forever.
MAX_RETRIES = 1
HEARTBEAT_ATTR = "moetune:heartbeat"


def is_database_url(location: str) -> bool:
    return "://" in location


def database_url(url: str) -> str:
    """`postgresql://` names no driver, and SQLAlchemy >= 2.1 takes psycopg 3 for it: use
    psycopg2 (what the `postgres` extra installs) when that is the driver installed."""
    scheme, _, rest = url.partition("://")
    if scheme == "postgresql" and find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def default_journal(out_dir: Path, device_key: str) -> Path:
    """The journal of a run without --storage: beside the device's tables."""
    return out_dir / device_key / STUDY_FILE


def _retry_stale_trials() -> dict:
    """RDBStorage's keyword for the retry callback, under the Optuna version installed."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if retry is not None:  # Optuna >= 4.9 renamed the callback and its keyword
        return {"heartbeat_stale_trial_callback": retry(max_retry=MAX_RETRIES)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)}


def open_storage(location: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S):
    """The storage at `location` (a database URL or a journal file path), heartbeats on."""
    grace_s = GRACE_BEATS * heartbeat_s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _retry_stale_trials()
        if is_database_url(location):
            # Long runs outlive idle database connections: test each one before use.
            engine = {} if location.startswith("sqlite") else {"pool_pre_ping": True}
            return optuna.storages.RDBStorage(database_url(location), engine_kwargs=engine,
                                              heartbeat_interval=heartbeat_s, grace_period=grace_s, **retry)
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        callback = next(iter(retry.values()))
        return HeartbeatJournalStorage(optuna.storages.journal.JournalFileBackend(str(location)),
                                       heartbeat_s, grace_s, callback)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat interface RDBStorage has.

    A heartbeat is a trial system attribute holding the writer's clock, so the processes
    sharing a journal across hosts need clocks that agree to well within the grace period.
    A RUNNING trial that never beat (its process died right after asking) is judged by its
    start time.
    """

    def __init__(self, backend, heartbeat_s: int, grace_s: int, stale_trial_callback) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_s
        self.grace_period = grace_s
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial inherits its predecessor's attributes, old heartbeat included.
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            last = max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), started)
            if now - last > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback

    def get_failed_trial_callback(self):  # the name Optuna < 4.9 asks for
        return self.stale_trial_callback


def fail_stale_trials(study) -> None:
    """Optuna's fail_stale_trials: FAIL the trials whose worker stopped beating, retry them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def ask(study, distributions: dict):
    """study.ask, without Optuna's warning that heartbeats are meant for study.optimize:
    with ask/tell, TrialHeartbeat records them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask(distributions)


class TrialHeartbeat:
    """A thread recording a heartbeat for every trial this process holds.

    Trials compiled ahead wait RUNNING for their turn, so it beats for all of them at once;
    the first beat is recorded before track() returns.
    """

    def __init__(self, storage) -> None:
        self.storage = storage
        self.interval = storage.get_heartbeat_interval()
        self.last_beat: dict[int, float] = {}  # trial id -> when this process last beat for it
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat_forever, name="moetune-heartbeat", daemon=True)
        self.thread.start()

    def track(self, trial_id: int) -> None:
        with self.lock:
            self.last_beat[trial_id] = 0.0
        self._beat(trial_id)

    def untrack(self, trial_id: int) -> None:
        with self.lock:
            self.last_beat.pop(trial_id, None)

    def catch_up(self) -> None:
        """Beat now for trials the thread has not beaten for an interval: a long call holding
        the GIL delays it, and this process must not judge its own trials stale."""
        with self.lock:
            overdue = [trial_id for trial_id, at in self.last_beat.items() if time.monotonic() - at > self.interval]
        for trial_id in overdue:
            self._beat(trial_id)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _beat(self, trial_id: int) -> None:
        with self.lock:
            if trial_id not in self.last_beat:
                return  # told meanwhile
            self.last_beat[trial_id] = time.monotonic()
        try:
            self.storage.record_heartbeat(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.untrack(trial_id)  # another process judged it stale and failed it
        except Exception:  # noqa: BLE001 - a missed beat (database hiccup) is retried next interval
            pass

    def _beat_forever(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                held = list(self.last_beat)
            for trial_id in held:
                self._beat(trial_id)
