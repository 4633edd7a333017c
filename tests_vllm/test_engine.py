"""(a) After a LoRA update, the engine samples from the updated weights: its log-probability of a fixed
continuation matches the training model's within 1e-3, before and after the update."""

from __future__ import annotations

import copy

import torch

from unisd_components.chat import encode_prompt
from unisd_components.lora import apply_lora
from unisd_components.step import eos_token_ids

TOL = 1e-3


def _model_logprobs(model, prompt: list[int], cont: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logps = torch.log_softmax(logits[0, len(prompt) - 1 : -1], dim=-1)
    return logps.gather(-1, torch.tensor(cont).unsqueeze(-1)).squeeze(-1)


def _fixture_pair(tok):
    prompt = encode_prompt(tok, [{"role": "user", "content": "Which planet is closest to the sun?"}], 256)
    cont = tok("Mercury is the planet closest to the sun.", add_special_tokens=False)["input_ids"]
    return prompt, cont


def test_engine_follows_a_lora_update(engine, bundled):
    base, tok = bundled
    model = apply_lora(copy.deepcopy(base), r=8, alpha=16)
    model.eval()
    prompt, cont = _fixture_pair(tok)

    engine.load_policy(model)  # B = 0: the base weights
    before = torch.tensor(engine.continuation_logprobs([prompt], [cont])[0])
    expected = _model_logprobs(model, prompt, cont)
    assert (before - expected).abs().max() < TOL

    # A LoRA update large enough to move the continuation's log-probs well past the tolerance.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    updated = _model_logprobs(model, prompt, cont)
    assert (updated - expected).abs().max() > 50 * TOL, "the update must change the model"
    stale = torch.tensor(engine.continuation_logprobs([prompt], [cont])[0])
    assert (stale - updated).abs().max() > 50 * TOL  # not pushed yet: the engine still has the old weights

    engine.load_policy(model)
    after = torch.tensor(engine.continuation_logprobs([prompt], [cont])[0])
    assert (after - updated).abs().max() < TOL


def test_engine_samples_follow_the_sampling_rule(engine, bundled):
    """Seeded: the same seed repeats, completions stop at an EOS id and respect the token limit."""
    base, tok = bundled
    engine.load_policy(base)
    prompt, _ = _fixture_pair(tok)
    eos = eos_token_ids(base, tok)
    a = engine.sample([prompt] * 3, max_new_tokens=16, temperature=0.7, seed=5, stop_token_ids=eos)
    b = engine.sample([prompt] * 3, max_new_tokens=16, temperature=0.7, seed=5, stop_token_ids=eos)
    assert a == b
    for row in a:
        assert 1 <= len(row) <= 16
        assert all(t not in eos for t in row[:-1])
    greedy = engine.sample([prompt] * 2, max_new_tokens=8, temperature=0.0, seed=None, stop_token_ids=eos)
    assert greedy[0] == greedy[1]
