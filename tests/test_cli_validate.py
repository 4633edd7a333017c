"""`harness validate` / `harness schema`: a valid study prints its summary; every kind of bad input gets
exactly one line on stderr (file:line: field.path: reason), exit code 2 and no traceback."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))

VALID = """\
name: t
model:
  ref: tiny-random:llama
data:
  train: [scienceqa]
  train_size: 8
method:
  baselines: [base, sft]
  subsets: [[ema]]
  ema:
    {beta: 0.5, sync_steps: 1}
training:
  max_steps: 1
evaluation:
  benchmarks: [scienceqa, mbpp]
  limit: 2
"""


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _fails(capsys, path: Path) -> str:
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("study", STUDIES, ids=[p.name for p in STUDIES])
def test_every_shipped_study_validates(capsys, study):
    code, out, err = _run(capsys, "validate", str(study))
    assert code == 0, err
    assert f"{study}: valid" in out
    for label in ("variants", "trials", "evaluate", "seeds", "objectives", "GPU hours"):
        assert label in out


def test_summary_counts_smoke_and_full_ablation(capsys):
    _, out, _ = _run(capsys, "validate", str(REPO / "studies" / "smoke.yaml"))
    assert "variants   4:" in out and "trials     4 (4 variants x 1 seed(s), grid)" in out
    assert "evaluate   scienceqa, mbpp (8 examples per trial)" in out
    _, out, _ = _run(capsys, "validate", str(REPO / "studies" / "full_ablation.yaml"))
    assert "variants   36:" in out and "trials     842 (grid over the axes below)" in out
    assert "2 model(s) x 4 training task(s) x 35 trained variant(s) x 3 seed(s) = 840 trained trials" in out
    assert "protocol   per_task: scienceqa -> scienceqa, gpqa" in out and "llama-3.1-8b" in out
    # the same lines as the dry-run plan: one formatter
    from harness.plan import describe_plan, format_plan
    from harness.spec import load_spec

    plan = format_plan(describe_plan(load_spec(REPO / "studies" / "full_ablation.yaml")))
    assert out == f"{REPO / 'studies' / 'full_ablation.yaml'}: valid\n{plan}\n"


def test_valid_minimal_spec(capsys, tmp_path):
    code, out, _ = _run(capsys, "validate", str(_write(tmp_path, VALID)))
    assert code == 0
    assert "variants   3: base, sft, unisd[ema]" in out


def test_missing_file(capsys, tmp_path):
    line = _fails(capsys, tmp_path / "nope.yaml")
    assert line == f"{tmp_path / 'nope.yaml'}: file not found"


def test_yaml_syntax_error_names_its_line(capsys, tmp_path):
    path = _write(tmp_path, "name: t\nmodel:\n  ref: [tiny\nmethod: {}\n")
    line = _fails(capsys, path)
    assert line.startswith(f"{path}:4: YAML syntax error")


def test_empty_file(capsys, tmp_path):
    line = _fails(capsys, _write(tmp_path, "# only a comment\n"))
    assert "empty study spec" in line


def test_top_level_list(capsys, tmp_path):
    line = _fails(capsys, _write(tmp_path, "- name\n- model\n"))
    assert line.endswith("a study must be a mapping of sections (name, model, ...), got a list")


def test_list_where_a_mapping_belongs(capsys, tmp_path):
    path = _write(
        tmp_path, VALID.replace("model:\n  ref: tiny-random:llama", "model:\n  - tiny-random:llama")
    )
    # a list of models is the model axis: each entry must be a model section
    assert _fails(capsys, path) == f"{path}:3: model[0]: must be a mapping (got 'tiny-random:llama')"


def test_unknown_key_suggests_the_closest(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("  max_steps: 1", "  max_steps: 1\n  lerning_rate: 0.001"))
    assert (
        _fails(capsys, path)
        == f"{path}:14: training.lerning_rate: unknown key (did you mean 'learning_rate'?)"
    )


def test_unknown_top_level_section(capsys, tmp_path):
    path = _write(tmp_path, VALID + "evalution: {}\n")
    line = _fails(capsys, path)
    assert line == f"{path}:17: evalution: unknown key (did you mean 'evaluation'?)"


def test_wrong_type(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("  max_steps: 1", "  batch_size: eight"))
    assert _fails(capsys, path) == f"{path}:13: training.batch_size: must be an integer (got 'eight')"


def test_out_of_range(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("beta: 0.5", "beta: 1.5"))
    assert _fails(capsys, path) == f"{path}:11: method.ema.beta: must be < 1 (got 1.5)"


def test_missing_required_field(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("  ref: tiny-random:llama\n", "  dtype: float32\n"))
    assert _fails(capsys, path) == f"{path}:2: model.ref: required field is missing"


def test_unknown_component_in_subset_string(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("subsets: [[ema]]", "subsets: [ema+agrement]"))
    line = _fails(capsys, path)
    assert line.startswith(
        f"{path}:9: method.subsets[0][1]: unknown value 'agrement' (did you mean 'agreement'?)"
    )
    assert "valid: agreement, contrastive, ema, feature_matching, clipping" in line


def test_unknown_component_in_subset_list(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("subsets: [[ema]]", "subsets: [[ema], [dropout]]"))
    line = _fails(capsys, path)
    assert line.startswith(f"{path}:9: method.subsets[1][0]: unknown value 'dropout'")


def test_unknown_benchmark_lists_the_valid_ones(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("[scienceqa, mbpp]", "[scienceqa, mmlu]"))
    line = _fails(capsys, path)
    assert line == (
        f"{path}:15: evaluation.benchmarks[1]: unknown value 'mmlu'; "
        "valid: scienceqa, gpqa, mbpp, humaneval, cos_e, toolalpaca"
    )


def test_eval_only_benchmark_as_training(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("train: [scienceqa]", "train: [scienceqa, humaneval]"))
    assert _fails(capsys, path).startswith(f"{path}:5: data.train[1]: humaneval is evaluation-only")


def test_unknown_preset(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("subsets: [[ema]]", "subsets: [[ema]]\n  presets: [unisd]"))
    assert "method.presets[0]: unknown value 'unisd'" in _fails(capsys, path)


def test_grid_over_a_continuous_range(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("beta: 0.5", "beta: {type: float, low: 0.5, high: 0.9}"))
    line = _fails(capsys, path)
    assert line.startswith(
        f"{path}:11: method.ema.beta: a grid cannot enumerate the continuous range 0.5..0.9"
    )


def test_tpe_without_a_search_space(capsys, tmp_path):
    path = _write(tmp_path, VALID + "search: {sampler: tpe, n_trials: 4}\n")
    line = _fails(capsys, path)
    assert line.startswith(f"{path}:17: search.sampler: tpe needs a search space")


def test_search_without_budget(capsys, tmp_path):
    path = _write(
        tmp_path,
        VALID.replace("beta: 0.5", "beta: {type: float, low: 0.5, high: 0.9}") + "search: {sampler: tpe}\n",
    )
    assert _fails(capsys, path) == f"{path}:17: search.n_trials: sampler tpe needs n_trials or timeout"


def test_gkd_parameters_without_the_gkd_baseline(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("  ema:\n", "  gkd: {beta: 0.3}\n  ema:\n"))
    line = _fails(capsys, path)
    assert (
        line
        == f"{path}:10: method.gkd: gkd parameters without the gkd baseline (add gkd to method.baselines)"
    )


def test_component_configured_but_never_enabled(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("  ema:\n", "  clipping: {mode: static}\n  ema:\n"))
    assert "method.clipping: configured but no subset enables it" in _fails(capsys, path)


def test_search_space_bound_outside_the_field_range(capsys, tmp_path):
    text = (
        VALID.replace("beta: 0.5", "beta: {type: float, low: 0.5, high: 1.5}")
        + "search: {sampler: random, n_trials: 3}\n"
    )
    path = _write(tmp_path, text)
    assert _fails(capsys, path) == f"{path}:11: method.ema.beta: search space high: must be < 1 (got 1.5)"


def test_malformed_search_space(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("beta: 0.5", "beta: {type: flaot, low: 0.5, high: 0.9}"))
    line = _fails(capsys, path)
    assert line.startswith(f"{path}:11: method.ema.beta: must be a value or a search space")


def test_unknown_objective_metric(capsys, tmp_path):
    path = _write(tmp_path, VALID + "search:\n  objectives: [{metric: mean.accuracy}]\n")
    line = _fails(capsys, path)
    assert line.startswith(f"{path}:18: search.objectives[0].metric: unknown metric 'mean.accuracy'")
    assert "mbpp.pass_at_1" in line


def test_pruner_with_several_objectives(capsys, tmp_path):
    text = VALID.replace("beta: 0.5", "beta: {type: float, low: 0.5, high: 0.9}").replace(
        "train_size: 8", "train_size: 8\n  dev_size: 4"
    )
    text += "search:\n  sampler: tpe\n  n_trials: 3\n  pruner: median\n  objectives: [{metric: mean.acc}, {metric: ppl_ret, direction: minimize}]\n"
    path = _write(tmp_path, text)
    assert (
        _fails(capsys, path)
        == f"{path}:21: search.pruner: Optuna cannot prune multi-objective studies; use none"
    )


def test_pruner_without_dev_split(capsys, tmp_path):
    text = VALID.replace("beta: 0.5", "beta: {type: float, low: 0.5, high: 0.9}")
    text += "search: {sampler: tpe, n_trials: 3, pruner: median}\n"
    line = _fails(capsys, _write(tmp_path, text))
    assert line.endswith("search.pruner: pruning needs a dev split: set data.dev_size")


def test_half_precision_on_cpu(capsys, tmp_path):
    path = _write(
        tmp_path,
        VALID.replace(
            "  ref: tiny-random:llama", "  ref: tiny-random:llama\n  device: cpu\n  dtype: bfloat16"
        ),
    )
    assert _fails(capsys, path).startswith(f"{path}:5: model.dtype: bfloat16 on cpu")


def test_duplicate_key(capsys, tmp_path):
    path = _write(tmp_path, VALID + "name: u\n")
    assert _fails(capsys, path) == f"{path}:17: name: key written twice"


def test_unset_environment_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("UNISD_TEST_UNSET", raising=False)
    path = _write(tmp_path, VALID + "output_dir: ${UNISD_TEST_UNSET}/x\n")
    line = _fails(capsys, path)
    assert line.startswith(f"{path}:17: output_dir: environment variable UNISD_TEST_UNSET is not set")


def test_error_in_inherited_file_names_that_file(capsys, tmp_path):
    _write(tmp_path, VALID.replace("beta: 0.5", "beta: -0.5"), "parent.yaml")
    child = _write(tmp_path, "base: parent.yaml\nname: child\n", "child.yaml")
    line = _fails(capsys, child)
    assert line == f"{tmp_path / 'parent.yaml'}:11: method.ema.beta: must be >= 0 (got -0.5)"


def test_inheritance_cycle(capsys, tmp_path):
    _write(tmp_path, "base: b.yaml\nname: a\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\nname: b\n", "b.yaml")
    assert "inheritance cycle" in _fails(capsys, tmp_path / "a.yaml")


def test_missing_base_file(capsys, tmp_path):
    path = _write(tmp_path, "base: nowhere.yaml\nname: x\n")
    assert _fails(capsys, path) == f"{path}:1: base: file not found: {tmp_path / 'nowhere.yaml'}"


def test_schema_to_stdout_and_file(capsys, tmp_path):
    code, out, _ = _run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert {"name", "model", "method", "training", "evaluation", "search", "base"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False
    target = tmp_path / "schema.json"
    code, out, _ = _run(capsys, "schema", "-o", str(target))
    assert code == 0 and json.loads(target.read_text()) == schema


def test_training_seed_points_to_the_seeds_list(capsys, tmp_path):
    path = _write(tmp_path, VALID.replace("  max_steps: 1", "  max_steps: 1\n  seed: 3"))
    assert (
        _fails(capsys, path)
        == f"{path}:14: training.seed: unknown key (seeds are the top-level list `seeds: [0, 1, 2]`)"
    )


def test_dry_run_json_lists_every_trial_of_full_ablation_with_resolved_params(capsys):
    code, out, _ = _run(capsys, "run", str(REPO / "studies" / "full_ablation.yaml"), "--dry-run", "--json")
    assert code == 0
    trials = [json.loads(line) for line in out.splitlines()]
    assert all(set(t) >= {"model", "train_task", "variant", "seed", "params"} for t in trials)
    base = [t for t in trials if t["variant"] == "base"]
    assert [(t["model"], t["train_task"], t["seed"]) for t in base] == [
        ("qwen2.5-7b", None, 0),
        ("llama-3.1-8b", None, 0),
    ]
    trained = [t for t in trials if t["variant"] != "base"]
    coords = {(t["model"], t["train_task"], t["variant"], t["seed"]) for t in trained}
    variants = {t["variant"] for t in trained}
    assert len(variants) == 35 and {"sft", "sdft", "gkd", "unisd_star_paper"} <= variants
    assert len(coords) == len(trained) == 2 * 4 * 35 * 3
    assert {t["train_task"] for t in trained} == {"scienceqa", "mbpp", "cos_e", "toolalpaca"}
    for t in (t for t in trained if t["variant"] == "unisd_star_paper"):
        p = t["params"]
        assert (p["agreement.gamma"], p["contrastive.weight"], p["contrastive.margin"]) == (0.001, 0.01, 0.1)
        assert (p["ema.beta"], p["ema.sync_steps"], p["feature_matching.weight"]) == (0.98, 10, 0.01)
        assert p["training.batch_size"] == 2 and t["variant_kind"] == "preset"
    subset = next(t for t in trained if t["variant"] == "unisd[agreement+contrastive+ema+feature_matching]")
    assert subset["params"]["agreement.gamma"] == 1.0 and subset["params"]["training.batch_size"] == 4


def test_json_without_dry_run_is_a_user_error(capsys):
    code, _, err = _run(capsys, "run", str(REPO / "studies" / "smoke.yaml"), "--json")
    assert code == 2 and "--json only applies with --dry-run" in err


AXES = VALID.replace(
    "model:\n  ref: tiny-random:llama\n",
    "model:\n  - {name: a, ref: tiny-random:llama}\n  - {name: b, ref: tiny-random:qwen2, batch_size: 2}\n",
).replace("  train: [scienceqa]\n", "  protocol: per_task\n  train: [scienceqa, mbpp]\n")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("{name: b, ref", "{name: a, ref", "model[1].name: model name 'a' used twice"),
        (
            "benchmarks: [scienceqa, mbpp]",
            "benchmarks: [scienceqa, mbpp, humaneval, cos_e]",
            "evaluation.benchmarks[3]: per_task: cos_e is neither a training task nor a transfer target",
        ),
        (
            "train: [scienceqa, mbpp]",
            "train: [scienceqa, cos_e]",
            "data.train[1]: per_task: cos_e must be in evaluation.benchmarks",
        ),
        (
            "limit: 2",
            "limit: 2\nsearch: {sampler: random, n_trials: 2}",
            "search.sampler: random searches one model on pooled data",
        ),
        (
            "limit: 2",
            "limit: 2\nsearch: {objectives: [{metric: scienceqa.acc}]}",
            "per_task: each trial scores only its own cell",
        ),
        (
            "    {beta: 0.5, sync_steps: 1}",
            "    {beta: 0.5, sync_steps: 1}\n  preset_overrides: {unisd_star: {ema: {beta: 0.8}}}",
            "method.preset_overrides.unisd_star: unisd_star is not in method.presets",
        ),
    ],
)
def test_axes_errors_are_one_line(capsys, tmp_path, old, new, message):
    assert old in AXES
    assert message in _fails(capsys, _write(tmp_path, AXES.replace(old, new)))


def test_axes_spec_validates_and_summarises(capsys, tmp_path):
    code, out, _ = _run(capsys, "validate", str(_write(tmp_path, AXES)))
    assert code == 0, out
    # 2 models x 2 tasks x (sft, unisd[ema]) x 1 seed + base once per model
    assert "trials     10 (grid over the axes below)" in out
    assert "2 model(s) x 2 training task(s) x 2 trained variant(s) x 1 seed(s) = 8 trained trials" in out
    assert "models     a, b" in out and "tiny-random:llama, tiny-random:qwen2" in out
