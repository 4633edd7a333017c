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


def test_full_ablation_is_the_papers_protocol_models_x_tasks_x_variants_x_seeds():
    points = grid_points(load_spec(REPO / "studies" / "full_ablation.yaml"))
    base = [p for p in points if p.variant is None]
    trained = [p for p in points if p.variant is not None]
    models = ["qwen2.5-7b", "llama-3.1-8b"]
    tasks = ["scienceqa", "mbpp", "cos_e", "toolalpaca"]
    # the base model once per model: it depends on neither the task nor the seed
    assert [(p.model, p.train_task, p.seed) for p in base] == [(m, None, 0) for m in models]
    assert len(trained) == 2 * 4 * 35 * 3 and len(points) == 842
    assert {(p.model, p.train_task) for p in trained} == {(m, t) for m in models for t in tasks}
    names = list(dict.fromkeys(p.name for p in trained))
    assert len(names) == 35 and names[:3] == ["sft", "sdft", "gkd"]  # baselines first, then 31 subsets
    assert names[-1] == "unisd_star_paper"
    assert {p.components for p in trained if p.variant_kind in ("factorial",)} == {
        tuple(c for j, c in enumerate(COMPONENT_NAMES) if mask >> j & 1) for mask in range(32)
    }
    keys = [point_key(p) for p in points]
    assert len(set(keys)) == 842 and "llama-3.1-8b/mbpp/unisd[ema]/seed=2" in keys
    # Every variant config of one cell is distinct (no point is run twice under two names).
    cell = [p for p in trained if p.model == "qwen2.5-7b" and p.train_task == "scienceqa" and p.seed == 0]
    configs = {(p.variant.model_dump_json(), p.training.batch_size) for p in cell}
    assert len(configs) == 35
    assert {p.seed for p in trained} == {0, 1, 2}
    assert all(p.training.learning_rate == 2e-5 and p.training.grad_accum == 4 for p in trained)
    assert {p.training.batch_size for p in trained if p.variant_kind != "preset"} == {4}


def test_full_ablation_preset_keeps_the_papers_values_whatever_the_subset_sections_say():
    """Defect 1: the study's component sections (gamma 1, lambda_c 0.1 ...) configure the subsets only."""
    points = grid_points(load_spec(REPO / "studies" / "full_ablation.yaml"))
    paper = [p for p in points if p.name == "unisd_star_paper"]
    assert len(paper) == 2 * 4 * 3 and all(p.variant_kind == "preset" for p in paper)
    for p in paper:
        v = p.variant
        assert (v.agreement.gamma, v.agreement.k, v.agreement.strategy) == (0.001, 3, "retrieval")
        assert (v.contrastive.weight, v.contrastive.margin) == (0.01, 0.1)
        assert (v.ema.beta, v.ema.sync_steps) == (0.98, 10)
        assert v.feature_matching.weight == 0.01 and v.clipping is None and v.alpha == 0.0
        assert p.training.batch_size == 2  # half of the models' batch 4
        assert p.params["agreement.gamma"] == 0.001 and p.params["training.batch_size"] == 2
    same = [p for p in points if p.name == "unisd[agreement+contrastive+ema+feature_matching]"][0]
    assert same.variant.agreement.gamma == 1.0 and same.variant.ema.beta == 0.9
    assert same.variant != paper[0].variant


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


def test_a_preset_changes_only_through_preset_overrides_and_the_paper_preset_halves_the_batch(tmp_path):
    text = BASE.replace(
        "subsets: [[ema]]",
        "subsets: [[ema]]\n  ema: {beta: 0.7}\n  presets: [unisd_star, unisd_star_paper]\n"
        "  preset_overrides: {unisd_star: {ema: {beta: 0.8}, alpha: 0.5}}",
    )
    points = {p.name: p for p in grid_points(_spec(tmp_path, text)) if p.seed == 0}
    star, paper, subset = points["unisd_star"], points["unisd_star_paper"], points["unisd[ema]"]
    assert subset.variant.ema.beta == 0.7  # the component section configures the subset
    assert star.variant.ema.beta == 0.8 and star.variant.alpha == 0.5  # overridden by the preset's name
    assert paper.variant.ema.beta == 0.98 and paper.variant.alpha == 0.0  # the preset's own values
    assert paper.variant.agreement.gamma == 0.001 and star.variant.agreement.gamma == 1.0
    assert paper.variant.ema.sync_steps == 10
    assert star.training.batch_size == 4 and paper.training.batch_size == 2
    assert paper.params["training.batch_size"] == 2
    assert [p.variant_kind for p in (star, paper, subset, points["sdft"], points["sft"])] == [
        "preset",
        "preset",
        "factorial",
        "factorial",
        "baseline",
    ]


def test_a_component_section_only_a_preset_uses_is_refused(tmp_path):
    from harness.errors import SpecError

    text = BASE.replace("subsets: [[ema]]", "presets: [unisd_star_paper]\n  agreement: {gamma: 1.0}")
    with pytest.raises(SpecError, match="preset_overrides.unisd_star_paper.agreement"):
        _spec(tmp_path, text)


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
    assert full["n_trials"] == 842 and full["n_variants"] == 36
    assert full["axes"]["trained_trials"] == 840 and full["axes"]["base_trials"] == 2
    assert full["gpu_hours_7b"] > 10
    hours = full["gpu_hours_per_model"]
    assert set(hours) == {"qwen2.5-7b", "llama-3.1-8b"} and hours["llama-3.1-8b"] > hours["qwen2.5-7b"] > 10
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
    assert "trials     842 (grid over the axes below)" in text
    assert (
        "2 model(s) x 4 training task(s) x 35 trained variant(s) x 3 seed(s) = 840 trained trials" in text
    )
    assert "scienceqa -> scienceqa, gpqa; mbpp -> mbpp, humaneval; cos_e -> cos_e" in text
    assert "GPU hours (7B model) ~" in text and "GPU hours per model  qwen2.5-7b ~" in text
    text = format_plan(describe_plan(load_spec(REPO / "studies" / "unisd_full_search.yaml")))
    assert "1 fixed (baselines) + 60 searched (tpe)" in text and "agreement.gamma" in text
