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


def _brute_force(lengths, overhead, max_rows=None, max_tokens=None):
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
        if max_tokens is not None and any(
            len(g) > 1 and len(g) * max(lengths[i] for i in g) > max_tokens for g in groups
        ):
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
    max_tokens = rng.choice([None, 250, 600])
    groups = length_buckets(lengths, overhead, max_rows, max_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # consecutive sorted runs, shortest first
    assert max_rows is None or max(len(g) for g in groups) <= max_rows
    assert max_tokens is None or all(
        len(g) == 1 or len(g) * max(lengths[i] for i in g) <= max_tokens for g in groups
    )
    assert _cost(lengths, groups, overhead) == _brute_force(lengths, overhead, max_rows, max_tokens)


def test_length_buckets_by_hand():
    assert length_buckets([100, 10, 11, 101], overhead_tokens=20) == [[1, 2], [0, 3]]
    assert length_buckets([100, 10, 11, 101], overhead_tokens=500) == [[1, 2, 0, 3]]  # one forward is cheaper
    # at most 250 tokens a forward: three rows at width 100 do not fit; at most 200: nor do two at 101
    assert length_buckets([100, 10, 11, 101], 500, max_tokens=250) == [[1, 2], [0, 3]]
    assert length_buckets([100, 10, 11, 101], 500, max_tokens=200) == [[1, 2], [0], [3]]
    assert length_buckets([300, 10], 500, max_tokens=250) == [[1], [0]]


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


def test_row_hidden_runs_rows_in_cheapest_length_groups(tiny_model_and_tokenizer, monkeypatch):
    # The training step's scoring pass (SFT's student, unshared teacher contexts) groups rows of similar
    # length, at most _TOKEN_BUDGET tokens a forward: each row's states are those of its own forward, and
    # the decoder computes the tokens length_buckets chose (fewer than a budget-greedy split).
    from unisd_components import step as step_module
    from unisd_components.config import TrainingConfig, VariantConfig
    from unisd_components.scoring import completion_hidden, decoder_and_head
    from unisd_components.step import PhaseTimer, StepRunner, _Rows

    model, tok = tiny_model_and_tokenizer
    model = model.double().eval()
    monkeypatch.setitem(step_module._TOKEN_BUDGET, "cpu", 400)
    rng = random.Random(0)
    lengths_ctx = [10, 90, 12, 95, 11, 40, 88, 13]
    contexts = [[rng.randint(3, 200) for _ in range(n)] for n in lengths_ctx]
    completion = torch.tensor([[rng.randint(3, 200) for _ in range(5)] for _ in contexts])
    lengths = [5, 3, 5, 1, 4, 5, 2, 5]
    runner = StepRunner(
        model, tok, VariantConfig(), TrainingConfig(batch_size=8), [], None, None, PhaseTimer(torch.device("cpu")), 0
    )
    decoder, _ = decoder_and_head(model)
    fed = []
    hook = decoder.register_forward_pre_hook(lambda m, a, k: fed.append(k["input_ids"].numel()), with_kwargs=True)
    with torch.no_grad():
        hidden = runner._row_hidden(model, _Rows(contexts, list(range(8))), completion, lengths)
        hook.remove()
        for r, context in enumerate(contexts):
            ids = torch.tensor([context + completion[r, : lengths[r]].tolist()])
            alone = completion_hidden(model, ids, torch.ones_like(ids), 5, torch.tensor([lengths[r]]))
            torch.testing.assert_close(hidden[r], alone[0], rtol=1e-9, atol=1e-10)
    rows = [c + completion[r, : lengths[r]].tolist() for r, c in enumerate(contexts)]
    groups = length_buckets([len(r) for r in rows], 96, max_tokens=400)
    assert fed == [len(g) * (max(len(rows[i]) for i in g) - 1) for g in groups]
    assert sum(fed) == 448  # the old budget-greedy split: 5 rows x 44 (up to the 45-wide one), 3 x 95 = 505
