"""PPL fit and retention against a slow reference: one prompt at a time, full forward, no padding."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from harness.data import Example
from harness.evaluation.retention import (
    greedy_completions,
    ppl_fit,
    render_prompt,
    retention,
)

PROMPTS = [
    "Which planet is closest to the Sun?",
    "Write a function that adds two numbers.",
    "Name a mammal that can fly. Think about bats, birds and insects before you answer.",
]
DEMOS = [
    "Mercury orbits closest.\nThe answer is (A).",
    "```python\ndef add(a, b):\n    return a + b\n```",
    "Bats.",
]


def _examples() -> list[Example]:
    return [
        Example(
            id=f"toy/{i}",
            benchmark="toy",
            kind="multiple_choice",
            messages=({"role": "user", "content": p},),
            demonstration=d,
            answer="A",
            metadata={"prompt_version": 1},
        )
        for i, (p, d) in enumerate(zip(PROMPTS, DEMOS, strict=True))
    ]


def _prompt_ids(tok, ex) -> list[int]:
    return tok(render_prompt(tok, ex.messages), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _slow_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[n, vocab] log-softmax of the full, unpadded forward at the completion's prediction positions."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(completion) - 1], dim=-1)


@torch.no_grad()
def _slow_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        out.append(token)
    return out


def _perturbed(model, scale: float = 0.05):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def _slow_ppl(model, prompts, completions) -> float:
    values = []
    for p, c in zip(prompts, completions, strict=True):
        if c:
            lp = _slow_logprobs(model, p, c).gather(-1, torch.tensor(c)[:, None])[:, 0]
            values.append(math.exp(-float(lp.mean())))
    return sum(values) / len(values)


def test_ppl_fit_matches_slow_token_weighted(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    examples = _examples()
    total, count = 0.0, 0
    for ex in examples:
        gold = tok(ex.demonstration, add_special_tokens=False)["input_ids"]
        lp = _slow_logprobs(model, _prompt_ids(tok, ex), gold).gather(-1, torch.tensor(gold)[:, None])
        total += float(lp.sum())
        count += len(gold)
    expected = math.exp(-total / count)
    assert ppl_fit(model, tok, examples, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_batched_greedy_matches_one_at_a_time(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    prompts = [_prompt_ids(tok, ex) for ex in _examples()]
    batched = greedy_completions(model, tok, prompts, max_new_tokens=6, batch_size=3)
    slow = [_slow_greedy(model, p, 6, tok.eos_token_id) for p in prompts]
    assert batched == slow


def test_retention_matches_slow_reference(tiny_model_and_tokenizer, tmp_path):
    base, tok = tiny_model_and_tokenizer
    model = _perturbed(base)
    examples = _examples()
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    got = retention(model, base, tok, examples, max_new_tokens=6, cache_dir=tmp_path, batch_size=2)

    ours = [_slow_greedy(model, p, 6, tok.eos_token_id) for p in prompts]
    theirs = [_slow_greedy(base, p, 6, tok.eos_token_id) for p in prompts]
    jsd_values = []  # one per example: the mean over its tokens (then the mean over examples)
    for p, c in zip(prompts, ours, strict=True):
        lp_base, lp_model = _slow_logprobs(base, p, c), _slow_logprobs(model, p, c)
        pb, pm = lp_base.exp(), lp_model.exp()
        m = 0.5 * (pb + pm)
        per_token = 0.5 * (pb * (pb / m).log()).sum(-1) + 0.5 * (pm * (pm / m).log()).sum(-1)
        jsd_values.append(float(per_token.mean()))

    assert got["ppl_ret"] == pytest.approx(_slow_ppl(base, prompts, ours), rel=1e-4)
    assert got["ppl_ret_reverse"] == pytest.approx(_slow_ppl(model, prompts, theirs), rel=1e-4)
    assert got["ret_jsd"] == pytest.approx(sum(jsd_values) / len(jsd_values), rel=1e-3, abs=1e-6)
    assert 0.0 < got["ret_jsd"] <= math.log(2)


def test_base_against_itself(tiny_model_and_tokenizer, tmp_path):
    base, tok = tiny_model_and_tokenizer
    examples = _examples()
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    got = retention(base, base, tok, examples, max_new_tokens=6, cache_dir=tmp_path, batch_size=3)
    own = [_slow_greedy(base, p, 6, tok.eos_token_id) for p in prompts]
    assert got["ppl_ret"] == pytest.approx(_slow_ppl(base, prompts, own), rel=1e-4)
    assert got["ppl_ret_reverse"] == pytest.approx(got["ppl_ret"], rel=1e-5)
    assert got["ret_jsd"] == pytest.approx(0.0, abs=1e-6)


def test_base_completions_cached_per_base_model(tiny_model_and_tokenizer, tmp_path):
    base, tok = tiny_model_and_tokenizer
    examples = _examples()
    retention(base, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("base-completions-*.json"))
    assert len(files) == 1 and "-toy-v1-n4" in files[0].name
    cached = json.loads(files[0].read_text())
    assert set(cached) == {ex.id for ex in examples}
    # A cached entry is used as is: replace it and the reverse score must follow the cache.
    forced = {ex.id: [100, 200, 300] for ex in examples}
    files[0].write_text(json.dumps(forced))
    variant = _perturbed(base)
    got = retention(variant, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path)
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    assert got["ppl_ret_reverse"] == pytest.approx(
        _slow_ppl(variant, prompts, list(forced.values())), rel=1e-4
    )
    other = _perturbed(base, 0.2)
    retention(other, other, tok, examples, max_new_tokens=4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("base-completions-*.json"))) == 2  # different weights, own cache file


def test_reverse_retention_does_not_depend_on_trial_order(tiny_model_and_tokenizer, tmp_path):
    """Issue 11 item 2: the base trial (with its lm-eval completions, cut at stop sequences) and a variant
    trial give the same numbers whichever fills the base-completion cache first."""
    base, tok = tiny_model_and_tokenizer
    variant = _perturbed(base)
    examples = _examples()
    lm_eval_cut = [[11, 12, 13], [21, 22], [31]]  # what lm-eval hands over for the base: not raw greedy
    kwargs = dict(max_new_tokens=4, batch_size=2)

    first = tmp_path / "base_first"
    base_a = retention(base, base, tok, examples, cache_dir=first, completions=lm_eval_cut, **kwargs)
    variant_a = retention(variant, base, tok, examples, cache_dir=first, **kwargs)
    second = tmp_path / "variant_first"
    variant_b = retention(variant, base, tok, examples, cache_dir=second, **kwargs)
    base_b = retention(base, base, tok, examples, cache_dir=second, completions=lm_eval_cut, **kwargs)

    assert variant_a == pytest.approx(variant_b, rel=1e-6)
    assert base_a == pytest.approx(base_b, rel=1e-6)
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    greedy = [_slow_greedy(base, p, 4, tok.eos_token_id) for p in prompts]
    assert variant_a["ppl_ret_reverse"] == pytest.approx(_slow_ppl(variant, prompts, greedy), rel=1e-4)
    assert base_a["ppl_ret_reverse"] == pytest.approx(_slow_ppl(base, prompts, greedy), rel=1e-4)
    assert base_a["ppl_ret"] == pytest.approx(_slow_ppl(base, prompts, lm_eval_cut), rel=1e-4)


def test_retention_per_benchmark_and_jsd_per_example_first(tiny_model_and_tokenizer, tmp_path):
    """Issue 11 item 7: <bench>.ppl_ret / <bench>.ret_jsd besides the pooled values; JSD averaged over an
    example's tokens, then over examples (a long completion does not outweigh a short one)."""
    base, tok = tiny_model_and_tokenizer
    model = _perturbed(base)
    examples = _examples()
    examples[2] = Example(
        id="other/2", benchmark="other", kind="multiple_choice", messages=examples[2].messages,
        demonstration=examples[2].demonstration, answer="A", metadata={"prompt_version": 1},
    )
    own = [[11, 12, 13, 14, 15, 16, 17, 18], [21], [31, 32, 33]]
    got = retention(model, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, completions=own)
    prompts = [_prompt_ids(tok, ex) for ex in examples]

    def jsd_of(i):
        lp_base, lp_model = _slow_logprobs(base, prompts[i], own[i]), _slow_logprobs(model, prompts[i], own[i])
        pb, pm = lp_base.exp(), lp_model.exp()
        m = 0.5 * (pb + pm)
        return float((0.5 * (pb * (pb / m).log()).sum(-1) + 0.5 * (pm * (pm / m).log()).sum(-1)).mean())

    per_example = [jsd_of(i) for i in range(3)]
    assert got["ret_jsd"] == pytest.approx(sum(per_example) / 3, rel=1e-3)
    assert got["toy.ret_jsd"] == pytest.approx((per_example[0] + per_example[1]) / 2, rel=1e-3)
    assert got["other.ret_jsd"] == pytest.approx(per_example[2], rel=1e-3)
    assert got["toy.ppl_ret"] == pytest.approx(_slow_ppl(base, prompts[:2], own[:2]), rel=1e-4)
    assert got["other.ppl_ret"] == pytest.approx(_slow_ppl(base, prompts[2:], own[2:]), rel=1e-4)
    assert got["ppl_ret"] == pytest.approx(_slow_ppl(base, prompts, own), rel=1e-4)
    assert "toy.ppl_ret_reverse" in got and "other.ppl_ret_reverse" in got


def test_ppl_fit_shared_with_retention_equals_the_separate_pass(tiny_model_and_tokenizer, tmp_path):
    """One prompt pass serving completions, base completions and golds gives the separate passes' numbers."""
    base, tok = tiny_model_and_tokenizer
    model = _perturbed(base)
    examples = _examples()
    shared = retention(
        model, base, tok, examples, max_new_tokens=5, cache_dir=tmp_path, batch_size=2, with_ppl_fit=True
    )
    alone = retention(model, base, tok, examples, max_new_tokens=5, cache_dir=tmp_path, batch_size=3)
    assert shared["ppl_fit"] == pytest.approx(ppl_fit(model, tok, examples, batch_size=1), rel=1e-4)
    for key in ("ppl_ret", "ret_jsd", "ppl_ret_reverse"):
        assert shared[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-7), key


def test_base_prompt_forward_is_reused_across_trials_with_the_same_numbers(tiny_model_and_tokenizer, tmp_path):
    """Quickstart time: the base model's prompt forward is computed once per process and reused by later
    trials (same prompts, same base weights), with exactly the numbers a fresh computation gives."""
    from harness.evaluation import retention as retention_mod

    base, tok = tiny_model_and_tokenizer
    examples = _examples()
    one, other = _perturbed(base), _perturbed(base, 0.1)  # copied before the hook (deepcopy copies hooks)
    widths: list[int] = []
    hook = base.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        first = retention(one, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, batch_size=2)
        prompt_width = min(len(_prompt_ids(tok, ex)) for ex in examples)
        calls_first = sum(w >= prompt_width for w in widths)
        widths.clear()
        again = retention(other, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, batch_size=2)
        assert not any(w >= prompt_width for w in widths)  # no prompt forward of the base this time
        assert calls_first > 0
    finally:
        hook.remove()
    retention_mod._PREFILLS.clear()
    fresh = retention(other, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, batch_size=2)
    assert again == fresh
    assert first != again


def test_retention_scores_from_the_evaluations_own_prefill_with_the_same_numbers(tiny_model_and_tokenizer, tmp_path):
    """Quickstart time: the evaluated model's prompts, prefilled by its generation (prefills_kept), are
    not run again by retention, and the metrics are those a fresh prompt forward gives."""
    from unisd_components.prefill import generate_bucketed, prefills_kept

    base, tok = tiny_model_and_tokenizer
    model = _perturbed(base)
    examples = _examples()
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    completions = greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=3)
    kwargs = dict(max_new_tokens=5, cache_dir=tmp_path, batch_size=2, completions=completions, with_ppl_fit=True)
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        fresh = retention(model, base, tok, examples, **kwargs)
        fresh_calls = len(widths)  # per group of prompts: one prompt pass, one continuation per set (3)
        with prefills_kept(model):
            # A longer prompt that starts with every prompt (MBPP's prefilled code fence): a prefix serves.
            generate_bucketed(model, [p + [7, 8] for p in prompts], pad_id=0, max_new_tokens=1, do_sample=False)
            widths.clear()
            reused = retention(model, base, tok, examples, **kwargs)
    finally:
        hook.remove()
    assert fresh_calls % 4 == 0 and len(widths) == fresh_calls // 4 * 3  # continuations only, no prompt pass
    for key, value in fresh.items():
        assert reused[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_the_base_trials_own_prefill_serves_the_later_trials(tiny_model_and_tokenizer, tmp_path):
    """The base trial scores from its generation's prefill and keeps it; a trained trial's retention then
    runs no prompt pass of the base model, with the numbers a fresh computation gives."""
    from harness.evaluation import retention as retention_mod
    from unisd_components.prefill import generate_bucketed, prefills_kept

    base, tok = tiny_model_and_tokenizer
    examples = _examples()
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    other = _perturbed(base)
    retention_mod._PREFILLS.clear()
    with prefills_kept(base):
        generate_bucketed(base, prompts, pad_id=0, max_new_tokens=1, do_sample=False)
        retention(base, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, batch_size=2)
    assert retention_mod._PREFILLS.get(base)  # kept for the later trials
    widths: list[int] = []
    hook = base.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        reused = retention(other, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, batch_size=2)
    finally:
        hook.remove()
    prompt_width = min(len(p) for p in prompts)
    assert widths and not any(w >= prompt_width for w in widths)  # continuations only
    retention_mod._PREFILLS.clear()
    fresh = retention(other, base, tok, examples, max_new_tokens=4, cache_dir=tmp_path, batch_size=2)
    for key, value in fresh.items():
        assert reused[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_the_base_trials_equal_completion_sets_run_once(tiny_model_and_tokenizer, tmp_path):
    # Evaluating the base model itself, its own completions are also the reverse direction's base
    # completions: one continuation pass scores both, with the numbers of two passes.
    from harness.evaluation import retention as retention_mod

    base, tok = tiny_model_and_tokenizer
    examples = _examples()
    prompts = [_prompt_ids(tok, ex) for ex in examples]
    own = [_slow_greedy(base, p, 5, tok.eos_token_id) for p in prompts]
    fed: list[int] = []
    hook = base.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        got = retention(
            base, base, tok, examples, cache_dir=tmp_path, batch_size=3, completions=own, base_completions=list(own)
        )
    finally:
        hook.remove()
    retention_mod._PREFILLS.clear()
    width = max(len(p) for p in prompts)
    assert len(fed) == 2 and fed[0] == len(prompts) * width  # the prompts, then one continuation pass
    assert got["ppl_ret_reverse"] == got["ppl_ret"] == pytest.approx(_slow_ppl(base, prompts, own), rel=1e-4)
    other = [c[:-1] for c in own]
    with torch.inference_mode():
        sets = retention_mod._completion_logprobs(base, prompts, [own, other, own], tok.pad_token_id)
    assert sets[0] is sets[2] and sets[1] is not sets[0]
    for row, completion in enumerate(other):
        torch.testing.assert_close(sets[1][row], sets[0][row][: len(completion)])
