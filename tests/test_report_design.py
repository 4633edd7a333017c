"""Reports on fractional designs, paired comparisons and presets beside the factorial (issue 14)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.design import fractional_design, full_design
from harness.report import build_report

FIVE = ["agreement", "contrastive", "ema", "feature_matching", "clipping"]
MAIN = dict(zip(FIVE, (0.06, -0.03, 0.04, 0.0, 0.02), strict=True))
PAIRS = {"agreement×ema": 0.05, "contrastive×clipping": -0.04}
SE = 0.005


def _truth(z: np.ndarray) -> np.ndarray:
    """0.5 + planted main effects and pair interactions, in the report's units (±1 coefficients /2, /4)."""
    x = 2 * z - 1
    y = 0.5 + x @ np.array([MAIN[c] for c in FIVE]) / 2
    for key, value in PAIRS.items():
        a, b = key.split("×")
        y = y + value / 4 * x[:, FIVE.index(a)] * x[:, FIVE.index(b)]
    return y


def _table(runs, rng: np.random.Generator | None) -> pd.DataFrame:
    z = np.array(runs, dtype=float)
    y = _truth(z) + (rng.normal(0, SE, len(z)) if rng is not None else 0.0)
    df = pd.DataFrame(z.astype(int), columns=FIVE)
    return df.assign(**{"mean.acc": y, "mean.acc_se": SE})


def _from_csv(tmp_path, df: pd.DataFrame, name: str) -> tuple[dict, str]:
    csv = tmp_path / f"{name}.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / name
    argv = [
        "report",
        "--from-csv",
        str(csv),
        "--components",
        ",".join(FIVE),
        "--metrics",
        "mean.acc",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return json.loads((out / "effects.json").read_text())["mean.acc"], (out / "report.md").read_text()


def test_from_csv_recovers_planted_effects_on_a_16_row_resolution_v_fraction(tmp_path, capsys):
    runs = fractional_design(FIVE, 5).runs
    data, text = _from_csv(tmp_path, _table(runs, np.random.default_rng(7)), "half")
    assert data["design"]["name"] == "2^(5−1) fraction, resolution V" and data["design"]["runs"] == 16
    assert "2^(5−1) fraction, resolution V, 16 of 32 subsets" in text
    conclusions = text.split("## Conclusions")[1].split("##")[0]
    assert "The factorial rows form a 2^(5−1) fraction, resolution V (16 of 32 subsets" in conclusions
    fit = {t["term"]: t for t in data["fit"]}
    truth = {**MAIN, **PAIRS}
    assert len(fit) == 15 and all(t["estimate"] is not None for t in fit.values())
    for term, value in truth.items():  # planted effects inside their 95% CI (per-question errors, 16 rows)
        assert fit[term]["ci_low"] < value < fit[term]["ci_high"], term
    # the CI is ±1.96 · 2·SE/√16 for a main effect, twice that for a pair (report units)
    assert fit["ema"]["ci_high"] - fit["ema"]["ci_low"] == pytest.approx(2 * 1.96 * SE / 2, rel=1e-3)
    assert fit["ema"]["chain"] == "ema − agreement×contrastive×feature_matching×clipping"
    assert data["shapley"] == dict.fromkeys(FIVE)
    assert "Shapley values are not computed" in text and "n/a" not in text


def test_full_32_rows_and_their_half_fraction_agree(tmp_path, capsys):
    rng = np.random.default_rng(11)
    full = _table(full_design(FIVE).runs, rng)
    half_runs = set(fractional_design(FIVE, 5).runs)
    half = full[[tuple(r) in half_runs for r in full[FIVE].to_numpy()]]
    full_data, _ = _from_csv(tmp_path, full, "full")
    half_data, _ = _from_csv(tmp_path, half, "half")
    assert full_data["design"]["name"] == "2^5 full factorial" and len(half) == 16
    fit = {t["term"]: t for t in half_data["fit"]}
    for c in FIVE:
        assert (
            abs(full_data["main_effects"][c] - half_data["main_effects"][c])
            < fit[c]["ci_high"] - fit[c]["estimate"]
        )
    for key in full_data["interactions"]:
        diff = abs(full_data["interactions"][key] - half_data["interactions"][key])
        assert diff < fit[key]["ci_high"] - fit[key]["estimate"], key
    # without noise (and no interaction of three or more), the two analyses are identical
    exact_full = _table(full_design(FIVE).runs, None)
    exact_half = exact_full[[tuple(r) in half_runs for r in exact_full[FIVE].to_numpy()]]
    a, _ = _from_csv(tmp_path, exact_full, "exact_full")
    b, _ = _from_csv(tmp_path, exact_half, "exact_half")
    assert b["main_effects"] == pytest.approx(a["main_effects"], abs=1e-12)
    assert b["interactions"] == pytest.approx(a["interactions"], abs=1e-12)


def _study_rows(with_preset: bool) -> pd.DataFrame:
    rows, trial = [], 0
    levels = {(0, 0): 0.40, (1, 0): 0.45, (0, 1): 0.41, (1, 1): 0.50}
    for seed in (0, 1):
        rows.append(
            {
                "trial": trial,
                "variant": "base",
                "family": "base",
                "seed": seed,
                "ema": 0,
                "clipping": 0,
                "mean.acc": 0.3,
            }
        )
        trial += 1
        for (e, c), level in levels.items():
            name = (
                "sdft"
                if (e, c) == (0, 0)
                else "unisd[" + "+".join(n for n, on in (("ema", e), ("clipping", c)) if on) + "]"
            )
            family = "baseline" if name == "sdft" else "unisd"
            rows.append(
                {
                    "trial": trial,
                    "variant": name,
                    "family": family,
                    "seed": seed,
                    "ema": e,
                    "clipping": c,
                    "mean.acc": level + 0.01 * seed,
                }
            )
            trial += 1
        if (
            with_preset
        ):  # a preset whose components equal the {ema, clipping} cell, with a very different score
            rows.append(
                {
                    "trial": trial,
                    "variant": "unisd_star",
                    "family": "unisd",
                    "seed": seed,
                    "ema": 1,
                    "clipping": 1,
                    "mean.acc": 0.9,
                }
            )
            trial += 1
    return pd.DataFrame(rows).assign(state="COMPLETE")


def test_presets_are_never_pooled_into_the_factorial(tmp_path):
    kw = {"components": ["ema", "clipping"], "metrics": ["mean.acc"], "title": "t"}
    without = build_report(_study_rows(False), out_dir=tmp_path / "a", **kw)
    with_ = build_report(_study_rows(True), out_dir=tmp_path / "b", **kw)
    a = json.loads(without.effects_json.read_text())["mean.acc"]
    b = json.loads(with_.effects_json.read_text())["mean.acc"]
    for key in ("main_effects", "interactions", "shapley", "subsets"):
        assert a[key] == b[key], key
    assert "unisd_star" in with_.markdown.read_text()  # reported beside the factorial


def _records(rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A quickstart-shaped study: base, sft, sdft, two subsets and a preset; one seed; 0/1 per question."""
    skill = {
        "base": 0.3,
        "sft": 0.35,
        "sdft": 0.4,
        "unisd[ema]": 0.75,
        "unisd[feature_matching]": 0.42,
        "unisd_star": 0.45,
    }
    family = {"base": "base", "sft": "baseline", "sdft": "baseline", "unisd_star": "unisd"}
    comps = {"unisd[ema]": (1, 0), "unisd[feature_matching]": (0, 1), "unisd_star": (1, 1)}
    records, rows = [], []
    for t, (v, p) in enumerate(skill.items()):
        scores = {}
        for b in ("scienceqa", "mbpp"):
            metric = "scienceqa.acc" if b == "scienceqa" else "mbpp.pass_at_1"
            s = (rng.random(60) < p).astype(float)
            scores[metric] = s.mean()
            records += [
                {"variant": v, "seed": 0, "benchmark": b, "question": f"{b}{q}", "metric": metric, "score": x}
                for q, x in enumerate(s)
            ]
        e, f = comps.get(v, (0, 0))
        rows.append(
            {
                "trial": t,
                "state": "COMPLETE",
                "variant": v,
                "family": family.get(v, "unisd"),
                "seed": 0,
                "ema": e,
                "feature_matching": f,
                **scores,
                "mean.acc": np.mean(list(scores.values())),
            }
        )
    return pd.DataFrame(rows), pd.DataFrame(records)


def test_report_leads_with_paired_cis_against_base_and_sdft_and_states_the_mde(tmp_path):
    df, records = _records(np.random.default_rng(3))
    files = build_report(
        df, components=["ema", "feature_matching"], metrics=["scienceqa.acc", "mbpp.pass_at_1", "mean.acc"],
        out_dir=tmp_path, title="q", questions=records,
    )  # fmt: skip
    text = files.markdown.read_text()
    assert text.index("## Paired comparisons") < text.index("## Results") < text.index("## Component effects")
    assert "### Against base" not in text  # tables are captions, not headings
    data = json.loads(files.effects_json.read_text())
    assert data["_paired"]["references"] == ["base", "sdft"]
    for ref in ("base", "sdft"):
        assert set(data["_paired"]["comparisons"][ref]) == set(df.variant) - {ref}
    ema = data["_paired"]["comparisons"]["base"]["unisd[ema]"]["mean.acc"]
    assert ema["ci_low"] > 0  # a 0.45 gap on 120 questions is clear
    assert "distinguishable from noise (paired 95% CI excludes 0): " in text and "unisd[ema] (+" in text
    results = pd.read_csv(files.results_csv)
    assert len(results) == 6
    # results table: "+0.xxx [+0.xxx, +0.xxx]" against base
    row = next(line for line in text.splitlines() if line.startswith("| unisd[ema]"))
    assert f"{ema['estimate']:+.3f} [{ema['ci_low']:+.3f}, {ema['ci_high']:+.3f}]" in row
    mde = {r["metric"]: r for r in data["_mde"]}
    assert set(mde) == {"scienceqa.acc", "mbpp.pass_at_1", "mean.acc"}
    assert (
        mde["scienceqa.acc"]["questions"] == 60 and 0 < mde["mean.acc"]["mde"] < mde["scienceqa.acc"]["mde"]
    )
    assert "Minimum detectable effect" in text and "scienceqa.acc 0." in text
    # the quickstart's factorial rows ({}, {ema}, {fm}) identify no main effect: one sentence, no n/a table
    assert "form neither a full factorial nor a regular fraction" in text
    assert "| n/a" not in text


def _write_samples(path: Path, scores: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for bench, values in scores.items():
        key = "pass_at_1" if bench == "mbpp" else "acc"
        lines += [
            json.dumps({"benchmark": bench, "id": f"{bench}-{q}", "scores": {key: v}})
            for q, v in enumerate(values)
        ]
    path.write_text("\n".join(lines) + "\n")


def test_study_report_reads_the_trials_samples_and_pairs_them(tmp_path):
    from test_report import _logged_study

    from harness.report import report_for_study

    _, spec, _ = _logged_study(tmp_path, search=False)
    rng = np.random.default_rng(5)
    hard = rng.random(40)  # question difficulty shared by every variant: what pairing cancels
    for number in range(8):  # the order _logged_study logs: seed, then (ema, clipping) in product order
        ema, clip = divmod(number % 4, 2)
        p = 0.3 + 0.4 * ema + 0.05 * clip
        scores = {b: (hard < p).astype(float).tolist() for b in ("scienceqa", "mbpp")}
        _write_samples(spec.output_path / "trials" / str(number) / "eval" / "samples.jsonl", scores)
    files = report_for_study(spec, out_dir=tmp_path / "report", log_artifacts=False)
    data = json.loads(files.effects_json.read_text())
    assert data["_paired"]["references"] == ["sdft"]
    ema = data["_paired"]["comparisons"]["sdft"]["unisd[ema]"]["scienceqa.acc"]
    assert ema["estimate"] == pytest.approx(np.mean((hard < 0.7) & (hard >= 0.3)))
    assert ema["seeds"] == {"unisd[ema]": 2, "sdft": 2} and ema["test"] == "sign test"
    assert ema["ci_low"] > 0
    on_off = data["_paired"]["components"]["scienceqa.acc"]["ema"]
    assert on_off["ci_low"] > 0 and on_off["n_questions"] == {"scienceqa": 40}
    text = files.markdown.read_text()
    assert "## Paired comparisons" in text and "Minimum detectable effect" in text


def test_question_records_reuse_the_base_evaluation_once(tmp_path):
    from harness.report.sources import question_records

    _write_samples(tmp_path / "trials" / "0" / "eval" / "samples.jsonl", {"scienceqa": [1.0, 0.0]})
    _write_samples(tmp_path / "trials" / "2" / "eval" / "samples.jsonl", {"scienceqa": [1.0, 1.0]})
    results = pd.DataFrame(
        {
            "trial": [0, 1, 2],
            "state": "COMPLETE",
            "variant": ["base", "base", "sdft"],
            "family": ["base", "base", "baseline"],
            "seed": [0, 1, 0],
        }
    )
    records = question_records(tmp_path, results, ["scienceqa.acc", "mean.acc"])
    # trial 1 reused trial 0's base evaluation: the same answers, counted once
    assert len(records[records.variant == "base"]) == 2
    assert records[records.variant == "sdft"]["score"].tolist() == [1.0, 1.0]
    assert set(records["metric"]) == {"scienceqa.acc"}


def test_question_records_refuse_several_trials_per_variant_and_seed(tmp_path):
    from harness.report.sources import question_records

    for n in (0, 1):
        _write_samples(tmp_path / "trials" / str(n) / "eval" / "samples.jsonl", {"scienceqa": [1.0, 0.0]})
    results = pd.DataFrame(
        {"trial": [0, 1], "state": "COMPLETE", "variant": "unisd[ema]", "family": "unisd", "seed": [0, 0]}
    )
    assert question_records(tmp_path, results, ["scienceqa.acc"]) is None  # two hyperparameter draws
    assert len(question_records(tmp_path, results.assign(seed=[0, 1]), ["scienceqa.acc"])) == 4


def test_variant_means_combine_seed_and_question_spread():
    from harness.report.tables import variant_stats

    toy = pd.DataFrame({"variant": "v", "family": "unisd", "m": [0.5, 0.6], "m_se": [0.1, 0.1]})
    row = variant_stats(toy, ["m"]).iloc[0]
    se = np.sqrt(np.var([0.5, 0.6], ddof=1) / 2 + 0.01)  # s²/n + mean(se_q²)
    assert row["se"] == pytest.approx(se)
    assert row["ci_high"] - row["mean"] == pytest.approx(1.959964 * se, rel=1e-5)
    one = variant_stats(toy.iloc[:1], ["m"]).iloc[0]  # one seed: the question spread alone
    assert one["ci_high"] - one["mean"] == pytest.approx(1.959964 * 0.1, rel=1e-5)


def test_full_factorial_cis_are_centred_on_the_subset_mean_effects():
    from harness.report.build import _fit_by_term
    from harness.report.factorial import design_effects

    rng = np.random.default_rng(0)
    rows = []
    for a, b, c in itertools.product((0, 1), repeat=3):  # {a, b, c} has three seeds, the others one
        for _ in range(3 if a + b + c == 3 else 1):
            y = 0.4 + 0.1 * a + 0.02 * b + 0.05 * a * b * c + rng.normal(0, 0.01)
            rows.append({"a": a, "b": b, "c": c, "y": y})
    e = design_effects(pd.DataFrame(rows), ["a", "b", "c"], "y")
    fit = _fit_by_term(e)
    for term, value in (("a", e["main_effects"]["a"]), ("a×b", e["interactions"]["a×b"])):
        assert (fit[term]["ci_low"] + fit[term]["ci_high"]) / 2 == pytest.approx(value)
    raw = {t["term"]: t for t in e["fit"]}
    assert raw["a"]["estimate"] != pytest.approx(e["main_effects"]["a"])  # the rows weigh differently
