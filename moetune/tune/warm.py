"""The configs a study tries first, queued by the process that creates it: the nearest batch
size's best (of those this process tuned), a baseline table's configs at the two nearest
batch sizes (--baseline-configs), and the default heuristic."""

from __future__ import annotations

from ..configs import default_config
from ..shapes import MoEShape
from ..types import Gemm, LaunchConfig
from .settings import BatchKey, StudyKey, TuneSettings
from .study import RoleResult

# How many of a tuned study's best configs warm-start its neighbour.
NEIGHBOUR_BEST = 3


class WarmStarts:
    def __init__(self, settings: TuneSettings):
        self.settings = settings
        self.best: dict[StudyKey, list[LaunchConfig]] = {}  # the best configs of the studies tuned here
        self.baselines: dict[MoEShape, object] = {}  # shape -> its baseline table's configs, or None

    def learn(self, key: StudyKey, result: RoleResult | None) -> None:
        """A study this process tuned: its best configs start its neighbours."""
        if result is not None:
            self.best[key] = [config for _, config in result.ranked[:NEIGHBOUR_BEST]]

    def configs(self, key: StudyKey) -> list[LaunchConfig]:
        shape, M = key.batch.shape, key.batch.M
        warm = self._neighbour_best(key)
        baseline = self._baseline(shape)
        if baseline is not None:
            table = baseline.gemm1 if key.role.gemm is Gemm.GEMM1 else baseline.gemm2
            for near in sorted(table, key=lambda m: (abs(m - M), m))[:2]:
                warm.append(LaunchConfig.from_json(table[near], "baseline config", unknown="ignore"))
        default = default_config(M, shape.E, shape.N, shape.K, shape.topk,
                                 shared_memory_bytes=self.settings.device.shared_memory_bytes)
        return warm + [LaunchConfig.from_json(default)]

    def _neighbour_best(self, key: StudyKey) -> list[LaunchConfig]:
        """The best configs of the nearest batch size this process has tuned this role at."""
        sizes = sorted(self.settings.batch_sizes)
        tuned = [M for M in sizes if self._at(key, M) in self.best]
        if not tuned:
            return []
        here = sizes.index(key.batch.M)
        nearest = min(tuned, key=lambda M: (abs(sizes.index(M) - here), M))
        return list(self.best[self._at(key, nearest)])

    @staticmethod
    def _at(key: StudyKey, M: int) -> StudyKey:
        return BatchKey(key.batch.shape, M).study(key.role)

    def _baseline(self, shape: MoEShape):
        if shape not in self.baselines:
            self.baselines[shape] = None
            if self.settings.baseline_dir is not None:
                from ..baseline_configs import find_baseline

                self.baselines[shape] = find_baseline(self.settings.baseline_dir, shape.E, shape.N,
                                                      self.settings.device.key, self.settings.dtype)
        return self.baselines[shape]
