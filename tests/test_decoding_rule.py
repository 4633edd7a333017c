"""Issue 11 item 1: every generation decodes under the rule its call states, never the checkpoint's.

A model whose ``generation_config`` ships a strong repetition penalty, n-gram blocking, a minimum length
and suppressed tokens must sample (training) and decode greedily (evaluation) exactly the same tokens as
the same weights without them.
"""

from __future__ import annotations

import copy
import json

import torch

from harness.evaluation import evaluate_model
from harness.evaluation.retention import greedy_completions
from unisd_components.step import eos_token_ids, sample_completions


def _leaky(model, tokenizer):
    """The same weights with a generation config that would change every decoding step."""
    leaky = copy.deepcopy(model)
    config = leaky.generation_config
    config.repetition_penalty = 20.0
    config.no_repeat_ngram_size = 1
    config.min_new_tokens = 6
    config.top_k = 2
    config.top_p = 0.3
    config.suppress_tokens = list(range(0, 200))
    return leaky


def _prompts(tokenizer):
    texts = ["The sky is", "Write a function that adds two numbers.", "A B A B A B"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return rows, pad


def test_training_samples_ignore_the_generation_config(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with torch.no_grad():  # peaked next-token distributions: samples repeat, so a penalty would show
        model.get_output_embeddings().weight.mul_(40.0)
    leaky = _leaky(model, tok)
    rows, pad = _prompts(tok)
    samples = []
    for m in (model, leaky):
        torch.manual_seed(0)
        samples.append(
            sample_completions(
                m, rows, max_new_tokens=12, temperature=0.7, pad_id=pad, eos_ids=eos_token_ids(m, tok)
            )
        )
    assert torch.equal(samples[0], samples[1])
    assert leaky.generation_config.repetition_penalty == 20.0  # restored after the call


def test_greedy_completions_ignore_the_generation_config(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    leaky = _leaky(model, tok)
    rows, _ = _prompts(tok)
    plain = greedy_completions(model, tok, rows, max_new_tokens=12, batch_size=2)
    other = greedy_completions(leaky, tok, rows, max_new_tokens=12, batch_size=2)
    assert plain == other
    assert any(len(c) > 1 for c in plain)


def test_lm_eval_greedy_decoding_ignores_the_generation_config(tiny_model_and_tokenizer, tmp_path, data_dir):
    model, tok = tiny_model_and_tokenizer
    leaky = _leaky(model, tok)
    responses = []
    for name, m in (("plain", model), ("leaky", leaky)):
        result = evaluate_model(
            m, tok, ["cos_e"], limit=2, batch_size=2, output_dir=tmp_path / name, data_dir=data_dir,
            max_gen_tokens=8, ppl_fit=False, retention=False,
        )
        lines = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
        responses.append([line["response"] for line in lines])
    assert responses[0] == responses[1]
