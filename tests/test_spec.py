"""Study spec loading: inheritance, environment interpolation, YAML number forms, derived locations,
and the component sections mirroring unisd_components.config."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.spec import (
    COMPONENT_CONFIGS,
    PRESET_COMPONENTS,
    ChoiceSpace,
    FloatSpace,
    IntSpace,
    StudySpec,
    load_spec,
    spec_json_schema,
)
from unisd_components.config import COMPONENT_NAMES, TrainingConfig

PARENT = """\
name: parent
model:
  ref: tiny-random:llama
  lora: {enabled: true, r: 8}
data:
  train: [scienceqa, mbpp]
  train_size: 8
method:
  baselines: [base, sft]
  subsets: [[ema], agreement+ema]
  ema: {beta: 0.5, sync_steps: 3}
training:
  max_steps: 1
  learning_rate: 1.0e-4
seeds: [0, 1]
evaluation:
  benchmarks: [scienceqa, mbpp]
  limit: 2
"""


def _write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_inheritance_deep_merges_and_replaces_lists(tmp_path):
    _write(tmp_path, PARENT, "parent.yaml")
    (tmp_path / "sub").mkdir()
    child = _write(
        tmp_path / "sub",
        """\
        base: ../parent.yaml
        name: child
        model:
          lora: {r: 32}
        method:
          ema: {beta: 0.7}
        seeds: [5]
        """,
        "child.yaml",
    )
    spec = load_spec(child)
    assert spec.name == "child"
    assert spec.model.ref == "tiny-random:llama"  # kept from the parent
    assert spec.model.lora.enabled is True and spec.model.lora.r == 32  # merged inside the mapping
    assert spec.method.ema.beta == 0.7 and spec.method.ema.sync_steps == 3
    assert spec.seeds == [5]  # lists are replaced, not appended
    assert spec.method.baselines == ["base", "sft"]
    assert spec.source == child


def test_inheritance_chain_of_three(tmp_path):
    _write(tmp_path, PARENT, "a.yaml")
    _write(tmp_path, "base: a.yaml\nname: b\nevaluation: {limit: 3}\n", "b.yaml")
    c = _write(tmp_path, "base: b.yaml\nname: c\ntraining: {max_steps: 2}\n", "c.yaml")
    spec = load_spec(c)
    assert (spec.name, spec.evaluation.limit, spec.training.max_steps) == ("c", 3, 2)
    assert spec.training.learning_rate == pytest.approx(1e-4)


def test_env_interpolation_with_types_and_defaults(tmp_path):
    text = PARENT.replace("limit: 2", "limit: ${UNISD_T_LIMIT}").replace(
        "learning_rate: 1.0e-4", "learning_rate: ${UNISD_T_LR:-3e-5}"
    )
    text += "output_dir: ${UNISD_T_ROOT:-/tmp}/runs/${UNISD_T_NAME}\n"
    text = text.replace("  train_size: 8", "  train_size: 8\n  data_dir: ${UNISD_T_DATA:-}")
    path = _write(tmp_path, text, "env.yaml")
    env = {"UNISD_T_LIMIT": "7", "UNISD_T_NAME": "abc"}
    spec = load_spec(path, env=env)
    assert spec.evaluation.limit == 7
    assert spec.training.learning_rate == pytest.approx(3e-5)  # the default, read as a number
    assert spec.output_dir == "/tmp/runs/abc"
    assert spec.data.data_dir is None  # empty -> the hub
    env.update(UNISD_T_DATA="/data", UNISD_T_LR="0.5", UNISD_T_ROOT="/srv")
    spec = load_spec(path, env=env)
    assert spec.data.data_dir == "/data" and spec.training.learning_rate == 0.5
    assert spec.output_dir == "/srv/runs/abc"


def test_env_interpolation_from_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_T_SEEDLESS_NAME", "from_env")
    path = _write(tmp_path, PARENT.replace("name: parent", "name: ${UNISD_T_SEEDLESS_NAME}"), "s.yaml")
    assert load_spec(path).name == "from_env"


def test_quoted_interpolation_stays_a_string(tmp_path):
    path = _write(tmp_path, PARENT.replace("name: parent", 'name: "${UNISD_T_N:-123}"'), "q.yaml")
    assert load_spec(path, env={}).name == "123"


def test_exponent_without_a_dot_is_a_float_in_choices(tmp_path):
    text = PARENT.replace("beta: 0.5", "beta: {choices: [1e-1, 5e-1]}")
    spec = load_spec(_write(tmp_path, text, "f.yaml"))
    assert spec.method.ema.beta == ChoiceSpace(choices=[0.1, 0.5])


def test_spaces_are_parsed_and_listed(tmp_path):
    text = PARENT.replace(
        "ema: {beta: 0.5, sync_steps: 3}",
        "ema: {beta: {type: float, low: 0.8, high: 0.99}, sync_steps: {type: int, low: 1, high: 50, log: true}}",
    ).replace("learning_rate: 1.0e-4", "learning_rate: {type: float, low: 1e-6, high: 1e-3, log: true}")
    text += "search: {sampler: tpe, n_trials: 5}\n"
    spec = load_spec(_write(tmp_path, text, "s.yaml"))
    spaces = spec.spaces()
    assert set(spaces) == {"ema.beta", "ema.sync_steps", "training.learning_rate"}
    assert isinstance(spaces["ema.beta"], FloatSpace)
    assert spaces["ema.sync_steps"] == IntSpace(type="int", low=1, high=50, log=True)
    assert spaces["training.learning_rate"].log is True


def test_defaults_locations_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_write(tmp_path, PARENT, "p.yaml"))
    assert spec.output_path == Path("runs/parent")
    assert spec.storage_url == f"sqlite:///{tmp_path / 'runs/parent/optuna.db'}"
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'runs/parent/mlflow.db'}"
    assert spec.experiment_name == "parent"
    moved = spec.with_overrides(output_dir=tmp_path / "elsewhere", storage="postgresql://h/db")
    assert moved.tracking_uri == f"sqlite:///{tmp_path / 'elsewhere/mlflow.db'}"
    assert moved.storage_url == "postgresql://h/db"
    assert moved.source == spec.source


def test_sections_mirror_the_component_configs():
    from harness.spec import MethodSpec, TrainingSpec

    for name, config in COMPONENT_CONFIGS.items():
        section = MethodSpec.model_fields[name].annotation.__args__[0]
        assert set(section.model_fields) == set(config.model_fields), name
    assert set(TrainingSpec.model_fields) == set(TrainingConfig.model_fields) - {"seed"}
    assert tuple(COMPONENT_CONFIGS) == COMPONENT_NAMES


def test_every_preset_is_a_valid_spec_preset_with_its_components(tmp_path):
    from unisd_components.presets import PRESETS

    for name, variant in PRESETS.items():
        text = PARENT.replace("subsets: [[ema], agreement+ema]", f"subsets: [[ema]]\n  presets: [{name}]")
        spec = load_spec(_write(tmp_path, text, f"{name}.yaml"))
        assert PRESET_COMPONENTS[name] == variant.enabled_components()
        assert spec.method.enabled_anywhere() == {"ema", *variant.enabled_components()}


def test_subsets_all_respects_the_component_pool(tmp_path):
    text = PARENT.replace("subsets: [[ema], agreement+ema]", "components: [ema, clipping]\n  subsets: all")
    spec = load_spec(_write(tmp_path, text, "a.yaml"))
    assert spec.method.subset_list() == [(), ("ema",), ("clipping",), ("ema", "clipping")]


def test_subset_strings_are_canonicalised_and_duplicates_refused(tmp_path):
    spec = load_spec(_write(tmp_path, PARENT.replace("agreement+ema", "ema+agreement"), "a.yaml"))
    assert spec.method.subset_list() == [("ema",), ("agreement", "ema")]
    text = PARENT.replace("[[ema], agreement+ema]", "[[ema, agreement], agreement+ema]")
    with pytest.raises(SpecError, match=r"method.subsets\[1\]: subset agreement\+ema listed twice"):
        load_spec(_write(tmp_path, text, "b.yaml"))


def test_a_spec_built_in_code_is_validated_too():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown bundled model 'bundled:other'"):
        StudySpec.model_validate(
            {
                "name": "x",
                "model": {"ref": "bundled:other"},
                "method": {"baselines": ["base"]},
                "evaluation": {"benchmarks": ["gpqa"]},
            }
        )


def test_json_schema_describes_spaces():
    schema = spec_json_schema()
    beta = schema["$defs"]["EMASpec"]["properties"]["beta"]
    text = str(beta)
    assert "FloatSpace" in text and "ChoiceSpace" in text
    assert "exclusiveMaximum" in text  # the field's own bound (< 1) is in the schema


def test_fixed_spec_data_pins_a_search_trial(tmp_path):
    import optuna
    import yaml

    from harness.plan import grid_points, suggest_point
    from harness.spec import fixed_spec_data

    spec = load_spec(Path(__file__).resolve().parents[1] / "studies" / "unisd_full_search.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    point = suggest_point(trial, spec)
    data = fixed_spec_data(spec, trial.params)
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    pinned = load_spec(path)
    assert pinned.name == "unisd_full_search_best" and pinned.search.sampler == "grid"
    assert pinned.spaces() == {}
    points = [p for p in grid_points(pinned) if p.name == "unisd_star"]
    assert len(points) == 1
    assert points[0].variant == point.variant
    assert points[0].training.learning_rate == point.training.learning_rate


def test_fixed_spec_data_with_a_chosen_subset(tmp_path):
    from harness.plan import grid_points
    from harness.spec import fixed_spec_data

    text = PARENT.replace("[[ema], agreement+ema]", "[[ema], agreement+ema, [clipping]]").replace(
        "ema: {beta: 0.5, sync_steps: 3}", "ema: {beta: {type: float, low: 0.5, high: 0.9}}"
    )
    spec = load_spec(_write(tmp_path, text + "search: {sampler: tpe, n_trials: 3}\n", "s.yaml"))
    data = fixed_spec_data(spec, {"variant": "unisd[agreement+ema]", "ema.beta": 0.6}, name="pinned")
    pinned = StudySpec.model_validate(data)
    names = [p.name for p in grid_points(pinned) if p.seed == 0]
    assert names == ["base", "sft", "unisd[agreement+ema]"]
    assert grid_points(pinned)[-1].variant.ema.beta == 0.6


def test_a_spec_with_every_section_pickles_for_worker_processes():
    """Workers are spawned processes: the spec, its generated section classes included, must pickle."""
    import pickle

    spec = load_spec(Path(__file__).resolve().parents[1] / "studies" / "full_ablation.yaml")
    assert all(getattr(spec.method, name) is not None for name in ("agreement", "ema"))
    assert pickle.loads(pickle.dumps(spec)) == spec
