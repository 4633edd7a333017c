"""ema_update_: exact math on a small module, and on a peft LoRA Llama where the adapters must move."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from unisd_components.ema import ema_update_


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_ema_math_on_small_module():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    teacher = copy.deepcopy(student).requires_grad_(False)
    student[2].weight.requires_grad_(False)  # not trained by the student -> must not move
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    n_updated = ema_update_(teacher, student, beta=0.9)
    assert n_updated == 3
    student_params = dict(student.named_parameters())
    for name, phi in teacher.named_parameters():
        if name == "2.weight":
            assert torch.equal(phi, before[name])
        else:
            expected = 0.9 * before[name] + 0.1 * student_params[name].detach()
            torch.testing.assert_close(phi, expected)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_beta_zero_copies_and_one_keeps():
    student = nn.Linear(2, 2)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student.weight.mul_(3.0)
    ema_update_(teacher, student, beta=1.0)
    assert not torch.equal(teacher.weight, student.weight)
    ema_update_(teacher, student, beta=0.0)
    assert torch.equal(teacher.weight, student.weight)


def test_ema_refuses_missing_or_shared_parameters():
    student = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no parameter"):
        ema_update_(nn.Linear(2, 2, bias=False), student, 0.9)
    with pytest.raises(ValueError, match="deep-copy"):
        ema_update_(student, student, 0.9)


def test_ema_moves_lora_adapter_weights_toward_the_student():
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(
        _tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    # one real optimizer step on the student: LoRA B starts at 0, so it moves off it
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 64, (2, 8))
    student(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    lora_b = [n for n in trained if "lora_B" in n]
    assert all(not torch.equal(trained[n], before[n]) for n in lora_b)

    n_updated = ema_update_(teacher, student, beta=0.9)
    assert n_updated == len(trained)
    after = dict(teacher.named_parameters())
    for name, theta in trained.items():
        torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * theta)
        # strictly closer to the student than before
        if not torch.equal(before[name], theta):
            assert (after[name] - theta).norm() < (before[name] - theta).norm()
    # frozen base weights of the teacher did not move
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(after[n], before[n]) for n in base)
    # and the teacher's outputs changed: the EMA teacher is not inert under LoRA
    with torch.no_grad():
        reference = copy.deepcopy(teacher)
        for name, p in reference.named_parameters():
            p.copy_(before[name])
        assert not torch.allclose(teacher(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_ema_second_adapter_teacher_on_the_shared_base_model():
    """Memory-lean layout for large models: the teacher is a second adapter on the student's base."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(_tiny_llama(), lora)
    model.add_adapter("teacher", lora)
    model.set_adapter("default")  # only the student's adapter trains
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn_like(p))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    n = ema_update_(model, model, beta=0.5, rename=lambda name: name.replace(".default.", ".teacher."))
    assert n == len(trainable)
    for name in trainable:
        t_name = name.replace(".default.", ".teacher.")
        torch.testing.assert_close(params[t_name], 0.5 * before[t_name] + 0.5 * before[name])
        assert torch.equal(params[name], before[name])  # the student is untouched
    with pytest.raises(ValueError, match="deep-copy"):
        ema_update_(model, model, beta=0.5)
