"""The paper's tables (harness.report.paper) on a hand-made per-task, two-model results table whose cell
values are known, and the rule that a preset never enters a factorial cell."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from harness.report import build_report
from harness.report.paper import paper_tables

COMPONENTS = ["ema", "clipping"]
# In-domain and transfer cells of a per-task study: scienceqa (+ gpqa), mbpp (+ humaneval).
CELLS = {"scienceqa": ["scienceqa.acc", "gpqa.acc"], "mbpp": ["mbpp.pass_at_1", "humaneval.pass_at_1"]}
MODEL_SHIFT = {"llama": 0.0, "qwen2": 0.1}
TASK_SHIFT = {"scienceqa": 0.0, "mbpp": -0.2}
BENCH_SHIFT = {"scienceqa.acc": 0.0, "gpqa.acc": -0.1, "mbpp.pass_at_1": 0.05, "humaneval.pass_at_1": -0.05}
VARIANT = {"sft": 0.30, "gkd": 0.32}


def _subset_score(ema: int, clipping: int, task: str) -> float:
    # ema helps +0.1 on scienceqa and +0.3 on mbpp; clipping −0.05 everywhere; interaction +0.02
    ema_gain = 0.1 if task == "scienceqa" else 0.3
    return 0.4 + ema_gain * ema - 0.05 * clipping + 0.02 * ema * clipping


def _row(trial, model, task, variant, family, kind, seed, comps, value_fn):
    row = {
        "trial": trial,
        "state": "COMPLETE",
        "variant": variant,
        "family": family,
        "variant_kind": kind,
        "seed": seed,
        "model": model,
        "train_task": task,
        **{c: int(c in comps) for c in COMPONENTS},
    }
    benches = [m for ms in CELLS.values() for m in ms] if task is None else CELLS[task]
    for metric in benches:
        row[metric] = value_fn(metric)
    row["mean.acc"] = float(np.mean([row[m] for m in benches]))
    return row


def _table(*, with_presets: bool = True, seeds: int = 2) -> pd.DataFrame:
    rows = []
    n = itertools.count()
    noise = np.random.default_rng(0)
    for model, shift in MODEL_SHIFT.items():
        rows.append(
            _row(
                next(n),
                model,
                None,
                "base",
                "base",
                "base",
                0,
                (),
                lambda m, s=shift: 0.2 + s + BENCH_SHIFT[m],
            )
        )
        for task, seed in itertools.product(CELLS, range(seeds)):
            eps = noise.normal(0, 0.001)

            def value(m, base, s=shift, t=task, e=eps):
                return base + s + TASK_SHIFT[t] + BENCH_SHIFT[m] + e

            for name in ("sft", "gkd"):
                rows.append(
                    _row(
                        next(n),
                        model,
                        task,
                        name,
                        "baseline",
                        "baseline",
                        seed,
                        (),
                        lambda m, b=VARIANT[name]: value(m, b),
                    )
                )
            for ema, clipping in itertools.product((0, 1), repeat=2):
                comps = tuple(c for c, on in zip(COMPONENTS, (ema, clipping), strict=True) if on)
                name = "sdft" if not comps else "unisd[" + "+".join(comps) + "]"
                family = "baseline" if name == "sdft" else "unisd"
                score = _subset_score(ema, clipping, task)
                rows.append(
                    _row(
                        next(n),
                        model,
                        task,
                        name,
                        family,
                        "factorial",
                        seed,
                        comps,
                        lambda m, b=score: value(m, b),
                    )
                )
            if with_presets:
                # the paper preset enables ema (not clipping) with other hyperparameters: a very different
                # score that would move the {ema} cell if it were pooled into it
                rows.append(
                    _row(
                        next(n),
                        model,
                        task,
                        "unisd_star_paper",
                        "unisd",
                        "preset",
                        seed,
                        ("ema",),
                        lambda m: value(m, 0.95),
                    )
                )
    return pd.DataFrame(rows)


def test_effects_with_and_without_preset_rows_are_identical(tmp_path):
    """Defect 2: a preset is reported beside the factorial, never pooled into the cell of its components."""
    metrics = ["scienceqa.acc", "gpqa.acc", "mbpp.pass_at_1", "humaneval.pass_at_1", "mean.acc"]
    with_p = build_report(_table(), components=COMPONENTS, metrics=metrics, out_dir=tmp_path / "a", title="t")
    without = build_report(
        _table(with_presets=False), components=COMPONENTS, metrics=metrics, out_dir=tmp_path / "b", title="t"
    )
    a = json.loads(with_p.effects_json.read_text())
    b = json.loads(without.effects_json.read_text())
    for metric in metrics:
        for key in ("main_effects", "shapley", "interactions", "subsets", "anova"):
            assert a[metric][key] == b[metric][key], (metric, key)
    assert a["_paper"]["effects"] == b["_paper"]["effects"]
    # the preset is still in the report, as its own row
    assert "unisd_star_paper" in a["_paper"]["results"]["llama"]["cells"]
    # and the test can fail: pooled into {ema}, the preset would change the effects
    from harness.report.effects import analyse_effects

    pooled = _table()
    pooled = pooled[pooled["variant_kind"].isin(["factorial", "preset"])]
    assert analyse_effects(pooled, COMPONENTS, "mean.acc")["main_effects"] != pytest.approx(
        a["mean.acc"]["main_effects"]
    )


def test_old_results_without_variant_kind_still_keep_presets_out(tmp_path):
    df = _table().drop(columns=["variant_kind"])
    ref = _table(with_presets=False).drop(columns=["variant_kind"])
    a = build_report(df, components=COMPONENTS, metrics=["mean.acc"], out_dir=tmp_path / "a", title="t")
    b = build_report(ref, components=COMPONENTS, metrics=["mean.acc"], out_dir=tmp_path / "b", title="t")
    assert json.loads(a.effects_json.read_text())["mean.acc"]["main_effects"] == pytest.approx(
        json.loads(b.effects_json.read_text())["mean.acc"]["main_effects"]
    )


def test_results_per_model_cells_overall_and_deltas():
    tables = paper_tables(_table(), COMPONENTS)
    data = tables["data"]
    assert data["cells"] == ["scienceqa", "mbpp", "gpqa ← scienceqa", "humaneval ← mbpp"]
    llama = data["results"]["llama"]["cells"]
    # sft on llama: 0.30 + task + bench shifts (seed noise 0.001)
    assert llama["sft"]["scienceqa"] == pytest.approx(0.30, abs=0.003)
    assert llama["sft"]["gpqa ← scienceqa"] == pytest.approx(0.20, abs=0.003)
    assert llama["sft"]["mbpp"] == pytest.approx(0.15, abs=0.003)
    assert llama["sft"]["humaneval ← mbpp"] == pytest.approx(0.05, abs=0.003)
    # overall: the unweighted mean of the four cells; the base model is scored on every cell
    assert llama["sft"]["overall"] == pytest.approx(np.mean([0.30, 0.20, 0.15, 0.05]), abs=0.003)
    assert llama["base"]["gpqa ← scienceqa"] == pytest.approx(0.1) and llama["base"]["mbpp"] == pytest.approx(
        0.25
    )
    assert data["results"]["llama"]["strongest_baseline"] == "sdft"  # 0.40 beats gkd 0.32 and sft 0.30
    table = tables["results"]["llama"]
    assert list(table["variant"]) == [
        "base",
        "sft",
        "gkd",
        "sdft",
        "unisd[clipping]",  # subsets by size, then in the order the results list them
        "unisd[ema]",
        "unisd[ema+clipping]",
        "unisd_star_paper",
    ]
    row = table[table["variant"] == "sft"].iloc[0]
    assert row["Δ overall vs sdft"] == "-0.100"
    # averaged over models: qwen2 is llama + 0.1 everywhere
    averaged = data["results"]["averaged over models"]["cells"]
    assert averaged["sft"]["scienceqa"] == pytest.approx(0.35, abs=0.003)


def test_self_distillation_minus_sft_per_model_and_cell():
    tables = paper_tables(_table(), COMPONENTS)
    beats = tables["beats_sft"]
    assert tables["star"] == "unisd_star_paper"
    llama_mbpp = beats[(beats["model"] == "llama") & (beats["cell"] == "mbpp")].iloc[0]
    assert llama_mbpp["SDFT − SFT"] == "+0.100"  # 0.40 − 0.30
    assert llama_mbpp["unisd_star_paper − SFT"] == "+0.650"  # 0.95 − 0.30
    assert set(beats["cell"]) == {"scienceqa", "mbpp", "gpqa ← scienceqa", "humaneval ← mbpp", "overall"}


def test_component_effects_per_cell_per_model_per_task_and_pooled():
    effects = paper_tables(_table(), COMPONENTS)["data"]["effects"]
    per_task = effects["per_task_cell"]
    assert per_task["scienceqa"]["ema"] == pytest.approx(0.11, abs=0.003)  # 0.1 + half the interaction
    assert per_task["mbpp"]["ema"] == pytest.approx(0.31, abs=0.003)
    assert per_task["mbpp"]["clipping"] == pytest.approx(-0.04, abs=0.003)
    assert per_task["mbpp"]["ema×clipping"] == pytest.approx(0.02, abs=0.003)
    assert effects["per_model"]["llama"]["ema"] == pytest.approx(0.21, abs=0.003)  # mean over 4 cells
    assert effects["pooled"]["ema"] == pytest.approx(0.21, abs=0.003)
    assert len(effects["per_cell"]) == 2 * 4


def test_paper_section_only_for_studies_with_axes_and_pooled_cells_are_benchmarks():
    from harness.report.paper import paper_blocks

    pooled = _table(with_presets=False)
    pooled = pooled[pooled["train_task"].isna() | (pooled["train_task"] == "scienceqa")].copy()
    pooled["train_task"] = None  # pooled training: one model on everything, one cell per benchmark
    one_model = pooled[pooled["model"] == "llama"]
    assert paper_blocks(one_model, COMPONENTS) == ([], {})  # its results table is the paper table
    blocks, data = paper_blocks(pooled, COMPONENTS)
    assert blocks and set(data["results"]) == {"llama", "qwen2", "averaged over models"}
    assert data["cells"][:2] == ["scienceqa", "gpqa"] and "←" not in "".join(data["cells"])
