"""Faults and bad input (issue 15): each finding reproduced cheaply, without training a model.

The end-to-end checks on the smoke study (killed parents, races, full disks) are in
``test_faults_e2e.py``; these are the unit-sized ones. Each test names its finding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "studies" / "smoke.yaml"


def _one_line_exit_2(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _smoke_with(tmp_path: Path, old: str, new: str) -> Path:
    text = SMOKE.read_text()
    assert old in text
    path = tmp_path / "study.yaml"
    path.write_text(text.replace(old, new))
    return path


# --------------------------------------------------------------------------------------------------
# Finding 10: booleans pass the integer checks


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("max_steps: 2", "max_steps: true", "training.max_steps: must be an integer, not a boolean"),
        ("learning_rate: 1.0e-4", "learning_rate: false", "training.learning_rate: must be a number"),
        ("batch_size: 4\n  grad_accum", "batch_size: true\n  grad_accum", "training.batch_size: must be"),
        ("limit: 4", "limit: true", "evaluation.limit: must be an integer, not a boolean"),
        ("seeds: [0]", "seeds: [true]", "seeds: item 0 must be an integer, not a boolean"),
        ("train_size: 16", "train_size: true", "data.train_size: must be an integer"),
        ("    beta: 0.9", "    beta: true", "method.ema.beta: must be a number, not a boolean"),
        ("    beta: 0.9", "    beta: {choices: [true, 0.5]}", "method.ema.beta: search space choices[0]"),
        (
            "sync_steps: 1 ",
            "sync_steps: {type: int, low: true, high: 3} ",
            "sync_steps.low: must be an integer",
        ),
    ],
)
def test_finding10_a_boolean_is_not_a_number(capsys, tmp_path, old, new, expected):
    line = _one_line_exit_2(capsys, "validate", str(_smoke_with(tmp_path, old, new)))
    assert expected in line, line


def test_finding10_library_configs_refuse_booleans_too():
    from pydantic import ValidationError

    from unisd_components.config import EMAConfig, TrainingConfig

    with pytest.raises(ValidationError, match="must be an integer, not a boolean"):
        TrainingConfig(max_steps=True)
    with pytest.raises(ValidationError, match="must be a number, not a boolean"):
        EMAConfig(beta=False)
    # what stays valid: real booleans, numbers, and numeric strings from ${ENV} substitution
    config = TrainingConfig(max_steps="3", gradient_checkpointing=True, learning_rate=1)
    assert config.max_steps == 3 and config.gradient_checkpointing is True
