"""`harness run` end to end on the smoke study: real training, evaluation, Optuna and MLflow stores.

Each test runs the real command in a subprocess (tiny random Llama, a handful of examples), in a
temporary directory so the report and stores land there. Timings are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from harness.plan import grid_points, point_key
from harness.spec import load_spec
from harness.study import study_trials
from harness.tracking import get_runs, load_results

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "studies" / "smoke.yaml"
SMOKE_GRID = REPO / "studies" / "smoke_grid.yaml"

# Two variants at a sane learning rate, two at one so large that the first update overflows the weights:
# a real divergence, recorded by the trainer as a non-finite loss.
DIVERGING = """
name: diverging
model: {ref: tiny-random:llama, dtype: float32, device: cpu}
data: {train: [scienceqa], train_size: 8, data_dir: DATA}
method:
  components: [ema]
  subsets: [[], [ema]]
  ema: {sync_steps: 1}        # two steps: a longer period would never sync (refused as inert)
training:
  max_steps: 2
  batch_size: 4
  learning_rate: {choices: [1.0e-4, 1.0e+30]}
  max_prompt_tokens: 256
  max_completion_tokens: 8
evaluation: {benchmarks: [scienceqa], limit: 2, batch_size: 2, max_gen_tokens: 8, retention: false}
output_dir: OUT
"""


def _harness(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _trials(spec):
    return study_trials(spec)[1]


def _smoke(tmp_path: Path):
    return load_spec(SMOKE).with_overrides(output_dir=tmp_path / "out")


def test_smoke_study_fills_real_stores_and_writes_the_report(tmp_path):
    spec = _smoke(tmp_path)
    start = time.perf_counter()
    out = _finish(_harness("run", str(SMOKE), "--output-dir", str(tmp_path / "out"), cwd=tmp_path))
    wall = time.perf_counter() - start
    print(f"\nsmoke study: {wall:.1f}s wall for the whole command\n" + "\n".join(out.splitlines()[-4:]))

    keys = sorted(point_key(p) for p in grid_points(spec))
    trials = _trials(spec)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(keys)
    assert sorted(t.user_attrs["point_key"] for t in trials) == keys
    runs = {r.info.run_id: r for r in get_runs(spec)}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] in runs
        assert run.data.tags["optuna_trial_number"] == str(t.number)
        for metric in ("scienceqa.acc", "mbpp.pass_at_1", "mean.acc", "ppl_fit", "ppl_ret", "train/loss",
                       "scienceqa.acc_se", "mean.acc_se"):  # fmt: skip
            assert metric in run.data.metrics, (metric, sorted(run.data.metrics))
        assert run.data.metrics["mean.acc"] == pytest.approx(t.values[0])
        trial_dir = spec.output_path / "trials" / str(t.number)
        config = json.loads((trial_dir / "variant.json").read_text())
        assert config["variant_name"] == t.user_attrs["variant"]
        assert any((trial_dir / "eval").rglob("*")), "per-sample evaluation logs"
    frame = load_results(spec)
    assert len(frame) == len(keys) and frame["mean.acc"].notna().all()
    assert (frame["train_seconds"] > 0).all() and (frame["generated_tokens"] > 0).all()
    assert (tmp_path / "out" / "report").is_dir(), out[-2000:]
    # the report pairs the trials' samples.jsonl: every variant against SDFT, and the MDE per benchmark
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Paired comparisons" in report and "*Against sdft*" in report
    assert "Minimum detectable effect" in report and "scienceqa.acc 0." in report


def test_sigkill_mid_trial_then_the_same_command_resumes(tmp_path):
    spec = _smoke(tmp_path)
    args = ("run", str(SMOKE), "--output-dir", str(tmp_path / "out"), "--no-report")
    proc = _harness(*args, cwd=tmp_path)
    deadline = time.time() + 300
    running = None
    while running is None:
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no trial ever ran"
        if (spec.output_path / "optuna.db").exists():
            try:
                trials = _trials(spec)
            except Exception:  # the study is still being created
                trials = []
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            # in the middle of a trial: claimed and its MLflow run open (training or evaluating)
            busy = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
            if done and busy:
                running = busy[0].number
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = {t.number: (t.state, t.datetime_complete, t.values) for t in _trials(spec)}
    assert before[running][0] == TrialState.RUNNING

    _finish(_harness(*args, cwd=tmp_path))
    trials = {t.number: t for t in _trials(spec)}
    assert trials[running].state == TrialState.FAIL
    assert trials[running].user_attrs["fail_reason"] == "interrupted"
    complete = [t.user_attrs["point_key"] for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(point_key(p) for p in grid_points(spec)), "each point COMPLETE once"
    for number, (state, finished, values) in before.items():
        if state == TrialState.COMPLETE:
            assert trials[number].datetime_complete == finished and trials[number].values == values
    assert [t.state for t in trials.values()].count(TrialState.FAIL) == 1
    statuses = {r.info.run_id: r.info.status for r in get_runs(spec)}
    assert statuses[trials[running].user_attrs["mlflow_run_id"]] == "KILLED"
    assert "RUNNING" not in statuses.values(), "no MLflow run left open"


def test_two_workers_never_run_a_point_twice(tmp_path):
    spec = _smoke(tmp_path)
    start = time.perf_counter()
    out = _finish(
        _harness(
            "run",
            str(SMOKE),
            "--output-dir",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--no-report",
            cwd=tmp_path,
        )
    )
    print(f"\nsmoke study, 2 workers: {time.perf_counter() - start:.1f}s wall")
    trials = _trials(spec)
    keys = [t.user_attrs["point_key"] for t in trials]
    assert len(keys) == len(set(keys)) == len(grid_points(spec))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    owners = {t.user_attrs["owner"]["pid"] for t in trials}
    assert len(owners) == 2, f"both workers ran trials: {out[-2000:]}"
    children = [r for r in get_runs(spec) if r.data.tags.get("unisd.role") == "trial"]
    assert len(children) == len(keys) and all(r.info.status == "FINISHED" for r in children)


def test_a_diverging_trial_fails_with_its_reason_while_the_others_complete(tmp_path):
    path = tmp_path / "diverging.yaml"
    data_dir = os.environ["UNISD_DATA_DIR"]
    path.write_text(DIVERGING.replace("OUT", str(tmp_path / "out")).replace("DATA", data_dir))
    spec = load_spec(path)
    _finish(_harness("run", str(path), "--no-report", cwd=tmp_path))
    trials = _trials(spec)
    assert len(trials) == 4
    for t in trials:
        lr = t.user_attrs["params"]["training.learning_rate"]
        if lr > 1:
            assert t.state == TrialState.FAIL
            assert t.user_attrs["fail_reason"].startswith("non-finite loss at optimizer step")
        else:
            assert t.state == TrialState.COMPLETE
    runs = {r.info.run_id: r for r in get_runs(spec)}
    failed = [runs[t.user_attrs["mlflow_run_id"]] for t in trials if t.state == TrialState.FAIL]
    assert all(r.info.status == "FAILED" and "non-finite" in r.data.tags["fail_reason"] for r in failed)


SEARCH = """
name: search
model: {ref: tiny-random:llama, dtype: float32, device: cpu}
data: {train: [scienceqa], train_size: 8, dev_size: 2, data_dir: DATA}
method:
  baselines: [base]
  components: [ema]
  subsets: [[ema]]
  ema:
    beta: {type: float, low: 0.5, high: 0.99}
    sync_steps: 1
seeds: [0, 1]
training: {max_steps: 2, batch_size: 4, max_prompt_tokens: 256, max_completion_tokens: 8}
evaluation: {benchmarks: [scienceqa], limit: 2, batch_size: 2, max_gen_tokens: 8}
search: {sampler: tpe, n_trials: 2, pruner: median}
output_dir: OUT
"""


def test_search_with_pruning_reports_dev_metrics_and_reuses_the_base_evaluation(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(
        SEARCH.replace("OUT", str(tmp_path / "out")).replace("DATA", os.environ["UNISD_DATA_DIR"])
    )
    spec = load_spec(path)
    out = _finish(_harness("run", str(path), "--no-report", cwd=tmp_path))
    trials = sorted(_trials(spec), key=lambda t: t.number)
    assert [t.user_attrs["variant"] for t in trials[:2]] == ["base", "base"], "baselines first, one per seed"
    assert "reused from trial 0" in out, "the second base point reuses the first one's evaluation"
    assert trials[1].values == trials[0].values
    searched = trials[2:]
    assert len(searched) == 2 and all("ema.beta" in t.params for t in searched)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in searched)
    runs = {r.info.run_id: r for r in get_runs(spec)}
    for t in searched:
        assert t.intermediate_values, "the dev metric was reported to the pruner"
        assert "dev.mean.acc" in runs[t.user_attrs["mlflow_run_id"]].data.metrics


def test_gpus_per_trial_trains_each_trial_over_launched_processes(tmp_path):
    """`--gpus-per-trial 2` (two CPU processes here): a LoRA trial trains data-parallel and is evaluated
    on the weights the processes saved; a diverging one fails with the trainer's own reason."""
    from safetensors.torch import load_file

    path = tmp_path / "dp.yaml"
    text = DIVERGING.replace("OUT", str(tmp_path / "out")).replace("DATA", os.environ["UNISD_DATA_DIR"])
    text = text.replace("subsets: [[], [ema]]", "subsets: [[ema]]").replace(
        "device: cpu}", "device: cpu, lora: {enabled: true, r: 4}}"
    )
    path.write_text(text)
    spec = load_spec(path)
    _finish(_harness("run", str(path), "--no-report", "--gpus-per-trial", "2", cwd=tmp_path))
    trials = {t.user_attrs["params"]["training.learning_rate"]: t for t in _trials(spec)}
    good, bad = trials[1e-4], trials[1e30]
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.FAIL
    assert bad.user_attrs["fail_reason"].startswith("non-finite loss at optimizer step 1")
    trial_dir = spec.output_path / "trials" / str(good.number)
    history = json.loads((trial_dir / "history.json").read_text())
    assert [row["step"] for row in history] == [1, 2]
    trained = load_file(trial_dir / "data_parallel" / "trained.safetensors")
    assert trained and all("lora_" in name for name in trained)
    assert any(float(t.abs().sum()) > 0 for n, t in trained.items() if "lora_B" in n)  # B starts at zero
    row = load_results(spec).set_index("trial").loc[good.number]
    assert 0 <= row["scienceqa.acc"] <= 1 and row["train_steps"] == 2
    run = {r.info.run_id: r for r in get_runs(spec)}[good.user_attrs["mlflow_run_id"]]
    assert run.data.tags["gpus_per_trial"] == "2"


def test_gpus_per_trial_refuses_a_pruner(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(
        SEARCH.replace("OUT", str(tmp_path / "out")).replace("DATA", os.environ["UNISD_DATA_DIR"])
    )
    proc = _harness("run", str(path), "--gpus-per-trial", "2", cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "cannot prune" in out and "Traceback" not in out, out


def test_smoke_grid_two_architectures_x_two_tasks_end_to_end_with_the_paper_tables(tmp_path):
    """The study's axes for real: tiny Llama and tiny Qwen2, each trained per task on ScienceQA and MBPP,
    scored in domain and on the transfer cells; the report has the paper tables and per-task effects."""
    spec = load_spec(SMOKE_GRID).with_overrides(output_dir=tmp_path / "out")
    start = time.perf_counter()
    out = _finish(_harness("run", str(SMOKE_GRID), "--output-dir", str(tmp_path / "out"), cwd=tmp_path))
    print(f"\nsmoke grid: {time.perf_counter() - start:.1f}s wall\n" + "\n".join(out.splitlines()[-4:]))
    keys = sorted(point_key(p) for p in grid_points(spec))
    assert len(keys) == 2 * 2 * 3 + 2
    trials = _trials(spec)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(keys)
    assert sorted(t.user_attrs["point_key"] for t in trials) == keys
    frame = load_results(spec)
    assert set(frame["model"]) == {"llama", "qwen2"}
    sqa = frame[(frame["train_task"] == "scienceqa") & (frame["variant"] == "sft")]
    assert len(sqa) == 2 and sqa["gpqa.acc"].notna().all() and sqa["mbpp.pass_at_1"].isna().all()
    configs = {json.loads((spec.output_path / "trials" / str(t.number) / "variant.json").read_text())["model"]["ref"]
               for t in trials}
    assert configs == {"tiny-random:llama", "tiny-random:qwen2"}
    assert {p.name for p in (spec.output_path / "cache").iterdir()} == {"llama", "qwen2"}
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    for caption in ("*Model llama*", "*Model qwen2*", "*Averaged over models", "gpqa ← scienceqa",
                    "humaneval ← mbpp", "When does self-distillation beat static imitation?",
                    "*Component effects, per task cell*", "*Component effects, per model*"):
        assert caption in report, caption
    effects = json.loads((tmp_path / "out" / "report" / "effects.json").read_text())
    assert set(effects["_paper"]["effects"]["per_task_cell"]) == {
        "scienceqa", "mbpp", "gpqa ← scienceqa", "humaneval ← mbpp"
    }
