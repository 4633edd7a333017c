"""harness.plan: the points of the shipped studies, grid expansion, Optuna suggestions on a real
in-memory study, preset semantics and the dry-run estimate."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from harness.plan import (
    describe_plan,
    format_plan,
    grid_points,
    point_key,
    point_summary,
    search_candidates,
    suggest_point,
)
from harness.spec import load_spec
from unisd_components.config import COMPONENT_NAMES, VariantConfig

REPO = Path(__file__).resolve().parents[1]

BASE = """\
name: t
model: {ref: tiny-random:llama}
data: {train: [scienceqa], train_size: 8}
method:
  baselines: [base, sft, sdft, gkd]
  subsets: [[ema]]
training: {max_steps: 2, batch_size: 4, max_completion_tokens: 16}
seeds: [0, 1]
evaluation: {benchmarks: [scienceqa, mbpp], limit: 4, max_gen_tokens: 16}
"""


def _spec(tmp_path: Path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return load_spec(path)


def test_smoke_has_four_variants():
    points = grid_points(load_spec(REPO / "studies" / "smoke.yaml"))
    assert [p.name for p in points] == ["sdft", "unisd[ema]", "unisd[clipping]", "unisd[ema+clipping]"]
    assert [p.components for p in points] == [(), ("ema",), ("clipping",), ("ema", "clipping")]
    assert points[1].variant == VariantConfig(ema=points[1].variant.ema)
    assert points[1].variant.ema.sync_steps == 1  # the study's value, not the default
    assert all(p.training.max_steps == 2 and p.training.max_completion_tokens == 16 for p in points)


def test_full_ablation_is_36_variants_times_3_seeds():
    points = grid_points(load_spec(REPO / "studies" / "full_ablation.yaml"))
    assert len(points) == 108
    names = list(dict.fromkeys(p.name for p in points))
    assert len(names) == 36
    assert names[:4] == ["base", "sft", "sdft", "gkd"]  # baselines first
    assert {p.components for p in points} == {
        tuple(c for j, c in enumerate(COMPONENT_NAMES) if mask >> j & 1) for mask in range(32)
    }
    keys = [point_key(p) for p in points]
    assert len(set(keys)) == 108
    # Every variant config is distinct (no point is run twice under two names).
    configs = {(p.variant.model_dump_json() if p.variant else "base", p.training.batch_size) for p in points}
    assert len(configs) == 36
    assert {p.seed for p in points} == {0, 1, 2}
    assert all(p.training.learning_rate == 2e-5 and p.training.grad_accum == 4 for p in points)


def test_quickstart_trains_on_64_examples_per_variant():
    spec = load_spec(REPO / "studies" / "quickstart.yaml")
    names = [p.name for p in grid_points(spec)]
    assert names == ["base", "sft", "sdft", "unisd[ema]", "unisd[feature_matching]", "unisd_star"]
    assert describe_plan(spec)["train_examples_per_variant"] >= 64


def test_families_variants_and_params(tmp_path):
    points = grid_points(_spec(tmp_path, BASE))
    by_name = {p.name: p for p in points if p.seed == 0}
    assert list(by_name) == ["base", "sft", "sdft", "gkd", "unisd[ema]"]
    assert [p.family for p in by_name.values()] == ["base", "baseline", "baseline", "baseline", "unisd"]
    assert by_name["base"].variant is None
    assert by_name["sft"].variant.method == "sft" and by_name["gkd"].variant.gkd.lmbda == 0.5
    assert by_name["sdft"].variant.enabled_components() == ()
    ema = by_name["unisd[ema]"]
    assert ema.params["comp.ema"] is True and ema.params["comp.agreement"] is False
    assert ema.params["ema.beta"] == 0.9 and ema.params["training.max_steps"] == 2
    summary = point_summary(ema)
    assert summary["components"]["ema"] is True and "comp.ema" not in summary["params"]
    assert [p.seed for p in points if p.name == "sft"] == [0, 1]
    assert {p.training.seed for p in points} == {0, 1}


def test_grid_expands_choices_and_integer_ranges(tmp_path):
    text = BASE.replace(
        "subsets: [[ema]]",
        "subsets: [[ema]]\n  ema: {beta: {choices: [0.5, 0.9]}, sync_steps: {type: int, low: 1, high: 5, step: 2}}",
    )
    points = [p for p in grid_points(_spec(tmp_path, text)) if p.name == "unisd[ema]"]
    assert len(points) == 2 * 3 * 2  # beta x sync_steps x seeds
    combos = {(p.variant.ema.beta, p.variant.ema.sync_steps) for p in points}
    assert combos == {(b, s) for b in (0.5, 0.9) for s in (1, 3, 5)}
    keys = {point_key(p) for p in points}
    assert len(keys) == 12 and "unisd[ema]/seed=0/ema.beta=0.5/ema.sync_steps=3" in keys


def test_user_values_override_a_preset_and_the_paper_preset_halves_the_batch(tmp_path):
    text = BASE.replace("subsets: [[ema]]", "presets: [unisd_star, unisd_star_paper]\n  ema: {beta: 0.7}")
    points = {p.name: p for p in grid_points(_spec(tmp_path, text)) if p.seed == 0}
    star, paper = points["unisd_star"], points["unisd_star_paper"]
    assert star.variant.ema.beta == 0.7 and paper.variant.ema.beta == 0.7  # written in the spec: wins
    assert paper.variant.agreement.gamma == 0.001 and star.variant.agreement.gamma == 1.0  # preset values
    assert paper.variant.ema.sync_steps == 10
    assert star.training.batch_size == 4 and paper.training.batch_size == 2
    assert paper.params["training.batch_size"] == 2


def test_suggest_point_on_a_real_optuna_study(tmp_path):
    spec = load_spec(REPO / "studies" / "unisd_full_search.yaml")
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3)
    )
    seen = []
    for _ in range(6):
        trial = study.ask()
        point = suggest_point(trial, spec)
        seen.append(point)
        assert point.name == "unisd_star" and point.family == "unisd"
        agreement = point.variant.agreement
        assert 1e-3 <= agreement.gamma <= 10 and 2 <= agreement.k <= 5
        assert agreement.strategy in ("random", "retrieval", "induction")
        assert 0.8 <= point.variant.ema.beta <= 0.99 and 1 <= point.variant.ema.sync_steps <= 50
        assert 5e-6 <= point.training.learning_rate <= 1e-4
        assert trial.params["agreement.gamma"] == agreement.gamma
        assert trial.params["training.learning_rate"] == point.training.learning_rate
        assert point.params["agreement.gamma"] == agreement.gamma
        study.tell(trial, agreement.gamma)  # any finite objective
    assert len({p.variant.agreement.gamma for p in seen}) == 6
    # The baselines of a search are fixed points, every space at its default.
    fixed = grid_points(spec)
    assert [p.name for p in fixed] == ["base"]


def test_suggest_point_chooses_among_several_variants(tmp_path):
    text = (
        BASE.replace("subsets: [[ema]]", "subsets: [[ema], [clipping], ema+clipping]")
        + "search: {sampler: random, n_trials: 5}\n"
    )
    spec = _spec(tmp_path, text)
    assert search_candidates(spec) == ["unisd[ema]", "unisd[clipping]", "unisd[ema+clipping]"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    names = set()
    for _ in range(12):
        trial = study.ask()
        point = suggest_point(trial, spec)
        assert trial.params["variant"] == point.name
        assert point.seed == spec.seeds[trial.number % 2]
        names.add(point.name)
        study.tell(trial, 0.0)
    assert names == set(search_candidates(spec))


def test_fixed_points_of_a_search_take_space_defaults(tmp_path):
    text = BASE.replace(
        "training: {max_steps: 2,",
        "training: {learning_rate: {type: float, low: 1e-6, high: 1e-4, log: true}, max_steps: 2,",
    ).replace("  subsets: [[ema]]", "  alpha: {type: float, low: 0.2, high: 1.0}\n  subsets: [[ema]]")
    text += "search: {sampler: tpe, n_trials: 3}\n"
    points = {p.name: p for p in grid_points(_spec(tmp_path, text)) if p.seed == 0}
    assert list(points) == ["base", "sft", "sdft", "gkd"]
    assert points["sft"].training.learning_rate == pytest.approx(2e-5)  # the config default, inside the range
    assert points["sdft"].variant.alpha == pytest.approx(0.6)  # default 0 is outside [0.2, 1]: the midpoint


def test_describe_plan_counts_and_tokens():
    plan = describe_plan(load_spec(REPO / "studies" / "smoke.yaml"))
    assert plan["n_variants"] == 4 and plan["n_trials"] == 4 and plan["seeds"] == [0]
    # Per trial: evaluation 2 benchmarks x 4 examples x 16 tokens = 128, training 2 steps x 4 prompts x 16
    # = 128; once per study: base completions for retention 8 x 16 = 128.
    assert plan["generated_tokens"]["upper_bound"] == 4 * (128 + 128) + 128
    full = describe_plan(load_spec(REPO / "studies" / "full_ablation.yaml"))
    assert full["n_trials"] == 108 and full["n_variants"] == 36
    assert full["gpu_hours_7b"] > 10
    search = describe_plan(load_spec(REPO / "studies" / "unisd_full_search.yaml"))
    assert search["n_trials"] == 61 and search["searched_trials"] == 60
    assert "agreement.gamma" in search["search_space"]


def test_base_point_records_the_study_training_but_no_hyperparameters(tmp_path):
    text = BASE.replace(
        "training: {max_steps: 2,", "training: {learning_rate: {choices: [1e-4, 1e-5]}, max_steps: 2,"
    )
    points = grid_points(_spec(tmp_path, text))
    base = [p for p in points if p.name == "base"]
    assert len(base) == 2  # one per seed, not one per learning rate
    assert base[0].training.max_steps == 2 and base[0].training.learning_rate == 1e-4
    assert not any(k.startswith("training.") for k in base[0].params)
    assert len([p for p in points if p.name == "sft"]) == 4


def test_format_plan_states_trials_and_gpu_hours():
    text = format_plan(describe_plan(load_spec(REPO / "studies" / "full_ablation.yaml")))
    assert "trials     108 (36 variants x 3 seed(s), grid)" in text
    assert "GPU hours (7B model) ~" in text
    text = format_plan(describe_plan(load_spec(REPO / "studies" / "unisd_full_search.yaml")))
    assert "1 fixed (baselines) + 60 searched (tpe)" in text and "agreement.gamma" in text
