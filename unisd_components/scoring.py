"""Scoring completions: hidden states and log-probs at completion positions only.

Every scored row is laid out ``[left padding | context | completion]`` with the completion (``T`` tokens,
padding after EOS included) at the right edge, so the positions that predict completion tokens are the
last ``T`` positions of the input with its final token dropped. The decoder (the transformer without its
LM head) runs over the whole row, and the LM head runs ONLY over those ``T`` hidden states: logits over
prompt positions are never computed (with V ~ 50k-150k they would dominate the memory of a step).

- :func:`completion_hidden`: final-layer hidden states ``[R,T,H]`` after the final norm.
- :func:`completion_logps`: full-vocabulary log-probs ``[R,T,V]`` (fp32) at a temperature.
- :func:`sampled_token_logps`: log-probs of the given tokens only ``[R,T]``, computed in row chunks so that
  no ``[R,T,V]`` tensor ever exists (the K agreement contexts and the negative context).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "completion_hidden",
    "completion_logits",
    "completion_logps",
    "decoder_and_head",
    "hidden_at",
    "pad_left",
    "sampled_token_logps",
]

# Elements of one fp32 logits chunk in sampled_token_logps (16M floats = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (embeddings + blocks + final norm) and the LM head of a causal LM, peft-wrapped or not.

    Calling the decoder of a peft model directly still applies the injected LoRA layers, and honours
    ``disable_adapter()`` / ``set_adapter()``: those act on the layers, not on the wrapper's forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        raise TypeError(f"{type(base).__name__} does not expose a decoder and an LM head")
    return decoder, head


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``, both ``[R, L]`` long tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def completion_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states ``[R,T,H]`` that predict the completion tokens of each row (``T = completion_len``).

    ``input_ids`` is ``[R, L]`` left-padded, each row ending with its completion. ``lengths`` (``[R]``,
    default all ``T``) is how many completion tokens a row actually carries: rows may drop the padding
    after their EOS, so no compute goes to it; positions ``t >= lengths[r]`` come back as zeros. The
    final token is not fed (nothing is predicted from it). Position ids count real tokens only, so a
    left-padded row is scored exactly as the unpadded one (and as ``generate`` saw it).
    """
    longest = completion_len if lengths is None else int(lengths.max())
    if completion_len < 1 or longest >= input_ids.shape[1]:
        raise ValueError(
            f"completion of {longest} tokens does not fit rows of {input_ids.shape[1]} (context >= 1)"
        )
    decoder, _ = decoder_and_head(model)
    ids = input_ids[:, :-1]
    mask = attention_mask[:, :-1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = hidden.last_hidden_state
    if lengths is None:
        return hidden[:, -completion_len:]
    # Completion token t of row r sits at input column L - len_r + t; the hidden state before it predicts it.
    lengths = lengths.to(hidden.device)
    return hidden_at(hidden, hidden.shape[1] - lengths, lengths, completion_len)


def hidden_at(hidden: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """``[R, steps, H]`` from ``hidden`` ``[R, L, H]``: row ``r``'s states at positions ``starts[r] + t`` for
    ``t < lengths[r]``, zeros after."""
    arange = torch.arange(steps, device=hidden.device)
    starts, lengths = starts.to(hidden.device), lengths.to(hidden.device)
    index = (starts[:, None] + arange[None, :]).clamp(max=hidden.shape[1] - 1)
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    valid = arange[None, :] < lengths[:, None]
    return torch.where(valid[..., None], picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def completion_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on completion hidden states (final logit soft-capping applied where the model uses it)."""
    _, head = decoder_and_head(model)
    logits = head(hidden)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def completion_logps(model: nn.Module, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary log-probs ``[R,T,V]`` in fp32 of ``logits / temperature``."""
    logits = completion_logits(model, hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def sampled_token_logps(
    model: nn.Module,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Log-probs ``[R,T]`` (fp32) of ``tokens`` (``[R,T]``) under ``logits / temperature``.

    ``temperature`` is a float or a per-row tensor ``[R]``. The logits are built and reduced a few
    (row, position) pairs at a time (about ``chunk_elements`` floats each, whatever ``T``: one row of
    1024 positions at a 152k vocabulary is already 155M floats), so memory stays ``O(chunk)`` instead of
    ``O(R·T·V)``. Equal to ``log_softmax(logits / temperature).gather(tokens)``.
    """
    rows, steps = tokens.shape
    vocab = _vocab_size(model)
    per_chunk = max(1, chunk_elements // max(1, vocab))
    if not torch.is_tensor(temperature):
        temperature = torch.full((rows,), float(temperature))
    temperature = temperature.to(device=hidden.device, dtype=torch.float32)
    flat_hidden = hidden.reshape(rows * steps, hidden.shape[-1])
    flat_tokens = tokens.reshape(rows * steps, 1).to(hidden.device)
    flat_temperature = temperature[:, None].expand(rows, steps).reshape(rows * steps, 1)
    out = torch.empty(rows * steps, dtype=torch.float32, device=hidden.device)
    for start in range(0, rows * steps, per_chunk):
        stop = min(rows * steps, start + per_chunk)
        logits = completion_logits(model, flat_hidden[start:stop]).float()
        logits = logits / flat_temperature[start:stop]
        picked = logits.gather(-1, flat_tokens[start:stop]).squeeze(-1)
        out[start:stop] = picked - torch.logsumexp(logits, dim=-1)
    return out.view(rows, steps)


def _vocab_size(model: nn.Module) -> int:
    _, head = decoder_and_head(model)
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(model.config.vocab_size)
