"""Where the Optuna studies live, who may share them, and how the processes sharing them
notice one that died.

Every storage has heartbeats on: a process records one for each trial it holds while the
trial runs (TrialHeartbeat), and before asking for a trial each process fails the RUNNING
trials whose heartbeat is older than the grace period and queues their config again, once
(Optuna's RetryHeartbeatStaleTrialCallback). So a worker killed mid-trial never stalls the
others, and a live trial is never failed for being RUNNING.

  postgresql://..., sqlite:///...  Optuna's RDBStorage, whose heartbeats and stale-trial
                                   retry the tuner uses as they are;
  anything else                    a journal file, shared by the processes of one host (or a
                                   shared file system). Optuna's JournalStorage has neither,
                                   so JournalHeartbeat adds both through the storage's public
                                   methods.

One study per (device, shape, dtype, role, batch size). The process that creates a study
records the GPU it runs on and its heartbeat interval; every process that loads it later
must match both, so that hosts with another GPU model cannot mix their timings in, and all
processes judge a silent trial stale after the same grace period.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from ..device import DeviceInfo
from ..errors import RunFailure, UsageError, one_line

STUDY_FILE = "moetune-studies.journal"
DEFAULT_HEARTBEAT_S = 5
# A trial is stale after this many heartbeats are missed: generous, because a process busy
# in a long call that holds the GIL (a compile, a graph capture) beats late.
GRACE_BEATS = 3
# A config whose trial keeps killing its worker is not queued again forever.
MAX_RETRIES = 1
# A process holds the journal's lock file only while it appends a few lines (milliseconds). One
# killed while holding it leaves the file behind, and every other process waits this long
# before breaking it: Optuna's default, 30 s, stalled a run for that long after each such kill.
JOURNAL_LOCK_GRACE_S = 5
# Optuna releases that lock by renaming it to `<journal>.lock<uuid>.rename`, then removing the
# renamed link: a process killed between the two leaves the renamed link behind.
JOURNAL_LOCK_RENAMED = ".lock*.rename"
# Trial system attribute of a journal's trial: when its holder last beat (its clock, time.time()).
LAST_BEAT_ATTR = "moetune:heartbeat"
# Study user attributes: what every process sharing the study must match.
DEVICE_ATTR = "device"  # name of the GPU the study's trials run on
HEARTBEAT_INTERVAL_ATTR = "heartbeat_s"
# Trial user attribute: the process holding the trial ({"host", "pid", "device", "trial"}).
WORKER_ATTR = "worker"
# A database server restarting (an upgrade, a failover) is gone for seconds: a run that loses
# its connection reopens its studies every RECONNECT_PAUSE_S and carries on, and stops with
# one line only once the server has been unreachable this long.
STORAGE_OUTAGE_S = 60.0
RECONNECT_PAUSE_S = 2.0


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


def storage_exists(location: str) -> bool:
    """Whether opening `location` would find studies rather than create an empty storage
    (a journal file or an SQLite database that is not there yet); a server database is
    taken to exist."""
    if not is_database_url(location):
        return Path(location).is_file()
    if location.startswith("sqlite:///"):
        database = location[len("sqlite:///"):]
        return database in ("", ":memory:") or Path(database).is_file()
    return True


def lost_connection(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that says the database connection was lost (the server
    stopped, restarted or is unreachable), else None (a query it refused). Optuna wraps it in
    a StorageInternalError that blames the data, sometimes behind SQLAlchemy's demand for a
    rollback of the broken transaction."""
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:
        return None
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OperationalError) or (isinstance(error, DBAPIError) and error.connection_invalidated):
            return error
        error = error.__cause__ or error.__context__
    return None


def with_reconnects(location: str, attempt: Callable[[], object], log: Callable[[str], None] = print,
                    outage_s: float = STORAGE_OUTAGE_S, pause_s: float = RECONNECT_PAUSE_S):
    """attempt(), again after each lost connection to the database at `location`, until the
    server has been unreachable `outage_s`; then RunFailure says so in one line. `attempt` must
    resume from the studies (a tune does), so nothing measured is lost or measured twice.
    A journal file has no connection to lose: its errors (a full disk) are raised at once."""
    outage_began = None
    while True:
        started = time.monotonic()
        try:
            return attempt()
        except Exception as error:
            lost = lost_connection(error) if is_database_url(location) else None
            if lost is None:
                raise
            now = time.monotonic()
            if outage_began is None or now - started > outage_s:
                outage_began = now  # the attempt ran long: a new outage, not the old one going on
            if now - outage_began >= outage_s:
                raise RunFailure(f"the storage has been unreachable for {now - outage_began:.0f} s "
                                 f"({one_line(lost)})") from error
            log(f"lost the connection to the storage ({one_line(lost)}); "
                f"reopening the studies in {pause_s:g} s")
            time.sleep(pause_s)


def _retry_stale_trials() -> tuple[str, object]:
    """Optuna's callback that queues a stale trial's config again, and RDBStorage's keyword
    for it, under the Optuna version installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if retry is not None:  # Optuna >= 4.9 renamed the callback and its keyword
            return "heartbeat_stale_trial_callback", retry(max_retry=MAX_RETRIES)
        return "failed_trial_callback", optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)


class JournalHeartbeat:
    """Heartbeats and stale-trial retry for Optuna's JournalStorage, which has neither
    (Optuna offers them for RDBStorage only): what RDBStorage and
    optuna.storages.fail_stale_trials do, through BaseStorage's public methods.

    A heartbeat is a trial system attribute holding the writer's clock, so the processes
    sharing a journal across hosts need clocks that agree to well within the grace period.
    A RUNNING trial that never beat (its process died right after asking) is judged by its
    start time.
    """

    def __init__(self, storage: JournalStorage, grace_s: float):
        self.storage, self.grace_s = storage, grace_s
        _, self.retry = _retry_stale_trials()

    def record(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, LAST_BEAT_ATTR, time.time())

    def fail_stale_trials(self, study) -> None:
        storage = self.storage
        study_id = storage.get_study_id_from_name(study.study_name)
        now = time.time()
        failed = []
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial inherits its predecessor's attributes, old heartbeat included.
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - max(trial.system_attrs.get(LAST_BEAT_ATTR, 0.0), started) <= self.grace_s:
                continue
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process failed it first
        for trial_id in failed:
            self.retry(study, copy.deepcopy(storage.get_trial(trial_id)))


class StudyStorage:
    """An Optuna storage with heartbeats on, and where the user named it (for messages)."""

    def __init__(self, storage, heartbeat_s: int, where: str, journal: JournalHeartbeat | None = None,
                 journal_path: Path | None = None):
        self.storage, self.heartbeat_s, self.where, self.journal = storage, heartbeat_s, where, journal
        self.journal_path = journal_path
        self.study_ids: dict[str, int] = {}

    def remove_abandoned_locks(self) -> None:
        """Remove the renamed journal locks that killed processes left. A lock older than the
        grace period is broken by any process that meets it, so a renamed one that old
        belongs to nobody (a live holder removes its own within microseconds)."""
        if self.journal_path is None:
            return
        for path in self.journal_path.parent.glob(self.journal_path.name + JOURNAL_LOCK_RENAMED):
            try:
                if time.time() - os.lstat(path).st_mtime > JOURNAL_LOCK_GRACE_S:
                    os.unlink(path)
            except OSError:
                pass  # another process removed it first

    def trial_id(self, study, number: int) -> int:
        """The storage's id of trial `number` of `study`, which heartbeats are recorded under."""
        name = study.study_name
        if name not in self.study_ids:
            self.study_ids[name] = self.storage.get_study_id_from_name(name)
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_ids[name], number)

    def record_heartbeat(self, trial_id: int) -> None:
        if self.journal is not None:
            self.journal.record(trial_id)
        else:
            self.storage.record_heartbeat(trial_id)

    def fail_stale_trials(self, study) -> None:
        """FAIL the trials whose holder stopped beating, and queue their configs again."""
        if self.journal is not None:
            self.journal.fail_stale_trials(study)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def open_storage(location: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S, where: str | None = None) -> StudyStorage:
    """The storage at `location` (a database URL or a journal file path), heartbeats on."""
    grace_s = GRACE_BEATS * heartbeat_s
    where = where or repr(location)
    if is_database_url(location):
        keyword, retry = _retry_stale_trials()
        # Long runs outlive idle database connections: test each one before use.
        engine = {} if location.startswith("sqlite") else {"pool_pre_ping": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(database_url(location), engine_kwargs=engine,
                                                 heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                                 **{keyword: retry})
        return StudyStorage(storage, heartbeat_s, where)
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(location), grace_period=JOURNAL_LOCK_GRACE_S)
    storage = JournalStorage(optuna.storages.journal.JournalFileBackend(str(location), lock_obj=lock))
    opened = StudyStorage(storage, heartbeat_s, where, JournalHeartbeat(storage, grace_s), Path(location))
    opened.remove_abandoned_locks()
    return opened


def ask(study, distributions: dict):
    """study.ask, without Optuna's warning that RDBStorage's heartbeats are meant for
    study.optimize: with ask/tell, TrialHeartbeat records them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask(distributions)


class TrialHeartbeat:
    """A thread recording a heartbeat for every trial this process holds.

    Trials compiled ahead wait RUNNING for their turn, so it beats for all of them at once;
    the first beat is recorded before track() returns.
    """

    def __init__(self, storage: StudyStorage) -> None:
        self.storage = storage
        self.interval = storage.heartbeat_s
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


# -- who may share the studies -------------------------------------------------------------------

@dataclass(frozen=True)
class Sharer:
    """What a process must agree on with the others sharing the studies."""

    device: DeviceInfo
    heartbeat_s: int

    def _device_mismatch(self, recorded: str, where: str) -> UsageError:
        return UsageError(f"{where} holds studies tuned on {recorded!r} but this device is {self.device.name!r}: "
                          f"every host tuning them must have the same GPU model (use another --storage for another)")

    def _check_heartbeat(self, attrs: dict, name: str) -> None:
        recorded = attrs.get(HEARTBEAT_INTERVAL_ATTR)
        if recorded is not None and recorded != self.heartbeat_s:
            raise UsageError(f"--heartbeat {self.heartbeat_s}: study {name!r} was started with --heartbeat "
                             f"{recorded}; every process sharing it must use the same")

    def check_run_studies(self, storage: StudyStorage, suffixes: set[str]) -> None:
        """Refuse a storage whose studies of this run (`suffixes`: their names but the device)
        belong to another GPU model, whatever device their names carry, or were started with
        another heartbeat interval."""
        for summary in optuna.get_all_study_summaries(storage.storage, include_best_trial=False):
            prefix, _, suffix = summary.study_name.partition("/")
            if suffix not in suffixes:
                continue
            recorded = summary.user_attrs.get(DEVICE_ATTR)
            if recorded is None:  # from before the device was recorded: the name has its key
                matches = prefix == self.device.key
            else:
                matches = recorded == self.device.name
            if not matches:
                raise self._device_mismatch(recorded or prefix, storage.where)
            self._check_heartbeat(summary.user_attrs, summary.study_name)

    def load(self, storage: StudyStorage, name: str, sampler=None):
        """The study `name`, or None when the storage has none of that name."""
        try:
            study = optuna.load_study(study_name=name, storage=storage.storage, sampler=sampler)
        except KeyError:
            return None
        recorded = study.user_attrs.get(DEVICE_ATTR)
        if recorded is not None and recorded != self.device.name:
            raise self._device_mismatch(recorded, f"study {name!r}")
        self._check_heartbeat(study.user_attrs, name)
        return study

    def open(self, storage: StudyStorage, name: str, sampler):
        """(study, created?): load it, else create it and record what the others must match."""
        study = self.load(storage, name, sampler)
        if study is not None:
            return study, False
        try:
            study = optuna.create_study(study_name=name, storage=storage.storage, sampler=sampler,
                                        direction="minimize")
        except optuna.exceptions.DuplicatedStudyError:  # another process created it first
            return self.load(storage, name, sampler), False
        study.set_user_attr(DEVICE_ATTR, self.device.name)
        study.set_user_attr(HEARTBEAT_INTERVAL_ATTR, self.heartbeat_s)
        return study, True
