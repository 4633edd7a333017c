"""(c) lm-eval through the vLLM engine scores the bundled model on two benchmarks with the same prompts as
the ``hf`` path (HFLM), greedy: the same rendered prompts, nearly the same answers, and accuracies within
sampling noise of each other on the same examples."""

from __future__ import annotations

import json
import math

from harness.evaluation import evaluate_model

BENCHMARKS = ["scienceqa", "gpqa"]
LIMIT = 12


def _evaluate(model, tok, data_dir, out, engine=None):
    result = evaluate_model(
        model,
        tok,
        BENCHMARKS,
        limit=LIMIT,
        batch_size=8,
        output_dir=out,
        data_dir=data_dir,
        max_gen_tokens=24,
        ppl_fit=False,
        retention=False,
        engine=engine,
    )
    lines = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    return result.metrics, {(s["benchmark"], s["id"]): s for s in lines}


def test_vllm_and_hf_evaluations_agree(engine, bundled, data_dir, tmp_path):
    model, tok = bundled
    vllm_metrics, vllm_samples = _evaluate(model, tok, data_dir, tmp_path / "vllm", engine)
    hf_metrics, hf_samples = _evaluate(model, tok, data_dir, tmp_path / "hf")

    assert vllm_samples.keys() == hf_samples.keys()
    assert len(vllm_samples) == LIMIT * len(BENCHMARKS)
    for key, sample in vllm_samples.items():
        assert sample["prompt"] == hf_samples[key]["prompt"], key  # the same rendered prompt, byte for byte
    same = sum(vllm_samples[k]["filtered"] == hf_samples[k]["filtered"] for k in vllm_samples)
    assert same >= 0.75 * len(vllm_samples), f"only {same}/{len(vllm_samples)} greedy answers agree"
    for bench in BENCHMARKS:
        a, b = vllm_metrics[f"{bench}.acc"], hf_metrics[f"{bench}.acc"]
        p = max((a + b) / 2, 1 / LIMIT)
        noise = 2 * math.sqrt(2 * p * (1 - p) / LIMIT)  # two standard errors of a difference
        assert abs(a - b) <= noise, (bench, a, b, noise)
