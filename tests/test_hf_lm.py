"""BucketedHFLM (harness.evaluation.hf_lm): the tasks' requests decoded together give HFLM's answers."""

from __future__ import annotations

import json

import torch
from lm_eval.models.huggingface import HFLM

from harness.evaluation import evaluate_model, hf_lm
from harness.evaluation.hf_lm import RowStops


def _responses(path) -> dict[str, object]:
    return {row["id"]: row["response"] for row in map(json.loads, path.read_text().splitlines())}


def test_rows_stop_at_their_own_stop_sequences(bundled_tokenizer):
    tok = bundled_tokenizer
    prompt = tok("Question: 1 + 1?", add_special_tokens=False)["input_ids"]
    answer = tok(" The answer is 2. Question: next", add_special_tokens=False)["input_ids"]
    code = tok(" def f(): return 1\n```", add_special_tokens=False)["input_ids"]
    width = len(prompt)
    stops = RowStops(tok, [["Question:"], ["```"], ["never"]], width)
    rows = [prompt + answer, prompt + code, prompt + answer]
    steps = min(len(answer), len(code))
    done = None
    for t in range(1, steps + 1):
        done = stops(torch.tensor([r[: width + t] for r in rows]), torch.zeros(3, 5))
    assert done.tolist() == [True, True, False]


def test_answers_equal_hflm_across_tasks_with_different_stops(
    tiny_model_and_tokenizer, tmp_path, data_dir, monkeypatch
):
    """ScienceQA, GPQA and MBPP (two sets of stop sequences, one with a prefilled code fence) decoded
    in one batch answer what HFLM answers task by task."""
    model, tok = tiny_model_and_tokenizer
    kwargs = dict(
        limit=3, batch_size=9, data_dir=data_dir, max_gen_tokens=12, ppl_fit=False, retention=False
    )
    calls = []
    real = hf_lm.generate_bucketed

    def counted(model, prompts, **kw):
        calls.append(len(prompts))
        return real(model, prompts, **kw)

    monkeypatch.setattr(hf_lm, "generate_bucketed", counted)
    ours = evaluate_model(model, tok, ["scienceqa", "gpqa", "mbpp"], output_dir=tmp_path / "ours", **kwargs)
    assert calls == [9]  # one decoding batch for the three tasks
    monkeypatch.setattr(hf_lm, "BucketedHFLM", HFLM)  # lm-eval's own generate_until, task by task
    theirs = evaluate_model(model, tok, ["scienceqa", "gpqa", "mbpp"], output_dir=tmp_path / "hf", **kwargs)
    assert _responses(ours.samples_path) == _responses(theirs.samples_path)
    assert len(_responses(ours.samples_path)) == 9
    assert ours.metrics["mean.acc"] == theirs.metrics["mean.acc"]
