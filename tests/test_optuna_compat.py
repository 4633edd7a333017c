"""The private Optuna calls of the runner, all in harness.optuna_compat, checked against the installed Optuna."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from harness import optuna_compat


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def test_claim_waiting_takes_the_chosen_trial_once():
    study = _study()
    study.enqueue_trial({}, user_attrs={"point_key": "a"})
    study.enqueue_trial({}, user_attrs={"point_key": "b"})
    second = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[1]
    trial = optuna_compat.claim_waiting(study, second)
    assert isinstance(trial, optuna.Trial) and trial.user_attrs["point_key"] == "b"
    assert optuna_compat.trial_id(trial) == optuna_compat.trial_id(second)
    assert optuna_compat.claim_waiting(study, second) is None  # already RUNNING: another worker's now
    states = {t.user_attrs["point_key"]: t.state for t in study.get_trials()}
    assert states == {"a": TrialState.WAITING, "b": TrialState.RUNNING}


def test_user_attrs_and_state_of_a_frozen_trial():
    study = _study()
    study.enqueue_trial({})
    frozen = study.get_trials(deepcopy=False)[0]
    optuna_compat.set_user_attr(study, frozen, "fail_reason", "gone")
    optuna_compat.set_user_attr(study, optuna_compat.trial_id(frozen), "heartbeat", 1.5)
    assert optuna_compat.set_state(study, frozen, TrialState.FAIL)
    (after,) = study.get_trials()
    assert after.state == TrialState.FAIL and after.user_attrs == {"fail_reason": "gone", "heartbeat": 1.5}
