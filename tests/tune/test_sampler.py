"""The tuner's sampler proposes only configs worth a trial, while there are any."""

import optuna
import pytest

from moetune.tune.sampler import Candidates, study_sampler
from moetune.tune.space import Problem, SearchSpace, config_of, iter_configs, optuna_distributions
from moetune.types import Gemm

SPACE = SearchSpace({"BLOCK_SIZE_M": (16, 32, 64), "BLOCK_SIZE_N": (32, 64, 128), "BLOCK_SIZE_K": (32, 64),
                     "GROUP_SIZE_M": (1, 4), "num_warps": (2, 4), "num_stages": (2,)})
# One token on 4 experts: the rules keep 16 of the 72 configs.
PROBLEM = Problem(Gemm.GEMM1, M=1, E=4, topk=2, n_out=64, k_in=64, dtype_bytes=2)
SMEM = 232448


def ask_and_measure(sampler_of, asks: int, held=()) -> tuple[list, Candidates]:
    """A study asking `asks` trials, each measured (as the tuner tells the candidates);
    `held`: configs other processes hold meanwhile."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    candidates = Candidates(SPACE, PROBLEM, SMEM)
    candidates.held = set(held)
    study = optuna.create_study(sampler=sampler_of(candidates))
    asked = []
    for _ in range(asks):
        trial = study.ask(optuna_distributions(SPACE))
        config = config_of(trial.params)
        asked.append(config)
        candidates.measured[config] = float(sum(config.to_json().values()))
        study.tell(trial, candidates.measured[config])
    return asked, candidates


def kept() -> list:
    return list(Candidates(SPACE, PROBLEM, SMEM).in_order)


def test_the_rules_keep_some_but_not_all_of_the_space():
    assert len(kept()) == 16 and SPACE.size() == 72


@pytest.mark.parametrize("seed", [0, 1])
def test_every_kept_config_is_proposed_once_before_anything_else(seed):
    asked, _ = ask_and_measure(lambda candidates: study_sampler(SPACE, candidates, seed), asks=len(kept()))
    assert set(asked) == set(kept())  # each kept config, none twice, nothing pruned


def test_plain_tpe_would_propose_pruned_or_repeated_configs():
    """What the wrapper is for: the same loop with TPE alone wastes trials."""
    tpe = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, n_startup_trials=8, seed=0)
    asked, _ = ask_and_measure(lambda candidates: tpe, asks=len(kept()))
    assert set(asked) != set(kept())


def test_configs_other_processes_hold_are_not_proposed():
    held = kept()[::2]
    asked, _ = ask_and_measure(lambda candidates: study_sampler(SPACE, candidates, 0), asks=len(kept()) - len(held),
                               held=held)
    assert set(asked) == set(kept()) - set(held)


def test_with_nothing_left_to_try_tpe_s_own_proposals_stand():
    asked, candidates = ask_and_measure(lambda candidates: study_sampler(SPACE, candidates, 0), asks=len(kept()) + 5)
    assert candidates.fresh() == []
    assert set(asked[:len(kept())]) == set(kept())
    assert set(asked[len(kept()):]) <= set(iter_configs(SPACE))  # configs of the space, repeated or pruned


def test_a_warm_start_the_rules_prune_gives_way_to_the_nearest_kept_config():
    wide = next(config for config in iter_configs(SPACE) if config.block_m == 64 and config.block_n == 128)
    nearest = Candidates(SPACE, PROBLEM, SMEM).nearest_kept(wide)
    assert wide not in kept() and nearest in kept()
    assert (nearest.block_m, nearest.block_n) == (16, 64)  # as close as the rules allow
