"""The few things the study runner needs that Optuna has no public API for, in one place.

Written against Optuna 5.0.0 (``optuna.__version__``); each function says which private attribute it
touches, so an Optuna upgrade is checked here and nowhere else (``harness.study`` uses the public API:
``Trial.set_user_attr``, ``Study.tell``, ``Study.ask``, ``Study.get_trials``).

- Writing to a trial the process does not hold as a live ``optuna.Trial``: a FrozenTrial from
  ``get_trials`` (a stale RUNNING trial of a dead worker, a WAITING point no longer in the spec), or a
  trial stamped by a heartbeat thread. Optuna's public writers need the live trial object.
- Claiming one particular WAITING trial atomically. ``Study.ask`` claims one too, but not the one the
  caller chose, and it may create a new trial when none is waiting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = ["OPTUNA_VERSION", "claim_waiting", "set_state", "set_user_attr", "trial_id"]

OPTUNA_VERSION = "5.0.0"


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (``_trial_id``; ``number`` is per study, the id is per storage)."""
    return trial._trial_id


def set_user_attr(study: optuna.Study, trial: Any, key: str, value: Any) -> None:
    """``trial.set_user_attr`` for a trial held only as a FrozenTrial or an id (``Study._storage``)."""
    target = trial if isinstance(trial, int) else trial_id(trial)
    study._storage.set_trial_user_attr(target, key, value)


def set_state(study: optuna.Study, trial: Any, state: optuna.trial.TrialState) -> bool:
    """Set the state of a trial that is not this process's live RUNNING trial (``Study.tell`` refuses a
    WAITING one). Returns False when another process changed it first (the storage's compare-and-set)."""
    target = trial if isinstance(trial, int) else trial_id(trial)
    return bool(study._storage.set_trial_state_values(target, state=state))


def claim_waiting(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial | None:
    """Move this WAITING trial to RUNNING if no other worker did first; the live trial, else None."""
    import optuna
    from optuna.trial import TrialState

    try:
        if not set_state(study, frozen, TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    return optuna.Trial(study, trial_id(frozen))
