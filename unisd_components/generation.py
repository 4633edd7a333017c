"""Batched sampling of chat completions as text: induced instructions, negative demonstrations.

Left padding (so every row's generation starts right after its own prompt), the KV cache, the
prompts rendered as training renders them (:mod:`unisd_components.chat`), and a seeded RNG that does not disturb the
caller's global torch RNG state. The model is put in eval mode for the call and restored after.

Example::

    texts = generate_texts(model, tok, [[{"role": "user", "content": "Hi"}]], max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unisd_components.chat import render_prompt

__all__ = ["generate_texts"]


def generate_texts(
    model,
    tokenizer,
    message_lists: Sequence[Sequence[dict]],
    max_new_tokens: int,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 8,
) -> list[str]:
    """One completion per message list, decoded without special tokens. ``temperature=0``: greedy."""
    if not message_lists:
        return []
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, messages) for messages in message_lists]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature > 0
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}
    was_training = model.training
    old_side = tokenizer.padding_side
    fork_devices = [device] if device.type == "cuda" else []
    outputs: list[str] = []
    try:
        model.eval()
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(
                    prompts[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    use_cache=True,
                    do_sample=sample,
                    **{k: v for k, v in sampling.items() if k != "do_sample"},
                )
                new_tokens = generated[:, batch["input_ids"].shape[1] :]
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return [text.strip() for text in outputs]
