"""The tuner's Optuna sampler: multivariate TPE that proposes only configs worth a trial.

TPE samples the whole grid of BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps and num_stages, but
at a given batch size the pruning rules keep a fraction of it (a quarter of the default space
at M = 4096, a sixth at M = 16), and later in a study it often proposes a config already
measured. Each such proposal used to become a trial of its own, pruned or marked duplicate:
several per measured config, each costing a round of storage writes that all processes
sharing the studies queue for. This sampler draws again instead, so a trial is created for a
config that the rules keep and nobody has measured or holds (`Candidates` knows which):

- after TPE's random start-up phase, TPE's proposals, until one is such a config (at most
  `tries` draws);
- during the start-up phase, or when `tries` draws found none, a uniform draw among them;
- when there is none left, TPE's proposal stands and the tuner records it as pruned or
  duplicate, as it would without this sampler.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from ..types import CONFIG_KEYS, LaunchConfig
from .space import Problem, SearchSpace, candidates, config_of, optuna_distributions

# The TPE sampler every study wraps, and the tables' record of it.
TPE_OPTIONS = {"multivariate": True, "constant_liar": True, "n_startup_trials": 8}


def sampler_description() -> str:
    tpe = ", ".join(f"{name}={value}" for name, value in TPE_OPTIONS.items())
    return f"KeptConfigSampler(TPESampler({tpe}))"


class Candidates:
    """The configs the pruning rules keep for one problem, and which of them are taken:
    measured (or rejected) by any process, or held RUNNING by one."""

    def __init__(self, space: SearchSpace, problem: Problem, shared_memory_bytes: int):
        self.space, self.problem, self.shared_memory_bytes = space, problem, shared_memory_bytes
        self.measured: dict[LaunchConfig, float | None] = {}  # config -> µs, None when rejected
        self.held: set[LaunchConfig] = set()  # the configs of RUNNING trials, at the last look

    @functools.cached_property
    def kept(self) -> frozenset[LaunchConfig]:
        return frozenset(self.in_order)

    @functools.cached_property
    def in_order(self) -> tuple[LaunchConfig, ...]:
        """Computed on first use: a study that asks nothing never prunes its space."""
        return tuple(candidates(self.space, self.problem, self.shared_memory_bytes))

    def is_fresh(self, config: LaunchConfig) -> bool:
        """Kept by the rules, and neither measured nor held by any process."""
        return config in self.kept and config not in self.measured and config not in self.held

    def worth_trying(self, params: dict[str, Any]) -> bool:
        """The sampler's test of a proposal (Optuna's parameters)."""
        return self.is_fresh(config_of(params))

    def fresh(self) -> list[LaunchConfig]:
        return [config for config in self.in_order if self.is_fresh(config)]

    def nearest_kept(self, config: LaunchConfig) -> LaunchConfig | None:
        """The kept config closest to `config` (in log2 steps of each key); None if none is kept."""
        if not self.in_order:
            return None
        wanted = config.to_json()
        return min(self.in_order, key=lambda c: sum(abs(math.log2(v / wanted[k])) for k, v in c.to_json().items()))


class KeptConfigSampler(optuna.samplers.BaseSampler):
    """Wraps `base` (a TPESampler); `candidates` says which configs are worth a trial right now."""

    def __init__(self, base: optuna.samplers.BaseSampler, distributions: dict[str, BaseDistribution],
                 candidates: Candidates, seed: int | None = None, tries: int = 16):
        if set(distributions) != set(CONFIG_KEYS):
            raise ValueError(f"the sampler draws launch configs: distributions of {', '.join(CONFIG_KEYS)}")
        self.base, self.distributions, self.candidates, self.tries = base, distributions, candidates, tries
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
            if self.candidates.worth_trying(proposal):
                return proposal
        fresh = self.candidates.fresh()
        if not fresh:
            return proposal
        return self.rng.choice(fresh).to_json()

    def sample_independent(self, study, trial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.rng.seed()


def study_sampler(space: SearchSpace, candidates: Candidates, seed: int) -> KeptConfigSampler:
    """The sampler of one study: TPE with TPE_OPTIONS, proposing `candidates`' fresh configs."""
    tpe = optuna.samplers.TPESampler(**TPE_OPTIONS, seed=seed)
    return KeptConfigSampler(tpe, optuna_distributions(space), candidates, seed=seed)
