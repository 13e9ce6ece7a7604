"""The tuner's Optuna studies: their names, who may share them, and what their trials add up to.

One study per (device, shape, dtype, role, batch size). The process that creates a study
records the GPU it runs on and its heartbeat interval; every process that loads it later
must match both, so that hosts with another GPU model cannot mix their timings in, and
all processes judge a silent trial stale after the same grace period.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import CONFIG_KEYS
from ..device import DeviceInfo
from ..errors import UsageError
from ..shapes import MoEShape

# Status of a trial, in its user attributes; "counted" ones use up --trials.
COUNTED = ("measured", "wrong_result", "compile_failed", "launch_failed")
# Study user attributes.
DEVICE_ATTR = "device"  # name of the GPU the study's trials run on
HEARTBEAT_ATTR = "heartbeat_s"
# Trial user attribute: the process holding the trial ({"host", "pid", "device", "trial"}).
WORKER_ATTR = "worker"


@dataclass
class RoleResult:
    ranked: list[tuple[float, dict]]  # (µs, config) of the measured configs, best first, each once


def study_suffix(shape: MoEShape, dtype: str, role: str, M: int) -> str:
    return f"E={shape.E},N={shape.N},K={shape.K},topk={shape.topk}/{dtype}/{role}/M={M}"


def study_name(device: DeviceInfo, shape: MoEShape, dtype: str, role: str, M: int) -> str:
    return f"{device.key}/{study_suffix(shape, dtype, role, M)}"


def config_of(params: dict) -> dict:
    return {key: int(params[key]) for key in CONFIG_KEYS}


def params_key(config: dict) -> tuple:
    return tuple(config[key] for key in CONFIG_KEYS)


# -- who may share them ----------------------------------------------------------------------

@dataclass(frozen=True)
class Sharer:
    """What a process must agree on with the others sharing the studies."""

    device: DeviceInfo
    heartbeat_s: int
    where: str  # the storage, as the user named it

    def device_mismatch(self, recorded: str, where: str) -> UsageError:
        return UsageError(f"{where} holds studies tuned on {recorded!r} but this device is {self.device.name!r}: "
                          f"every host tuning them must have the same GPU model (use another --storage for another)")

    def check_heartbeat(self, attrs: dict, name: str) -> None:
        recorded = attrs.get(HEARTBEAT_ATTR)
        if recorded is not None and recorded != self.heartbeat_s:
            raise UsageError(f"--heartbeat {self.heartbeat_s}: study {name!r} was started with --heartbeat "
                             f"{recorded}; every process sharing it must use the same")

    def check_storage(self, storage, suffixes: set[str]) -> None:
        """Refuse a storage whose studies of this run belong to another GPU model (whatever
        device their names carry), or were started with another heartbeat interval."""
        import optuna

        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            prefix, _, suffix = summary.study_name.partition("/")
            if suffix not in suffixes:
                continue
            recorded = summary.user_attrs.get(DEVICE_ATTR)
            if recorded is None:  # from before the device was recorded: the name has its key
                matches = prefix == self.device.key
            else:
                matches = recorded == self.device.name
            if not matches:
                raise self.device_mismatch(recorded or prefix, self.where)
            self.check_heartbeat(summary.user_attrs, summary.study_name)

    def check_study(self, study) -> None:
        recorded = study.user_attrs.get(DEVICE_ATTR)
        if recorded is not None and recorded != self.device.name:
            raise self.device_mismatch(recorded, f"study {study.study_name!r}")
        self.check_heartbeat(study.user_attrs, study.study_name)

    def load(self, storage, name: str, sampler=None):
        """The study `name`, or None when the storage has none of that name."""
        import optuna

        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        except KeyError:
            return None
        self.check_study(study)
        return study

    def open(self, storage, name: str, sampler):
        """(study, created?): load it, else create it and record what the others must match."""
        import optuna

        study = self.load(storage, name, sampler)
        if study is not None:
            return study, False
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize")
        except optuna.exceptions.DuplicatedStudyError:  # another process created it first
            return self.load(storage, name, sampler), False
        study.set_user_attr(DEVICE_ATTR, self.device.name)
        study.set_user_attr(HEARTBEAT_ATTR, self.heartbeat_s)
        return study, True


# -- what the trials add up to -----------------------------------------------------------------

def is_held(trial) -> bool:
    """RUNNING and beating. A trial retried after its worker died inherits that worker's
    attribute: only one naming this very trial counts."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    return trial.state.name == "RUNNING" and isinstance(worker, dict) and worker.get("trial") == trial.number


@dataclass
class StudyState:
    counted: int  # finished trials that used up the budget
    held: dict[int, tuple]  # trial number -> config, of the RUNNING trials live processes hold
    waiting: int  # queued trials: warm starts, and the retries of trials whose worker died

    @property
    def in_flight(self) -> int:
        return len(self.held)


def study_state(study, trials: list | None = None) -> StudyState:
    counted, held, waiting = 0, {}, 0
    for trial in trials if trials is not None else study.get_trials(deepcopy=False):
        # Finished ones only: a retried trial inherits its predecessor's attributes.
        if trial.state.name in ("COMPLETE", "PRUNED") and trial.user_attrs.get("status") in COUNTED:
            counted += 1
        elif is_held(trial) and trial.params:
            held[trial.number] = params_key(config_of(trial.params))
        elif trial.state.name == "WAITING":
            waiting += 1
    return StudyState(counted, held, waiting)


def study_result(study) -> RoleResult | None:
    """The measured configs, fastest first, each once."""
    measured = [(t.value, config_of(t.params)) for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("status") == "measured" and t.value is not None
                and t.user_attrs.get("precise", True)]
    if not measured:
        return None
    measured.sort(key=lambda item: item[0])
    unique, keys = [], set()
    for value, config in measured:
        if params_key(config) not in keys:
            keys.add(params_key(config))
            unique.append((value, config))
    return RoleResult(unique)


def rejection_reasons(study) -> list[str]:
    return sorted({t.user_attrs["reason"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("reason")})
