"""(b) An ``engine: vllm`` trial and an ``engine: hf`` trial on the same seed both complete with finite
losses; the vLLM one really sampled through the engine (one weight push per optimizer step at least)."""

from __future__ import annotations

import json
import math

from conftest import study_spec

from harness.plan import grid_points
from harness.trial import TrialContext, run_trial


def _run(engine_name: str, tmp_path):
    spec = study_spec(engine_name, tmp_path / engine_name)
    (point,) = [p for p in grid_points(spec) if p.name == "sdft"]
    ctx = TrialContext(
        number=0,
        output_dir=tmp_path / engine_name,
        trial_dir=tmp_path / engine_name / "trials" / "0",
        cache_dir=tmp_path / engine_name / "cache",
    )
    metrics = run_trial(point, spec, ctx)
    history = json.loads((ctx.trial_dir / "history.json").read_text())
    return metrics, history


def test_vllm_and_hf_trials_complete_with_finite_losses(engine, tmp_path):
    pushes = engine.weight_pushes
    results = {name: _run(name, tmp_path) for name in ("vllm", "hf")}
    for name, (metrics, history) in results.items():
        assert metrics["train_steps"] == 2, name
        assert len(history) == 2, name
        for row in history:
            assert math.isfinite(row["loss"]), (name, row)
            assert row["generated_tokens"] > 0, (name, row)
        assert 0.0 <= metrics["scienceqa.acc"] <= 1.0
    # two optimizer steps sampled from two pushes, plus the evaluation's push of the trained weights
    assert engine.weight_pushes - pushes >= 3
