"""Work the training step shares instead of repeating (unisd_components.prefill.prefix_kv and
hidden_after_prefixes): the student's prompt pass also serves its sampling, and teacher contexts that
share a long prefix (UniSD*'s main, negative and same-donor agreement contexts) run that prefix once.
Each gives the numbers (loss, gradients, samples) of the unshared computation, and runs fewer tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from unisd_components import prefill
from unisd_components import step as step_module
from unisd_components.config import (
    AgreementConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    TrainingConfig,
    VariantConfig,
)
from unisd_components.lora import apply_lora
from unisd_components.prefill import hidden_after_prefixes, prefix_kv, shared_prefix_lengths
from unisd_components.registry import build_components
from unisd_components.scoring import completion_hidden, decoder_and_head, pad_left
from unisd_components.step import PhaseTimer, StepRunner
from unisd_components.teachers import make_teacher
from unisd_components.trainer import TrainingExample


def test_shared_prefix_lengths_by_hand():
    rows = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9], [7, 8], [1, 2, 3, 4, 6]]
    # row 0 shares [1,2,3,4] with row 4 but keeps its last token to feed: 3
    assert shared_prefix_lengths(rows) == [3, 3, 2, 0, 4]
    assert shared_prefix_lengths(rows, min_tokens=3) == [3, 3, 0, 0, 4]
    assert shared_prefix_lengths([[5, 6]]) == [0]


def _float64_lora(base):
    """A seeded LoRA copy of ``base`` in float64 (a wrong path shows, summation order does not), its B drawn
    at random (B starts at zero: give the adapter something to differentiate). LoRA's A matrices come from
    the global generator, hence the seed."""
    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(base), r=4).double()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _random_rows(seed, n, vocab=100):
    g = torch.Generator().manual_seed(seed)
    stem = torch.randint(3, vocab, (12,), generator=g).tolist()
    rows = []
    for i in range(n):
        own = torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append(stem[: 4 + (i % 3) * 4] + own)
    return rows


@pytest.mark.parametrize("budget", [None, 40])
def test_hidden_after_prefixes_equals_a_whole_forward_with_its_gradients(tiny_model_and_tokenizer, budget):
    base, _ = tiny_model_and_tokenizer
    model = _float64_lora(base)
    contexts = _random_rows(0, 6)
    splits = [s or len(c) - 1 for s, c in zip(shared_prefix_lengths(contexts), contexts, strict=True)]
    completions = [[11, 12, 13, 14], [21, 22], [31, 32, 33, 34], [41], [51, 52, 53], [61, 62, 63, 64]]
    lengths = [len(c) for c in completions]
    T = max(lengths)

    ids, mask = pad_left([c + x for c, x in zip(contexts, completions, strict=True)], 0)
    whole = completion_hidden(model, ids, mask, T, torch.tensor(lengths))
    (whole.square().sum()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    prefixes = prefix_kv(model, [c[:s] for c, s in zip(contexts, splits, strict=True)], pad_id=0, token_budget=budget)
    feeds = [c[s:] + x[:-1] for c, s, x in zip(contexts, splits, completions, strict=True)]
    first = [len(c) - s - 1 for c, s in zip(contexts, splits, strict=True)]
    shared = hidden_after_prefixes(model, prefixes, feeds, first, T, lengths, pad_id=0, token_budget=budget)
    torch.testing.assert_close(shared, whole, rtol=1e-9, atol=1e-10)
    (shared.square().sum()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            _assert_same_gradient(param.grad, expected[name], name, rel=1e-9)


def _assert_same_gradient(got, expected, name, rel):
    """Equal up to float summation order: the difference is tiny against the gradient's own size."""
    assert float((got - expected).norm()) <= rel * float(expected.norm()) + 1e-12, name


def _examples():
    # Two pairs of prompts that share a long stem (their contexts then share it too), two that do not.
    stem = "Consider the following long shared instructions about arithmetic and careful reasoning. " * 3
    texts = [stem + "Add 2 and 3.", stem + "Add 4 and 9.", "Multiply 3 by 7.", "What is 10 minus 4?"]
    return [
        TrainingExample(
            id=f"shared/{i}",
            messages=[{"role": "user", "content": text}],
            demonstration=f"The answer is {i + 5}.",
            benchmark="toy",
        )
        for i, text in enumerate(texts)
    ]


def _runner(model, tok, variant, tmp_path, shares_prompt=True, min_shared=32, monkeypatch=None):
    training = TrainingConfig(batch_size=4, max_completion_tokens=6, temperature=1.0)
    components = build_components(variant)
    from unisd_components.component import SetupContext

    ctx = SetupContext(
        model=model, tokenizer=tok, examples=_examples(), cache_dir=tmp_path, model_id="tiny",
        seed=0, max_new_tokens=6, batch_size=4,
    )
    for component in components:
        component.setup(ctx)
    teacher = make_teacher(model, ema=any(c.needs_ema_teacher for c in components))
    runner = StepRunner(model, tok, variant, training, components, teacher, None, PhaseTimer(torch.device("cpu")), 0)
    runner._shares_prompt_pass = shares_prompt
    monkeypatch.setattr(step_module, "_MIN_SHARED_PREFIX", min_shared)
    return runner


def _step(base, tok, variant, tmp_path, monkeypatch, **kw):
    # The tiny random model's next-token distribution is nearly flat over 49k tokens: a float32 rounding
    # difference between two equal computations could flip a sampled token. In float64 it does not.
    model = _float64_lora(base)
    monkeypatch.setattr(prefill, "_CONTEXT_PREFIXES", {})  # a frozen teacher's contexts start unscored
    monkeypatch.setattr(prefill, "_context_prefix_bytes", 0)
    runner = _runner(model, tok, variant, tmp_path, monkeypatch=monkeypatch, **kw)
    decoder, _ = decoder_and_head(model)
    tokens = []
    hook = decoder.register_forward_pre_hook(
        lambda m, a, k: tokens.append(int(k["attention_mask"][:, -k["input_ids"].shape[1]:].sum())), with_kwargs=True
    )
    model.train()
    torch.manual_seed(1)
    terms, metrics = runner.distill(_examples(), step=1, alpha=0.0)
    hook.remove()
    loss = sum(terms.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), metrics, grads, sum(tokens)


UNISD_STAR = VariantConfig(
    agreement=AgreementConfig(level="token", k=2, strategy="random", gamma=1.0),
    contrastive=ContrastiveConfig(weight=0.1, margin=0.5),
    ema=EMAConfig(beta=0.9, sync_steps=1),
    feature_matching=FeatureMatchingConfig(weight=0.1),
)


def _assert_same_numbers(got, expected):
    assert got[0] == pytest.approx(expected[0], rel=1e-9)
    for key in ("kl", "entropy", "completion_tokens"):
        assert got[1][key] == pytest.approx(expected[1][key], rel=1e-9, abs=1e-12), key
    assert got[2].keys() == expected[2].keys()
    for name, grad in got[2].items():
        _assert_same_gradient(grad, expected[2][name], name, rel=1e-9)


def test_the_student_prompt_pass_serves_its_sampling(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    base, tok = tiny_model_and_tokenizer
    unshared = _step(base, tok, VariantConfig(), tmp_path, monkeypatch, shares_prompt=False)
    shared = _step(base, tok, VariantConfig(), tmp_path, monkeypatch)
    _assert_same_numbers(shared, unshared)
    # Exactly the prompts' prefill (all tokens but the last, 4 rows) is no longer run a second time.
    assert unshared[3] - shared[3] == sum(len(p) - 1 for p in _runner_prompts(tok))


def test_teacher_contexts_sharing_a_prefix_run_it_once(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    base, tok = tiny_model_and_tokenizer
    unshared = _step(base, tok, UNISD_STAR, tmp_path, monkeypatch, shares_prompt=False, min_shared=10**9)
    shared = _step(base, tok, UNISD_STAR, tmp_path, monkeypatch, shares_prompt=False)
    _assert_same_numbers(shared, unshared)
    # Two prompts share a stem of ~45 tokens: their main, negative and agreement contexts (5 each) and the
    # donor blocks that quote them run it once per distinct prefix.
    assert shared[3] < unshared[3] - 200


def _runner_prompts(tok):
    from unisd_components.chat import encode_prompt

    return [encode_prompt(tok, ex.messages, 512) for ex in _examples()]


def test_a_student_with_active_dropout_samples_from_its_own_prefill(tiny_model_and_tokenizer):
    base, tok = tiny_model_and_tokenizer
    training = TrainingConfig(batch_size=4, max_completion_tokens=6)
    with_dropout = apply_lora(copy.deepcopy(base), r=4, dropout=0.1)
    plain = apply_lora(copy.deepcopy(base), r=4)
    timer = PhaseTimer(torch.device("cpu"))
    assert not StepRunner(with_dropout, tok, VariantConfig(), training, [], None, None, timer, 0)._shares_prompt_pass
    assert StepRunner(plain, tok, VariantConfig(), training, [], None, None, timer, 0)._shares_prompt_pass
    checkpointed = training.model_copy(update={"gradient_checkpointing": True})
    assert not StepRunner(plain, tok, VariantConfig(), checkpointed, [], None, None, timer, 0)._shares_prompt_pass


def test_prefix_kv_runs_the_rows_common_prefix_once(tiny_model_and_tokenizer):
    # Every prompt begins with the chat template's system turn: prefix_kv runs it once and each row's rest
    # after its KV. Same keys and values as whole-row forwards (float64), same gradients into the adapter.
    base, _ = tiny_model_and_tokenizer
    model = _float64_lora(base)
    rows = _random_rows(1, 7)
    rows = [[5, 6, 7, 8, 9, 10, 11, 12] + r for r in rows]  # a common 8-token stem (and more, pairwise)
    decoder, _ = decoder_and_head(model)
    fed: list[int] = []
    hook = decoder.register_forward_pre_hook(lambda m, a, k: fed.append(int(k["input_ids"].numel())), with_kwargs=True)

    def kv_and_grads(overhead):
        model.zero_grad()
        fed.clear()
        kv = prefix_kv(model, rows, pad_id=0, overhead_tokens=overhead, token_budget=40)
        sum(k.square().sum() + v.square().sum() for row in kv for k, v in row).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return kv, grads, sum(fed)

    try:
        whole, whole_grads, whole_fed = kv_and_grads(10**6)  # a forward "costs" more than sharing saves
        shared, shared_grads, shared_fed = kv_and_grads(0)
        with torch.no_grad():  # two rows: sharing 12 tokens saves less than a forward costs
            fed.clear()
            prefix_kv(model, rows[:2], pad_id=0, overhead_tokens=96)
            assert len(fed) == 1
    finally:
        hook.remove()
    common = 8 + 4  # _random_rows' rows share their first 4 stem tokens too
    assert shared_fed < whole_fed - (len(rows) - 2) * common
    for a, b in zip(shared, whole, strict=True):
        for (ka, va), (kb, vb) in zip(a, b, strict=True):
            torch.testing.assert_close(ka, kb, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(va, vb, rtol=1e-9, atol=1e-10)
    assert shared_grads.keys() == whole_grads.keys() and any("k_proj.lora_A" in n for n in shared_grads)
    # Llama's RMSNorm runs in float32 even in a float64 model: the shared prefix's gradient, summed over
    # the rows before it goes back through the norms, rounds there differently (~1e-7 of its size).
    for name, grad in shared_grads.items():
        _assert_same_gradient(grad, whole_grads[name], name, rel=1e-6)


def test_scored_rows_run_their_common_prefix_once(tiny_model_and_tokenizer):
    # StepRunner._row_hidden (SFT's student, unshared teacher contexts): rows that all begin with the same
    # tokens run them once; the completion states are those of whole-row forwards (float64), and so are
    # the adapter's gradients (up to the float32 RMSNorm's rounding, see above).
    from unisd_components.config import TrainingConfig, VariantConfig
    from unisd_components.step import _Rows

    base, tok = tiny_model_and_tokenizer
    model = _float64_lora(base)
    contexts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14] + r for r in _random_rows(2, 8)]
    completion = torch.tensor([[20 + i, 30 + i, 40 + i, 50 + i] for i in range(8)])
    lengths = [4, 2, 4, 1, 3, 4, 4, 2]
    runner = StepRunner(
        model, tok, VariantConfig(), TrainingConfig(batch_size=8), [], None, None, PhaseTimer(torch.device("cpu")), 0
    )
    decoder, _ = decoder_and_head(model)
    fed: list[int] = []
    hook = decoder.register_forward_pre_hook(lambda m, a, k: fed.append(int(k["input_ids"].numel())), with_kwargs=True)
    try:
        hidden = runner._row_hidden(model, _Rows(contexts, list(range(8))), completion, lengths)
        hidden.square().sum().backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = []
    for r, context in enumerate(contexts):
        ids = torch.tensor([context + completion[r, : lengths[r]].tolist()])
        alone.append(completion_hidden(model, ids, torch.ones_like(ids), 4, torch.tensor([lengths[r]]))[0])
    torch.testing.assert_close(hidden, torch.stack(alone), rtol=1e-9, atol=1e-10)
    torch.stack(alone).square().sum().backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            _assert_same_gradient(grads[name], param.grad, name, rel=1e-6)
    common = 10 + 4  # _random_rows' rows share their first 4 stem tokens too
    assert fed[0] == common  # the stem ran once, alone
    assert sum(fed) < sum(len(c) + n for c, n in zip(contexts, lengths, strict=True))  # < whole rows, unpadded
