"""Batched sampling of chat completions as text: induced instructions, negative demonstrations.

Left padding (so every row's generation starts right after its own prompt), the KV cache, the
prompts rendered as training renders them (:mod:`unisd_components.chat`), and a seeded RNG that does not disturb the
caller's global torch RNG state. The model is put in eval mode for the call and restored after.

Why :func:`stated_decoding`: ``generate`` fills every option the caller leaves unset from the model's
own ``generation_config`` (Qwen2.5-Instruct ships ``repetition_penalty`` 1.05, others
``no_repeat_ngram_size``, ``min_length``, top-k/top-p ...), so the same call samples from a different
distribution on every model. Every generation of the project (on-policy samples, negatives, induced
instructions, evaluation's greedy decoding) runs inside it, so its decoding rule is the one its call states
(pure temperature sampling or plain greedy), whatever the checkpoint ships.

Example::

    texts = generate_texts(model, tok, [[{"role": "user", "content": "Hi"}]], max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from unisd_components.chat import encode_prompt
from unisd_components.lora import adapters_folded
from unisd_components.prefill import generate_bucketed

__all__ = ["generate_texts", "greedy_kwargs", "sampling_kwargs", "stated_decoding"]

# Kept from the model's generation config: which tokens start, pad and end a sequence, nothing else.
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def sampling_kwargs(temperature: float) -> dict:
    """Pure temperature sampling from p at ``temperature``: no top-k/top-p, no penalty, no n-gram block."""
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
    }


def greedy_kwargs() -> dict:
    """Plain greedy decoding: argmax of p at every step, no penalty, no n-gram block, one beam."""
    return {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1}


def _generation_owner(model: nn.Module) -> nn.Module:
    """The transformers model whose ``generation_config`` ``generate`` reads (through peft wrappers)."""
    inner = model
    while hasattr(inner, "get_base_model"):
        nxt = inner.get_base_model()
        if nxt is inner:
            break
        inner = nxt
    return inner


@contextlib.contextmanager
def stated_decoding(*models: nn.Module | None) -> Iterator[None]:
    """While inside, each model's ``generation_config`` holds its special token ids and nothing else.

    ``generate`` then takes every decoding option from its call or from transformers' neutral global
    defaults (repetition penalty 1, no n-gram blocking, no minimum length, no suppressed tokens ...), never
    from what the checkpoint ships. Restored on exit.
    """
    from transformers import GenerationConfig

    swapped: list[tuple[nn.Module, object]] = []
    try:
        for model in models:
            if model is None:
                continue
            owner = _generation_owner(model)
            config = getattr(owner, "generation_config", None)
            if config is None or any(o is owner for o, _ in swapped):
                continue
            tokens = {k: getattr(config, k, None) for k in _TOKEN_FIELDS}
            clean = GenerationConfig(**{k: v for k, v in tokens.items() if v is not None})
            swapped.append((owner, config))
            owner.generation_config = clean
        yield
    finally:
        for owner, config in reversed(swapped):
            owner.generation_config = config


def generate_texts(
    model,
    tokenizer,
    message_lists: Sequence[Sequence[dict]],
    max_new_tokens: int,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 8,
) -> list[str]:
    """One completion per message list, decoded without special tokens. ``temperature=0``: greedy.

    Prompts are batched in order of length (returned in the caller's order), each batch prefilled in
    groups of similar length (:func:`unisd_components.prefill.generate_bucketed`); a LoRA model generates
    with its adapter folded into its weights (:func:`unisd_components.lora.adapters_folded`).
    """
    if not message_lists:
        return []
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, messages) for messages in message_lists]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoding = sampling_kwargs(temperature) if temperature > 0 else greedy_kwargs()
    was_training = model.training
    fork_devices = [device] if device.type == "cuda" else []
    outputs: list[str] = []
    try:
        model.eval()
        with (
            torch.random.fork_rng(devices=fork_devices),
            torch.inference_mode(),
            stated_decoding(model),
            adapters_folded(model),
        ):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                new_tokens = generate_bucketed(
                    model,
                    [prompts[i] for i in order[start : start + batch_size]],
                    pad_id=pad_id,
                    max_new_tokens=max_new_tokens,
                    use_cache=True,
                    **decoding,
                )
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    texts = [""] * len(prompts)
    for i, text in zip(order, outputs, strict=True):
        texts[i] = text.strip()
    return texts
