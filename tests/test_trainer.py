"""The trainer end to end on the tiny random Llama: every component subset, the presets, the baselines.

Sizes are tiny (batch 2, 8 completion tokens, 2 optimizer steps) so the 40-odd runs take about a minute;
the generated negatives and embeddings are cached in one session directory, as a study would.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from unisd_components import registry as registry_module
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
from unisd_components.presets import PRESETS
from unisd_components.registry import ClippingComponent
from unisd_components.scoring import decoder_and_head
from unisd_components.step import completion_mask
from unisd_components.trainer import NonFiniteLossError, TrainingExample, train_variant

COMPLETION = 8
TRAINING = TrainingConfig(
    max_steps=2, batch_size=2, max_completion_tokens=COMPLETION, learning_rate=1e-3, warmup_ratio=0.0
)


def _examples(n: int = 6) -> list[TrainingExample]:
    out = []
    for i in range(n):
        a, b = i + 2, 2 * i + 3
        out.append(
            TrainingExample(
                id=f"toy/{i}",
                messages=[
                    {
                        "role": "user",
                        "content": f"What is {a} + {b}?\n(A) {a + b}\n(B) {a + b + 1}\n(C) {a * b}",
                    }
                ],
                demonstration=f"Adding {a} and {b} gives {a + b}.\nThe answer is (A).",
                kind="multiple_choice",
                choices=(str(a + b), str(a + b + 1), str(a * b)),
                answer="A",
            )
        )
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("unisd-cache")


@pytest.fixture()
def spy_teacher(monkeypatch):
    """Record the teacher objects train_variant builds (the real ones, just remembered)."""
    made = []
    real = trainer_module.make_teacher

    def recording(student, **kwargs):
        teacher = real(student, **kwargs)
        made.append((teacher, [p.detach().clone() for p in teacher.parameters()]))
        return teacher

    monkeypatch.setattr(trainer_module, "make_teacher", recording)
    return made


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(before: dict[str, torch.Tensor], model) -> bool:
    params = dict(model.named_parameters())
    return any(not torch.equal(before[n], params[n].detach()) for n in before)


def _variant(subset: tuple[str, ...]) -> VariantConfig:
    configs = {
        "agreement": AgreementConfig(k=3, strategy="random"),
        "contrastive": ContrastiveConfig(),
        "ema": EMAConfig(sync_steps=1, beta=0.5),
        "feature_matching": FeatureMatchingConfig(),
        "clipping": ClippingConfig(),
    }
    return VariantConfig(**{name: configs[name] for name in subset})


def _assert_trained(result, model, before, made, *, frozen: bool) -> None:
    assert result.steps == 2
    for row in result.history:
        assert math.isfinite(row["loss"]), row
        for key, value in row.items():
            assert math.isfinite(value), (key, value)
    assert _changed(before, model), "the student's weights did not change"
    teacher, initial = made[0]
    same = all(torch.equal(a, b.detach()) for a, b in zip(initial, teacher.parameters(), strict=True))
    assert same == frozen, "a frozen teacher moved" if frozen else "the EMA teacher never moved"


SUBSETS = [s for n in range(len(COMPONENT_NAMES) + 1) for s in itertools.combinations(COMPONENT_NAMES, n)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "sdft")
def test_every_component_subset_trains(subset, tiny_model_and_tokenizer, cache_dir, spy_teacher):
    model, tok = tiny_model_and_tokenizer
    before = _snapshot(model)
    result = train_variant(model, tok, _examples(), _variant(subset), TRAINING, cache_dir=cache_dir)
    _assert_trained(result, model, before, spy_teacher, frozen="ema" not in subset)
    last = result.history[-1]
    assert last["generated_tokens"] > 0
    assert ("loss_contrastive" in last) == ("contrastive" in subset)
    assert ("loss_feature" in last) == ("feature_matching" in subset)
    assert ("agreement_weight_min" in last) == ("agreement" in subset)
    assert ("clip_cap" in last) == ("clipping" in subset)
    assert set(result.phase_seconds) >= {"generation", "teacher", "student", "backward", "optimizer"}
    assert result.phase_seconds["backward"] > 0  # the backward pass is timed, not lost between phases


@pytest.mark.parametrize("preset", ["unisd_star", "unisd_star_paper"])
def test_presets_train_with_retrieval_contexts(preset, tiny_model_and_tokenizer, cache_dir, spy_teacher):
    model, tok = tiny_model_and_tokenizer
    variant = PRESETS[preset]
    assert variant.agreement is not None and variant.agreement.strategy == "retrieval"
    variant = variant.model_copy(update={"ema": EMAConfig(beta=variant.ema.beta, sync_steps=1)})
    before = _snapshot(model)
    result = train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=cache_dir)
    _assert_trained(result, model, before, spy_teacher, frozen=False)
    assert 0 < result.history[-1]["agreement_weight_min"] <= result.history[-1]["agreement_weight_mean"] <= 1


@pytest.mark.parametrize(
    "variant",
    [
        VariantConfig(method="sft"),
        VariantConfig(method="sdft"),
        VariantConfig(method="gkd", gkd=GKDConfig(beta=0.5, lmbda=0.5)),
        VariantConfig(method="gkd", gkd=GKDConfig(beta=0.5, lmbda=0.0)),
        VariantConfig(method="sdft", alpha=0.5, kl_to_base_beta=0.1),
        VariantConfig(method="sdft", kl_to_base_beta=0.1, ema=EMAConfig(sync_steps=1)),
    ],
    ids=["sft", "sdft", "gkd", "gkd-offpolicy", "sdft-jsd-klbase", "ema-klbase"],
)
def test_baselines_train(variant, tiny_model_and_tokenizer, cache_dir, spy_teacher):
    model, tok = tiny_model_and_tokenizer
    before = _snapshot(model)
    result = train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=cache_dir)
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    assert _changed(before, model)
    last = result.history[-1]
    if variant.method == "sft":
        assert spy_teacher == [] and "loss_cross_entropy" in last and last["generated_tokens"] == 0
        assert last["seconds_generation"] == 0.0 and last["seconds_teacher"] == 0.0
    else:
        teacher, initial = spy_teacher[0]
        if variant.ema is None:
            assert all(torch.equal(a, b) for a, b in zip(initial, teacher.parameters(), strict=True))
    if variant.kl_to_base_beta:
        assert last["loss_kl_base"] >= 0
    if variant.method == "gkd" and variant.gkd.lmbda == 0.0:
        assert result.generated_tokens == 0 and all(r["on_policy"] == 0 for r in result.history)


def test_gkd_coin_is_seeded(tiny_model_and_tokenizer, cache_dir):
    model, tok = tiny_model_and_tokenizer
    variant = VariantConfig(method="gkd", gkd=GKDConfig(lmbda=0.5))
    training = TRAINING.model_copy(update={"max_steps": 6, "learning_rate": 1e-6})
    first = train_variant(model, tok, _examples(), variant, training, cache_dir=cache_dir)
    second = train_variant(model, tok, _examples(), variant, training, cache_dir=cache_dir)
    coins = [r["on_policy"] for r in first.history]
    assert coins == [r["on_policy"] for r in second.history]
    assert 0 < sum(coins) < len(coins)


def test_ema_teacher_follows_the_student_under_full_finetuning(
    tiny_model_and_tokenizer, cache_dir, spy_teacher
):
    model, tok = tiny_model_and_tokenizer
    beta = 0.5
    trajectory = []

    def record(step, metrics):
        teacher = spy_teacher[0][0]
        trajectory.append(
            ([p.detach().clone() for p in model.parameters()], [p.clone() for p in teacher.parameters()])
        )

    variant = VariantConfig(ema=EMAConfig(beta=beta, sync_steps=1))
    train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=cache_dir, callback=record)
    teacher_before = spy_teacher[0][1]
    for student, teacher in trajectory:
        expected = [beta * t0 + (1 - beta) * s for t0, s in zip(teacher_before, student, strict=True)]
        for got, want in zip(teacher, expected, strict=True):
            torch.testing.assert_close(got, want)
        teacher_before = teacher


def test_ema_sync_steps_are_respected(tiny_model_and_tokenizer, cache_dir):
    model, tok = tiny_model_and_tokenizer
    variant = VariantConfig(ema=EMAConfig(sync_steps=2))
    training = TRAINING.model_copy(update={"max_steps": 4})
    result = train_variant(model, tok, _examples(), variant, training, cache_dir=cache_dir)
    synced = ["ema_synced_tensors" in row for row in result.history]
    assert synced == [False, True, False, True]


class _PoisonedClipping(ClippingComponent):
    """A mechanism plugged in through the registry alone, whose extra term is infinite."""

    def loss_terms(self, scores, metrics):
        return {"poison": scores.student_token_logps.sum() * float("inf")}


def test_non_finite_term_names_step_and_term(tiny_model_and_tokenizer, cache_dir, monkeypatch):
    model, tok = tiny_model_and_tokenizer
    monkeypatch.setitem(registry_module.REGISTRY, "clipping", _PoisonedClipping)
    variant = VariantConfig(clipping=ClippingConfig())
    with pytest.raises(NonFiniteLossError) as info:
        train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=cache_dir)
    assert info.value.step == 1 and info.value.term == "poison"
    assert "step 1" in str(info.value) and "poison" in str(info.value)


def test_infinite_learning_rate_stops_with_a_clear_error(tiny_model_and_tokenizer, cache_dir):
    model, tok = tiny_model_and_tokenizer
    training = TRAINING.model_copy(update={"learning_rate": float("inf")})
    with pytest.raises(NonFiniteLossError) as info:
        train_variant(model, tok, _examples(), VariantConfig(), training, cache_dir=cache_dir)
    assert info.value.step == 1 and "parameters" in info.value.term


def test_lm_head_never_sees_prompt_positions(tiny_model_and_tokenizer, cache_dir):
    """The LM head runs on completion positions only: length T when scoring, 1 when sampling.

    On the unfused path, where the head module is called on ``[R,T,H]``; the fused path's chunks are
    pinned by ``test_fused_loss.test_fused_step_holds_no_full_vocabulary_tensor``."""
    model, tok = tiny_model_and_tokenizer
    decoder, head = decoder_and_head(model)
    head_lengths: list[int] = []
    flat_positions: list[int] = []  # sampled-token scoring flattens [R,T,H] to completion positions
    decoder_rows: list[tuple[int, int]] = []
    head.register_forward_hook(
        lambda m, args, out: (head_lengths if args[0].dim() == 3 else flat_positions).append(args[0].shape[-2])
    )
    decoder.register_forward_hook(
        lambda m, args, kwargs, out: (
            decoder_rows.append(tuple(kwargs["input_ids"].shape))
            if kwargs.get("input_ids") is not None
            else None
        ),
        with_kwargs=True,
    )
    variant = VariantConfig(
        agreement=AgreementConfig(k=3, strategy="random"),
        contrastive=ContrastiveConfig(),
        clipping=ClippingConfig(),
    )
    training = TRAINING.model_copy(update={"max_steps": 1, "fused_loss": False})
    result = train_variant(model, tok, _examples(), variant, training, cache_dir=cache_dir)
    assert result.history[0]["completion_tokens"] > 0
    scoring = [n for n in head_lengths if n != 1]
    # teacher (main + K + negative rows, one call per chunk) and student: each exactly T positions.
    assert scoring and all(n == COMPLETION for n in scoring), head_lengths
    # The K agreement and the negative contexts' sampled-token scores: exactly their completion positions.
    assert sum(flat_positions) == 2 * (3 + 1) * COMPLETION, flat_positions
    # One batched teacher forward: B main rows + K·B agreement rows + B negative rows.
    assert any(rows == 2 * (1 + 3 + 1) for rows, _ in decoder_rows), decoder_rows


def test_completion_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    mask = completion_mask(tokens, [2])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    assert completion_mask(tokens, [2], skip_first=1)[:, 0].tolist() == [False] * 3


def test_sft_loss_is_the_gold_cross_entropy(tiny_model_and_tokenizer, cache_dir):
    """Step-1 SFT loss equals an independent full-sequence cross-entropy on the gold completion."""
    model, tok = tiny_model_and_tokenizer
    ex = _examples(1)
    training = TRAINING.model_copy(update={"max_steps": 1, "batch_size": 1, "max_completion_tokens": 64})
    prompt = tok.apply_chat_template(ex[0].messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gold = tok(ex[0].demonstration, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + gold])).logits[0, len(prompt_ids) - 1 : -1]
        want = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(gold))
    result = train_variant(model, tok, ex, VariantConfig(method="sft"), training, cache_dir=cache_dir)
    assert result.history[0]["loss"] == pytest.approx(float(want), rel=1e-4)


def test_sampled_token_scoring_equals_full_log_softmax_then_gather(tiny_model_and_tokenizer):
    """The chunked K-context scoring equals the naive [R,T,V] log_softmax + gather, per-row temperatures."""
    from unisd_components.scoring import sampled_token_logps

    model, _ = tiny_model_and_tokenizer
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, model.config.hidden_size, generator=g)
    tokens = torch.randint(0, model.config.vocab_size, (7, 5), generator=g)
    temps = torch.tensor([1.0, 0.7, 0.7, 1.0, 2.0, 0.5, 1.0])
    with torch.no_grad():
        full = torch.log_softmax(model.lm_head(hidden).double() / temps[:, None, None].double(), -1)
        want = full.gather(-1, tokens[..., None]).squeeze(-1)
        # chunk_elements small enough that every row is its own chunk
        got = sampled_token_logps(model, hidden, tokens, temps, chunk_elements=5 * model.config.vocab_size)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_left_padded_rows_score_like_unpadded_ones(tiny_model_and_tokenizer):
    """Padding and position ids: each row of a left-padded batch scores as it does alone."""
    from unisd_components.scoring import completion_hidden, completion_logps, pad_left

    model, _ = tiny_model_and_tokenizer
    contexts = [[1, 50, 60, 70, 80, 90, 100], [1, 55], [1, 65, 75, 85]]
    completion = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    ctx_ids, ctx_mask = pad_left(contexts, pad_id=2)
    ids = torch.cat([ctx_ids, completion], 1)
    mask = torch.cat([ctx_mask, torch.ones_like(completion)], 1)
    with torch.no_grad():
        batched = completion_logps(model, completion_hidden(model, ids, mask, 3), 0.7)
        for i, ctx in enumerate(contexts):
            row = torch.tensor([ctx + completion[i].tolist()])
            alone = torch.log_softmax(model(input_ids=row).logits[0, len(ctx) - 1 : -1].float() / 0.7, -1)
            torch.testing.assert_close(batched[i], alone, atol=2e-4, rtol=1e-4)
    assert torch.isfinite(batched).all()
    # Rows that drop the padding after their EOS: same values at their real positions, zeros after.
    lengths = [3, 1, 2]
    trimmed_ids, trimmed_mask = pad_left(
        [c + completion[i, :n].tolist() for i, (c, n) in enumerate(zip(contexts, lengths, strict=True))], 2
    )
    with torch.no_grad():
        hidden = completion_hidden(model, trimmed_ids, trimmed_mask, 3, torch.tensor(lengths))
        trimmed = completion_logps(model, hidden, 0.7)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(trimmed[i, :n], batched[i, :n], atol=2e-4, rtol=1e-4)
        assert (hidden[i, n:] == 0).all()


def test_gradient_checkpointing_and_accumulation(tiny_model_and_tokenizer, cache_dir):
    model, tok = tiny_model_and_tokenizer
    training = TRAINING.model_copy(
        update={"gradient_checkpointing": True, "grad_accum": 2, "max_steps": None, "epochs": 1.0}
    )
    variant = VariantConfig(feature_matching=FeatureMatchingConfig())
    result = train_variant(model, tok, _examples(), variant, training, cache_dir=cache_dir)
    # 6 examples / batch 2 = 3 micro-batches per epoch, 2 per optimizer step -> 2 steps.
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    assert result.generated_tokens == sum(int(r["generated_tokens"]) for r in result.history)
    assert not model.is_activation_checkpointing


def test_bad_inputs_are_rejected(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="at least one"):
        train_variant(model, tok, [], VariantConfig(), TRAINING)
    twice = _examples(2)
    twice[1].id = twice[0].id
    with pytest.raises(ValueError, match="unique"):
        train_variant(model, tok, twice, VariantConfig(), TRAINING)


@pytest.mark.slow
def test_unisd_star_trains_on_bundled_smollm2_with_lora(data_dir, tmp_path):
    """UniSD* (retrieval K=3, contrastive, EMA, feature matching) on the real 135M model under LoRA."""
    from harness.data import load_benchmark
    from harness.models import BUNDLED_SMOLLM2, load_model
    from unisd_components.lora import apply_lora

    model, tok = load_model(BUNDLED_SMOLLM2, device="cpu")
    model = apply_lora(model, r=8, alpha=16)
    raw = load_benchmark("scienceqa", "train", data_dir=data_dir, limit=6)
    examples = [e.to_training_example() for e in raw]
    variant = PRESETS["unisd_star"].model_copy(update={"ema": EMAConfig(beta=0.9, sync_steps=1)})
    training = TrainingConfig(max_steps=2, batch_size=2, max_completion_tokens=16, learning_rate=1e-3)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_variant(model, tok, examples, variant, training, cache_dir=tmp_path)
    assert result.steps == 2 and result.generated_tokens > 0
    for row in result.history:
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["ema_synced_tensors"] > 0 and 0 < row["agreement_weight_min"] <= 1
    params = dict(model.named_parameters())
    assert any(not torch.equal(adapters[n], params[n]) for n in adapters)
    assert list((tmp_path).glob("negatives-*.json")) and list((tmp_path).glob("embeddings-*.npy"))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedule_warms_up_then_decays(schedule):
    from unisd_components.trainer import _schedule

    factor = _schedule(TrainingConfig(warmup_ratio=0.2, schedule=schedule), total_steps=10)
    values = [factor(step) for step in range(10)]
    assert values[0] < values[1] < values[2] == 1.0  # 2 warm-up steps, then the peak
    if schedule == "constant":
        assert values[2:] == [1.0] * 8
    else:
        assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False)) and values[-1] < 0.2
    if schedule == "cosine":
        assert values[6] == pytest.approx(0.5)  # halfway through the decay


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_agreement_with_induced_instructions(level, tiny_model_and_tokenizer, cache_dir):
    model, tok = tiny_model_and_tokenizer
    variant = VariantConfig(agreement=AgreementConfig(k=2, strategy="induction", level=level))
    result = train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=cache_dir)
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    assert 0 < result.history[-1]["agreement_weight_min"] <= 1
    assert list(cache_dir.glob("instructions-*.json"))


def test_kl_metric_is_the_forward_kl_whatever_the_divergence(tiny_model_and_tokenizer, cache_dir):
    """Under forward KL (alpha 0) the KL metric is the divergence term itself (reused, not recomputed);
    under JSD it is still the forward KL, which is larger than the JSD here."""
    model, tok = tiny_model_and_tokenizer
    forward = train_variant(model, tok, _examples(), VariantConfig(), TRAINING, cache_dir=cache_dir)
    for row in forward.history:
        assert row["kl"] == pytest.approx(row["loss_divergence"], rel=1e-6) and row["kl"] > 0
    jsd = train_variant(model, tok, _examples(), VariantConfig(alpha=0.5), TRAINING, cache_dir=cache_dir)
    assert all(row["kl"] > row["loss_divergence"] > 0 for row in jsd.history)


def test_setup_generations_decode_in_wide_batches_on_a_cpu(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    # Contrastive negatives are generated once in setup. On a CPU a decoding step reads every weight
    # whatever the rows, so up to 64 prompts decode together, not a training batch (2 here) at a time.
    from unisd_components import generation

    model, tok = tiny_model_and_tokenizer
    batches: list[int] = []
    original = generation.generate_texts

    def spy(model, tokenizer, message_lists, max_new_tokens, temperature=0.7, seed=0, batch_size=8):
        batches.append(batch_size)
        return original(model, tokenizer, message_lists, max_new_tokens, temperature, seed, batch_size)

    monkeypatch.setattr(generation, "generate_texts", spy)
    variant = VariantConfig(contrastive=ContrastiveConfig())
    training = TRAINING.model_copy(update={"max_steps": 1})
    train_variant(model, tok, _examples(), variant, training, cache_dir=tmp_path)
    assert batches == [64]  # the 6 examples' negatives in one batch
    assert trainer_module._setup_generation_rows(128, model) == 128  # a wider training batch stays
