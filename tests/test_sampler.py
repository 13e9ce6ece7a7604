"""The tuner's sampler proposes only configs worth a trial, while there are any."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from moetune.tune.sampler import KeptConfigSampler

VALUES = [1, 2, 3, 4, 5, 6, 7, 8]
SPACE = {"a": CategoricalDistribution(VALUES), "b": CategoricalDistribution(VALUES)}
KEPT = [{"a": a, "b": b} for a in VALUES for b in VALUES if a * b <= 8]  # 20 of the 64


def run_study(sampler_of, asks: int) -> list[tuple]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen: set[tuple] = set()
    fresh = lambda: [c for c in KEPT if (c["a"], c["b"]) not in seen]  # noqa: E731
    worth = lambda p: (p["a"], p["b"]) not in seen and p["a"] * p["b"] <= 8  # noqa: E731
    study = optuna.create_study(sampler=sampler_of(fresh, worth))
    asked = []
    for _ in range(asks):
        trial = study.ask(SPACE)
        key = (trial.params["a"], trial.params["b"])
        asked.append(key)
        seen.add(key)
        study.tell(trial, float(key[0] + key[1]))
    return asked


def kept_sampler(seed):
    return lambda fresh, worth: KeptConfigSampler(
        optuna.samplers.TPESampler(multivariate=True, constant_liar=True, n_startup_trials=8, seed=seed),
        SPACE, fresh=fresh, worth_trying=worth, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_kept_config_is_proposed_once_before_anything_else(seed):
    asked = run_study(kept_sampler(seed), asks=len(KEPT))
    assert all(a * b <= 8 for a, b in asked), asked
    assert len(set(asked)) == len(asked)


def test_plain_tpe_would_propose_pruned_or_repeated_configs():
    """What the wrapper is for: the same loop with TPE alone wastes trials."""
    asked = run_study(lambda fresh, worth: optuna.samplers.TPESampler(
        multivariate=True, constant_liar=True, n_startup_trials=8, seed=0), asks=len(KEPT))
    assert any(a * b > 8 for a, b in asked) or len(set(asked)) < len(asked)


def test_with_nothing_left_to_try_the_study_still_asks():
    asked = run_study(kept_sampler(0), asks=len(KEPT) + 5)
    assert len(asked) == len(KEPT) + 5  # the last five are TPE's own proposals, pruned or repeated
    assert set(asked[:len(KEPT)]) == {(c["a"], c["b"]) for c in KEPT}
