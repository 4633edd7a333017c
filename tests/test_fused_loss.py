"""The fused, chunked LM head + divergence against the unfused reference (``training.fused_loss``).

Two levels:

- the function itself (:func:`fused_head_scores`) against plain autograd over full ``[B,T,V]``
  log-probs, for the three divergences, with and without an LM-head bias and logit soft-capping, for
  chunk sizes that do and do not divide the number of positions;
- one optimizer step of the trainer, fused against unfused, from the same weights and the same
  completions, for every one of the 32 component subsets and the baselines (SFT, SDFT, GKD on- and
  off-policy, reverse KL, JSD with KL to base, match_repr): the loss, every term, every per-step metric
  and the gradient of every trainable parameter agree within 1e-5 (relative, fp32). The tiny model has
  the bundled tokenizer's vocabulary (49,152 entries, tied embeddings, hidden 64), the completions are
  fixed with uneven lengths (EOS early in some rows, padding after) and the first token is masked.

"Relative" for a tensor is ``||fused - unfused|| / ||unfused||``; for a scalar ``|a - b| / max(|b|, 1e-8)``.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from unisd_components import step as step_module
from unisd_components import trainer as trainer_module
from unisd_components.config import (
    COMPONENT_NAMES,
    AgreementConfig,
    ClippingConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    GKDConfig,
    TrainingConfig,
    VariantConfig,
)
from unisd_components.divergence import token_divergence
from unisd_components.fused_loss import HeadWeights, chunk_tokens_for, fused_head_scores
from unisd_components.scoring import pad_left
from unisd_components.trainer import TrainingExample, train_variant

RTOL = 1e-5
# Metrics such as the KL of a barely trained tiny model (~1e-3) are differences of log-probs near -10.8,
# whose float32 spacing is ~1e-6: after averaging, two exact computations agree to ~1e-8 absolute.
METRIC_ATOL = 1e-7
_OPTIMIZER_STEP = trainer_module._optimizer_step  # the real one, whatever a test patched in
COMPLETION = 10
LENGTHS = (COMPLETION, 3, 7)  # tokens up to and including EOS, per row of the batch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------------
# The function against autograd over full log-probs


def _reference(hs, W, b, ht, Wt, tok, tau, alpha, softcap):
    def logps(h, weight, bias):
        z = h @ weight.T + (0 if bias is None else bias)
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        return torch.log_softmax(z / tau, dim=-1)

    s, u = logps(hs, W, b), logps(ht, Wt, None)
    return token_divergence(s, u, alpha), s.gather(-1, tok[..., None]).squeeze(-1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_fused_scores_and_gradients_match_autograd(alpha, softcap, bias, chunk):
    gen = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 7, 16, 700
    W = torch.randn(V, H, generator=gen, requires_grad=True)
    b = torch.randn(V, generator=gen, requires_grad=True) if bias else None
    Wt = torch.randn(V, H, generator=gen)
    hs = torch.randn(B, T, H, generator=gen, requires_grad=True)
    ht = torch.randn(B, T, H, generator=gen)
    tok = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    g_d, g_s = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    params = [hs, W] + ([b] if b is not None else [])

    d_ref, s_ref = _reference(hs, W, b, ht, Wt, tok, 0.7, alpha, softcap)
    loss_ref = (torch.where(mask, d_ref * g_d, 0.0) + torch.where(mask, s_ref * g_s, 0.0)).sum()
    grads_ref = torch.autograd.grad(loss_ref, params)

    out = fused_head_scores(
        hs,
        HeadWeights(W, b, softcap),
        tok,
        mask,
        0.7,
        teacher_hidden=ht,
        teacher_head=HeadWeights(Wt, None, softcap),
        alpha=alpha,
        chunk_tokens=chunk,
    )
    loss = (
        torch.where(mask, out.divergence * g_d, 0.0) + torch.where(mask, out.token_logps * g_s, 0.0)
    ).sum()
    grads = torch.autograd.grad(loss, params)

    assert float(loss.detach()) == pytest.approx(float(loss_ref.detach()), rel=RTOL)
    torch.testing.assert_close(out.divergence[mask], d_ref.detach()[mask], rtol=RTOL, atol=1e-6)
    assert torch.all(out.divergence[~mask] == 0) and torch.all(out.token_logps[~mask] == 0)
    for got, want in zip(grads, grads_ref, strict=True):
        assert _rel(got, want) < RTOL
    # Positions outside the mask get no gradient at all.
    assert torch.all(grads[0][~mask] == 0)


def test_student_only_scores_are_the_sampled_token_log_probs():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(300, 8, generator=gen)
    hs = torch.randn(2, 5, 8, generator=gen)
    tok = torch.randint(0, 300, (2, 5), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = fused_head_scores(hs, HeadWeights(W), tok, mask, 1.0, chunk_tokens=3)
    want = torch.log_softmax(hs @ W.T, -1).gather(-1, tok[..., None]).squeeze(-1)
    torch.testing.assert_close(out.token_logps, want, rtol=RTOL, atol=1e-6)
    assert out.divergence is None and out.teacher_token_logps is None


def test_default_chunk_bounds_the_logits_per_chunk():
    assert chunk_tokens_for(151_936, None) * 151_936 <= 1 << 24
    assert chunk_tokens_for(151_936, 64) == 64
    assert chunk_tokens_for(10, None) >= 16


# ---------------------------------------------------------------------------------------------------
# One trainer step, fused against unfused


def _examples(n: int = 6) -> list[TrainingExample]:
    return [
        TrainingExample(
            id=f"toy/{i}",
            messages=[{"role": "user", "content": f"What is {i + 2} + {2 * i + 3}?\n(A) {3 * i + 5}\n(B) 0"}],
            demonstration="word " * (2 + 3 * i) + f"gives {3 * i + 5}. The answer is (A).",
            kind="multiple_choice",
            choices=(str(3 * i + 5), "0"),
            answer="A",
        )
        for i in range(n)
    ]


def _fixed_completions(model, prompts, *, max_new_tokens, pad_id, eos_ids, **_):
    """Deterministic completions of uneven length: random ids, EOS after LENGTHS[b] - 1 of them, pad after."""
    gen = torch.Generator().manual_seed(int(pad_left(prompts, pad_id)[0].sum()))  # seeded by the padded batch
    vocab = model.get_output_embeddings().weight.shape[0]
    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long)
    for b in range(len(prompts)):
        n = min(LENGTHS[b % len(LENGTHS)], max_new_tokens)
        ids = torch.randint(0, vocab, (n,), generator=gen)
        ids = torch.where(torch.isin(ids, torch.tensor(eos_ids)), 7, ids)
        ids[-1] = eos_ids[0] if n < max_new_tokens else ids[-1]
        out[b, :n] = ids
    return out.to(next(model.parameters()).device)


def _one_step(model, tok, variant, cache_dir, monkeypatch, fused: bool):
    captured: dict[str, torch.Tensor] = {}

    def capturing(model_, params, *args, **kwargs):
        for name, p in model_.named_parameters():
            if p.requires_grad:
                captured[name] = p.grad.detach().clone()
        return _OPTIMIZER_STEP(model_, params, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "_optimizer_step", capturing)
    monkeypatch.setattr(step_module, "sample_completions", _fixed_completions)
    training = TrainingConfig(
        max_steps=1,
        batch_size=3,
        max_completion_tokens=COMPLETION,
        skip_first_tokens=1,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        fused_loss=fused,
        fused_chunk_tokens=4,  # several chunks, one of them partial
    )
    result = train_variant(copy.deepcopy(model), tok, _examples(), variant, training, cache_dir=cache_dir)
    return result.history[0], captured


def _assert_parity(model, tok, variant, cache_dir, monkeypatch) -> dict[str, float]:
    ref_metrics, ref_grads = _one_step(model, tok, variant, cache_dir, monkeypatch, fused=False)
    metrics, grads = _one_step(model, tok, variant, cache_dir, monkeypatch, fused=True)
    assert ref_grads and ref_grads.keys() == grads.keys()
    for name, want in ref_grads.items():
        assert _rel(grads[name], want) < RTOL, (name, _rel(grads[name], want))
    assert metrics.keys() == ref_metrics.keys()
    for key, want in ref_metrics.items():
        if key.startswith("seconds_"):
            continue
        got = metrics[key]
        assert abs(got - want) <= RTOL * abs(want) + METRIC_ATOL, (key, got, want)
    return ref_metrics


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fused-cache")


SUBSETS = [s for n in range(len(COMPONENT_NAMES) + 1) for s in itertools.combinations(COMPONENT_NAMES, n)]


def _subset_variant(subset: tuple[str, ...]) -> VariantConfig:
    configs = {
        "agreement": AgreementConfig(k=3, strategy="random"),
        "contrastive": ContrastiveConfig(margin=0.5),
        "ema": EMAConfig(sync_steps=1, beta=0.5),
        "feature_matching": FeatureMatchingConfig(),
        "clipping": ClippingConfig(quantile=0.8),  # clips several of the ~14 masked tokens
    }
    return VariantConfig(**{name: configs[name] for name in subset})


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "sdft")
def test_fused_step_matches_unfused_for_every_subset(
    subset, tiny_model_and_tokenizer, cache_dir, monkeypatch
):
    model, tok = tiny_model_and_tokenizer
    metrics = _assert_parity(model, tok, _subset_variant(subset), cache_dir, monkeypatch)
    # The fixed completions really are uneven and partly masked: 10, 3 and 7 tokens, first one skipped.
    assert metrics["completion_tokens"] == pytest.approx((9 + 2 + 6) / 3)
    if "clipping" in subset:
        assert metrics["clip_frac"] > 0


@pytest.mark.parametrize(
    "variant",
    [
        VariantConfig(method="sft"),
        VariantConfig(method="gkd", gkd=GKDConfig(beta=0.5, lmbda=1.0)),
        VariantConfig(method="gkd", gkd=GKDConfig(beta=0.3, lmbda=0.0)),
        VariantConfig(alpha=1.0),
        VariantConfig(alpha=0.5, kl_to_base_beta=0.1),
        VariantConfig(kl_to_base_beta=0.1, ema=EMAConfig(sync_steps=1)),
        VariantConfig(feature_matching=FeatureMatchingConfig(match_repr=True)),
    ],
    ids=["sft", "gkd-on-policy", "gkd-off-policy", "reverse-kl", "jsd-kl-base", "ema-kl-base", "match-repr"],
)
def test_fused_step_matches_unfused_for_the_baselines(
    variant, tiny_model_and_tokenizer, cache_dir, monkeypatch
):
    model, tok = tiny_model_and_tokenizer
    _assert_parity(model, tok, variant, cache_dir, monkeypatch)


@pytest.mark.parametrize(
    "variant",
    [VariantConfig(), _subset_variant(("agreement", "contrastive", "ema", "feature_matching"))],
    ids=["sdft-lora", "unisd-star-lora"],
)
def test_fused_step_matches_unfused_under_lora(variant, tiny_model_and_tokenizer, cache_dir, monkeypatch):
    """Under LoRA the LM head is frozen (no weight gradient to form) and the teacher is the base with
    adapters off (SDFT) or a second adapter (EMA): only the adapters' gradients, equal on both paths."""
    from unisd_components.lora import apply_lora

    model, tok = tiny_model_and_tokenizer
    lora_model = apply_lora(model, r=4)
    _assert_parity(lora_model, tok, variant, cache_dir, monkeypatch)


def test_fused_step_holds_no_full_vocabulary_tensor(tiny_model_and_tokenizer, cache_dir, monkeypatch):
    """The LM head runs on masked completion positions only, at most ``fused_chunk_tokens`` at a time,
    and the full-vocabulary log-softmax of the unfused path is never called."""
    import unisd_components.fused_loss as fused_module

    model, tok = tiny_model_and_tokenizer
    rows: list[int] = []
    real_logits = fused_module._logits

    def spy(h, *args, **kwargs):
        rows.append(h.shape[0])
        return real_logits(h, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("completion_logps ([B,T,V]) called on the fused path")

    monkeypatch.setattr(fused_module, "_logits", spy)
    monkeypatch.setattr(step_module, "completion_logps", forbidden)
    variant = VariantConfig(clipping=ClippingConfig(), contrastive=ContrastiveConfig())
    metrics, _ = _one_step(model, tok, variant, cache_dir, monkeypatch, fused=True)
    assert rows and max(rows) <= 4
    masked = 9 + 2 + 6
    # forward: student + teacher over the masked positions; backward: both again, but for the last
    # chunk (17 = 4 + 4 + 4 + 4 + 1), whose log-probs the forward kept.
    assert sum(rows) == 4 * masked - 2 * 1
    assert metrics["loss"] > 0


def test_sampled_token_scoring_chunks_over_positions_not_only_rows(tiny_model_and_tokenizer, monkeypatch):
    """One row of T positions is already T·V logits: the extra contexts' scoring chunks positions too."""
    from unisd_components import scoring

    model, _ = tiny_model_and_tokenizer
    V = model.config.vocab_size
    hidden = torch.randn(2, 9, model.config.hidden_size)
    tokens = torch.randint(0, V, (2, 9))
    sizes: list[int] = []
    real = scoring.completion_logits
    monkeypatch.setattr(scoring, "completion_logits", lambda m, h: sizes.append(h.shape[0]) or real(m, h))
    with torch.no_grad():
        got = scoring.sampled_token_logps(
            model, hidden, tokens, torch.tensor([0.7, 1.0]), chunk_elements=4 * V
        )
        want = torch.log_softmax(real(model, hidden) / torch.tensor([0.7, 1.0])[:, None, None], -1)
    assert max(sizes) <= 4 and sum(sizes) == 18
    torch.testing.assert_close(got, want.gather(-1, tokens[..., None]).squeeze(-1), rtol=RTOL, atol=1e-5)


def test_bf16_matmuls_stay_close_to_fp32():
    """CUDA runs the LM-head matmuls in bf16 (as autocast would); the rest stays fp32."""
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(400, 16, generator=gen, requires_grad=True)
    hs = torch.randn(2, 6, 16, generator=gen, requires_grad=True)
    ht, tok = torch.randn(2, 6, 16, generator=gen), torch.randint(0, 400, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    outs = []
    for dtype in (None, torch.bfloat16):
        out = fused_head_scores(
            hs,
            HeadWeights(W),
            tok,
            mask,
            0.7,
            teacher_hidden=ht,
            teacher_head=HeadWeights(W),
            compute_dtype=dtype,
        )
        (grad,) = torch.autograd.grad(out.divergence.sum() + out.token_logps.sum(), [hs])
        outs.append((out.divergence.detach(), grad))
    assert outs[1][0].dtype == torch.float32 and outs[1][1].dtype == torch.float32
    assert _rel(outs[1][0], outs[0][0]) < 0.05 and _rel(outs[1][1], outs[0][1]) < 0.05
