"""The two stores of a study must tell the same history: Optuna's trials and MLflow's runs.

Why: a study lives in two stores (``optuna.db``: which points ran; ``mlflow.db``: their metrics and
artifacts). Delete the MLflow file and keep Optuna's, and a rerun used to count "4 COMPLETE (0 run
now)", start an empty MLflow store and end with "study has no trials yet". Nothing in Optuna's
storage holds the metrics a report needs (only the objective values), so the runs cannot be rebuilt
from it faithfully; the honest answer is one line saying what happened and the two ways on: bring the
MLflow store back, or start the study anew.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError

if TYPE_CHECKING:
    import optuna

    from harness.spec import StudySpec

__all__ = ["check_tracking_history"]


def check_tracking_history(spec: StudySpec, study: optuna.Study, storage_url: str) -> None:
    """Raise a one-line HarnessError when Optuna records finished trials whose MLflow history is gone.

    Checked before the tracking store is opened, so a missing SQLite file is not silently recreated.
    """
    from optuna.trial import TrialState

    recorded = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("mlflow_run_id")
    ]
    if not recorded:
        return
    uri = spec.tracking_uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            _gone(spec, storage_url, len(recorded), f"{path} is missing", f"restore {path}")
    missing = [t.number for t in recorded if not _run_exists(uri, t.user_attrs["mlflow_run_id"])]
    if len(missing) == len(recorded):
        _gone(
            spec,
            storage_url,
            len(recorded),
            f"{uri} has none of their runs",
            f"restore the MLflow store {uri}",
        )


def _run_exists(uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def _gone(spec: StudySpec, storage_url: str, n: int, what: str, restore: str) -> None:
    raise HarnessError(
        f"the MLflow history of study {spec.name!r} is gone ({what}) while its Optuna storage {storage_url} "
        f"records {n} finished trial(s): {restore} and run again, or start anew with a new --output-dir "
        "(or delete the Optuna storage)"
    )
