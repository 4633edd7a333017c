"""LoRA adapters (peft) for parameter-efficient self-distillation.

The trainer works on the returned ``PeftModel`` like on any model; because the student then trains only
adapter weights, the frozen teacher can share the base weights (adapters disabled) and an EMA teacher can
be a second adapter on the same base (no second copy of the model). See ``unisd_components.teachers``.

Example::

    model = apply_lora(model, r=64, alpha=128, target_modules="all-linear")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "adapters_folded",
    "apply_lora",
    "is_peft_model",
    "lora_layers",
    "merged_for_inference",
]

# Attention and MLP projections of Llama/Qwen/Mistral/Gemma-style decoders (the paper's choice).
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (adapters injected, base weights frozen)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def lora_layers(model: nn.Module) -> dict:
    """peft LoRA layers by their module name (empty for a plain model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply_lora(
    model: nn.Module,
    r: int = 64,
    alpha: float | None = None,
    target_modules: Sequence[str] | str | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap ``model`` with a fresh LoRA adapter named ``default`` (B = 0: the wrapped model equals the base).

    ``alpha`` defaults to ``2 * r``; ``target_modules`` to the attention and MLP projections
    (``"all-linear"`` is also accepted). Only the adapter weights are trainable afterwards.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if is_peft_model(model):
        raise ValueError("model already has peft adapters; apply_lora expects a plain transformers model")
    if target_modules is None:
        target_modules = list(DEFAULT_TARGET_MODULES)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=float(2 * r if alpha is None else alpha),
        target_modules=target_modules,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    fused = _fused_linear_class()
    for layer in lora_layers(model).values():
        if type(layer) is fused.__base__:
            layer.__class__ = fused  # same state, a forward with fewer passes over the output
    return model


_FUSED_LINEAR = None


def _fused_linear_class():
    """peft's LoRA ``Linear`` with one change: the common case (one plain adapter, no active dropout, fp32 or
    matching dtypes) adds its update inside one matmul, ``addmm_(base(x), x A^T, (s B)^T)``.

    peft computes ``base(x) + (B (A x)) * s``: the update is written, scaled and added in three passes over
    the ``[tokens, out_features]`` output, and the scaling runs again in the backward. On two CPU cores a
    training forward and backward of SmolLM2-135M with r = 16 on all seven projections spent ~12% of its
    time in those passes (``benchmarks/lora_forward.py``). The function and its gradients are the same up
    to float rounding (``tests/test_lora.py``); every other case runs peft's own forward.
    """
    global _FUSED_LINEAR
    if _FUSED_LINEAR is None:
        from peft.tuners.lora.layer import Linear

        class FusedLoraLinear(Linear):
            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                adapter = _plain_adapter(self, x, args, kwargs)
                if adapter is None:
                    return super().forward(x, *args, **kwargs)
                base = self.get_base_layer()
                a = self.lora_A[adapter].weight
                b = self.lora_B[adapter].weight * self.scaling[adapter]
                flat = x.reshape(-1, x.shape[-1])
                out = torch.nn.functional.linear(flat, base.weight, base.bias)
                out = out.addmm_(torch.nn.functional.linear(flat, a), b.t())
                return out.view(*x.shape[:-1], out.shape[-1])

        FusedLoraLinear.__module__ = __name__
        FusedLoraLinear.__qualname__ = "FusedLoraLinear"
        _FUSED_LINEAR = FusedLoraLinear
    return _FUSED_LINEAR


def _plain_adapter(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter ``layer`` can run fused on ``x``, or None (peft's own forward runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = list(layer.active_adapters)
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    adapter = active[0]
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return None  # peft draws the mask
    base = layer.get_base_layer()
    if adapter in layer.lora_variant or layer.lora_bias.get(adapter, False) or type(base) is not nn.Linear:
        return None
    weights = (base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
    if any(w.dtype != x.dtype or w.device != x.device for w in weights):
        return None
    return adapter


def merged_for_inference(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA adapters merged into fp32 base weights, for inference only; else unchanged.

    The merged model computes the same function with one matmul per projection instead of three (on
    two CPU cores, evaluation of SmolLM2-135M with r = 16 on seven projections: see the quickstart's
    figures in README.md). Adapters stay unmerged when any adapted base weight is not fp32: added to bf16
    weights, a small LoRA update mostly rounds away (bf16 keeps 8 bits of mantissa), so the merged model
    would not be the trained one. Merging replaces the adapted modules in place: use the result, not
    ``model``, afterwards, and only when the adapters will not train again.
    """
    if not is_peft_model(model):
        return model
    weights = [layer.get_base_layer().weight for layer in lora_layers(model).values()]
    if not weights or any(w.dtype != torch.float32 for w in weights):
        return model
    return model.merge_and_unload()


def _foldable(layer, adapter: str) -> bool:
    from peft.tuners.lora.layer import Linear

    weight = getattr(layer.get_base_layer(), "weight", None)
    return (
        type(layer) in (Linear, _fused_linear_class())
        and weight is not None
        and weight.dtype == torch.float32
        and adapter not in layer.lora_variant  # plain LoRA: no DoRA magnitude, no bias of its own
        and not layer.lora_bias.get(adapter, False)
    )


@contextmanager
def adapters_folded(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, each LoRA layer's active adapter is folded into a merged fp32 copy of its base weight,
    so an inference pass runs one matmul per projection instead of three; on exit the layers get their
    own base weights back (the same tensors: frozen weights stay bit for bit frozen).

    For no-grad passes only (sampling, teacher scoring): a merged layer gives its adapter no gradient, so
    entering with gradients enabled raises. Layers that cannot be folded exactly (adapters disabled,
    several active adapters, DoRA or LoRA bias, non-fp32 base weights: a small update rounds away in
    bf16) keep their adapter path. On CUDA the merged copies (the adapted weights' size) are made only
    when that much memory is free. A plain model passes through unchanged.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("adapters_folded is for inference: enter it under torch.no_grad()")
    folded = []
    for layer in lora_layers(model).values():
        active = list(layer.active_adapters)
        if layer.disable_adapters or layer.merged or len(active) != 1 or not _foldable(layer, active[0]):
            continue
        folded.append((layer, active[0]))
    if folded and _no_room_for_copies([layer.get_base_layer().weight for layer, _ in folded]):
        folded = []
    originals = []
    try:
        for layer, adapter in folded:
            base = layer.get_base_layer()
            originals.append((layer, adapter, base.weight.data))
            base.weight.data = base.weight.data + layer.get_delta_weight(adapter)
            layer.merged_adapters.append(adapter)  # peft's forward now runs the base layer alone
        yield model
    finally:
        for layer, adapter, weight in reversed(originals):
            layer.get_base_layer().weight.data = weight
            if adapter in layer.merged_adapters:  # (peft unmerges by itself if adapters were disabled inside)
                layer.merged_adapters.remove(adapter)


def _no_room_for_copies(weights: list[torch.Tensor]) -> bool:
    device = weights[0].device
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    needed = sum(w.numel() * w.element_size() for w in weights)
    return free < needed + (1 << 30)
