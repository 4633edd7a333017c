"""harness.study: grid coverage, resume after SIGKILL, Ctrl-C, failures, workers, search and pruning.

Real Optuna and MLflow stores in temporary directories; the trial itself is a small stand-in function
(the real train + evaluate loop is covered by test_run_e2e.py), so these tests run in seconds and can
stop a trial exactly where they want (marker files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from harness.spec import load_spec
from harness.study import run_study, status, study_trials
from harness.tracking import get_runs, load_results

GRID = """
name: gridtest
model: {ref: tiny-random:llama, device: cpu}
data: {train: [scienceqa], train_size: 4}
method:
  baselines: [base, sft]
  components: [ema, clipping]
  subsets: all
  ema: {sync_steps: 1}        # one step: a longer period would never sync (refused as inert)
training: {max_steps: 1}
seeds: [0]
evaluation: {benchmarks: [scienceqa], limit: 2, retention: false}
output_dir: OUT
"""

# The study's axes: two models x two training tasks (per task) x sft, sdft, unisd[ema] x 1 seed + base
# once per model = 14 points.
AXES = """
name: axestest
model:
  - {name: m1, ref: tiny-random:llama, device: cpu}
  - {name: m2, ref: tiny-random:qwen2, device: cpu}
data: {protocol: per_task, train: [scienceqa, mbpp], train_size: 4}
method:
  baselines: [base, sft]
  components: [ema]
  subsets: all
  ema: {sync_steps: 1}
training: {max_steps: 1}
seeds: [0]
evaluation: {benchmarks: [scienceqa, gpqa, mbpp], limit: 2, retention: false}
output_dir: OUT
"""

SEARCH = """
name: searchtest
model: {ref: tiny-random:llama, device: cpu}
data: {train: [scienceqa], train_size: 4, dev_size: 2}
method:
  baselines: [sft]
  components: [ema]
  subsets: [[ema]]
  ema:
    beta: {type: float, low: 0.5, high: 0.99}
    sync_steps: 2
training: {max_steps: 8}
evaluation: {benchmarks: [scienceqa], limit: 2, retention: false}
search: {sampler: tpe, n_trials: 6, pruner: median}
output_dir: OUT
"""

TESTS_DIR = str(Path(__file__).resolve().parent)


def _spec(tmp_path: Path, text: str = GRID, name: str = "study.yaml"):
    path = tmp_path / name
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    return load_spec(path), path


def _score(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) / 0xFFFFFF


# ---- stand-in trial functions (module level: spawned workers import them by name) -------------------


def fake_trial(point, spec, ctx):
    """Deterministic metrics from the point; records each call so tests can count executions."""
    from harness.plan import point_key

    key = point_key(point)
    with open(ctx.output_dir / "calls.log", "a") as log:
        log.write(f"{os.getpid()} {ctx.number} {key}\n")
    with open(ctx.output_dir / "cells.log", "a") as log:  # what the trial saw: its cell, its caches
        cell = {
            "key": key,
            "model": spec.model.ref,
            "train": list(spec.data.train),
            "benchmarks": list(spec.evaluation.benchmarks),
            "cache": str(ctx.cache_dir),
        }
        log.write(json.dumps(cell) + "\n")
    if ctx.run is not None:
        ctx.run.log_step(1, {"loss": 1.0})
    time.sleep(float(os.environ.get("FAKE_TRIAL_SLEEP", "0")))
    return {
        "scienceqa.acc": _score(key),
        "mean.acc": _score(key),
        "train_seconds": 0.01,
        "eval_seconds": 0.01,
    }


def hanging_trial(point, spec, ctx):
    """Completes the first two trials, then blocks inside the third (signals a marker file first)."""
    done = len(list((ctx.output_dir).glob("done-*")))
    if done >= 2 and not (ctx.output_dir / "resumed").exists():
        (ctx.output_dir / "hanging").write_text(str(ctx.number))
        time.sleep(600)
    (ctx.output_dir / f"done-{ctx.number}").write_text("")
    return fake_trial(point, spec, ctx)


def failing_trial(point, spec, ctx):
    from harness.plan import point_key
    from unisd_components.trainer import NonFiniteLossError

    if "clipping" in point_key(point) and "ema" not in point_key(point):
        raise NonFiniteLossError(1, "divergence", float("nan"))
    return fake_trial(point, spec, ctx)


def pruned_trial(point, spec, ctx):
    """Reports a dev metric (= ema.beta) each step: a beta below the median so far gets pruned."""
    trial = ctx.optuna_trial
    score = float(point.params.get("ema.beta", 0.5))
    if trial is not None and "ema" in point.components:
        for step in range(1, 9):
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")
    return {"scienceqa.acc": score, "mean.acc": score}


# ---- helpers -----------------------------------------------------------------------------------------


def _trials(spec):
    return study_trials(spec)[1]


def _calls(spec) -> list[str]:
    log = spec.output_path / "calls.log"
    return [line.split()[2] for line in log.read_text().splitlines()] if log.exists() else []


def _run_in_subprocess(spec_path: Path, trial_fn: str, extra: str = "", workers: int = 1) -> subprocess.Popen:
    code = "\n".join(
        [
            f"import sys; sys.path.insert(0, {TESTS_DIR!r})",
            "from harness.spec import load_spec",
            "from harness.study import run_study",
            "from harness.progress import LineProgress",
            "import test_study",
            "try:",
            f"    run_study(load_spec({str(spec_path)!r}), workers={workers}, trial_fn=test_study.{trial_fn},"
            " progress=LineProgress())",
            "except KeyboardInterrupt:",
            "    sys.exit(130)",
            "",
        ]
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code + extra], env=env, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"runner exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.2)


# ---- tests -------------------------------------------------------------------------------------------


def test_grid_runs_every_point_once_baselines_first_and_rerun_is_a_no_op(tmp_path):
    from harness.plan import grid_points, point_key

    spec, _ = _spec(tmp_path)
    keys = [point_key(p) for p in grid_points(spec)]
    summary = run_study(spec, trial_fn=fake_trial)
    assert summary.states == {"COMPLETE": len(keys)} and summary.ran == len(keys)
    trials = sorted(_trials(spec), key=lambda t: t.number)
    assert [t.user_attrs["point_key"] for t in trials] == keys, "plan order kept (baselines first)"
    assert sorted(_calls(spec)) == sorted(keys)
    assert all(t.values == [pytest.approx(_score(t.user_attrs["point_key"]))] for t in trials)
    # Optuna <-> MLflow links both ways
    runs = {r.info.run_id: r for r in get_runs(spec)}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna_trial_number"] == str(t.number)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["mean.acc"] == pytest.approx(t.values[0])
    frame = load_results(spec)
    assert len(frame) == len(keys) and set(frame["state"]) == {"COMPLETE"}
    assert frame.loc[frame["variant"] == "base", "family"].item() == "base"

    again = run_study(spec, trial_fn=fake_trial)
    assert again.ran == 0 and len(_trials(spec)) == len(keys)
    assert len(_calls(spec)) == len(keys), "a COMPLETE point never reruns"


def test_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    spec, _ = _spec(tmp_path)
    summary = run_study(spec, trial_fn=failing_trial)
    trials = _trials(spec)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1
    reason = failed[0].user_attrs["fail_reason"]
    assert reason.startswith("non-finite loss at optimizer step 1: term 'divergence'")
    assert summary.states["COMPLETE"] == len(trials) - 1
    run = {r.info.run_id: r for r in get_runs(spec)}[failed[0].user_attrs["mlflow_run_id"]]
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == reason
    assert (spec.output_path / "trials" / str(failed[0].number) / "error.txt").is_file()
    # on resume, the failed point gets one more chance (an OOM may not repeat); finished ones do not
    run_study(spec, trial_fn=fake_trial)
    states = [t.state for t in _trials(spec)]
    assert states.count(TrialState.COMPLETE) == len(trials) and states.count(TrialState.FAIL) == 1


@pytest.mark.parametrize("text", [GRID, AXES], ids=["one-model", "models-x-tasks"])
def test_sigkill_mid_trial_then_resume(tmp_path, text):
    spec, path = _spec(tmp_path, text)
    proc = _run_in_subprocess(path, "hanging_trial")
    _wait_for(spec.output_path / "hanging", proc)
    killed_number = int((spec.output_path / "hanging").read_text())
    before = {t.number: (t.state, t.datetime_complete) for t in _trials(spec)}
    assert before[killed_number][0] == TrialState.RUNNING
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (spec.output_path / "resumed").write_text("")

    run_study(spec, trial_fn=hanging_trial)
    trials = _trials(spec)
    by_number = {t.number: t for t in trials}
    killed = by_number[killed_number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"] == "interrupted"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    keys = [t.user_attrs["point_key"] for t in complete]
    from harness.plan import grid_points, point_key

    assert sorted(keys) == sorted(point_key(p) for p in grid_points(spec)), (
        "every point COMPLETE exactly once"
    )
    for number, (state, finished) in before.items():
        if state == TrialState.COMPLETE:  # finished work kept, not recomputed
            assert by_number[number].state == TrialState.COMPLETE
            assert by_number[number].datetime_complete == finished
    assert len(_calls(spec)) == len(keys), "only the interrupted and never-started points ran again"
    run = {r.info.run_id: r for r in get_runs(spec)}[killed.user_attrs["mlflow_run_id"]]
    assert run.info.status == "KILLED", "the killed trial's MLflow run is closed on resume"


def test_ctrl_c_marks_the_running_trial_and_exits_130(tmp_path):
    spec, path = _spec(tmp_path)
    proc = _run_in_subprocess(path, "hanging_trial")
    _wait_for(spec.output_path / "hanging", proc)
    number = int((spec.output_path / "hanging").read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    trial = {t.number: t for t in _trials(spec)}[number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted by user"
    assert not [t for t in _trials(spec) if t.state == TrialState.RUNNING]


@pytest.mark.parametrize("text", [GRID, AXES], ids=["one-model", "models-x-tasks"])
def test_two_workers_share_a_journal_and_never_repeat_a_point(tmp_path, text):
    from harness.plan import grid_points

    spec, _ = _spec(tmp_path, text)
    os.environ["FAKE_TRIAL_SLEEP"] = "0.5"
    try:
        summary = run_study(spec, workers=2, trial_fn=fake_trial)
    finally:
        del os.environ["FAKE_TRIAL_SLEEP"]
    assert summary.storage.startswith("journal:") and (spec.output_path / "optuna.journal").is_file()
    calls = _calls(spec)
    assert len(calls) == len(set(calls)) == summary.states["COMPLETE"] == len(grid_points(spec))
    pids = {line.split()[0] for line in (spec.output_path / "calls.log").read_text().splitlines()}
    assert len(pids) == 2, "both workers took trials"
    assert status(spec)["storage"].startswith("journal:"), "later commands find the journal"


def test_sqlite_storage_refuses_parallel_workers(tmp_path):
    from harness.errors import HarnessError

    spec, _ = _spec(tmp_path)
    run_study(spec, trial_fn=fake_trial)
    with pytest.raises(HarnessError, match="SQLite"):
        run_study(spec, workers=2, trial_fn=fake_trial)


def test_search_runs_baselines_first_then_n_trials_with_pruning(tmp_path):
    spec, _ = _spec(tmp_path, SEARCH)
    summary = run_study(spec, trial_fn=pruned_trial)
    trials = sorted(_trials(spec), key=lambda t: t.number)
    assert trials[0].user_attrs["fixed"] and trials[0].user_attrs["variant"] == "sft"
    searched = [t for t in trials if not t.user_attrs.get("fixed")]
    assert len(searched) == 6
    assert all("ema.beta" in t.params for t in searched)
    assert summary.states.get("PRUNED", 0) >= 1, "the median pruner stopped some trials"


def test_status_json_lists_trials(tmp_path):
    spec, path = _spec(tmp_path)
    run_study(spec, trial_fn=fake_trial)
    result = subprocess.run(
        [sys.executable, "-m", "harness", "status", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(result.stdout)
    assert data["study"] == "gridtest" and len(data["trials"]) == 6
    first = data["trials"][0]
    assert set(first) >= {"number", "state", "params", "values", "mlflow_run_id"}
    assert first["state"] == "COMPLETE" and first["mlflow_run_id"]
    table = subprocess.run(
        [sys.executable, "-m", "harness", "status", str(path)], capture_output=True, text=True
    )
    assert table.returncode == 0 and "COMPLETE" in table.stdout


def test_status_of_a_study_never_run_is_a_user_error(tmp_path):
    _, path = _spec(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "harness", "status", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "harness run" in result.stderr


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    spec, path = _spec(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(path), "--dry-run"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "trials     6 (6 variants x 1 seed(s), grid)" in result.stdout
    assert "variants   6: base, sft, sdft" in result.stdout
    assert "generated tokens ~" in result.stdout and "GPU hours" in result.stdout
    assert not spec.output_path.exists()


def test_multi_objective_study_records_every_objective(tmp_path):
    text = GRID.replace("retention: false", "retention: true").replace(
        "output_dir: OUT",
        "search:\n  objectives:\n    - {metric: mean.acc, direction: maximize}\n"
        "    - {metric: ppl_ret, direction: minimize}\noutput_dir: OUT",
    )
    spec, _ = _spec(tmp_path, text)

    def two_metrics(point, spec, ctx):
        metrics = fake_trial(point, spec, ctx)
        return {**metrics, "ppl_ret": 1.0 + metrics["mean.acc"]}

    run_study(spec, trial_fn=two_metrics)
    study = optuna.load_study(
        study_name=spec.name, storage=f"sqlite:///{spec.output_path.resolve()}/optuna.db"
    )
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 and t.values[1] == pytest.approx(1 + t.values[0]) for t in study.trials)
    assert study.best_trials, "a Pareto front exists"


def test_ctrl_c_on_the_parent_stops_every_worker(tmp_path):
    spec, path = _spec(tmp_path)
    (spec.output_path).mkdir(parents=True)
    for i in range(2):  # let the first trials finish quickly, then each worker hangs in its next one
        (spec.output_path / f"done-x{i}").write_text("")
    proc = _run_in_subprocess(path, "hanging_trial", workers=2)
    _wait_for(spec.output_path / "hanging", proc, timeout=180)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # the parent only: it must forward the interrupt to its workers
    assert proc.wait(timeout=120) == 130
    trials = _trials(spec)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted by user"]
    assert 1 <= len(interrupted) <= 2


def test_staleness_uses_the_pid_here_and_the_heartbeat_elsewhere():
    from datetime import datetime

    from optuna.trial import create_trial

    from harness.study import HEARTBEAT_STALE_S, _is_stale, _owner_record

    def running(attrs):
        trial = create_trial(state=TrialState.RUNNING, user_attrs=attrs)
        trial.datetime_start = datetime.now()
        return trial

    me = _owner_record()
    assert not _is_stale(running({"owner": me}))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert _is_stale(running({"owner": {**me, "pid": int(dead.stdout)}}))
    assert _is_stale(running({"owner": {**me, "started": me["started"] - 100}})), (
        "a reused pid is not the owner"
    )
    elsewhere = {**me, "host": "another-machine"}
    assert not _is_stale(running({"owner": elsewhere, "heartbeat": time.time()}))
    assert _is_stale(running({"owner": elsewhere, "heartbeat": time.time() - HEARTBEAT_STALE_S - 1}))
    assert not _is_stale(running({})), "just claimed, owner not written yet"


def test_a_point_enqueued_twice_still_runs_once(tmp_path):
    """Two `harness run` on two machines may both enqueue a missing point: the lower trial number wins."""
    from harness.plan import grid_points, point_key
    from harness.study import load_study, resolve_storage

    spec, _ = _spec(tmp_path)
    spec.output_path.mkdir(parents=True)
    study = load_study(spec, resolve_storage(spec), create=True)
    first = grid_points(spec)[0]
    for _ in range(2):
        study.enqueue_trial({}, user_attrs={"point_key": point_key(first), "fixed": True})
    run_study(spec, trial_fn=fake_trial)
    trials = _trials(spec)
    same = [t for t in trials if t.user_attrs["point_key"] == point_key(first)]
    assert [t.state for t in same] == [TrialState.COMPLETE, TrialState.FAIL]
    assert same[1].user_attrs["fail_reason"] == f"duplicate of trial {same[0].number}"
    assert sorted(_calls(spec)) == sorted(point_key(p) for p in grid_points(spec))


def test_a_trial_judged_by_its_heartbeat_names_the_silent_machine(monkeypatch):
    from datetime import datetime

    from optuna.trial import create_trial

    from harness.study import _is_stale, _owner_record, _stale_reason

    monkeypatch.setenv("UNISD_HOST", "machine-b")  # machines (containers) that share a host name
    me = _owner_record()
    assert me["host"] == "machine-b"
    trial = create_trial(
        state=TrialState.RUNNING,
        user_attrs={"owner": {**me, "host": "machine-a"}, "heartbeat": time.time() - 700},
    )
    trial.datetime_start = datetime.now()
    assert _is_stale(trial)
    assert re.fullmatch(r"interrupted: no heartbeat from machine-a for 70\ds", _stale_reason(trial))
    dead_here = create_trial(state=TrialState.RUNNING, user_attrs={"owner": {**me, "pid": 2**22 + 7}})
    assert _stale_reason(dead_here) == "interrupted"


def test_axes_every_model_task_variant_seed_once_each_trial_sees_its_cell(tmp_path):
    from harness.plan import grid_points, point_key

    spec, _ = _spec(tmp_path, AXES)
    points = grid_points(spec)
    assert len(points) == 2 * 2 * 3 + 2
    run_study(spec, trial_fn=fake_trial)
    assert sorted(_calls(spec)) == sorted(point_key(p) for p in points)
    cells = {c["key"]: c for c in map(json.loads, (spec.output_path / "cells.log").read_text().splitlines())}
    cache = spec.output_path.resolve() / "cache"
    m1_sqa = cells["m1/scienceqa/unisd[ema]/seed=0"]
    assert m1_sqa["model"] == "tiny-random:llama" and m1_sqa["train"] == ["scienceqa"]
    assert m1_sqa["benchmarks"] == ["scienceqa", "gpqa"]  # in domain + its transfer cell
    assert m1_sqa["cache"] == str(cache / "m1" / "scienceqa")
    assert cells["m1/scienceqa/sft/seed=0"]["cache"] == m1_sqa["cache"], "variants of a cell share caches"
    m2_mbpp = cells["m2/mbpp/sdft/seed=0"]
    assert m2_mbpp["model"] == "tiny-random:qwen2" and m2_mbpp["benchmarks"] == ["mbpp"]
    assert m2_mbpp["cache"] == str(cache / "m2" / "mbpp"), "never shared across models"
    base = cells["m2/base/base/seed=0"]
    assert base["benchmarks"] == ["scienceqa", "gpqa", "mbpp"] and base["cache"] == str(cache / "m2" / "base")
    frame = load_results(spec)
    assert set(frame["model"]) == {"m1", "m2"} and set(frame["train_task"].dropna()) == {"scienceqa", "mbpp"}
    assert set(frame["variant_kind"]) == {"base", "baseline", "factorial"}
