"""evaluate_model end to end on a tiny random Llama through the real lm-eval, and ``harness eval``."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.errors import HarnessError
from harness.evaluation import EvalResult, evaluate_model
from harness.evaluation.lmeval import normalise_metrics, question_errors, task_name


def _perturbed(model, scale: float = 0.5):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def _responses(path) -> dict[str, object]:
    return {row["id"]: row["response"] for row in map(json.loads, path.read_text().splitlines())}


def test_end_to_end_scienceqa_and_mbpp(tiny_model_and_tokenizer, tmp_path, data_dir):
    model, tok = tiny_model_and_tokenizer
    result = evaluate_model(
        model, tok, ["scienceqa", "mbpp"], limit=2, batch_size=2, output_dir=tmp_path, data_dir=data_dir,
        max_gen_tokens=8, base_model=model, cache_dir=tmp_path / "base",
    )  # fmt: skip
    assert isinstance(result, EvalResult) and result.seconds > 0
    m = result.metrics
    for key in ("scienceqa.acc", "mbpp.pass_at_1", "mean.acc"):
        assert 0.0 <= m[key] <= 1.0
    assert m["mean.acc"] == pytest.approx((m["scienceqa.acc"] + m["mbpp.pass_at_1"]) / 2)
    assert m["scienceqa.n"] == 2 and m["mbpp.n"] == 2
    assert m["ppl_fit"] > 1.0 and math.isfinite(m["ppl_fit"])
    assert all("," not in key for key in m)  # MLflow-safe names
    # Retention reuses lm-eval's generations; against itself the model has no divergence.
    assert m["ret_jsd"] == pytest.approx(0.0, abs=1e-5)
    assert m["ppl_ret"] > 1.0 and m["ppl_ret_reverse"] > 1.0
    rows = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    assert sorted(r["benchmark"] for r in rows) == ["mbpp", "mbpp", "scienceqa", "scienceqa"]
    assert all(r["prompt"].startswith("<|im_start|>") for r in rows)  # chat template applied
    assert {r["filtered"][0] for r in rows if r["benchmark"] == "mbpp"} <= {
        "passed",
        "failed",
        "timeout",
        "error",
    }
    # max_gen_tokens is honoured: 8 new tokens decode to far fewer than 200 characters.
    assert all(len(r["response"][0][0]) < 200 for r in rows)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == pytest.approx(m)
    assert (tmp_path / "lm_eval_cache").is_dir()
    # per-question standard errors, from the same per-sample scores samples.jsonl holds
    sqa = [r["scores"]["acc"] for r in rows if r["benchmark"] == "scienceqa"]
    assert m["scienceqa.acc_se"] == pytest.approx(np.std(sqa, ddof=1) / np.sqrt(2))
    assert math.isfinite(m["mbpp.pass_at_1_se"]) and math.isfinite(m["mean.acc_se"])


def test_response_cache_is_per_variant(tiny_model_and_tokenizer, tmp_path, data_dir):
    """Two models under one cache root get their own answers, not each other's cached ones."""
    model_a, tok = tiny_model_and_tokenizer
    model_b = _perturbed(model_a)
    kwargs = dict(limit=2, batch_size=2, data_dir=data_dir, max_gen_tokens=6, ppl_fit=False)
    a = evaluate_model(model_a, tok, ["cos_e"], output_dir=tmp_path / "a", **kwargs)
    b = evaluate_model(model_b, tok, ["cos_e"], output_dir=tmp_path / "b", **kwargs)
    b_fresh = evaluate_model(model_b, tok, ["cos_e"], output_dir=tmp_path / "fresh" / "b", **kwargs)
    a_again = evaluate_model(model_a, tok, ["cos_e"], output_dir=tmp_path / "a", **kwargs)
    assert _responses(b.samples_path) == _responses(b_fresh.samples_path)
    assert _responses(a.samples_path) != _responses(b.samples_path)
    assert _responses(a_again.samples_path) == _responses(a.samples_path)


def test_loglikelihood_scoring_and_retention(tiny_model_and_tokenizer, tmp_path, data_dir):
    model, tok = tiny_model_and_tokenizer
    result = evaluate_model(
        model, tok, ["gpqa"], limit=2, batch_size=2, output_dir=tmp_path / "out", data_dir=data_dir,
        scoring="loglikelihood", max_gen_tokens=4, base_model=model, cache_dir=tmp_path / "base",
    )  # fmt: skip
    m = result.metrics
    assert 0.0 <= m["gpqa.acc"] <= 1.0 and m["gpqa.n"] == 2
    assert m["ret_jsd"] == pytest.approx(0.0, abs=1e-5)  # the model against itself
    assert m["ppl_ret"] == pytest.approx(m["ppl_ret_reverse"], rel=1e-4)  # same greedy completions
    assert list((tmp_path / "base").glob("base-completions-*-gpqa-*.json"))
    row = json.loads(result.samples_path.read_text().splitlines()[0])
    assert row["task"] == "unisd_gpqa_ll" and len(row["filtered"]) == 4  # one log-likelihood per option


def test_normalise_metrics():
    results = {
        "unisd_scienceqa": {
            "alias": "unisd_scienceqa",
            "acc,none": 0.5,
            "acc_stderr,none": "N/A",
            "sample_len": 4,
        },
        "unisd_humaneval": {"alias": "x", "pass_at_1,sandbox": 0.25, "pass_at_1_stderr,sandbox": 0.1},
    }
    got = normalise_metrics(results, {"unisd_scienceqa": "scienceqa", "unisd_humaneval": "humaneval"})
    assert got == {"scienceqa.acc": 0.5, "scienceqa.n": 4.0, "humaneval.pass_at_1": 0.25, "mean.acc": 0.375}


def test_question_errors_by_hand():
    samples = {
        "unisd_scienceqa": [{"metrics": ["acc"], "acc": v} for v in (1.0, 0.0, 1.0, 1.0)],
        "unisd_humaneval": [{"metrics": ["pass_at_1"], "pass_at_1": v} for v in (True, False)],
    }
    got = question_errors(samples, {"unisd_scienceqa": "scienceqa", "unisd_humaneval": "humaneval"})
    sqa, he = np.std([1, 0, 1, 1], ddof=1) / 2, np.std([1, 0], ddof=1) / np.sqrt(2)
    assert got["scienceqa.acc_se"] == pytest.approx(sqa)
    assert got["humaneval.pass_at_1_se"] == pytest.approx(he)
    assert got["mean.acc_se"] == pytest.approx(np.sqrt(sqa**2 + he**2) / 2)


def test_task_names_and_bad_input():
    assert task_name("scienceqa", "loglikelihood") == "unisd_scienceqa_ll"
    assert task_name("mbpp", "loglikelihood") == "unisd_mbpp"
    with pytest.raises(HarnessError, match="valid benchmarks: .*scienceqa"):
        task_name("mmlu")
    with pytest.raises(HarnessError, match="unknown scoring"):
        task_name("gpqa", "vibes")


def test_cli_unknown_benchmark(capsys):
    assert (
        main(["eval", "--model", "tiny-random:llama", "--benchmarks", "scienceqa,nope", "--limit", "2"]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "toolalpaca" in err


def test_cli_eval_tiny(tmp_path, data_dir, capsys):
    code = main(
        ["eval", "--model", "tiny-random:llama", "--benchmarks", "cos_e", "--limit", "2", "--output",
         str(tmp_path), "--device", "cpu", "--scoring", "loglikelihood", "--batch-size", "2"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "cos_e" in out and "acc" in out and "mean" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["cos_e.acc"] <= 1.0
    assert (tmp_path / "samples.jsonl").is_file()


@pytest.mark.slow
def test_bundled_smollm2_all_six_benchmarks(tmp_path, data_dir):
    """A real instruct model through every task: chat template, stop sequences, sandbox, tool-call parsing."""
    from harness.data import BENCHMARKS
    from harness.models import BUNDLED_SMOLLM2, load_model

    model, tok = load_model(BUNDLED_SMOLLM2, device="cpu")
    result = evaluate_model(
        model, tok, list(BENCHMARKS), limit=2, batch_size=4, output_dir=tmp_path, data_dir=data_dir,
        max_gen_tokens=48,
    )  # fmt: skip
    m = result.metrics
    for name, spec in BENCHMARKS.items():
        key = f"{name}.pass_at_1" if spec.kind == "code" else f"{name}.acc"
        assert 0.0 <= m[key] <= 1.0 and m[f"{name}.n"] == 2
    assert 1.0 < m["ppl_fit"] < 100.0  # an instruct model fits gold answers far better than chance
    rows = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    assert len(rows) == 2 * len(BENCHMARKS)
    assert all(
        r["prompt"].endswith("<|im_start|>assistant\n")
        for r in rows
        if r["benchmark"] not in ("mbpp", "humaneval")
    )
    assert all(
        r["prompt"].endswith("<|im_start|>assistant\n```python\n")
        for r in rows
        if r["benchmark"] in ("mbpp", "humaneval")
    )


def test_evaluation_and_tracking_name_metrics_alike():
    """One normaliser: lm-eval's ``pass@1,<filter>`` is ``<bench>.pass_at_1`` in the evaluation's metrics,
    and the tracking layer (which sends every metric to MLflow) leaves that name as it is; two filters of
    one metric stay apart instead of overwriting each other."""
    from harness.tracking import normalise_metric_name

    got = normalise_metrics({"unisd_mbpp": {"pass@1,create_test": 0.5}}, {"unisd_mbpp": "mbpp"})
    assert got == {"mbpp.pass_at_1": 0.5, "mean.acc": 0.5}
    assert all(normalise_metric_name(name) == name for name in got)
    two = normalise_metrics(
        {"unisd_scienceqa": {"acc,none": 1.0, "acc,flex": 0.0}}, {"unisd_scienceqa": "scienceqa"}
    )
    assert two == {"scienceqa.acc": 1.0, "scienceqa.acc_flex": 0.0, "mean.acc": 1.0}


def test_evaluation_leaves_the_callers_random_streams_alone(tiny_model_and_tokenizer, tmp_path, data_dir):
    """Issue 11 item 6: lm-eval seeds every global generator; a dev evaluation during training must not
    re-seed the trial's sampling (Python, NumPy and torch draws after it are those without it)."""
    import random

    import numpy as np

    model, tok = tiny_model_and_tokenizer

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def seed_all():
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    seed_all()
    draws()
    expected = draws()
    seed_all()
    draws()
    evaluate_model(
        model, tok, ["cos_e"], limit=2, batch_size=2, output_dir=tmp_path, data_dir=data_dir,
        max_gen_tokens=4, ppl_fit=False, retention=False,
    )
    assert draws() == expected


@pytest.mark.slow
def test_reverse_retention_is_the_same_whichever_trial_runs_first(tiny_model_and_tokenizer, tmp_path, data_dir):
    """Issue 11 item 2: the base trial and a variant trial report the same retention numbers whether the
    base model's evaluation or the variant's fills the shared base-completion cache first."""
    base, tok = tiny_model_and_tokenizer
    variant = _perturbed(base, 0.05)
    kwargs = dict(limit=2, batch_size=2, data_dir=data_dir, max_gen_tokens=6, ppl_fit=False, base_model=base)
    keys = ("ppl_ret", "ret_jsd", "ppl_ret_reverse", "mbpp.ppl_ret_reverse")

    def run(first, second, order):
        cache = tmp_path / order / "cache"
        out = {}
        for name, model in ((first, {"base": base, "variant": variant}[first]),
                            (second, {"base": base, "variant": variant}[second])):
            result = evaluate_model(model, tok, ["mbpp"], output_dir=tmp_path / order / name,
                                    cache_dir=cache, **kwargs)
            out[name] = {k: result.metrics[k] for k in keys}
        return out

    base_first = run("base", "variant", "base_first")
    variant_first = run("variant", "base", "variant_first")
    assert base_first == variant_first
    # One definition: the base's completions are its own lm-eval completions, so base scores itself alike.
    assert base_first["base"]["ppl_ret"] == pytest.approx(base_first["base"]["ppl_ret_reverse"])
