"""The tuner's Optuna sampler: multivariate TPE that proposes only configs worth a trial.

TPE samples the whole grid of BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps and num_stages, but
at a given batch size the pruning rules keep a fraction of it (a quarter of the default space
at M = 4096, a sixth at M = 16), and later in a study it often proposes a config already
measured. Each such proposal used to become a trial of its own, pruned or marked duplicate:
several per measured config, each costing a round of storage writes that all processes
sharing the studies queue for. This sampler draws again instead, so a trial is created for a
config that the rules keep and nobody has measured or holds:

- after TPE's random start-up phase, TPE's proposals, until one is such a config (at most
  `tries` draws);
- during the start-up phase, or when `tries` draws found none, a uniform draw among them;
- when there is none left, TPE's proposal stands and the tuner records it as pruned or
  duplicate, as it would without this sampler.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution


class KeptConfigSampler(optuna.samplers.BaseSampler):
    """Wraps `base` (a TPESampler); `fresh` lists the configs worth a trial right now."""

    def __init__(self, base: optuna.samplers.BaseSampler, distributions: dict[str, BaseDistribution],
                 fresh: Callable[[], list[dict]], worth_trying: Callable[[dict], bool], seed: int | None = None,
                 tries: int = 16):
        self.base, self.distributions = base, distributions
        self.fresh, self.worth_trying, self.tries = fresh, worth_trying, tries
        self.rng = random.Random(seed)

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        # Always the whole space: the start-up draw sets every parameter at once.
        return dict(self.distributions)

    def sample_relative(self, study, trial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        proposal: dict[str, Any] = {}
        for _ in range(self.tries):
            proposal = self.base.sample_relative(study, trial, search_space)
            if not proposal:
                break  # TPE's start-up phase: it would draw each parameter on its own
            if self.worth_trying(proposal):
                return proposal
        fresh = self.fresh()
        if not fresh:
            return proposal
        return dict(self.rng.choice(fresh))

    def sample_independent(self, study, trial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.rng.seed()
