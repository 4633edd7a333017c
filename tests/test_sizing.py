"""Fractional subsets in the spec and the --dry-run sizing lines: design, relation, aliases, MDE (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.errors import SpecError
from harness.plan import describe_plan, grid_points
from harness.report.paired import planned_mde
from harness.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
FRACTIONAL = REPO / "studies" / "fractional_ablation.yaml"
FULL = REPO / "studies" / "full_ablation.yaml"


def _spec_with(tmp_path: Path, subsets) -> Path:
    raw = yaml.safe_load(FULL.read_text())
    raw["method"]["subsets"] = subsets
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_fractional_subsets_expand_to_a_regular_fraction(tmp_path):
    half = load_spec(FRACTIONAL).method.subset_list()
    assert len(half) == 16 and () in half
    assert sorted({len(s) for s in half}) == [0, 2, 4]  # I = −abcde: an even number of components on
    eighth = load_spec(_spec_with(tmp_path, {"design": "fractional", "resolution": 3})).method.subset_list()
    assert len(eighth) == 8
    assert (
        len(load_spec(_spec_with(tmp_path, {"design": "fractional", "resolution": 4})).method.subset_list())
        == 16
    )
    full = load_spec(_spec_with(tmp_path, {"design": "full"})).method.subset_list()
    assert sorted(full) == sorted(load_spec(FULL).method.subset_list())
    # the fraction of a smaller pool: method.components decides what is combined
    raw = yaml.safe_load(FULL.read_text())
    raw["method"]["components"] = ["ema", "clipping", "agreement"]
    raw["method"]["subsets"] = {"design": "fractional", "resolution": 3}
    for name in ("contrastive", "feature_matching"):
        raw["method"].pop(name)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    assert sorted(load_spec(tmp_path / "p.yaml").method.subset_list()) == sorted(
        [(), ("agreement", "ema"), ("agreement", "clipping"), ("ema", "clipping")]
    )


@pytest.mark.parametrize(
    ("subsets", "message"),
    [
        ({"design": "fractional", "resolution": 6}, "method.subsets.resolution"),
        ({"design": "half"}, "method.subsets.design: unknown value 'half'"),
        ({"design": "fractional", "runs": 8}, "method.subsets.runs: unknown key"),
    ],
)
def test_bad_design_is_one_spec_error(tmp_path, subsets, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_spec_with(tmp_path, subsets))


def test_dry_run_of_the_fractional_ablation_halves_the_subset_gpu_hours(capsys):
    frac, full = describe_plan(load_spec(FRACTIONAL)), describe_plan(load_spec(FULL))
    assert frac["n_trials"] == 458 and full["n_trials"] == 842  # 2 models x 4 tasks x 19 or 35 x 3 + 2 base
    d, f = frac["design"], full["design"]
    assert d["name"] == "2^(5−1) fraction, resolution V" and f["name"] == "2^5 full factorial"
    assert d["subset_gpu_hours_7b"] == pytest.approx(f["subset_gpu_hours_7b"] / 2, abs=0.2)
    assert d["full_factorial_gpu_hours_7b"] == pytest.approx(f["subset_gpu_hours_7b"], abs=0.2)
    assert len(d["aliases"]) == 15  # five main effects, ten pairs
    assert d["aliases"]["ema"] == "ema − agreement×contrastive×feature_matching×clipping"
    # MDE for the planned limit (500, or the whole benchmark when smaller) and three seeds
    assert frac["mde"]["scienceqa"] == pytest.approx(planned_mde(500, 3))
    assert frac["mde"]["gpqa"] == pytest.approx(planned_mde(198, 3))
    assert main(["run", str(FRACTIONAL), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "design     2^(5−1) fraction, resolution V: 16 of 32 subsets" in out
    assert "relation   I = −agreement×contrastive×ema×feature_matching×clipping" in out
    assert "agreement×ema − contrastive×feature_matching×clipping" in out
    assert "MDE        scienceqa 0.046" in out
    assert len(grid_points(load_spec(FRACTIONAL))) == 458
