"""LoRA: apply_lora, the teachers that share the base weights, and EMA moving the teacher's adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from unisd_components import trainer as trainer_module
from unisd_components.config import EMAConfig, TrainingConfig, VariantConfig
from unisd_components.lora import adapters_folded, apply_lora, is_peft_model, merged_for_inference
from unisd_components.teachers import AdapterTeacher, DisabledAdapterTeacher, make_teacher
from unisd_components.trainer import TrainingExample, train_variant

TRAINING = TrainingConfig(
    max_steps=2, batch_size=2, max_completion_tokens=8, learning_rate=1e-2, warmup_ratio=0.0
)


def _examples() -> list[TrainingExample]:
    return [
        TrainingExample(
            id=f"lora/{i}",
            messages=[{"role": "user", "content": f"Name a number larger than {i}."}],
            demonstration=f"{i + 1} is larger than {i}.",
        )
        for i in range(4)
    ]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_apply_lora_trains_adapters_only_and_starts_as_the_base(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    base_logits = _logits(model, ids)
    wrapped = apply_lora(model, r=4, alpha=8)
    assert is_peft_model(wrapped)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    torch.testing.assert_close(_logits(wrapped, ids), base_logits)
    with pytest.raises(ValueError, match="already has peft adapters"):
        apply_lora(wrapped, r=4)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_model_and_tokenizer[0], r=0)


def _trained_adapter(model):
    """LoRA with nonzero B, so the adapted model differs from its base."""
    wrapped = apply_lora(copy.deepcopy(model), r=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return wrapped.eval()


def _peft_forward_copy(model):
    """A deep copy of ``model`` whose LoRA layers run peft's own forward (the reference)."""
    from peft.tuners.lora.layer import Linear

    reference = copy.deepcopy(model)
    for layer in lora_layers_of(reference):
        layer.__class__ = Linear
    return reference


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids).logits.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_forward_is_peft_forward_in_float64(tiny_model_and_tokenizer):
    # apply_lora's layers add the update inside one matmul; the function and every adapter gradient are
    # peft's (float64, so only the order of additions differs). alpha / r = 1.5 is not a power of two.
    model = copy.deepcopy(tiny_model_and_tokenizer[0]).double()
    ids = torch.tensor([[1, 5, 9, 13, 17], [2, 4, 6, 8, 10]])
    wrapped = apply_lora(model, r=4, alpha=6).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    reference = _peft_forward_copy(wrapped)
    assert {type(layer).__name__ for layer in lora_layers_of(wrapped)} == {"FusedLoraLinear"}
    loss, grads = _loss_and_grads(wrapped, ids)
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).norm() <= 1e-9 * ref_grads[name].norm(), name
    with wrapped.disable_adapter(), reference.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(
            wrapped(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0
        )


def test_fused_lora_forward_makes_one_pass_over_the_output(tiny_model_and_tokenizer):
    # peft writes B A x, scales it and adds it: three passes over each [tokens, out] output. The fused
    # forward adds the update inside the matmul, and draws peft's dropout mask when dropout is active.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape[-2:] == (5, self.width):
                self.names.append(func.__name__)  # an op writing a whole [tokens, out] output
            return out

    ids = torch.tensor([[1, 5, 9, 13, 17]])

    def projection_ops(model) -> list[str]:
        layer = next(lay for lay in lora_layers_of(model) if lay.base_layer.out_features > 64)
        x = torch.randn(1, 5, layer.base_layer.in_features)
        with Ops() as ops, torch.no_grad():
            ops.width = layer.base_layer.out_features
            layer(x)
        return ops.names

    fused = apply_lora(copy.deepcopy(tiny_model_and_tokenizer[0]), r=4)
    assert projection_ops(fused) == ["mm.default", "addmm_.default", "view.default"]
    assert {"mul.Tensor", "add.Tensor"} <= set(projection_ops(_peft_forward_copy(fused)))
    dropped = apply_lora(copy.deepcopy(tiny_model_and_tokenizer[0]), r=4, dropout=0.5).train()
    assert "addmm_.default" not in projection_ops(dropped)  # peft's forward: its dropout mask
    assert "addmm_.default" in projection_ops(dropped.eval())  # dropout off in eval: fused again
    wrapped = apply_lora(copy.deepcopy(tiny_model_and_tokenizer[0]), r=4)
    torch.testing.assert_close(
        _logits(wrapped.to(torch.bfloat16), ids).float(), _logits(_peft_forward_copy(wrapped), ids).float()
    )  # bf16 runs too (B = 0: both are the base)


def test_merged_for_inference_is_the_same_function_without_adapters(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ids = torch.tensor([[1, 5, 9, 13, 17], [2, 4, 6, 8, 10]])
    wrapped = _trained_adapter(model)
    adapted_logits = _logits(wrapped, ids)
    assert not torch.allclose(adapted_logits, _logits(model, ids), atol=1e-4)  # the adapter matters
    merged = merged_for_inference(wrapped)
    assert not is_peft_model(merged)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), adapted_logits, rtol=1e-5, atol=1e-5)
    assert merged_for_inference(model) is model  # a plain model is returned as it is


def test_merged_for_inference_keeps_adapters_over_low_precision_weights(tiny_model_and_tokenizer):
    # bf16 base weights would round a small LoRA update away: the adapters must stay unmerged.
    wrapped = _trained_adapter(copy.deepcopy(tiny_model_and_tokenizer[0]).to(torch.bfloat16))
    assert merged_for_inference(wrapped) is wrapped and is_peft_model(wrapped)


def test_adapters_folded_is_the_same_function_and_gives_the_base_weights_back(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ids = torch.tensor([[1, 5, 9, 13, 17], [2, 4, 6, 8, 10]])
    wrapped = _trained_adapter(model)
    adapted_logits = _logits(wrapped, ids)
    bases = {n: p for n, p in wrapped.named_parameters() if "lora_" not in n}
    saved = {n: p.detach().clone() for n, p in bases.items()}
    storage = {n: p.data_ptr() for n, p in bases.items()}
    with torch.no_grad(), adapters_folded(wrapped) as folded:
        assert folded is wrapped
        # Folded: every projection runs its base layer alone, on merged weights.
        assert all(layer.merged for layer in lora_layers_of(wrapped))
        torch.testing.assert_close(_logits(wrapped, ids), adapted_logits, rtol=1e-5, atol=1e-5)
        assert not torch.equal(
            dict(wrapped.named_parameters())[_a_q_proj(wrapped)], saved[_a_q_proj(wrapped)]
        )
    assert not any(layer.merged for layer in lora_layers_of(wrapped))
    after = dict(wrapped.named_parameters())
    # The same tensors, bit for bit (not merged weights minus the update, which would drift).
    assert all(after[n].data_ptr() == storage[n] and torch.equal(after[n], saved[n]) for n in bases)
    torch.testing.assert_close(_logits(wrapped, ids), adapted_logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inference"):
        with adapters_folded(wrapped):
            pass


def test_adapters_folded_leaves_disabled_and_low_precision_adapters_alone(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    wrapped = _trained_adapter(model)
    with torch.no_grad(), wrapped.disable_adapter(), adapters_folded(wrapped):
        assert not any(layer.merged for layer in lora_layers_of(wrapped))
        torch.testing.assert_close(_logits(wrapped, ids), _logits(model, ids))  # still the base model
    low = _trained_adapter(copy.deepcopy(model).to(torch.bfloat16))
    with torch.no_grad(), adapters_folded(low):
        assert not any(layer.merged for layer in lora_layers_of(low))
    with torch.no_grad(), adapters_folded(model):  # a plain model passes through
        torch.testing.assert_close(_logits(model, ids), _logits(model, ids))


def lora_layers_of(model):
    from unisd_components.lora import lora_layers

    return list(lora_layers(model).values())


def _a_q_proj(model) -> str:
    return next(n for n, _ in model.named_parameters() if n.endswith("q_proj.base_layer.weight"))


def test_teacher_kinds_under_lora(tiny_model_and_tokenizer):
    model = apply_lora(tiny_model_and_tokenizer[0], r=4)
    assert isinstance(make_teacher(model, ema=False), DisabledAdapterTeacher)
    teacher = make_teacher(model, ema=True)
    assert isinstance(teacher, AdapterTeacher)
    # Only the student's adapter trains; the teacher adapter is a frozen copy of it.
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all("unisd_teacher" not in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    student_logits = _logits(model, ids)
    with teacher.active() as module:
        torch.testing.assert_close(_logits(module, ids), student_logits)
    assert model.active_adapter == "default"
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def test_non_fresh_adapter_gets_a_copied_teacher_not_the_base(tiny_model_and_tokenizer):
    model = apply_lora(tiny_model_and_tokenizer[0], r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    teacher = make_teacher(model, ema=False)
    assert isinstance(teacher, AdapterTeacher)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with teacher.active() as module:
        torch.testing.assert_close(_logits(module, ids), _logits(model, ids))


@pytest.fixture()
def spy_teacher(monkeypatch):
    made = []
    real = trainer_module.make_teacher

    def recording(student, **kwargs):
        teacher = real(student, **kwargs)
        made.append(teacher)
        return teacher

    monkeypatch.setattr(trainer_module, "make_teacher", recording)
    return made


def test_frozen_teacher_under_lora_is_the_untouched_base(tiny_model_and_tokenizer, tmp_path, spy_teacher):
    model = apply_lora(tiny_model_and_tokenizer[0], r=4)
    tok = tiny_model_and_tokenizer[1]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_variant(model, tok, _examples(), VariantConfig(), TRAINING, cache_dir=tmp_path)
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert isinstance(spy_teacher[0], DisabledAdapterTeacher)
    params = dict(model.named_parameters())
    assert all(torch.equal(base[n], params[n]) for n in base)
    assert any(not torch.equal(adapters[n], params[n]) for n in adapters)


def test_ema_teacher_adapter_moves_toward_the_student(tiny_model_and_tokenizer, tmp_path, spy_teacher):
    """The published code skips adapter weights, so its EMA teacher never moves under LoRA; ours does."""
    model = apply_lora(tiny_model_and_tokenizer[0], r=4)
    tok = tiny_model_and_tokenizer[1]
    beta = 0.5
    seen = []

    def record(step, metrics):
        teacher = spy_teacher[0]
        student = {
            n.replace(".default.", "."): p.detach().clone()
            for n, p in model.named_parameters()
            if ".default." in n
        }
        mine = {
            n.replace(".unisd_teacher.", "."): p.detach().clone()
            for n, p in model.named_parameters()
            if ".unisd_teacher." in n
        }
        assert len(teacher.parameters()) == len(mine) > 0
        seen.append((student, mine))

    variant = VariantConfig(ema=EMAConfig(beta=beta, sync_steps=1))
    train_variant(model, tok, _examples(), variant, TRAINING, cache_dir=tmp_path, callback=record)
    # Before the first sync the teacher adapter equals the initial student adapter (lora_B = 0).
    previous = {n: p for n, p in seen[0][1].items()}
    first_student = seen[0][0]
    for name, phi in seen[0][1].items():
        if "lora_B" in name:
            # phi_1 = beta * 0 + (1 - beta) * theta_1: the EMA teacher left the base.
            torch.testing.assert_close(phi, (1 - beta) * first_student[name])
            assert phi.abs().sum() > 0
    student, teacher = seen[1]
    for name, phi in teacher.items():
        torch.testing.assert_close(phi, beta * previous[name] + (1 - beta) * student[name])
    # The returned model carries the student's adapter only.
    assert "unisd_teacher" not in model.peft_config
    assert all(".unisd_teacher." not in n for n, _ in model.named_parameters())
