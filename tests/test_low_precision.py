"""Issue 11 item 3: full fine-tuning in bf16 keeps fp32 master weights, so lr 2e-5 updates (and the EMA
teacher's small steps) are not lost to bf16 rounding."""

from __future__ import annotations

import copy

import torch

from unisd_components.config import TrainingConfig, VariantConfig
from unisd_components.teachers import make_teacher
from unisd_components.trainer import TrainingExample, train_variant


def _fraction(count: int, model) -> float:
    return count / sum(p.numel() for p in model.parameters())


def test_bf16_full_finetuning_tracks_the_fp32_reference(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    examples = [
        TrainingExample(
            id=f"x{i}", messages=[{"role": "user", "content": f"What is {i}+{i}?"}],
            demonstration=f"The answer is {2 * i}.",
        )
        for i in range(4)
    ]
    training = TrainingConfig(
        max_steps=6, batch_size=2, learning_rate=2e-5, warmup_ratio=0.0, schedule="constant",
        max_completion_tokens=8,
    )
    reference = copy.deepcopy(model)  # fp32
    low = copy.deepcopy(model).to(torch.bfloat16)
    before = [p.detach().clone() for p in low.parameters()]
    train_variant(reference, tok, examples, VariantConfig(method="sft"), training)
    train_variant(low, tok, examples, VariantConfig(method="sft"), training)

    changed = sum(int((p != b).sum()) for p, b in zip(low.parameters(), before, strict=True))
    # The best a bf16 model can hold is the fp32 result rounded to bf16: most weights must equal it.
    rounded = [q.detach().to(torch.bfloat16) for q in reference.parameters()]
    same = sum(int((p == r).sum()) for p, r in zip(low.parameters(), rounded, strict=True))
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())  # the model stays in bf16
    assert _fraction(changed, low) > 0.6  # bf16 AdamW in place: ~0.3 (updates below the rounding step)
    assert _fraction(same, low) > 0.6  # bf16 AdamW in place: ~0.1


def test_bf16_ema_teacher_moves_under_full_finetuning(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    student = model.to(torch.bfloat16)
    teacher = make_teacher(student, ema=True)
    start = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(3e-4 * torch.sign(p))  # a few lr-2e-5 steps' worth of drift
    for _ in range(10):
        teacher.ema_update(student, 0.9)  # each step moves phi by ~3e-5: below bf16's step at |w|~0.02
    moved = sum(int((p != s).sum()) for p, s in zip(teacher.parameters(), start, strict=True))
    assert _fraction(moved, student) > 0.5
