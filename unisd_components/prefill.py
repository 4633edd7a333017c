"""Batched generation whose prompt prefill costs the prompts' real tokens, not rows x the longest prompt.

``generate`` on a left-padded batch runs every prompt at the width of the longest one: the quickstart's
training prompts (95 to 266 tokens) are 48% padding, and on a CPU the prefill is half of a training
step's sampling. :func:`generate_bucketed` cuts the prompts into groups of similar length
(:func:`length_buckets`: padding traded against a fixed cost per forward), runs each group's prompts
but their last token once, assembles the groups' KV caches, left-padded, into one cache for the whole
batch, and lets ``generate`` feed every row's last prompt token and decode all rows together, as before.

The result is the function plain left-padded ``generate`` computes: positions count real tokens only and
padding is masked out of attention, so a row's logits do not depend on its neighbours (up to float
summation order). Models whose cache is not a plain growing cache in every layer (sliding-window or
linear-attention layers, encoder-decoders) keep the single padded prefill.

The same two pieces serve scoring: :func:`prefix_kv` runs token sequences (with gradient when enabled)
and returns each one's KV; :func:`hidden_after_prefixes` feeds more tokens after such KV and returns the
final hidden states a whole-row forward computes there. The training step uses them so that work is done
once: the student's prompt pass also serves its sampling, teacher contexts that share a long prefix
(:func:`shared_prefix_lengths`) run it once, and a frozen teacher's contexts are kept across trials
(:func:`keep_context_prefix`).

Example::

    new_tokens = generate_bucketed(model, [[1, 5, 9], [1, 7]], pad_id=0, max_new_tokens=8, do_sample=False)
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from unisd_components.scoring import decoder_and_head, hidden_at, pad_left

__all__ = [
    "common_prefix_length",
    "common_prefix_worth_sharing",
    "cache_kwarg",
    "hidden_after_prefixes",
    "prefix_kv",
    "shared_prefix_lengths",
    "cache_from_rows",
    "context_prefix",
    "keep_context_prefix",
    "forward_overhead_tokens",
    "generate_bucketed",
    "kept_prefill",
    "length_buckets",
    "plain_cache_layers",
    "prefills_kept",
]


@functools.cache
def cache_kwarg() -> str:
    """transformers renamed ``past_key_values`` (forward and generate) to ``cache``; the old name goes in
    6.0. Asked lazily: importing a model class at import time loads transformers' modelling code."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


# What one more forward costs, in prompt tokens of padding it would save: a CPU runs a few hundred
# tokens per forward near its matmul peak, a GPU thousands (its per-call overhead is the larger part).
_FORWARD_OVERHEAD_TOKENS = {"cpu": 96, "cuda": 2048}
_DEFAULT_OVERHEAD_TOKENS = 512


def forward_overhead_tokens(device: torch.device) -> int:
    """What one more forward costs on ``device``, in tokens: the ``overhead_tokens`` of :func:`length_buckets`."""
    return _FORWARD_OVERHEAD_TOKENS.get(device.type, _DEFAULT_OVERHEAD_TOKENS)


def length_buckets(
    lengths: Sequence[int], overhead_tokens: int, max_rows: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` in groups of consecutive sorted lengths that minimise the tokens computed.

    A group of rows runs at its longest row's width: it costs ``rows x longest + overhead_tokens``;
    ``max_rows`` caps a group's rows, ``max_tokens`` its ``rows x longest`` (a row longer than that runs
    alone). Exact dynamic programming over the sorted lengths (``O(n^2)``, n = a batch). Groups come
    shortest first, rows within a group in ascending length (rows already in ascending order keep their
    order).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    cap = n if max_rows is None else max(1, max_rows)
    best = [0] * (n + 1)  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]
        rows = cap if max_tokens is None else max(1, min(cap, max_tokens // max(1, width)))
        best[j], cut[j] = min(
            (best[i] + (j - i) * width + overhead_tokens, i) for i in range(max(0, j - rows), j)
        )
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def plain_cache_layers(cache) -> list | None:
    """The cache's per-layer (keys, values) when every layer is a plain growing layer; else None."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    if any(not isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes new keys and values into spare room instead of concatenating.

        ``DynamicLayer.update`` copies the whole cache at every decoding step (``torch.cat``): at 36 rows
        of ~350 positions that copy was a quarter of a CPU decoding step. Here the time axis has room for
        ``capacity`` positions (doubled when full); ``keys``/``values`` are views of the filled part.
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self._length = 0
            self._keys = keys.new_empty((*keys.shape[:-2], max(capacity, keys.shape[-2]), keys.shape[-1]))
            self._values = values.new_empty((*values.shape[:-2], self._keys.shape[-2], values.shape[-1]))
            self.update(keys, values)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            new = key_states.shape[-2]
            if self._length + new > self._keys.shape[-2]:
                room = 2 * (self._length + new)
                keys = self._keys.new_empty((*self._keys.shape[:-2], room, self._keys.shape[-1]))
                values = self._values.new_empty((*self._values.shape[:-2], room, self._values.shape[-1]))
                keys[..., : self._length, :] = self._keys[..., : self._length, :]
                values[..., : self._length, :] = self._values[..., : self._length, :]
                self._keys, self._values = keys, values
            self._keys[..., self._length : self._length + new, :] = key_states
            self._values[..., self._length : self._length + new, :] = value_states
            self._length += new
            self.keys = self._keys[..., : self._length, :]
            self.values = self._values[..., : self._length, :]
            return self.keys, self.values

    return GrowingLayer


def prefix_kv(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    overhead_tokens: int | None = None,
    token_budget: int | None = None,
) -> list[list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """Per sequence (none empty), per layer ``(keys, values)`` ``[H, len, D]`` of all its tokens under
    ``model`` (a causal LM, peft-wrapped or not: its decoder runs, never the LM head).

    The sequences run in groups of similar length (:func:`length_buckets`), one forward each, of at most
    ``token_budget`` tokens (rows x width; default: no cap). When they all begin with the same tokens (the
    chat template's system turn: 24 tokens for SmolLM2) and running them once saves more than a forward
    costs, that common prefix runs once and each sequence runs only the rest after its KV
    (:func:`_kv_after_common`). The tensors are views of each forward's cache (or, after a common prefix,
    its KV joined with the rest's); gradients flow through them when enabled. None: the model's cache is
    not a plain growing cache (the caller scores whole rows instead).
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("prefix_kv needs at least one sequence, none of them empty")
    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    if overhead_tokens is None:
        overhead_tokens = forward_overhead_tokens(device)
    common = common_prefix_worth_sharing(sequences, overhead_tokens)
    if common:
        return _kv_after_common(decoder, sequences, common, pad_id, overhead_tokens, token_budget, device)
    out: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(sequences)
    for chunk in length_buckets([len(s) for s in sequences], overhead_tokens, max_tokens=token_budget):
        ids, mask = pad_left([list(sequences[r]) for r in chunk], pad_id)
        result = decoder(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
            use_cache=True,
        )
        layers = plain_cache_layers(result.past_key_values)
        if layers is None:
            return None
        for i, r in enumerate(chunk):
            n = len(sequences[r])
            out[r] = [(k[i, :, k.shape[-2] - n :], v[i, :, v.shape[-2] - n :]) for k, v in layers]
    return out  # type: ignore[return-value]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many first tokens every sequence has in common, short of the shortest one's last token (it is
    left to feed)."""
    first, n = sequences[0], min(len(s) for s in sequences) - 1
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


def common_prefix_worth_sharing(sequences: Sequence[Sequence[int]], overhead_tokens: int) -> int:
    """:func:`common_prefix_length` when running it once saves more tokens than one more forward costs
    (``overhead_tokens``), else 0."""
    common = common_prefix_length(sequences)
    return common if common > 0 and (len(sequences) - 1) * common > overhead_tokens else 0


def _kv_after_common(
    decoder: nn.Module,
    sequences: Sequence[Sequence[int]],
    common: int,
    pad_id: int,
    overhead_tokens: int,
    token_budget: int | None,
    device: torch.device,
) -> list[list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """:func:`prefix_kv` of sequences whose first ``common`` tokens are the same: those run once, then each
    sequence's rest runs after their KV, in groups of similar rest length (right-padded: a real token never
    attends a padding position after it), at positions ``common, common + 1, ...``."""
    ids = torch.tensor([list(sequences[0][:common])], device=device)
    result = decoder(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(common, device=device)[None, :],
        use_cache=True,
    )
    shared = plain_cache_layers(result.past_key_values)
    if shared is None:
        return None
    shared = [(k[0], v[0]) for k, v in shared]
    rests = [list(s[common:]) for s in sequences]
    out: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(sequences)
    for chunk in length_buckets([len(r) for r in rests], overhead_tokens, max_tokens=token_budget):
        width = max(len(rests[r]) for r in chunk)
        feed = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        feed_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            feed[i, : len(rests[r])] = torch.tensor(rests[r], dtype=torch.long)
            feed_mask[i, : len(rests[r])] = 1
        cache = cache_from_rows([shared] * len(chunk), common)
        decoder(
            input_ids=feed.to(device),
            attention_mask=torch.cat([torch.ones((len(chunk), common), dtype=torch.long), feed_mask], -1).to(device),
            position_ids=(common + torch.arange(width))[None, :].expand(len(chunk), -1).to(device),
            use_cache=True,
            **{cache_kwarg(): cache},
        )
        layers = plain_cache_layers(cache)
        if layers is None:
            return None
        for i, r in enumerate(chunk):
            n = common + len(rests[r])
            out[r] = [(k[i, :, :n], v[i, :, :n]) for k, v in layers]
    return out  # type: ignore[return-value]


def hidden_after_prefixes(
    model: nn.Module,
    prefixes: Sequence[list[tuple[torch.Tensor, torch.Tensor]]],
    feeds: Sequence[Sequence[int]],
    first: Sequence[int],
    steps: int,
    lengths: Sequence[int],
    *,
    pad_id: int,
    token_budget: int | None = None,
) -> torch.Tensor:
    """Final hidden states ``[R, steps, H]`` (after the final norm) of tokens fed after kept prefixes.

    Row ``r`` feeds ``feeds[r]`` after the KV ``prefixes[r]`` (per layer ``[H, n_r, D]``, from
    :func:`prefix_kv`), at positions ``n_r, n_r + 1, ...``; ``out[r, t]`` is the hidden state at feed
    position ``first[r] + t`` for ``t < lengths[r]`` and zeros after. This is what a forward over the whole
    row computes there (a position's state depends only on the tokens up to it), without running the
    prefix again. Rows run in groups of similar feed length, in forwards of at most ``token_budget`` fed
    tokens; gradients flow into the prefixes' tensors when enabled.
    """
    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    if not all(1 <= lengths[r] + first[r] <= len(feeds[r]) or lengths[r] == 0 for r in range(len(feeds))):
        raise ValueError("a row's requested positions run past its feed")
    # Rows run in groups of similar feed length (the padding after a short feed costs whole tokens); within
    # a group, in order of prefix width (a prefix's left padding costs attention and cache copies). A
    # forward holds at most token_budget fed tokens and 512 x token_budget attention scores per head.
    widths = [prefixes[r][0][0].shape[-2] for r in range(len(feeds))]
    chunks: list[list[int]] = []
    for group in length_buckets([len(f) for f in feeds], forward_overhead_tokens(device)):
        feed_width = max(1, max(len(feeds[r]) for r in group))
        chunk: list[int] = []
        for r in sorted(group, key=lambda r: widths[r]):  # ascending: row r is the chunk's widest
            rows = len(chunk) + 1
            if chunk and token_budget is not None and (
                rows * feed_width > token_budget or rows * feed_width * (widths[r] + feed_width) > 512 * token_budget
            ):
                chunks.append(chunk)
                chunk = []
            chunk.append(r)
        chunks.append(chunk)
    pieces: dict[int, torch.Tensor] = {}
    for chunk in chunks:
        width = max(widths[r] for r in chunk)
        feed_width = max(1, max(len(feeds[r]) for r in chunk))
        past_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        ids = torch.full((len(chunk), feed_width), pad_id, dtype=torch.long)
        feed_mask = torch.zeros((len(chunk), feed_width), dtype=torch.long)
        for i, r in enumerate(chunk):
            past_mask[i, width - widths[r] :] = 1
            ids[i, : len(feeds[r])] = torch.tensor(list(feeds[r]), dtype=torch.long)
            feed_mask[i, : len(feeds[r])] = 1
        starts = torch.tensor([widths[r] for r in chunk])[:, None]
        hidden = decoder(
            input_ids=ids.to(device),
            attention_mask=torch.cat([past_mask, feed_mask], dim=-1).to(device),
            position_ids=(starts + torch.arange(feed_width)[None, :]).to(device),
            use_cache=True,
            **{cache_kwarg(): cache_from_rows([prefixes[r] for r in chunk], width)},
        ).last_hidden_state
        picked = hidden_at(
            hidden, torch.tensor([first[r] for r in chunk]), torch.tensor([lengths[r] for r in chunk]), steps
        )
        if len(chunks) == 1:
            inverse = torch.empty(len(chunk), dtype=torch.long)
            inverse[torch.tensor(chunk)] = torch.arange(len(chunk))
            return picked[inverse.to(device)]
        for i, r in enumerate(chunk):
            pieces[r] = picked[i]
    return torch.stack([pieces[r] for r in range(len(feeds))])


def shared_prefix_lengths(sequences: Sequence[Sequence[int]], min_tokens: int = 1) -> list[int]:
    """Per sequence, the length of the longest prefix it shares with another sequence, at most its own
    length minus one (its last token stays to be fed); 0 where that is under ``min_tokens``.

    The longest common prefix of a sequence with any other is the one with a neighbour in sorted order.
    """
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    shared = [0] * len(sequences)
    for a, b in zip(order, order[1:], strict=False):
        common = 0
        for x, y in zip(sequences[a], sequences[b], strict=False):
            if x != y:
                break
            common += 1
        shared[a], shared[b] = max(shared[a], common), max(shared[b], common)
    capped = [min(n, len(s) - 1) for n, s in zip(shared, sequences, strict=True)]
    return [n if n >= min_tokens else 0 for n in capped]


def _growing_cache(rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], width: int, capacity: int):
    """A left-padded cache over ``width`` positions from per-row KV, with room for ``capacity`` positions."""
    from transformers.cache_utils import DynamicCache

    growing = _growing_layer_class()
    cache = DynamicCache()
    cache.layers = [growing(keys, values, capacity) for keys, values in _left_padded_layers(rows, width)]
    return cache


# Per model: each generated prompt's KV over all its tokens but the last, while prefills_kept() is open.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def prefills_kept(model: nn.Module) -> Iterator[None]:
    """While inside, :func:`generate_bucketed` on ``model`` keeps every prompt's prefill (the KV of all its
    tokens but the last) for :func:`kept_prefill`; dropped on exit. ``model``'s weights must not change
    inside (an evaluation: generate, then score the same prompts)."""
    _KEPT[model] = {}
    try:
        yield
    finally:
        _KEPT.pop(model, None)


def kept_prefill(model: nn.Module, tokens: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer ``(keys, values)`` ``[H, len(tokens), D]`` of ``tokens`` under ``model``, cut from a kept
    prefill that starts with them (a position's KV depends only on the tokens up to it); None if none."""
    kept = _KEPT.get(model)
    if not kept or not tokens:
        return None
    key = tuple(tokens)
    n = len(key)
    for stored, layers in kept.items():
        if len(stored) >= n and stored[:n] == key:
            return [(k[:, :n], v[:, :n]) for k, v in layers]
    return None


def cache_from_rows(rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], width: int):
    """A left-padded ``DynamicCache`` over ``width`` positions from per-row ``(keys, values)`` lists."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=_left_padded_layers(rows, width))


def _left_padded_layers(
    rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the rows' keys and values ``[R, H, width, D]``, each row left-padded with zeros (which
    the attention mask hides). Differentiable: gradients reach the rows' tensors."""
    data = []
    for layer in range(len(rows[0])):
        keys = [torch.nn.functional.pad(row[layer][0], (0, 0, width - row[layer][0].shape[-2], 0)) for row in rows]
        values = [torch.nn.functional.pad(row[layer][1], (0, 0, width - row[layer][1].shape[-2], 0)) for row in rows]
        data.append((torch.stack(keys), torch.stack(values)))
    return data


@torch.no_grad()
def generate_bucketed(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    overhead_tokens: int | None = None,
    prefixes: Sequence[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """``model.generate`` over ``prompts`` (token lists), prefilled in length groups: the new tokens
    ``[B, T]`` in the caller's row order (rows padded by ``generate`` after they finish).

    ``generate_kwargs`` go to ``generate`` unchanged (decoding rule, ``max_new_tokens``, stopping
    criteria ...); a stopping criterion sees the rows in length order. ``overhead_tokens``: the cost of
    one more forward in tokens (default: per device type). ``prefixes``: each prompt's KV over all its
    tokens but the last, already computed under these weights (:func:`prefix_kv`; the training step's
    student pass): no prefill runs.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_bucketed needs at least one prompt, none of them empty")
    device = next(model.parameters()).device
    if overhead_tokens is None:
        overhead_tokens = forward_overhead_tokens(device)
    buckets = length_buckets([len(p) for p in prompts], overhead_tokens)
    order = [i for bucket in buckets for i in bucket]
    rows = [list(prompts[i]) for i in order]
    ids, mask = pad_left(rows, pad_id)
    cache = None
    if prefixes is not None:
        if len(prefixes) != len(prompts) or any(
            prefixes[i][0][0].shape[-2] != len(prompts[i]) - 1 for i in range(len(prompts))
        ):
            raise ValueError("prefixes must hold each prompt's KV over all its tokens but the last")
        rows_kv = [prefixes[i] for i in order]
    elif (
        ids.shape[1] > 1
        and min(len(p) for p in prompts) > 1
        and not getattr(model.config, "is_encoder_decoder", False)
    ):
        rows_kv = prefix_kv(model, [row[:-1] for row in rows], pad_id=pad_id, overhead_tokens=overhead_tokens)
    else:
        rows_kv = None
    if rows_kv is not None:
        capacity = ids.shape[1] + int(generate_kwargs.get("max_new_tokens") or 0)
        cache = _growing_cache(rows_kv, ids.shape[1] - 1, capacity)
        kept = _KEPT.get(model)
        if kept is not None:
            for row, layers in zip(rows, rows_kv, strict=True):
                kept[tuple(row[:-1])] = [(k.detach().clone(), v.detach().clone()) for k, v in layers]
    extra = {} if cache is None else {cache_kwarg(): cache}
    generated = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        pad_token_id=pad_id,
        **extra,
        **generate_kwargs,
    )
    new_tokens = generated[:, ids.shape[1] :]
    out = torch.empty_like(new_tokens)
    out[torch.tensor(order, device=new_tokens.device)] = new_tokens
    return out


# Frozen weights' context prefixes across trials: (weights fingerprint, tokens) -> per-layer (keys, values)
# ``[H, len(tokens), D]``. A frozen teacher scores the same demonstration contexts under the same base
# weights in every trial of a process (SDFT, then each UniSD subset without EMA): their KV is computed once.
_CONTEXT_PREFIXES: dict[tuple[str, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = {}
_CONTEXT_PREFIX_BUDGET_BYTES = 1 << 30
_context_prefix_bytes = 0


def context_prefix(fingerprint: str, tokens: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The kept KV of ``tokens`` under the weights of ``fingerprint``; None if not kept."""
    return _CONTEXT_PREFIXES.get((fingerprint, tuple(tokens)))


def keep_context_prefix(
    fingerprint: str, tokens: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]]
) -> bool:
    """Keep ``layers`` (cloned) for :func:`context_prefix` while the process's budget (1 GiB) allows."""
    global _context_prefix_bytes
    key = (fingerprint, tuple(tokens))
    if key in _CONTEXT_PREFIXES:
        return True
    size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    if _context_prefix_bytes + size > _CONTEXT_PREFIX_BUDGET_BYTES:
        return False
    _CONTEXT_PREFIXES[key] = [(k.clone(), v.clone()) for k, v in layers]
    _context_prefix_bytes += size
    return True
