"""The console a user reads: what ``harness run`` prints, with a terminal and without one.

Without a TTY (CI, ``nohup``, ``> log 2>&1``) the output is one line per event: no library progress
bars (carriage-return fragments in a file), no warnings (they go to the trial's ``trial.log``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "studies" / "smoke.yaml"

# Every line `harness run studies/smoke.yaml > log 2>&1` may print, and nothing else.
EVENT_LINES = [
    r"trial \d+ \(\S+\): started",
    r"trial \d+ \(\S+\): (evaluating|base evaluation reused from trial \d+)",
    r"trial \d+ \(\S+\): step \d+( loss \S+)?",
    r"trial \d+ \(\S+\): (COMPLETE|PRUNED|FAIL) in [\d.]+s.*",
    r"resumed: .*",
    r"study smoke: .*",
    r"training \+ evaluation .*",
    r"storage \S+; tracking \S+ \(harness ui .*\)",
    r"report: .*",
]


@pytest.mark.slow
def test_a_run_without_a_terminal_prints_one_line_per_event_and_no_library_noise(smoke_run):
    text = smoke_run.log.read_text()
    print(f"\nsmoke study without a TTY: {smoke_run.seconds:.1f}s\n{text}")
    assert "\r" not in text, "progress-bar fragments"
    for noise in ("it/s", "%|", "Warning", "warning", "WARN", "deprecated", "fatal:", "View run", "Traceback"):
        assert noise not in text, f"{noise!r} in the log:\n{text}"
    for line in text.splitlines():
        assert any(re.fullmatch(p, line) for p in EVENT_LINES), f"not an event line: {line!r}\n{text}"
    ends = re.findall(r"^trial (\d+) \(\S+\): COMPLETE in [\d.]+s mean\.acc=\S+$", text, flags=re.M)
    assert sorted(ends) == ["0", "1", "2", "3"], "one end line per trial, with its metric"
    assert f"(harness ui {SMOKE} --output-dir {smoke_run.output_dir})" in text, (
        "the printed `harness ui` command opens this run's store"
    )
    logs = sorted((smoke_run.output_dir / "trials").glob("*/trial.log"))
    for log in logs:
        for line in log.read_text().splitlines():
            assert re.match(r"\d{4}-\d\d-\d\d [\d:,]+ (WARNING|ERROR|CRITICAL) \S+: ", line) or line.startswith(
                (" ", "\t")
            ), line


ROUTING = """
import logging, sys, warnings
from pathlib import Path

from harness.library_output import quiet_libraries, trial_output

out = Path(sys.argv[1])
quiet_libraries(out / "harness.log")
warnings.warn("a warning before any trial")


class Progress:
    def __init__(self):
        self.seen = []

    def trial_progress(self, text, done, total):
        self.seen.append((text, done, total))


progress = Progress()
with trial_output(out / "trial.log", progress):
    import lm_eval.models.huggingface as hf
    from transformers.utils import logging as tlog

    warnings.simplefilter("always")
    warnings.warn("a user warning during the trial")
    tlog.get_logger("transformers.generation").warning("a transformers warning")
    logging.getLogger("lm_eval").error("an lm-eval error")
    bar = hf.tqdm(total=3, desc="Running generate_until requests")
    for _ in range(3):
        bar.update(1)
    bar.close()
    for _ in hf.tqdm(range(2)):
        pass
print(progress.seen)
"""


def test_library_output_goes_to_the_trial_log_and_lm_eval_progress_to_the_display(tmp_path):
    script = tmp_path / "routing.py"
    script.write_text(textwrap.dedent(ROUTING))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"library output reached the console: {done.stderr!r}"
    seen = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own script's repr
    assert ("generating", 3, 3) in seen and ("generating", 0, 3) in seen
    assert ("preparing prompts", 2, 2) in seen
    trial_log = (tmp_path / "trial.log").read_text()
    for text in ("a user warning during the trial", "a transformers warning", "an lm-eval error"):
        assert text in trial_log, trial_log
    assert "a warning before any trial" in (tmp_path / "harness.log").read_text()
    assert "before any trial" not in trial_log
