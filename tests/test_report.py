"""The component-interaction report: effects recovered on tables with known answers, files, HTML, CLI."""

from __future__ import annotations

import base64
import itertools
import json
import math
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.report import analyse_effects, build_report
from harness.report.tables import ci_table, results_table, variant_stats

# y = 2a − b + 3ab: by hand, main a = (2+5)/2 = 3.5, main b = (−1+2)/2 = 0.5, interaction a×b = 5 − 2 = 3,
# Shapley a = ½·2 + ½·5 = 3.5, Shapley b = ½·(−1) + ½·2 = 0.5; c does nothing.
NOISE = 0.05
SEEDS = 3


def _y(a: int, b: int, c: int) -> float:
    return 2 * a - b + 3 * a * b


def _factorial(
    noise: float = NOISE, seeds: int = SEEDS, drop: tuple[tuple[int, ...], ...] = ()
) -> pd.DataFrame:
    rng = np.random.default_rng(1234)
    rows = []
    for a, b, c in itertools.product((0, 1), repeat=3):
        if (a, b, c) in drop:
            continue
        for seed in range(seeds):
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "c": c,
                    "seed": seed,
                    "state": "COMPLETE",
                    "y": _y(a, b, c) + rng.normal(0, noise),
                }
            )
    return pd.DataFrame(rows)


def test_synthetic_table_recovers_known_effects():
    effects = analyse_effects(_factorial(), ["a", "b", "c"], "y")
    # Noise sd 0.05 over 3 seeds: a main effect / Shapley value averages 8 subset means (sd ≈ 0.02), an
    # interaction contrasts them in pairs (sd ≈ 0.04); 0.15 is more than 3.5 sd for both.
    tol = 0.15
    assert effects["main_effects"] == pytest.approx({"a": 3.5, "b": 0.5, "c": 0.0}, abs=tol)
    assert effects["shapley"] == pytest.approx({"a": 3.5, "b": 0.5, "c": 0.0}, abs=tol)
    assert list(effects["interactions"]) == ["a×b", "a×c", "b×c"]
    assert effects["interactions"] == pytest.approx({"a×b": 3.0, "a×c": 0.0, "b×c": 0.0}, abs=tol)
    assert effects["missing_subsets"] == []
    assert effects["identifiable"]["shapley"] is True
    # Shapley efficiency: the values add up to v(all) − v(none), exactly.
    assert sum(effects["shapley"].values()) == pytest.approx(effects["full_minus_empty"], abs=1e-12)
    terms = effects["anova"]["terms"]
    assert terms["a"]["p"] < 1e-6 and terms["b"]["p"] < 1e-6 and terms["a×b"]["p"] < 1e-6
    assert terms["c"]["p"] > 1e-3 and terms["b×c"]["p"] > 1e-3
    assert effects["anova"]["df_resid"] == 8 * SEEDS - 7


def test_noise_free_table_is_exact_and_anova_refuses_a_perfect_fit():
    effects = analyse_effects(_factorial(noise=0.0), ["a", "b", "c"], "y")
    assert effects["main_effects"] == pytest.approx({"a": 3.5, "b": 0.5, "c": 0.0}, abs=1e-12)
    assert effects["interactions"]["a×b"] == pytest.approx(3.0, abs=1e-12)
    assert effects["anova"] is None
    assert any("zero residual variance" in note for note in effects["notes"])


def test_seed_means_come_first_so_unequal_seeds_do_not_weigh_subsets():
    df = _factorial(noise=0.0)
    extra = df[(df.a == 1) & (df.b == 1) & (df.c == 1)].assign(seed=99)
    effects = analyse_effects(pd.concat([df, extra, extra]), ["a", "b", "c"], "y")
    assert effects["main_effects"]["a"] == pytest.approx(3.5, abs=1e-12)


def test_only_complete_rows_count():
    df = _factorial(noise=0.0)
    broken = df.iloc[:4].assign(state="FAIL", y=1e6)
    effects = analyse_effects(pd.concat([df, broken]), ["a", "b", "c"], "y")
    assert effects["main_effects"]["a"] == pytest.approx(3.5, abs=1e-12)


def test_incomplete_factorial_reports_missing_subsets_and_no_wrong_numbers():
    effects = analyse_effects(_factorial(noise=0.0, drop=((1, 1, 1),)), ["a", "b", "c"], "y")
    assert effects["missing_subsets"] == ["{a, b, c}"]
    # Every full average needs {a, b, c}: none is identifiable, none is given a number.
    assert effects["main_effects"] == {"a": None, "b": None, "c": None}
    assert effects["shapley"] == {"a": None, "b": None, "c": None}
    assert set(effects["interactions"].values()) == {None}
    assert effects["identifiable"]["shapley"] is False
    assert not any(effects["identifiable"]["main_effects"].values())
    # What is identifiable is labelled conditional: effect of a where both sides exist (b,c = 00, 01, 10).
    assert effects["matched_pairs"]["a"] == {"value": pytest.approx((2 + 2 + 5) / 3), "pairs": 3, "of": 4}
    assert effects["matched_quads"]["a×b"] == {"value": pytest.approx(3.0), "contexts": 1, "of": 2}
    assert any("incomplete factorial" in note for note in effects["notes"])


def test_incomplete_factorial_report_says_not_identifiable(tmp_path):
    df = _factorial(drop=((1, 1, 1), (0, 1, 1)))
    files = build_report(df, components=["a", "b", "c"], metrics=["y"], out_dir=tmp_path, title="t")
    text = files.markdown.read_text()
    assert "Missing subsets: {b, c}, {a, b, c}." in text
    assert "conditional effect over the subsets present" in text  # conclusions do not claim a main effect
    data = json.loads(files.effects_json.read_text())
    assert data["y"]["main_effects"] == {"a": None, "b": None, "c": None}
    assert data["y"]["missing_subsets"] == ["{b, c}", "{a, b, c}"]


def _brute_force_shapley(v: dict[tuple[int, ...], float], n: int) -> list[float]:
    """Shapley by its other definition: mean marginal contribution over all n! orderings."""
    phi = [0.0] * n
    for order in itertools.permutations(range(n)):
        on = [0] * n
        for i in order:
            before = v[tuple(on)]
            on[i] = 1
            phi[i] += v[tuple(on)] - before
    return [p / math.factorial(n) for p in phi]


def test_five_components_against_closed_forms_and_brute_force():
    comps = ["agreement", "contrastive", "ema", "feature_matching", "clipping"]
    rng = np.random.default_rng(7)
    beta = rng.normal(0, 1, 5)
    gamma = np.triu(rng.normal(0, 1, (5, 5)), 1)
    three_way = 1.5  # agreement·ema·clipping: Shapley must share it three ways
    rows, v = [], {}
    for x in itertools.product((0, 1), repeat=5):
        xs = np.array(x, dtype=float)
        value = beta @ xs + xs @ gamma @ xs + three_way * xs[0] * xs[2] * xs[4]
        v[x] = value
        for seed in range(2):
            rows.append({**dict(zip(comps, x, strict=True)), "seed": seed, "m": value})
    effects = analyse_effects(pd.DataFrame(rows), comps, "m")
    sym = gamma + gamma.T
    for i, c in enumerate(comps):
        # main effect of i = β_i + ½ Σ_j γ_ij (+ ¼ of the 3-way term for its members)
        expected = beta[i] + sym[i].sum() / 2 + (three_way / 4 if i in (0, 2, 4) else 0.0)
        assert effects["main_effects"][c] == pytest.approx(expected, abs=1e-9)
    for i, j in itertools.combinations(range(5), 2):
        expected = gamma[i, j] + (three_way / 2 if {i, j} < {0, 2, 4} else 0.0)
        assert effects["interactions"][f"{comps[i]}×{comps[j]}"] == pytest.approx(expected, abs=1e-9)
    brute = _brute_force_shapley(v, 5)
    assert [effects["shapley"][c] for c in comps] == pytest.approx(brute, abs=1e-9)
    # Exact data: the 3-way term is the only residual, and with 2 identical seeds ANOVA still has df.
    assert effects["anova"]["df_resid"] == 64 - 16


def test_anova_omitted_without_residual_degrees_of_freedom():
    rows = [{"a": a, "b": b, "y": a + b + 0.1 * a * b} for a, b in itertools.product((0, 1), repeat=2)]
    effects = analyse_effects(pd.DataFrame(rows), ["a", "b"], "y")
    assert effects["anova"] is None
    assert any("no residual degrees of freedom" in note for note in effects["notes"])
    assert effects["interactions"]["a×b"] == pytest.approx(0.1)


def test_bad_columns_are_harness_errors():
    df = _factorial()
    with pytest.raises(HarnessError, match="zzz"):
        analyse_effects(df, ["a", "zzz"], "y")
    with pytest.raises(HarnessError, match="0/1"):
        analyse_effects(df.assign(a=df.a * 2), ["a", "b"], "y")


def _study_table() -> pd.DataFrame:
    """A study-shaped table: base, two baselines, SDFT (empty subset) and the UniSD subsets of {a, b}."""
    rows, trial = [], 0
    rng = np.random.default_rng(3)
    variants = [
        ("base", "base", 0, 0, 0.30),
        ("sft", "baseline", 0, 0, 0.35),
        ("gkd", "baseline", 0, 0, 0.40),
    ]
    variants += [("sdft", "baseline", 0, 0, 0.38), ("unisd[a]", "unisd", 1, 0, 0.45)]
    variants += [("unisd[b]", "unisd", 0, 1, 0.39), ("unisd[a+b]", "unisd", 1, 1, 0.50)]
    for seed in range(3):
        for name, family, a, b, level in variants:
            acc1, acc2 = level + rng.normal(0, 0.01), level - 0.1 + rng.normal(0, 0.01)
            rows.append(
                {
                    "trial": trial, "state": "COMPLETE", "variant": name, "family": family, "seed": seed,
                    "a": a, "b": b, "param.a.gamma": 1.0, "scienceqa.acc": acc1, "mbpp.pass_at_1": acc2,
                    "mean.acc": (acc1 + acc2) / 2, "ppl_ret": 2.0 + a * 0.3 + rng.normal(0, 0.02),
                    "train_seconds": 0.0 if name == "base" else 10.0 + 5 * (a + b),
                    "generated_tokens": 0 if name == "base" else 100 * (1 + a + b),
                }
            )  # fmt: skip
            trial += 1
    rows.append(
        {
            "trial": trial,
            "state": "FAIL",
            "variant": "unisd[a+b]",
            "family": "unisd",
            "seed": 9,
            "a": 1,
            "b": 1,
        }
    )
    return pd.DataFrame(rows)


def test_effects_use_the_factorial_rows_only(tmp_path):
    df = _study_table()
    files = build_report(
        df, components=["a", "b"], metrics=["scienceqa.acc", "mean.acc"], out_dir=tmp_path, title="t"
    )
    data = json.loads(files.effects_json.read_text())
    factorial = df[df.variant.isin(["sdft", "unisd[a]", "unisd[b]", "unisd[a+b]"])]
    assert data["mean.acc"]["main_effects"] == pytest.approx(
        analyse_effects(factorial, ["a", "b"], "mean.acc")["main_effects"]
    )
    # base/sft/gkd also have a = b = 0; mixing them in would move the empty subset's mean
    assert data["mean.acc"]["main_effects"] != pytest.approx(
        analyse_effects(df, ["a", "b"], "mean.acc")["main_effects"]
    )


def test_paper_style_table_order_deltas_and_confidence_intervals():
    df = _study_table()
    st = variant_stats(df, ["mean.acc"], ["a", "b"])
    assert list(dict.fromkeys(st["variant"])) == [
        "base",
        "sft",
        "gkd",
        "sdft",
        "unisd[a]",
        "unisd[b]",
        "unisd[a+b]",
    ]
    table, refs = results_table(st, ["mean.acc"], "mean.acc")
    assert refs == {"base": "base", "best_baseline": "gkd"}
    means = df[df.state == "COMPLETE"].groupby("variant")["mean.acc"].mean()
    row = table.set_index("variant").loc["unisd[a+b]"]
    assert row["Δ mean.acc vs base"] == f"{means['unisd[a+b]'] - means['base']:+.3f}"
    assert row["Δ mean.acc vs gkd"] == f"{means['unisd[a+b]'] - means['gkd']:+.3f}"
    assert row["n"] == 3  # the FAIL row does not count
    # 95% CI by hand for values 1, 2, 3: 2 ± t(0.975, 2)·1/√3 = 2 ± 4.3027/1.7321
    toy = pd.DataFrame({"variant": ["v"] * 3, "family": ["unisd"] * 3, "m": [1.0, 2.0, 3.0]})
    st = variant_stats(toy, ["m"])
    assert st.loc[0, "ci_high"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert ci_table(st, ["m"]).loc[0, "m"] == "[-0.484, 4.484]"


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _check_html_embeds_every_figure(html_file: Path, figures: Sequence[Path]) -> None:
    parser = _Collector()
    parser.feed(html_file.read_text(encoding="utf-8"))
    parser.close()
    assert "table" in parser.tags and "h1" in parser.tags
    pngs = sorted((html_file.parent / "figures").glob("*.png"))
    assert pngs and sorted(figures) == pngs
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in parser.images]
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    for blob in embedded:
        assert blob.startswith(b"\x89PNG")


def test_study_report_files_html_and_pareto(tmp_path):
    metrics = ["scienceqa.acc", "mbpp.pass_at_1", "mean.acc", "ppl_ret"]
    files = build_report(
        _study_table(), components=["a", "b"], metrics=metrics, out_dir=tmp_path, title="Study"
    )
    _check_html_embeds_every_figure(files.html, files.figures)
    names = {p.name for p in files.figures}
    assert {"shapley_mean_acc.png", "interactions_mean_acc.png"} <= names
    assert {f"pareto_mean_acc_vs_{x}.png" for x in ("ppl_ret", "train_seconds", "generated_tokens")} <= names
    results = pd.read_csv(files.results_csv)
    assert len(results) == 22 and {"seed", "a", "b", "param.a.gamma", *metrics} <= set(results.columns)
    text = files.markdown.read_text()
    assert text.index("| base |") < text.index("| gkd |") < text.index("| unisd[a] |")
    assert "strongest baseline on mean.acc: gkd" in text
    conclusions = text.split("## Conclusions")[1].split("##")[0]
    assert "driven most by a" in conclusions and "ANOVA p" in conclusions


def test_conclusions_use_no_significance_words_without_p_values(tmp_path):
    rows = [
        {"a": a, "b": b, "y": 1 + a + 0.2 * b + 0.5 * a * b} for a, b in itertools.product((0, 1), repeat=2)
    ]
    files = build_report(
        pd.DataFrame(rows), components=["a", "b"], metrics=["y"], out_dir=tmp_path, title="t"
    )
    conclusions = files.markdown.read_text().split("## Conclusions")[1].split("##")[0]
    assert "driven most by a" in conclusions and "a×b = +0.5" in conclusions and "synergy" in conclusions
    assert "significant" not in conclusions and "p =" not in conclusions


def test_search_report_has_optuna_figures_and_best_params(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    rows = []
    for _ in range(12):
        trial = study.ask()
        gamma = trial.suggest_float("agreement.gamma", 1e-3, 10, log=True)
        a = trial.suggest_categorical("a", [0, 1])
        value = 0.5 + 0.1 * a - 0.01 * abs(math.log10(gamma))
        study.tell(trial, value)
        rows.append({"trial": trial.number, "state": "COMPLETE", "seed": 0, "a": a, "b": 0,
                     "param.agreement.gamma": gamma, "mean.acc": value})  # fmt: skip
    files = build_report(
        pd.DataFrame(rows), components=["a", "b"], metrics=["mean.acc"], out_dir=tmp_path, title="s",
        study_kind="search", optuna_study=study,
    )  # fmt: skip
    names = {p.name for p in files.figures}
    assert {"optuna_importances.png", "optuna_history.png", "optuna_parallel.png"} <= names
    _check_html_embeds_every_figure(files.html, files.figures)
    search = json.loads(files.effects_json.read_text())["_search"]
    assert search["best_params"] == pytest.approx(study.best_params)
    assert set(search["param_importances"]) == {"agreement.gamma", "a"}
    # b never varies: half the subsets are missing and the report says so instead of inventing effects
    # (b has no on/off contrast: it is left out of the effects, and the conclusions name it once)
    assert "b" not in json.loads(files.effects_json.read_text())["mean.acc"]["main_effects"]
    assert "Not varied in the factorial (switched on only in presets, or never): b" in files.markdown.read_text()


def _write_csv(path: Path) -> Path:
    _factorial().rename(columns={"y": "score"}).assign(cost=lambda d: 1 + d.a).to_csv(path, index=False)
    return path


def test_cli_from_csv_writes_every_file(tmp_path, capsys):
    csv = _write_csv(tmp_path / "table.csv")
    out = tmp_path / "report"
    rc = main(
        [
            "report",
            "--from-csv",
            str(csv),
            "--components",
            "a,b,c",
            "--metrics",
            "score,cost",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert "report written" in capsys.readouterr().out
    for name in ("report.md", "report.html", "results.csv", "effects.json"):
        assert (out / name).is_file()
    data = json.loads((out / "effects.json").read_text(encoding="utf-8"))
    assert list(data) == ["score", "cost"]
    for metric in data:
        assert list(data[metric]["main_effects"]) == ["a", "b", "c"]
        assert list(data[metric]["shapley"]) == ["a", "b", "c"]
        assert list(data[metric]["interactions"]) == ["a×b", "a×c", "b×c"]
    assert data["score"]["main_effects"]["a"] == pytest.approx(3.5, abs=0.15)
    assert data["cost"]["main_effects"]["a"] == pytest.approx(1.0, abs=1e-12)
    # derived variant names: subsets, "none" for the empty one
    assert set(pd.read_csv(out / "results.csv")["variant"]) == {
        "none",
        "a",
        "b",
        "c",
        "a+b",
        "a+c",
        "b+c",
        "a+b+c",
    }
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 4  # Shapley bars and interaction heatmap for each of the two metrics
    parser = _Collector()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(parser.images) == len(figures)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from-csv", "{tmp}/missing.csv", "--components", "a", "--metrics", "score", "--out", "{tmp}/o"],
         "no such results file"),
        (["--from-csv", "{csv}", "--components", "a,zzz", "--metrics", "score", "--out", "{tmp}/o"],
         "unknown column(s) zzz"),
        (["--from-csv", "{csv}", "--components", "a", "--metrics", "nope", "--out", "{tmp}/o"],
         "unknown column(s) nope"),
        (["--from-csv", "{csv}", "--components", "seed", "--metrics", "score", "--out", "{tmp}/o"],
         "must hold only 0 and 1"),
        (["--from-csv", "{csv}", "--metrics", "score", "--out", "{tmp}/o"], "--components is required"),
        (["--from-csv", "{csv}", "--components", "a", "--metrics", "score"], "--out DIR is required"),
        ([], "give a study SPEC"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    csv = _write_csv(tmp_path / "table.csv")
    argv = [a.format(tmp=tmp_path, csv=csv) for a in argv]
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _logged_study(tmp_path: Path, *, search: bool) -> tuple[Path, object, list[dict]]:
    """A smoke-shaped study written through the real tracking module (MLflow on SQLite, no training):
    SDFT and the UniSD subsets of {ema, clipping}, two seeds, known effects on the accuracies."""
    from harness import tracking
    from harness.spec import load_spec

    text = (Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml").read_text()
    text = text.replace("output_dir: runs/smoke", f"output_dir: {tmp_path / 'run'}")
    if search:
        text = text.replace("    beta: 0.9\n", "    beta: {type: float, low: 0.5, high: 0.99}\n")
        text = text.replace("  sampler: grid\n", "  sampler: random\n  n_trials: 8\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    spec = load_spec(path)
    handle = tracking.init_tracking(spec)
    study = None
    if search:
        study = optuna.create_study(study_name=spec.name, storage=spec.storage_url, direction="maximize")
    truth, number = [], 0
    for seed in (0, 1):
        for ema, clip in itertools.product((0, 1), repeat=2):
            on = [c for c, flag in (("ema", ema), ("clipping", clip)) if flag]
            name = "unisd[" + "+".join(on) + "]" if on else "sdft"
            beta = 0.5 + 0.06 * number
            acc = 0.3 + 0.1 * ema + 0.02 * clip + 0.05 * ema * clip + 0.01 * seed
            metrics = {"scienceqa.acc": acc, "mbpp.pass_at_1": acc / 2, "mean.acc": 0.75 * acc,
                       "ppl_ret": 2.0 + clip, "train_seconds": 10.0 + ema, "generated_tokens": 100}  # fmt: skip
            run = tracking.TrialRun.start(
                handle, trial_number=number, variant=name, family="baseline" if not on else "unisd", seed=seed,
                components={"ema": bool(ema), "clipping": bool(clip)}, params={"ema.beta": beta},
                system_metrics=False,
            )  # fmt: skip
            run.log_metrics(metrics)
            run.finish("COMPLETE")
            if study is not None:
                study.enqueue_trial({"ema.beta": beta, "variant": name})  # the params this row was run with
                trial = study.ask()
                trial.suggest_float("ema.beta", 0.5, 0.99)
                trial.suggest_categorical(
                    "variant", ["sdft", "unisd[ema]", "unisd[clipping]", "unisd[ema+clipping]"]
                )
                study.tell(trial, metrics["mean.acc"])
            truth.append(metrics)
            number += 1
    return path, spec, truth


def _parent_artifacts(spec) -> list[str]:
    from mlflow import MlflowClient

    from harness import tracking

    handle = tracking.open_tracking(spec)
    client = MlflowClient(spec.tracking_uri)
    return [a.path for a in client.list_artifacts(handle.parent_run_id, "report")]


def test_cli_study_mode_reads_mlflow_and_logs_the_report(tmp_path, capsys):
    spec_path, spec, _ = _logged_study(tmp_path, search=False)
    out = tmp_path / "report"
    assert main(["report", str(spec_path), "--out", str(out)]) == 0
    data = json.loads((out / "effects.json").read_text(encoding="utf-8"))
    # components in canonical order (ema before clipping); mean.acc = 0.75·(0.1 e + 0.02 c + 0.05 e·c) + ...
    assert data["mean.acc"]["main_effects"] == pytest.approx({"ema": 0.75 * 0.125, "clipping": 0.75 * 0.045})
    assert data["mean.acc"]["interactions"] == pytest.approx({"ema×clipping": 0.75 * 0.05})
    assert data["mean.acc"]["anova"]["df_resid"] == 8 - 4
    _check_html_embeds_every_figure(out / "report.html", sorted(out.glob("figures/*.png")))
    assert {"report/report.html", "report/report.md", "report/effects.json", "report/results.csv"} <= set(
        _parent_artifacts(spec)
    )


def test_study_mode_search_adds_optuna_section(tmp_path):
    from harness.report import report_for_study

    _, spec, truth = _logged_study(tmp_path, search=True)
    files = report_for_study(spec, out_dir=tmp_path / "report")
    data = json.loads(files.effects_json.read_text(encoding="utf-8"))
    assert data["_search"]["best_trial"]["value"] == pytest.approx(max(m["mean.acc"] for m in truth))
    assert {"optuna_history.png", "optuna_parallel.png", "optuna_importances.png"} <= {
        p.name for p in files.figures
    }
    assert "## Search" in files.markdown.read_text()
    # The best trial (ema + clipping, seed 1: the last one) pinned as a ready-to-run grid spec.
    from harness.plan import grid_points
    from harness.spec import load_spec

    best_spec = load_spec(files.directory / "best_spec.yaml")
    assert best_spec.search.sampler == "grid" and best_spec.name == f"{spec.name}_best"
    study = optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    beta = study.best_trial.params["ema.beta"]
    unisd = [p for p in grid_points(best_spec) if p.family == "unisd"]
    assert {p.name for p in unisd} == {"unisd[ema+clipping]"}
    assert all(p.variant.ema.beta == pytest.approx(beta) for p in unisd)


def test_interaction_heatmap_labels_stay_readable_on_saturated_cells(tmp_path, monkeypatch):
    """Seen in the browser: black numbers on the darkest red/blue cells could not be read."""
    from harness.report import plots
    from harness.report.effects import pair_key

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    effects = {
        "main_effects": {"a": 0.1, "b": -0.2, "c": 0.0},
        "interactions": {pair_key("a", "b"): -0.05, pair_key("a", "c"): 0.001, pair_key("b", "c"): None},
    }
    plots.interaction_heatmap(effects, ["a", "b", "c"], "mean.acc", tmp_path / "h.png")
    colors = {t.get_text(): t.get_color() for t in figures[0].axes[0].texts}
    assert colors["-0.05"] == "white", "the strongest interaction sits on the darkest cell"
    assert colors["+0.001"] == "black" and colors["n/a"] == "black" and colors["main\n+0.1"] == "black"
