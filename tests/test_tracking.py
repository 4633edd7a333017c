"""harness.tracking against a real MLflow SQLite store in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.spec import load_spec
from harness.tracking import (
    TrialRun,
    close_dangling_runs,
    finish_study,
    get_runs,
    init_tracking,
    load_results,
    log_report_artifacts,
    normalise_metric_name,
    open_tracking,
)
from unisd_components.config import COMPONENT_NAMES

SPEC = """
name: tracktest
model: {ref: tiny-random:llama, device: cpu}
data: {train: [scienceqa], train_size: 4}
method:
  baselines: [base, sft]
  components: [ema]
  subsets: all
  ema: {sync_steps: 1}
training: {max_steps: 1}
evaluation: {benchmarks: [scienceqa], limit: 2}
output_dir: OUT
"""


@pytest.fixture()
def spec(tmp_path: Path):
    path = tmp_path / "study.yaml"
    path.write_text(SPEC.replace("OUT", str(tmp_path / "out")))
    return load_spec(path)


def test_metric_names_are_normalised():
    assert normalise_metric_name("acc,none") == "acc"
    assert normalise_metric_name("pass@1,create_test") == "pass_at_1_create_test"
    assert normalise_metric_name("scienceqa.acc") == "scienceqa.acc"
    assert "," not in normalise_metric_name("a,b,c")


def test_parent_and_child_runs_and_results_table(spec, tmp_path):
    tracking = init_tracking(spec)
    db = tmp_path / "out" / "mlflow.db"
    assert db.is_file(), "the SQLite store lives in the output dir"
    run = TrialRun.start(
        tracking,
        trial_number=0,
        variant="unisd[ema]",
        family="unisd",
        seed=1,
        components={"ema": True},
        params={"ema.beta": 0.9, "training.learning_rate": 1e-4},
        system_metrics=False,
    )
    for step in range(1, 4):
        run.log_step(step, {"loss": 1.0 / step})
    run.log_metrics(
        {"scienceqa.acc,none": 0.5, "mean.acc": 0.5, "train_seconds": 2.0, "generated_tokens": 64}
    )
    run.log_dict({"method": "sdft"}, "variant.json")
    run.finish("COMPLETE")
    failed = TrialRun.start(
        tracking,
        trial_number=1,
        variant="sft",
        family="baseline",
        seed=1,
        components={},
        params={},
        system_metrics=False,
    )
    failed.finish("FAIL", "non-finite loss at step 1 (loss)")
    finish_study(tracking, "FINISHED", {"ran": 2})

    frame = load_results(spec)
    assert list(frame["trial"]) == [0, 1]
    assert list(frame.columns[:5]) == ["trial", "state", "variant", "family", "seed"]
    for name in COMPONENT_NAMES:
        assert frame[name].dtype.kind == "i"
    first = frame.iloc[0]
    assert first["state"] == "COMPLETE" and first["variant"] == "unisd[ema]" and first["family"] == "unisd"
    assert first["ema"] == 1 and first["agreement"] == 0 and first["seed"] == 1
    assert first["param.ema.beta"] == pytest.approx(0.9)
    assert first["scienceqa.acc"] == pytest.approx(0.5)  # comma-free name
    assert first["train_seconds"] == pytest.approx(2.0) and first["generated_tokens"] == 64
    assert not any(c.startswith("train/") for c in frame.columns), "curves stay in MLflow"
    assert frame.iloc[1]["state"] == "FAIL"

    runs = {r.info.run_id: r for r in get_runs(spec)}
    child = runs[first["mlflow_run_id"]]
    assert child.data.tags["mlflow.parentRunId"] == tracking.parent_run_id
    assert child.data.tags["optuna_trial_number"] == "0"
    assert child.data.params["component.ema"] == "true" and child.data.params["component.clipping"] == "false"
    assert child.info.status == "FINISHED"
    assert runs[frame.iloc[1]["mlflow_run_id"]].info.status == "FAILED"
    assert runs[frame.iloc[1]["mlflow_run_id"]].data.tags["fail_reason"].startswith("non-finite")
    parent = runs[tracking.parent_run_id]
    assert parent.info.status == "FINISHED"
    assert "version.mlflow" in parent.data.tags
    # artifacts land inside the output dir, never ./mlruns
    artifacts = list((tmp_path / "out" / "mlartifacts").rglob("resolved_spec.json"))
    assert artifacts and json.loads(artifacts[0].read_text())["name"] == "tracktest"
    assert not Path("mlruns").exists()


def test_resume_reuses_the_parent_and_closes_dangling_runs(spec):
    tracking = init_tracking(spec)
    run = TrialRun.start(
        tracking,
        trial_number=3,
        variant="sdft",
        family="baseline",
        seed=0,
        components={},
        params={},
        system_metrics=False,
    )
    # the process "dies" here: the run stays RUNNING; the Optuna trial is later reconciled to FAIL
    again = init_tracking(spec, parent_run_id=tracking.parent_run_id)
    assert again.parent_run_id == tracking.parent_run_id
    assert open_tracking(spec).parent_run_id == tracking.parent_run_id
    assert close_dangling_runs(again.tracking_uri, spec, {3: "RUNNING"}, {}) == 0
    assert close_dangling_runs(again.tracking_uri, spec, {3: "FAIL"}, {3: "interrupted"}) == 1
    status = {r.info.run_id: r.info.status for r in get_runs(spec)}
    assert status[run.run_id] == "KILLED"
    assert load_results(spec).iloc[0]["state"] == "FAIL"


def test_report_artifacts_attach_to_the_parent(spec, tmp_path):
    tracking = init_tracking(spec)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# hi\n")
    log_report_artifacts(spec, report)
    found = list((tmp_path / "out" / "mlartifacts").rglob("report/report.md"))
    assert found and tracking.parent_run_id in str(found[0])


def test_load_results_without_a_store_is_a_user_error(spec):
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="harness run"):
        load_results(spec)


def test_ui_serves_the_study_store_and_stops_with_its_process_group(spec):
    import os
    import socket
    import time
    import urllib.request

    from harness.tracking import start_ui, stop_ui

    init_tracking(spec)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, url = start_ui(spec, port)
    try:
        assert url == f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, "mlflow ui exited"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "mlflow ui never answered /health"
                time.sleep(1)
        query = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={spec.experiment_name}"
        with urllib.request.urlopen(query, timeout=10) as response:
            assert b"tracktest" in response.read(), "the UI reads this study's store"
    finally:
        stop_ui(process)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # no process of the group is left behind


def test_the_study_experiment_is_model_training_and_the_ui_link_opens_its_runs(spec):
    """MLflow 3's UI shows an experiment without ``mlflow.experimentKind`` as GenAI (traces, empty here);
    3.17 decides by the ``workflowType`` of the address: the link `harness ui` prints asks for runs."""
    from mlflow import MlflowClient

    from harness.tracking import study_ui_url

    assert study_ui_url(spec, "http://127.0.0.1:5000") == "http://127.0.0.1:5000", "no store yet"
    tracking = init_tracking(spec)
    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment(tracking.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert study_ui_url(spec, "http://127.0.0.1:5000") == (
        f"http://127.0.0.1:5000/#/experiments/{tracking.experiment_id}?workflowType=machine_learning"
    )
    client.delete_experiment_tag(tracking.experiment_id, "mlflow.experimentKind")  # a store made before
    init_tracking(spec, parent_run_id=tracking.parent_run_id)
    experiment = client.get_experiment(tracking.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
