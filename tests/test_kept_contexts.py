"""A frozen teacher's contexts are run once per process (unisd_components.prefill.keep_context_prefix):
a later trial scores them from the kept KV, with the numbers a fresh computation gives."""

from __future__ import annotations

import copy

import pytest

from unisd_components import prefill
from unisd_components.config import EMAConfig, TrainingConfig, VariantConfig
from unisd_components.lora import apply_lora
from unisd_components.scoring import decoder_and_head
from unisd_components.trainer import TrainingExample, train_variant

TRAINING = TrainingConfig(max_steps=2, batch_size=3, max_completion_tokens=6, learning_rate=1e-3, warmup_ratio=0.0)


def _examples() -> list[TrainingExample]:
    return [
        TrainingExample(
            id=f"kept/{i}",
            messages=[{"role": "user", "content": f"Add {i} and {i + 3}." + " Show the steps." * (i % 3)}],
            demonstration=f"{i} + {i + 3} = {2 * i + 3}.",
        )
        for i in range(6)
    ]


def _train(model, tok, tmp_path, variant, widths=None):
    decoder, _ = decoder_and_head(model)
    hook = None
    if widths is not None:
        hook = decoder.register_forward_pre_hook(
            lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
        )
    try:
        return train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=tmp_path).history
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_frozen_teachers_contexts_are_run_once_per_process(tiny_model_and_tokenizer, tmp_path, monkeypatch, lora):
    base, tok = tiny_model_and_tokenizer
    monkeypatch.setattr(prefill, "_CONTEXT_PREFIXES", {})
    monkeypatch.setattr(prefill, "_context_prefix_bytes", 0)

    def fresh_model():
        model = copy.deepcopy(base)
        return apply_lora(model, r=4) if lora else model

    first = _train(fresh_model(), tok, tmp_path, VariantConfig())
    assert prefill._CONTEXT_PREFIXES  # kept
    widths: list[int] = []
    again = _train(fresh_model(), tok, tmp_path, VariantConfig(), widths)
    shortest_context = min(len(key[1]) for key in prefill._CONTEXT_PREFIXES)
    # The second trial ran its prompts (sampling, student) but no teacher context: every forward wider
    # than a completion is a prompt's, and the kept contexts are all longer than any prompt here.
    assert all(w < shortest_context for w in widths)
    monkeypatch.setattr(prefill, "_CONTEXT_PREFIXES", {})
    monkeypatch.setattr(prefill, "_context_prefix_bytes", 0)
    fresh = _train(fresh_model(), tok, tmp_path, VariantConfig())
    for kept_row, fresh_row in zip(again, fresh, strict=True):
        for key in ("loss", "kl", "entropy"):
            assert kept_row[key] == pytest.approx(fresh_row[key], rel=1e-5, abs=1e-7), key
    assert first[0]["loss"] == pytest.approx(fresh[0]["loss"], rel=1e-5)


def test_an_ema_teacher_keeps_nothing(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    base, tok = tiny_model_and_tokenizer
    monkeypatch.setattr(prefill, "_CONTEXT_PREFIXES", {})
    monkeypatch.setattr(prefill, "_context_prefix_bytes", 0)
    _train(apply_lora(copy.deepcopy(base), r=4), tok, tmp_path, VariantConfig(ema=EMAConfig(beta=0.5, sync_steps=1)))
    assert prefill._CONTEXT_PREFIXES == {}  # its weights move every step: nothing to reuse


def test_an_ema_teacher_that_has_not_moved_scores_the_kept_base_contexts(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    # An EMA teacher starts as the fresh student adapter (B = 0): until its first sync it is the base model.
    # After a frozen-teacher trial kept the base's contexts, its first step costs only the completions, and
    # gives the numbers a fresh computation gives; once it has moved, it runs its contexts itself.
    import torch

    base, tok = tiny_model_and_tokenizer
    monkeypatch.setattr(prefill, "_CONTEXT_PREFIXES", {})
    monkeypatch.setattr(prefill, "_context_prefix_bytes", 0)
    ema = VariantConfig(ema=EMAConfig(beta=0.5, sync_steps=1))

    def lora_model():
        torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
        return apply_lora(copy.deepcopy(base), r=4)

    def fed(widths_rows):
        return sum(w * r for w, r in widths_rows)

    _train(lora_model(), tok, tmp_path, VariantConfig())  # SDFT: the base's contexts are kept
    kept_shapes: list[tuple[int, int]] = []
    kept = _train_shapes(lora_model(), tok, tmp_path, ema, kept_shapes)
    monkeypatch.setattr(prefill, "_CONTEXT_PREFIXES", {})
    monkeypatch.setattr(prefill, "_context_prefix_bytes", 0)
    fresh_shapes: list[tuple[int, int]] = []
    fresh = _train_shapes(lora_model(), tok, tmp_path, ema, fresh_shapes)
    step_one_contexts = sum(len(tok(ex.demonstration)["input_ids"]) for ex in _examples()[:3])
    assert fed(fresh_shapes) - fed(kept_shapes) > step_one_contexts  # step 1's contexts did not run again
    assert prefill._CONTEXT_PREFIXES == {}  # and the EMA trial kept nothing of its own
    for kept_row, fresh_row in zip(kept, fresh, strict=True):
        for key in ("loss", "kl", "entropy"):
            assert kept_row[key] == pytest.approx(fresh_row[key], rel=1e-5, abs=1e-7), key


def _train_shapes(model, tok, tmp_path, variant, shapes):
    decoder, _ = decoder_and_head(model)
    hook = decoder.register_forward_pre_hook(
        lambda m, a, kw: shapes.append((kw["input_ids"].shape[1], kw["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        return train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=tmp_path).history
    finally:
        hook.remove()
