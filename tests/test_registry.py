"""The component registry: names, composition from a VariantConfig, and hooks on hand-made scores."""

from __future__ import annotations

import math

import pytest
import torch

from unisd_components import registry as registry_module
from unisd_components.config import (
    COMPONENT_NAMES,
    AgreementConfig,
    ClippingConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    VariantConfig,
)
from unisd_components.registry import (
    REGISTRY,
    AgreementComponent,
    ClippingComponent,
    Component,
    ContrastiveComponent,
    FeatureMatchingComponent,
    StepScores,
    build_components,
)


def _scores(B=2, T=4, V=6, H=3, seed=0) -> StepScores:
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    u = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    gather = lambda x: x.gather(-1, tokens[..., None]).squeeze(-1)  # noqa: E731
    return StepScores(
        mask=mask,
        tokens=tokens,
        student_logps=s,
        teacher_logps=u,
        student_token_logps=gather(s),
        teacher_token_logps=gather(u),
        student_hidden=torch.randn(B, T, H, generator=g),
        teacher_hidden=torch.randn(B, T, H, generator=g),
        context_token_logps={
            "agreement": -torch.rand(3, B, T, generator=g) * 3,
            "contrastive": -torch.rand(1, B, T, generator=g) * 3,
        },
    )


def test_registry_covers_every_component_name():
    assert tuple(REGISTRY) == COMPONENT_NAMES
    assert all(issubclass(cls, Component) and cls.name == name for name, cls in REGISTRY.items())


def test_build_components_follows_the_variant():
    assert build_components(VariantConfig()) == []
    variant = VariantConfig(ema=EMAConfig(), clipping=ClippingConfig(mode="static", cap=0.5))
    built = build_components(variant)
    assert [c.name for c in built] == ["ema", "clipping"]
    assert built[1].config.cap == 0.5
    assert [c.needs_ema_teacher for c in built] == [True, False]
    fm = build_components(VariantConfig(feature_matching=FeatureMatchingConfig(match_repr=True)))[0]
    assert fm.drops_divergence and fm.needs_hidden


def test_agreement_hooks_token_and_sequence_levels():
    scores = _scores()
    metrics: dict[str, float] = {}
    token = AgreementComponent(AgreementConfig(level="token", strategy="random", gamma=1.0))
    w = token.token_weights(scores, metrics)
    assert w.shape == (2, 4) and token.sequence_weights(scores, {}) is None
    assert (w[~scores.mask] == 0).all() and (w[scores.mask] > 0).all() and (w <= 1).all()
    assert metrics["agreement_weight_min"] == pytest.approx(float(w[scores.mask].min()))
    seq = AgreementComponent(AgreementConfig(level="sequence", strategy="random", gamma=2.0))
    ws = seq.sequence_weights(scores, {})
    assert seq.token_weights(scores, {}) is None and ws.shape == (2,)
    # by hand: population variance over contexts of each sequence's masked mean log-prob
    ctx = scores.context_token_logps["agreement"]
    for b, n in enumerate([3, 2]):
        means = ctx[:, b, :n].mean(-1)
        assert float(ws[b]) == pytest.approx(math.exp(-2.0 * float(means.var(unbiased=False))), rel=1e-5)


def test_contrastive_term_by_hand():
    scores = _scores()
    metrics: dict[str, float] = {}
    component = ContrastiveComponent(ContrastiveConfig(weight=0.1, margin=0.5))
    term = component.loss_terms(scores, metrics)["contrastive"]
    s, u = scores.student_token_logps.tolist(), scores.teacher_token_logps.tolist()
    n = scores.context_token_logps["contrastive"][0].tolist()
    per_seq = []
    for b, length in enumerate([3, 2]):
        hinge = [max(0.0, 0.5 + abs(s[b][t] - u[b][t]) - abs(s[b][t] - n[b][t])) for t in range(length)]
        per_seq.append(sum(hinge) / length)
    assert float(term) == pytest.approx(0.1 * sum(per_seq) / 2, rel=1e-5)
    assert 0 <= metrics["contrastive_violation_frac"] <= 1


def test_clipping_static_and_adaptive():
    per_token = torch.tensor([[0.1, 5.0, 0.3, 100.0], [2.0, 0.2, 50.0, 60.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    metrics: dict[str, float] = {}
    out = ClippingComponent(ClippingConfig(mode="static", cap=1.0)).transform_divergence(
        per_token, mask, metrics
    )
    torch.testing.assert_close(out, torch.tensor([[0.1, 1.0, 0.3, 1.0], [1.0, 0.2, 1.0, 1.0]]))
    assert metrics["clip_cap"] == 1.0 and metrics["clip_frac"] == pytest.approx(2 / 5)
    adaptive = ClippingComponent(ClippingConfig(mode="adaptive", quantile=0.5))
    out = adaptive.transform_divergence(per_token, mask, metrics)
    # masked values 0.1, 5.0, 0.3, 2.0, 0.2 -> median 0.3; padding never sets the cap
    assert metrics["clip_cap"] == pytest.approx(0.3)
    assert float(out.max()) == pytest.approx(0.3)


def test_feature_matching_gradient_reaches_the_student_only():
    scores = _scores()
    scores.student_hidden.requires_grad_(True)
    scores.teacher_hidden.requires_grad_(True)
    term = FeatureMatchingComponent(FeatureMatchingConfig(weight=0.5)).loss_terms(scores, {})["feature"]
    term.backward()
    assert scores.student_hidden.grad is not None and scores.student_hidden.grad.abs().sum() > 0
    assert scores.teacher_hidden.grad is None


# Adding a mechanism (not replacing one) with no other edit: tests/test_extension.py registers a toy
# sixth mechanism and runs a whole study with it.


def test_mechanisms_are_ordered_and_refuse_duplicates():
    from unisd_components.registry import mechanisms, register_mechanism

    assert [m.component.__module__ for m in mechanisms().values()] == list(registry_module.BUILTIN_MODULES)
    with pytest.raises(ValueError, match="mechanism 'clipping' is already registered"):
        register_mechanism(AgreementConfig, ClippingComponent)
    with pytest.raises(TypeError, match="must subclass"):
        register_mechanism(AgreementConfig, object)
