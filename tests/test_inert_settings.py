"""Issue 11 item 5: settings that validate and then do nothing are refused by `harness validate` (exit 2,
one line naming the field and why), or made to work (KL-to-base for GKD)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.cli import main
from harness.plan import grid_points
from harness.spec import load_spec

SPEC = """\
name: t
model:
  ref: tiny-random:llama
data:
  train: [scienceqa]
  train_size: 8
method:
{method}
training:
  max_steps: 4
evaluation:
  benchmarks: [scienceqa]
  limit: 2
"""


def _write(tmp_path: Path, method: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(SPEC.format(method=textwrap.indent(textwrap.dedent(method).strip(), "  ")))
    return path


def _refused(capsys, path: Path) -> str:
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


INERT = {
    "match_repr_with_agreement": (
        """
        subsets: [agreement+feature_matching]
        feature_matching: {match_repr: true}
        """,
        "method.feature_matching.match_repr: drops the divergence, so agreement in "
        "unisd[agreement+feature_matching] would do nothing",
    ),
    "match_repr_with_clipping_in_a_choice": (
        """
        subsets: [feature_matching+clipping]
        feature_matching: {match_repr: {choices: [false, true]}}
        """,
        "method.feature_matching.match_repr: drops the divergence, so clipping",
    ),
    "static_cap_under_adaptive_clipping": (
        """
        subsets: [[clipping]]
        clipping: {mode: adaptive, cap: 5.0}
        """,
        "method.clipping.cap: only mode: static uses a fixed cap",
    ),
    "quantile_under_static_clipping": (
        """
        subsets: [[clipping]]
        clipping: {mode: static, quantile: 0.9}
        """,
        "method.clipping.quantile: only mode: adaptive uses the quantile",
    ),
    "token_settings_at_sequence_level": (
        """
        subsets: [[agreement]]
        agreement: {level: sequence, strategy: random, floor: 0.1}
        """,
        "method.agreement.floor: a token-level setting: level sequence",
    ),
    "alpha_for_gkd_only": (
        """
        baselines: [base, gkd]
        alpha: 0.5
        """,
        "method.alpha: no variant uses it",
    ),
    "kl_to_base_for_sft_only": (
        """
        baselines: [base, sft]
        kl_to_base_beta: 0.1
        """,
        "method.kl_to_base_beta: no variant uses it",
    ),
    "ema_sync_longer_than_the_run": (
        """
        subsets: [[ema]]
        ema: {sync_steps: 5}
        """,
        "method.ema.sync_steps: 5 is more than the 4 optimizer steps unisd[ema] takes",
    ),
    "ema_sync_space_reaching_past_the_run": (
        """
        subsets: [[ema]]
        ema: {sync_steps: {choices: [1, 2, 8]}}
        """,
        "method.ema.sync_steps: 8 is more than the 4 optimizer steps",
    ),
}


@pytest.mark.parametrize("case", list(INERT))
def test_inert_setting_is_refused_with_one_line(capsys, tmp_path, case):
    method, expected = INERT[case]
    line = _refused(capsys, _write(tmp_path, method))
    assert expected in line, line


def test_ema_sync_is_checked_by_harness_run_before_anything_runs(capsys, tmp_path):
    path = _write(tmp_path, "subsets: [[ema]]\nema: {sync_steps: 10}")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "method.ema.sync_steps: 10 is more than the 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method",
    [
        "subsets: [agreement+feature_matching]\nfeature_matching: {match_repr: false}",
        "subsets: [[feature_matching], [agreement]]\nfeature_matching: {match_repr: true}",
        "subsets: [[clipping]]\nclipping: {mode: static, cap: 5.0}",
        "subsets: [[clipping]]\nclipping: {mode: {choices: [static, adaptive]}, cap: 5.0, quantile: 0.9}",
        "subsets: [[agreement]]\nagreement: {level: token, floor: 0.1}",
        "baselines: [base, gkd, sdft]\nalpha: 0.5",
        "baselines: [sft, gkd]\nkl_to_base_beta: 0.1",
        "subsets: [[ema]]\nema: {sync_steps: 4}",
    ],
)
def test_settings_that_act_still_validate(capsys, tmp_path, method):
    assert main(["validate", str(_write(tmp_path, method))]) == 0, capsys.readouterr().err


def test_kl_to_base_reaches_the_gkd_baseline(tmp_path):
    spec = load_spec(_write(tmp_path, "baselines: [gkd, sdft]\nkl_to_base_beta: 0.1"))
    by_name = {p.name: p for p in grid_points(spec)}
    assert by_name["gkd"].variant.kl_to_base_beta == 0.1
    assert by_name["sdft"].variant.kl_to_base_beta == 0.1
    plain = load_spec(_write(tmp_path, "baselines: [gkd]"))
    assert grid_points(plain)[0].variant.kl_to_base_beta == 0.0
    assert "kl_to_base_beta" not in grid_points(plain)[0].params  # unchanged point keys by default


def test_trainer_refuses_an_ema_sync_longer_than_the_run(tiny_model_and_tokenizer):
    from unisd_components.config import EMAConfig, TrainingConfig, VariantConfig
    from unisd_components.trainer import TrainingExample, train_variant

    model, tok = tiny_model_and_tokenizer
    examples = [
        TrainingExample(id=f"x{i}", messages=[{"role": "user", "content": f"q{i}"}], demonstration="a")
        for i in range(2)
    ]
    with pytest.raises(ValueError, match="EMA sync_steps 3 > the 2 optimizer steps"):
        train_variant(
            model, tok, examples, VariantConfig(ema=EMAConfig(sync_steps=3)),
            TrainingConfig(max_steps=2, batch_size=1, max_completion_tokens=2),
        )
