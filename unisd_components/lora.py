"""LoRA adapters (peft) for parameter-efficient self-distillation.

The trainer works on the returned ``PeftModel`` like on any model; because the student then trains only
adapter weights, the frozen teacher can share the base weights (adapters disabled) and an EMA teacher can
be a second adapter on the same base (no second copy of the model). See ``unisd_components.teachers``.

Example::

    model = apply_lora(model, r=64, alpha=128, target_modules="all-linear")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_TARGET_MODULES", "apply_lora", "is_peft_model", "lora_layers", "merged_for_inference"]

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
    return get_peft_model(model, config)


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
