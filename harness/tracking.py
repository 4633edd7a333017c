"""Every MLflow call of the project: one parent run per study, one child run per Optuna trial.

Why one module: MLflow's fluent API keeps a per-process "active run" that does not survive worker
processes or a resumed study; here every call names its run id explicitly (``MlflowClient``), so a trial
logged from a spawned worker lands under the right parent, and nothing else in the code base needs to know
MLflow exists.

Layout with the default store (``sqlite:///<output_dir>/mlflow.db``): artifacts under
``<output_dir>/mlartifacts`` (never ``./mlruns`` in the working directory). Parallel workers must not race
to create the SQLite schema, so :func:`init_tracking` runs in the parent process before any worker starts;
workers only open the existing database.

Links: each child run carries the tag ``optuna_trial_number`` and ``mlflow.parentRunId``; the Optuna trial
carries the user attribute ``mlflow_run_id`` (set by ``harness.study``).

Example::

    tracking = init_tracking(spec, spec.output_path)
    run = TrialRun.start(tracking, trial_number=0, variant="sft", family="baseline", seed=0,
                         components={"ema": False, ...}, params={"training.learning_rate": 2e-5})
    run.log_step(1, {"loss": 0.7})
    run.log_metrics({"mean.acc": 0.4})
    run.finish("COMPLETE")
    load_results(spec)          # pandas DataFrame, one row per trial (columns: see load_results)
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness.errors import HarnessError
from harness.metric_names import normalise_metric_name
from unisd_components.config import COMPONENT_NAMES

if TYPE_CHECKING:
    from harness.spec import StudySpec

__all__ = [
    "StudyTracking",
    "TrialRun",
    "finish_study",
    "init_tracking",
    "load_results",
    "log_report_artifacts",
    "close_dangling_runs",
    "normalise_metric_name",
    "open_tracking",
    "start_ui",
    "stop_ui",
    "study_ui_url",
]

# Tags that identify our runs inside an experiment that may hold other things too.
TAG_ROLE = "unisd.role"  # "study" | "trial"
TAG_STUDY = "unisd.study"
TAG_TRIAL = "optuna_trial_number"
TAG_STATE = "optuna_state"
TAG_FAIL_REASON = "fail_reason"
_PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag on its GenAI "traces" overview (empty here); a study
# is model training, whose runs table is what a user compares.
_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {_KIND_TAG: "custom_model_development"}
_MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}
_VERSIONED = ("unisd-harness", "torch", "transformers", "peft", "optuna", "mlflow", "lm_eval", "pandas")
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, *args, **kwargs):
    """SQLite stores answer "database is locked" under parallel writers: wait and retry a few times."""
    for attempt in range(8):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # MLflow wraps sqlite's OperationalError in its own exception types
            if "locked" not in str(err) or attempt == 7:
                raise
            time.sleep(0.2 * 2**attempt)
    return None


@dataclass(frozen=True)
class StudyTracking:
    """Where a study's runs live. Picklable: handed to worker processes."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_name: str


def _artifact_location(spec: StudySpec) -> str | None:
    # Only for local stores: a tracking server decides its own artifact root.
    if spec.tracking_uri.startswith("sqlite:"):
        return (spec.output_path / "mlartifacts").resolve().as_uri()
    return None


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def _find_experiment(client, name: str):
    return _retry(client.get_experiment_by_name, name)


def init_tracking(spec: StudySpec, *, parent_run_id: str | None = None) -> StudyTracking:
    """Create (or reopen) the store, the experiment and the study's parent run. Call in the parent process.

    ``parent_run_id``: the run a previous invocation created (resume); it is reopened as RUNNING.
    """
    from mlflow.entities import Param, RunTag

    spec.output_path.mkdir(parents=True, exist_ok=True)
    client = _client(spec.tracking_uri)
    experiment = _find_experiment(client, spec.experiment_name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(
                spec.experiment_name, artifact_location=_artifact_location(spec), tags=EXPERIMENT_TAGS
            )
        except Exception:  # another machine created it a moment ago (a shared tracking server)
            experiment = _find_experiment(client, spec.experiment_name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(_KIND_TAG) is None:  # a store made before the tag existed
            client.set_experiment_tag(experiment_id, _KIND_TAG, EXPERIMENT_TAGS[_KIND_TAG])
    if parent_run_id is not None:
        try:
            client.update_run(parent_run_id, status="RUNNING")
            return StudyTracking(spec.tracking_uri, experiment_id, parent_run_id, spec.name)
        except Exception:  # the store was replaced or the run deleted: start a new parent
            pass
    versions = _package_versions()
    tags = {TAG_ROLE: "study", TAG_STUDY: spec.name, "sampler": spec.search.sampler}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update({f"version.{k}": v for k, v in versions.items()})
    run = client.create_run(experiment_id, tags=tags, run_name=f"study:{spec.name}")
    run_id = run.info.run_id
    from harness.spec import dump_spec

    resolved = dump_spec(spec)
    client.log_dict(run_id, resolved, "spec/resolved_spec.json")
    if spec.source is not None and Path(spec.source).is_file():
        client.log_artifact(run_id, str(spec.source), "spec")
    client.log_dict(run_id, versions, "environment/package_versions.json")
    params = [
        Param("model", ", ".join(m.ref for m in spec.models())),
        Param("sampler", spec.search.sampler),
        Param("objectives", ",".join(f"{o.metric}:{o.direction}" for o in spec.search.objectives)),
        Param("eval_benchmarks", ",".join(spec.evaluation.benchmarks)),
        Param("train_benchmarks", ",".join(spec.data.train)),
        Param("seeds", ",".join(map(str, spec.seeds))),
    ]
    client.log_batch(
        run_id, params=params, tags=[RunTag("mlflow.note.content", spec.description or spec.name)]
    )
    return StudyTracking(spec.tracking_uri, experiment_id, run_id, spec.name)


def open_tracking(spec: StudySpec) -> StudyTracking | None:
    """The study's tracking handles when it has been initialised (the newest parent run), else None."""
    client = _client(spec.tracking_uri)
    experiment = _find_experiment(client, spec.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{spec.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return StudyTracking(spec.tracking_uri, experiment.experiment_id, runs[0].info.run_id, spec.name)


def finish_study(
    tracking: StudyTracking, status: str = "FINISHED", summary: Mapping[str, Any] | None = None
) -> None:
    client = _client(tracking.tracking_uri)
    if summary:
        client.log_dict(tracking.parent_run_id, dict(summary), "summary.json")
        numeric = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and math.isfinite(v)}
        _log_metrics(client, tracking.parent_run_id, {f"study.{k}": v for k, v in numeric.items()}, step=0)
    _retry(client.set_terminated, tracking.parent_run_id, status)


def close_dangling_runs(
    tracking_uri: str, spec: StudySpec, states: Mapping[int, str], reasons: Mapping[int, str | None]
) -> int:
    """Close child runs still RUNNING whose Optuna trial is no longer RUNNING (its process died).

    ``states``/``reasons``: Optuna state name and fail reason by trial number. Returns how many closed.
    """
    client = _client(tracking_uri)
    experiment = _find_experiment(client, spec.experiment_name)
    if experiment is None:
        return 0
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_STUDY}` = '{spec.name}'",
        max_results=1000,
    )
    closed = 0
    for run in runs:
        number = int(run.data.tags.get(TAG_TRIAL, -1))
        state = states.get(number)
        if state is None or state in ("RUNNING", "WAITING"):
            continue
        reason = reasons.get(number)
        client.set_tag(run.info.run_id, TAG_STATE, state)
        if reason:
            client.set_tag(run.info.run_id, TAG_FAIL_REASON, reason[:5000])
        status = "KILLED" if (reason or "").startswith("interrupted") else _MLFLOW_STATUS.get(state, "FAILED")
        client.set_terminated(run.info.run_id, status)
        closed += 1
    return closed


def _log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(normalise_metric_name(k), float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
        _retry(client.log_batch, run_id, metrics=batch[i : i + 900])


class TrialRun:
    """The MLflow child run of one Optuna trial. Every method is safe to call from a worker process."""

    def __init__(self, tracking: StudyTracking, run_id: str) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self._client = _client(tracking.tracking_uri)
        self._monitor = None

    @classmethod
    def start(
        cls,
        tracking: StudyTracking,
        *,
        trial_number: int,
        variant: str,
        family: str,
        seed: int,
        components: Mapping[str, bool],
        params: Mapping[str, Any],
        point_key: str | None = None,
        system_metrics: bool = True,
        extra_tags: Mapping[str, Any] | None = None,
    ) -> TrialRun:
        """Open the child run: flat params (one boolean per component), tags naming the variant.

        ``extra_tags``: the trial's coordinates on the study's axes (``model``, ``train_task``,
        ``variant_kind``), read back as columns by :func:`load_results`."""
        from mlflow.entities import Param

        client = _client(tracking.tracking_uri)
        enabled = [c for c in COMPONENT_NAMES if components.get(c)]
        tags = {
            _PARENT_TAG: tracking.parent_run_id,
            TAG_ROLE: "trial",
            TAG_STUDY: tracking.study_name,
            TAG_TRIAL: str(trial_number),
            TAG_STATE: "RUNNING",
            "variant": variant,
            "family": family,
            "seed": str(seed),
            "components": "+".join(enabled) or "none",
        }
        if point_key:
            tags["point_key"] = point_key
        tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
        run = _retry(
            client.create_run, tracking.experiment_id, tags=tags, run_name=f"{trial_number}:{variant}"
        )
        self = cls(tracking, run.info.run_id)
        flat: dict[str, str] = {"variant": variant, "family": family, "seed": str(seed)}
        flat.update({f"component.{c}": str(bool(components.get(c, False))).lower() for c in COMPONENT_NAMES})
        flat.update({k: _param_text(v) for k, v in params.items()})
        batch = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(batch), 90):  # MLflow caps a batch at 100 params
            _retry(client.log_batch, self.run_id, params=batch[i : i + 90])
        if system_metrics:
            self._start_system_metrics()
        return self

    def _start_system_metrics(self) -> None:
        # Needs psutil (a dependency); CPU/RAM/GPU sampled every 10 s under system/*.
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, tracking_uri=self.tracking.tracking_uri
            )
            self._monitor.start()
        except Exception:  # system metrics are a nicety; never fail a trial for them
            self._monitor = None

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step training metrics, logged as ``train/<name>`` at ``step``."""
        _log_metrics(self._client, self.run_id, {f"train/{k}": v for k, v in metrics.items()}, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        _log_metrics(self._client, self.run_id, metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            _retry(self._client.set_tag, self.run_id, key, str(value)[:5000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            _retry(self._client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.is_file():
            _retry(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        _retry(self._client.log_dict, self.run_id, dict(data), artifact_file)

    def finish(self, state: str, reason: str | None = None) -> None:
        """Close the run. ``state``: the Optuna state (COMPLETE, PRUNED, FAIL) or INTERRUPTED."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
            self._monitor = None
        tags = {TAG_STATE: "FAIL" if state == "INTERRUPTED" else state}
        if reason:
            tags[TAG_FAIL_REASON] = reason
        self.set_tags(tags)
        _retry(self._client.set_terminated, self.run_id, _MLFLOW_STATUS.get(state, "FAILED"))


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM]


def _parse_param(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


_FIXED_PARAMS = {"variant", "family", "seed"}
_AXIS_TAGS = ("model", "train_task", "variant_kind")


def load_results(spec: StudySpec, output_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per trial of the study (the table the report analyses).

    Columns: trial, state, variant, family, seed, one 0/1 column per component, ``param.<name>`` for
    each hyperparameter, the evaluation metrics (normalised names), train_seconds, generated_tokens,
    mlflow_run_id. Per-step training curves and system metrics stay in MLflow.
    """
    if output_dir is not None:
        spec = spec.with_overrides(output_dir=output_dir)
    if (
        spec.tracking_uri.startswith("sqlite:")
        and not Path(spec.tracking_uri.removeprefix("sqlite:///")).is_file()
    ):
        raise HarnessError(f"no tracking store at {spec.tracking_uri}: run `harness run` on this study first")
    client = _client(spec.tracking_uri)
    experiment = _find_experiment(client, spec.experiment_name)
    if experiment is None:
        raise HarnessError(
            f"no MLflow experiment {spec.experiment_name!r} in {spec.tracking_uri}: run the study first"
        )
    runs = []
    token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_STUDY}` = '{spec.name}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        row: dict[str, Any] = {
            "trial": int(tags[TAG_TRIAL]),
            "state": tags.get(TAG_STATE, run.info.status),
            "variant": tags.get("variant", params.get("variant", "")),
            "family": tags.get("family", params.get("family", "")),
            "seed": int(tags.get("seed", params.get("seed", 0))),
        }
        for name in _AXIS_TAGS:  # the trial's coordinates on the study's axes, when it has them
            if name in tags:
                row[name] = tags[name]
        for name in COMPONENT_NAMES:
            row[name] = int(params.get(f"component.{name}", "false") == "true")
        for key, value in sorted(params.items()):
            if key in _FIXED_PARAMS or key.startswith("component."):
                continue
            row[f"param.{key}"] = _parse_param(value)
        for key, value in metrics.items():
            if key.startswith(("train/", "system/")):
                continue
            row[key] = value
        row["mlflow_run_id"] = run.info.run_id
        rows.append(row)
    columns = ["trial", "state", "variant", "family", "seed", *COMPONENT_NAMES]
    axis_columns = [c for c in _AXIS_TAGS if any(c in r for r in rows)]
    columns = [*columns[:5], *axis_columns, *columns[5:]]
    if not rows:
        return pd.DataFrame(columns=[*columns, "train_seconds", "generated_tokens", "mlflow_run_id"])
    frame = pd.DataFrame(rows)
    # A trial number appears once; if a store holds a re-created run for it, keep the newest.
    frame = frame.drop_duplicates("trial", keep="first").sort_values("trial").reset_index(drop=True)
    for name in ("train_seconds", "generated_tokens"):
        if name not in frame:
            frame[name] = float("nan")
    params_cols = sorted(c for c in frame.columns if c.startswith("param."))
    metric_cols = sorted(
        c for c in frame.columns if c not in columns and c not in params_cols and c != "mlflow_run_id"
    )
    frame = frame[[*columns, *params_cols, *metric_cols, "mlflow_run_id"]]
    frame[list(COMPONENT_NAMES)] = frame[list(COMPONENT_NAMES)].astype(int)
    frame["trial"] = frame["trial"].astype(int)
    frame["seed"] = frame["seed"].astype(int)
    return frame


def log_report_artifacts(
    spec: StudySpec, report_dir: str | Path, output_dir: str | Path | None = None
) -> None:
    """Attach a written report (HTML, Markdown, figures, CSV) to the study's parent run."""
    if output_dir is not None:
        spec = spec.with_overrides(output_dir=output_dir)
    tracking = open_tracking(spec)
    if tracking is None:
        raise HarnessError(
            f"no parent run for study {spec.name!r} in {spec.tracking_uri}: run the study first"
        )
    _retry(_client(tracking.tracking_uri).log_artifacts, tracking.parent_run_id, str(report_dir), "report")


# Tests and tools sometimes need the raw client, e.g. to assert on runs; keep it behind this module.
def get_runs(spec: StudySpec) -> list[Any]:
    """Every run (parent and children) of the study's experiment, newest first."""
    client = _client(spec.tracking_uri)
    experiment = _find_experiment(client, spec.experiment_name)
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], max_results=1000))


def start_ui(spec: StudySpec, port: int = 5000):
    """Start ``mlflow ui`` on 127.0.0.1 over the study's store, in its own process group.

    Returns ``(process, url)``; stop it with ``os.killpg(process.pid, signal.SIGTERM)`` (the UI's
    server runs child processes that a plain terminate would leave behind).
    """
    import sys

    uri = spec.tracking_uri
    if uri.startswith("sqlite:") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise HarnessError(f"no tracking store at {uri}: run `harness run` on this study first")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def study_ui_url(spec: StudySpec, base_url: str) -> str:
    """The page of the study's experiment in the MLflow UI at ``base_url``, on its runs table.

    MLflow 3.17's UI opens every experiment on its GenAI overview (traces: empty for a study) unless the
    URL asks for the model-training workflow; the experiment tag alone no longer decides.
    """
    experiment = _find_experiment(_client(spec.tracking_uri), spec.experiment_name)
    if experiment is None:
        return base_url
    return f"{base_url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"


def stop_ui(process, grace: float = 15.0) -> None:
    """Stop a UI started by :func:`start_ui` and every process of its group (SIGTERM, then SIGKILL)."""
    import os
    import signal

    def group_alive() -> bool:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    if group_alive():
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + grace
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while group_alive() and time.time() < deadline:
        time.sleep(0.2)
    if group_alive():
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
