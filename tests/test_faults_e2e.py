"""Faults on the real `harness run` (issue 15): a micro study (tiny random Llama, one training step, two
evaluation examples) in a temporary directory that is not a git checkout.

Findings pinned here: 3 (the report goes with --output-dir, and the command says where), 4 (a second
run on the same folder refuses in one line), 11 (no "fatal: not a git repository"), 1 (a study whose
trials all fail exits non-zero without the report too), 2 (killing a `--workers 2` parent leaves no worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

MICRO = """
name: micro
model: {ref: tiny-random:llama, dtype: float32, device: cpu}
data: {train: [scienceqa], train_size: 4, data_dir: DATA}
method: {components: [ema], subsets: SUBSETSEMA}
training: {max_steps: 1, batch_size: 2, learning_rate: LR, max_prompt_tokens: 128, max_completion_tokens: 4}
evaluation: {benchmarks: [scienceqa], limit: 2, batch_size: 2, max_gen_tokens: 4, retention: false}
output_dir: runs/micro
"""


def _micro(tmp_path: Path, *, subsets: str = "[[]]", lr: str = "1.0e-4") -> Path:
    # One step: the EMA syncs every step where a subset enables it (a longer period is refused as inert).
    ema = ", ema: {sync_steps: 1}" if "ema" in subsets else ""
    text = MICRO.replace("DATA", os.environ["UNISD_DATA_DIR"]).replace("SUBSETSEMA", subsets + ema)
    text = text.replace("LR", lr)
    path = tmp_path / "micro.yaml"
    path.write_text(text)
    return path


def _harness(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_report_lands_in_the_output_dir_a_second_run_waits_its_turn_and_git_is_quiet(tmp_path):
    spec = _micro(tmp_path)
    out = tmp_path / "elsewhere" / "out"
    first = _harness("run", str(spec), "--output-dir", str(out), cwd=tmp_path)
    deadline = time.time() + 300
    while not (out / "optuna.db").exists():  # the first run holds the folder once its store exists
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline, "the first run never created its store"
        time.sleep(0.2)
    # The first run is paused while the second starts (a micro study can finish before a second Python
    # process has imported torch): its lock is held all the while, as for any long run.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _harness("run", str(spec), "--output-dir", str(out), cwd=tmp_path)
        _, err2 = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-3000:]

    # finding 4: one line, exit 2, naming the ways to run in parallel
    assert second.returncode == 2, err2[-3000:]
    assert "Traceback" not in err2 and len(err2.strip().splitlines()) == 1, err2
    assert "another `harness run`" in err2 and "--workers" in err2 and "postgresql" in err2

    # finding 3: the report is with the run's outputs, and the command prints where
    report = out / "report"
    assert (report / "report.html").is_file() and (report / "results.csv").is_file()
    assert f"report: {report.resolve()}" in out1
    assert not (tmp_path / "reports").exists()

    # finding 11: outside a git checkout nothing complains about git
    assert not (tmp_path / ".git").exists()
    assert "not a git repository" not in err1 + err2, err1[-3000:]


def test_a_study_whose_trials_all_fail_exits_non_zero_without_the_report(tmp_path):
    spec = _micro(tmp_path, lr="1.0e+30")  # the first update overflows the weights: the trial FAILs
    done = _harness("run", str(spec), "--output-dir", str(tmp_path / "out"), "--no-report", cwd=tmp_path)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 1, (out[-2000:], err[-2000:])
    assert "1 FAIL" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: every trial of study micro failed (1 FAIL)"), err[-2000:]


def test_killing_a_workers_2_parent_leaves_no_worker_alive(tmp_path):
    spec = _micro(tmp_path, subsets="[[], [ema]]")
    parent = _harness("run", str(spec), "--output-dir", str(tmp_path / "out"), "--workers", "2", cwd=tmp_path)
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while len(workers) < 2:
            assert parent.poll() is None, parent.communicate()[1][-3000:]
            assert time.time() < deadline, "the workers never started"
            workers = [
                p for p in psutil.Process(parent.pid).children() if "spawn_main" in " ".join(p.cmdline())
            ]
            time.sleep(0.2)
        time.sleep(2.0)  # let them get going (importing torch, opening the stores)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers alive 10 s after their parent was killed: {[p.pid for p in alive]}"
    finally:
        for proc in workers:
            try:
                proc.kill()  # by pid, only the workers this test saw started
            except psutil.NoSuchProcess:
                pass
        if parent.poll() is None:
            parent.kill()
