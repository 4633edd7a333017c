"""Bucketed prefill (unisd_components.prefill): optimal length groups, and the same generations as one
left-padded ``generate``."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from unisd_components.generation import greedy_kwargs
from unisd_components.prefill import generate_bucketed, length_buckets, plain_cache_layers
from unisd_components.scoring import pad_left


def _cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def _brute_force(lengths, overhead, max_rows=None):
    """Every split of the sorted rows into consecutive groups."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for cut, i in zip(cuts, order[1:], strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        if max_rows is not None and max(len(g) for g in groups) > max_rows:
            continue
        cost = _cost(lengths, groups, overhead)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_length_buckets_are_the_cheapest_split(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 9))]
    overhead = rng.choice([0, 16, 96, 1000])
    max_rows = rng.choice([None, 1, 2, 3])
    groups = length_buckets(lengths, overhead, max_rows)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # consecutive sorted runs, shortest first
    assert max_rows is None or max(len(g) for g in groups) <= max_rows
    assert _cost(lengths, groups, overhead) == _brute_force(lengths, overhead, max_rows)


def test_length_buckets_by_hand():
    assert length_buckets([100, 10, 11, 101], overhead_tokens=20) == [[1, 2], [0, 3]]
    assert length_buckets([100, 10, 11, 101], overhead_tokens=500) == [[1, 2, 0, 3]]  # one forward is cheaper


def test_bucketed_generation_equals_one_padded_generate(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model.eval()
    rng = random.Random(0)
    prompts = [[rng.randint(3, 200) for _ in range(n)] for n in (1, 23, 4, 40, 5, 2, 41)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    assert len(length_buckets([len(p) for p in prompts], 0)) > 2  # really several prefills
    ids, mask = pad_left(prompts, pad)
    with torch.no_grad():
        plain = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=pad, **greedy_kwargs()
        )[:, ids.shape[1] :]
    bucketed = generate_bucketed(model, prompts, pad_id=pad, overhead_tokens=0, max_new_tokens=10, **greedy_kwargs())
    assert torch.equal(bucketed, plain)


def test_bucketed_generation_refuses_empty_prompts(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="empty"):
        generate_bucketed(model, [[1, 2], []], pad_id=0, max_new_tokens=2)


def test_caches_that_are_not_plain_keep_one_padded_prefill():
    keys = torch.zeros(1, 2, 3, 4)
    plain = DynamicCache(ddp_cache_data=[(keys, keys), (keys, keys)])
    assert all(type(layer) is DynamicLayer for layer in plain.layers)
    assert plain_cache_layers(plain) is not None
    sliding = DynamicCache(ddp_cache_data=[(keys, keys), (keys, keys, torch.tensor(2))])
    assert isinstance(sliding.layers[1], DynamicSlidingWindowLayer)
    assert plain_cache_layers(sliding) is None


def test_growing_cache_layer_writes_in_place_and_grows():
    from unisd_components.prefill import _growing_layer_class

    keys = torch.randn(2, 3, 4, 5)
    values = torch.randn(2, 3, 4, 5)
    layer = _growing_layer_class()(keys, values, capacity=6)
    storage = layer.keys.data_ptr()
    step = torch.randn(2, 3, 1, 5)
    k, v = layer.update(step, step + 1)
    assert k.data_ptr() == storage  # no copy of the cache for a decoding step
    torch.testing.assert_close(k, torch.cat([keys, step], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([values, step + 1], dim=-2), rtol=0, atol=0)
    more = torch.randn(2, 3, 3, 5)
    k, _ = layer.update(more, more)  # past the room: grows, keeps everything
    torch.testing.assert_close(k, torch.cat([keys, step, more], dim=-2), rtol=0, atol=0)
    assert layer.get_seq_length() == 8
