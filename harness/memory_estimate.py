"""GPU memory of one training trial, estimated for ``harness run --dry-run`` (does the batch fit?).

The estimate is a sum of the step's big terms, in bytes (``w`` bytes per weight: 2 in bf16/fp16, 4 in
fp32; ``P`` parameters, ``V`` vocabulary, ``H`` hidden size, ``I`` MLP size, ``n`` layers, ``kv`` KV
width = kv heads × head dim; ``B`` per-device batch, ``Lp`` max prompt, ``T`` max completion tokens,
``S = B·(Lp+T)`` student tokens; ``K`` the agreement contexts):

    weights      P·w                                  (student; LoRA teachers share it)
    teacher      P·w if full fine-tuning, else 0      (frozen or EMA copy; +P·w more for KL-to-base with EMA)
    training     LoRA: A·12 (fp32 adapter, grad, 2 AdamW moments), A = n·r·Σ(in+out) of the targets
                 full: P·(w + 8) (grad, 2 fp32 AdamW moments)
    activations  checkpointing: n·S·H·w + S·(16H + 2I)·w;  without: n·S·(16H + 2I)·w
    kv cache     2·n·B·(Lp+T)·kv·w                    (generation)
    teacher fwd  min(R·(2Lp+T), 32768)·(16H + 2I)·w   (R = B·(1 + K + contrastive) rows, one chunk live)
    loss         fused: 8·C·V·4, C = fused_chunk_tokens (default 2^24/V) positions
                 unfused: 5.4·B·T·V·4                (measured: ~5.4 [B,T,V] fp32 tensors deep, issue 16)

Activation constants are the usual per-token, per-layer bytes of a decoder with fused (SDPA/flash)
attention; a real run adds the CUDA context and allocator slack (count ~2 GB). The figure is a guide to
whether a planned batch fits, not a guarantee.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unisd_components.config import TrainingConfig, VariantConfig
from unisd_components.fused_loss import chunk_tokens_for

__all__ = ["ModelShape", "describe_memory", "format_memory", "model_shape", "trial_memory"]

GB = 1024**3
_TEACHER_TOKEN_BUDGET = 32768  # unisd_components.step: tokens per teacher forward chunk on CUDA
_UNFUSED_DEPTH = 5.4  # [B,T,V] fp32 tensors live at the unfused loss's peak (measured, issue 16)
_FUSED_DEPTH = 8  # [chunk,V] fp32 tensors live at the fused loss's peak (forward kept chunk + backward)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of an architecture."""

    params: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # kv heads x head dim


# The paper's models and the built-ins (from their config.json), for dry runs without the weights.
_KNOWN: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape(494_000_000, 151_936, 896, 4864, 24, 128),
    "qwen2.5-1.5b": ModelShape(1_544_000_000, 151_936, 1536, 8960, 28, 256),
    "qwen2.5-3b": ModelShape(3_086_000_000, 151_936, 2048, 11008, 36, 256),
    "qwen2.5-7b": ModelShape(7_616_000_000, 152_064, 3584, 18944, 28, 512),
    "llama-3.1-8b": ModelShape(8_030_000_000, 128_256, 4096, 14336, 32, 1024),
    "gemma-3-4b": ModelShape(3_880_000_000, 262_208, 2560, 10240, 34, 1024),
    "smollm2-135m": ModelShape(134_500_000, 49_152, 576, 1536, 30, 192),
    "tiny-random:llama": ModelShape(3_300_000, 49_152, 64, 128, 2, 32),
}


def model_shape(ref: str) -> ModelShape | None:
    """The shape of ``ref``: a known model by name, else a local ``config.json``; None if unknown."""
    low = ref.lower()
    for name, shape in _KNOWN.items():
        if name in low:
            return shape
    config = Path(ref) / "config.json"
    if not config.is_file():
        return None
    try:
        c = json.loads(config.read_text(encoding="utf-8"))
        c = c.get("text_config", c)
        H, V, n, M = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["intermediate_size"]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or H // heads
        kv = c.get("num_key_value_heads", heads) * head_dim
    except (OSError, ValueError, KeyError, TypeError):
        return None
    per_layer = H * (H + 2 * kv) + H * H + 3 * H * M
    tied = c.get("tie_word_embeddings", False)
    return ModelShape(n * per_layer + V * H * (1 if tied else 2), V, H, M, n, kv)


def _lora_params(shape: ModelShape, r: int, targets: list[str]) -> int:
    H, M, kv = shape.hidden, shape.intermediate, shape.kv_width
    sizes = {
        "q_proj": (H, H),
        "k_proj": (H, kv),
        "v_proj": (H, kv),
        "o_proj": (H, H),
        "gate_proj": (H, M),
        "up_proj": (H, M),
        "down_proj": (M, H),
    }
    return shape.layers * r * sum(sum(sizes[t]) for t in targets if t in sizes)


def trial_memory(
    shape: ModelShape,
    variant: VariantConfig,
    training: TrainingConfig,
    *,
    weight_bytes: int = 2,
    lora: Any = None,
) -> dict[str, float]:
    """The terms of the module docstring's formula, in bytes, and their ``total``."""
    w = weight_bytes
    P, V, H, M, n = shape.params, shape.vocab, shape.hidden, shape.intermediate, shape.layers
    B, Lp, T = training.batch_size, training.max_prompt_tokens, training.max_completion_tokens
    S = B * (Lp + T)
    use_lora = bool(lora is not None and lora.enabled)
    terms: dict[str, float] = {"weights": P * w}
    distills = variant.method != "sft"
    teacher_copies = 0 if use_lora or not distills else 1
    if not use_lora and variant.kl_to_base_beta > 0 and variant.ema is not None:
        teacher_copies += 1
    terms["teacher"] = teacher_copies * P * w
    if use_lora:
        terms["training"] = _lora_params(shape, lora.r, list(lora.target_modules)) * 12
    else:
        terms["training"] = P * (w + 8)
    layer = 16 * H + 2 * M
    if training.gradient_checkpointing:
        terms["activations"] = n * S * H * w + S * layer * w
    else:
        terms["activations"] = n * S * layer * w
    terms["kv_cache"] = 2 * n * B * (Lp + T) * shape.kv_width * w if distills else 0
    rows = B * (1 + (variant.agreement.k if variant.agreement else 0) + (1 if variant.contrastive else 0))
    terms["teacher_forward"] = min(rows * (2 * Lp + T), _TEACHER_TOKEN_BUDGET) * layer * w if distills else 0
    if training.fused_loss:
        terms["loss"] = _FUSED_DEPTH * chunk_tokens_for(V, training.fused_chunk_tokens) * V * 4
    else:
        terms["loss"] = _UNFUSED_DEPTH * B * T * V * 4
    terms["total"] = sum(terms.values())
    return terms


def format_memory(terms: dict[str, float], gpu_bytes: float | None, label: str) -> str:
    """One line: the total, its biggest terms, and whether it fits on ``gpu_bytes``."""
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in terms.items() if k != "total" and v >= 0.05 * GB)
    line = f"{label}: ~{terms['total'] / GB:.1f} GB ({parts})"
    if gpu_bytes:
        fits = terms["total"] <= gpu_bytes
        line += f" -> {'fits' if fits else 'does NOT fit'} on {gpu_bytes / GB:.0f} GB"
    return line


def describe_memory(spec: Any, gpu_gb: float | None = None) -> str:
    """``--dry-run``'s memory lines, per model: its largest planned trial and plain SDFT, and whether they
    fit on the GPU this process sees (or on ``gpu_gb``, which wins when given)."""
    from harness.plan import grid_points

    gpu_bytes = None if gpu_gb is None else gpu_gb * GB
    if gpu_bytes is None:
        try:
            import torch

            if torch.cuda.is_available():
                gpu_bytes = float(torch.cuda.get_device_properties(0).total_memory)
        except Exception:  # no usable CUDA: the user can still state --gpu-memory
            gpu_bytes = None
    points = [p for p in grid_points(spec) if p.variant is not None]
    models = spec.models()
    lines = ["  memory     per trial, estimated (formula: harness/memory_estimate.py)"]
    for model in models:
        prefix = f"{model.label}: " if len(models) > 1 else ""
        shape = model_shape(model.ref)
        if shape is None:
            lines.append(f"    {prefix}unknown for {model.ref} (no config.json found locally)")
            continue
        w = 4 if model.dtype == "float32" else 2
        estimates = [
            (p.name, trial_memory(shape, p.variant, p.training, weight_bytes=w, lora=model.lora))
            for p in points
            if len(models) == 1 or p.model == model.label
        ]
        if not estimates:
            lines.append(f"    {prefix}no training trial planned")
            continue
        largest = max(estimates, key=lambda e: e[1]["total"])
        lines.append("    " + format_memory(largest[1], gpu_bytes, f"{prefix}largest ({largest[0]})"))
        sdft = next((e for e in estimates if e[0] == "sdft"), None)
        if sdft is not None and sdft is not largest:
            lines.append("    " + format_memory(sdft[1], gpu_bytes, f"{prefix}sdft"))
    if gpu_bytes is None:
        lines.append("    no GPU seen: pass --gpu-memory GB to check the fit")
    return "\n".join(lines)
